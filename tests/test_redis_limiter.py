"""RedisLimiter against a real redis-server: shared pacing, shared 429s, losing Redis.

Redis comes from BATCHER_TEST_REDIS_URL (CI: `source .ci/redis.sh start`) or is started here on a
free loopback port; the tests that kill Redis always start their own. Several RedisLimiter
instances in one event loop stand for several `batcher run` processes. Time bounds are only
lower bounds (a limiter can never be faster than its rate) or generous hang guards.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_server import RedisServer, SharedRedis, free_port, redis_binary

from batcher.admission import LocalLimiter, Policy
from batcher.admission.redis_backend import FEEDBACK_LUA, RESERVE_LUA, RedisLimiter, redact_url
from batcher.errors import LimiterError

MODEL = "gpt-4o-mini"
HEADROOM = 0.985
HANG_GUARD_S = 30.0  # only stops a broken limiter from hanging the suite
DEFAULTS = Policy(1, 1)
DEFAULT_TOLERANCE_S = DEFAULTS.tolerance_s
WINDOW_MARGIN = DEFAULTS.window_margin  # our windows are this fraction longer
IDLE_TTL_S = DEFAULTS.idle_ttl_s


def windows(*lengths: float) -> dict[str, tuple[float, ...]]:
    """Knobs: caps and header readings over these windows only."""
    return {
        "request_windows_s": lengths,
        "token_windows_s": lengths,
        "header_windows_s": lengths,
        "ramp_header_windows_s": (),
    }


def slot_s(lim: RedisLimiter) -> float:
    """The slot (server time, s) of the limiter's last reservation of MODEL."""
    return lim.last_reply[MODEL].at / 1e6


def fixed(rpm: int, tpm: int) -> Callable[[str], tuple[int, int]]:
    return lambda model: (rpm, tpm)


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[SharedRedis]:
    shared = SharedRedis()
    yield shared
    shared.close()


@pytest.fixture
def redis_url(shared_redis: SharedRedis) -> str:
    if shared_redis.url is None:
        pytest.skip(shared_redis.skip_reason)
    return shared_redis.url


@pytest.fixture
def workspace() -> str:
    # Each test its own workspace: tests sharing one Redis never see each other's schedules.
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server this test may kill."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def make_redis(redis_url: str, workspace: str) -> AsyncIterator[Callable[..., Any]]:
    """Started RedisLimiters on the shared Redis and test workspace; closed afterwards."""
    made: list[RedisLimiter] = []

    async def make(limits: Callable[[str], tuple[int, int]], **kw: Any) -> RedisLimiter:
        kw.setdefault("headroom", HEADROOM)
        kw.setdefault("aimd_strike_requests", 0)  # every 429 cuts, as these tests expect
        lim = RedisLimiter(redis_url, workspace, limits, **kw)
        await lim.start()
        made.append(lim)
        return lim

    yield make
    for lim in made:
        await lim.aclose()


async def server_time(url: str) -> float:
    client = aioredis.Redis.from_url(url)
    try:
        sec, usec = await client.time()
    finally:
        await client.aclose()
    return sec + usec / 1e6


def max_in_window(times: list[float], window_s: float) -> int:
    """Most admissions in any window (t - window_s, t], counted in whole µs as Redis does."""
    us = sorted(round(t * 1e6) for t in times)  # epoch seconds as floats blur the last µs
    width = round(window_s * 1e6)
    best, lo = 0, 0
    for hi, t in enumerate(us):
        while us[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# -- pure pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://me:s3cret@cache:6379/0", "redis://me:***@cache:6379/0"),
        ("rediss://me:s3cret@cache/1", "rediss://me:***@cache/1"),
    ],
)
def test_redact_url_hides_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_both_scripts_take_time_from_the_redis_server() -> None:
    # Skewed machine clocks cannot disagree about a schedule they never read.
    for script in (RESERVE_LUA, FEEDBACK_LUA):
        assert "redis.call('TIME')" in script


def test_bad_arguments_are_refused_at_construction() -> None:
    with pytest.raises(ValueError):
        RedisLimiter("redis://127.0.0.1:1/0", "ws", fixed(1, 1), headroom=1.5)
    with pytest.raises(ValueError):
        RedisLimiter("redis://127.0.0.1:1/0", "ws", fixed(1, 1), local_share=0)
    with pytest.raises(ValueError):
        RedisLimiter("redis://127.0.0.1:1/0", "ws", fixed(1, 1), on_failure="retry")  # type: ignore[arg-type]


# -- several processes, one schedule --------------------------------------------------------


async def test_concurrent_processes_share_the_limit_fairly(
    make_redis: Callable[..., Any], redis_url: str
) -> None:
    rpm, processes, workers, run_s = 6000, 4, 2, 3.0
    # A 1 s window (the server's shortest) so the window cap binds within a short test.
    lims = [await make_redis(fixed(rpm, 10_000_000), **windows(1.0)) for _ in range(processes)]
    start = await server_time(redis_url)
    admitted: list[tuple[float, int]] = []

    async def worker(i: int) -> None:
        lim = lims[i]
        while True:
            await lim.acquire(MODEL, 10)
            at = slot_s(lim)  # no await since: this call's slot
            if at >= start + run_s:
                return
            admitted.append((at, i))

    tasks = [worker(i) for i in range(processes) for _ in range(workers)]
    await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S)

    rate = rpm / 60 * HEADROOM  # per second
    times = [t for t, _ in admitted]
    # The window cap: no 1 s window (plus margin) holds more than the limit's second.
    assert max_in_window(times, 1.0 * (1 + WINDOW_MARGIN)) <= rpm / 60
    # The pacing: any window of length T holds at most rate * (T + tolerance) + 1.
    for window in (0.1, 0.5, 2.0):
        assert max_in_window(times, window) <= rate * (window + DEFAULT_TOLERANCE_S) + 1
    assert len(times) <= rate * (run_s + DEFAULT_TOLERANCE_S) + 1
    # The schedule was kept busy (loose: a stalled machine may leave slots unclaimed).
    assert len(times) >= int(rate * run_s * 0.5)
    # Every process got its turn: one reservation outstanding each makes slots interleave.
    per_process = Counter(i for _, i in admitted)
    fair = len(admitted) / processes
    assert all(per_process[i] >= 0.5 * fair for i in range(processes)), per_process
    # One round trip per admission (plus the few slots past the end of the run).
    for lim in lims:
        snap = lim.snapshot()[MODEL]
        assert snap.backend == "redis"
        assert snap.redis_round_trips <= per_process[lims.index(lim)] + workers
        assert lim.round_trips == snap.redis_round_trips + 3  # ping + 2 script loads


async def test_admission_times_come_from_the_server_clock_not_the_local_one(
    make_redis: Callable[..., Any], redis_url: str
) -> None:
    # Two "machines" an hour apart on their own clocks still share one smooth schedule.
    limits = fixed(3000, 10_000_000)
    ahead = await make_redis(limits, clock=lambda: time.monotonic() + 3600, tolerance_s=0)
    behind = await make_redis(limits, clock=lambda: time.monotonic() - 3600, tolerance_s=0)
    before = await server_time(redis_url)
    slots: list[float] = []
    waits: list[float] = []

    async def run(lim: RedisLimiter) -> None:
        for _ in range(15):
            waits.append((await lim.acquire(MODEL, 1)).waited_s)
            slots.append(slot_s(lim))

    await asyncio.wait_for(asyncio.gather(run(ahead), run(behind)), HANG_GUARD_S)
    after = await server_time(redis_url)
    rate = 3000 / 60 * HEADROOM
    assert all(before <= s <= after for s in slots)
    gaps = [b - a for a, b in zip(sorted(slots), sorted(slots)[1:], strict=False)]
    assert min(gaps) >= 1 / rate - 2e-6
    assert max(waits) < 60  # a local clock in the schedule would have meant an hour
    for lim in (ahead, behind):
        assert lim.snapshot()[MODEL].paused_until_s == 0.0


async def test_a_429_in_one_process_pauses_and_slows_the_others(
    make_redis: Callable[..., Any],
) -> None:
    a = await make_redis(fixed(600, 1_000_000))
    b = await make_redis(fixed(600, 1_000_000))
    await a.acquire(MODEL, 10)
    await b.acquire(MODEL, 10)
    a.feedback(MODEL, status=429, headers={"retry-after": "1"})
    await a.drain_feedback()
    waited = (await asyncio.wait_for(b.acquire(MODEL, 10), HANG_GUARD_S)).waited_s
    res = b.last_reply[MODEL]
    # b saw a's pause and its shrunken multiplier without being told anything locally.
    assert res.pause > res.now
    assert res.at >= res.pause
    assert waited >= (res.at - res.now) / 1e6 - 0.01
    assert res.multiplier == pytest.approx(0.85, abs=0.01)
    snap = b.snapshot()[MODEL]
    assert snap.multiplier == pytest.approx(0.85, abs=0.01)
    assert snap.effective_rpm == pytest.approx(600 * HEADROOM * 0.85, rel=0.02)
    assert snap.decreases_429 == 1 and snap.slowdown_reasons()


async def test_429s_within_the_cooldown_decrease_the_shared_multiplier_once(
    make_redis: Callable[..., Any],
) -> None:
    lims = [await make_redis(fixed(600, 1_000_000)) for _ in range(3)]
    for lim in lims:  # a burst of 429s across processes: one answer to one overload
        lim.feedback(MODEL, status=429, headers={"retry-after-ms": "10"})
    for lim in lims:
        await lim.drain_feedback()
    await lims[0].acquire(MODEL, 1)
    assert lims[0].last_reply[MODEL].multiplier == pytest.approx(0.85, abs=0.01)


async def test_a_non_adaptive_process_pauses_but_keeps_its_full_rate(
    make_redis: Callable[..., Any],
) -> None:
    lim = await make_redis(fixed(600, 1_000_000), adaptive=False)
    lim.feedback(MODEL, status=429, headers={"retry-after-ms": "50"})
    await lim.acquire(MODEL, 1)
    res = lim.last_reply[MODEL]
    assert res.multiplier == 1.0
    assert res.at >= res.pause > 0


async def test_own_429_during_a_wait_voids_the_slot(make_redis: Callable[..., Any]) -> None:
    lim = await make_redis(fixed(120, 1_000_000), tolerance_s=0)  # one slot per ~0.5 s
    await lim.acquire(MODEL, 1)
    waiting = asyncio.create_task(lim.acquire(MODEL, 1))  # sleeps toward its slot
    while lim.snapshot()[MODEL].redis_round_trips < 2:  # until it holds the slot
        await asyncio.sleep(0.005)
    lim.feedback(MODEL, status=429, headers={"retry-after": "0.8"})
    await asyncio.wait_for(waiting, HANG_GUARD_S)
    res = lim.last_reply[MODEL]
    assert res.at >= res.pause > 0
    assert lim.snapshot()[MODEL].redis_round_trips == 4  # 2 slots, 1 retaken, 1 feedback


async def test_state_lives_under_the_workspace_key_and_expires(
    make_redis: Callable[..., Any], redis_url: str, workspace: str
) -> None:
    lim = await make_redis(fixed(600, 60_000))
    await lim.acquire(MODEL, 100)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        key = f"batcher:{workspace}:{MODEL}"
        state = await client.hgetall(f"{key}:pace")
        entries = await client.zrange(f"{key}:log", 0, -1)
        ttls = [await client.pttl(f"{key}:{part}") for part in ("pace", "log")]
    finally:
        await client.aclose()
    assert {"rtat", "ttat", "last"} <= set(state)
    # running token total, sequence number, cost: zero-padded, so rank order is log order
    assert entries == ["0000000000000100:000000000001:100"]
    assert all(0 < ttl <= (IDLE_TTL_S + 120) * 1000 for ttl in ttls)


async def test_a_flushed_script_cache_is_reloaded(
    make_redis: Callable[..., Any], redis_url: str
) -> None:
    lim = await make_redis(fixed(6000, 10_000_000))
    await lim.acquire(MODEL, 1)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    await lim.acquire(MODEL, 1)  # NOSCRIPT -> SCRIPT LOAD -> EVALSHA
    assert lim.snapshot()[MODEL].redis_round_trips == 4


# -- losing Redis ---------------------------------------------------------------------------


async def test_unreachable_redis_at_start_names_the_url_without_its_password() -> None:
    port = free_port()  # nothing listens here
    lim = RedisLimiter(f"redis://:hunter2@127.0.0.1:{port}/0", "ws", fixed(500, 60_000))
    with pytest.raises(LimiterError) as info:
        await asyncio.wait_for(lim.start(), HANG_GUARD_S)
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg
    assert "hunter2" not in msg
    assert "limiter.url" in msg  # says what to do
    assert "hunter2" not in repr(info.value.__cause__)


async def test_not_a_redis_url_is_a_limiter_error() -> None:
    lim = RedisLimiter("http://:pw@example.invalid/", "ws", fixed(500, 60_000))
    with pytest.raises(LimiterError, match=r"limiter\.url") as info:
        await lim.start()
    assert "pw@" not in str(info.value)


async def test_redis_lost_mid_run_stops_with_a_limiter_error(own_redis: RedisServer) -> None:
    lim = RedisLimiter(own_redis.url, "ws", fixed(6000, 10_000_000), on_failure="stop")
    await lim.start()
    try:
        await lim.acquire(MODEL, 1)
        own_redis.kill()
        with pytest.raises(LimiterError) as info:
            await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
        assert own_redis.url in str(info.value)
        assert "on_limiter_failure" in str(info.value)
    finally:
        await asyncio.wait_for(lim.aclose(), HANG_GUARD_S)


async def test_a_redis_that_stops_answering_is_noticed_within_the_socket_timeout(
    own_redis: RedisServer,
) -> None:
    lim = RedisLimiter(own_redis.url, "ws", fixed(6000, 10_000_000), on_failure="stop")
    await lim.start()
    try:
        await lim.acquire(MODEL, 1)
        own_redis.freeze()  # the connection stays up; the answer never comes
        with pytest.raises(LimiterError, match="mid-run"):
            await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
    finally:
        own_redis.thaw()
        await asyncio.wait_for(lim.aclose(), HANG_GUARD_S)


async def test_a_redis_that_refuses_the_script_is_a_limiter_error_even_with_local_fallback(
    own_redis: RedisServer,
) -> None:
    # Redis answers but says no (here: an ACL without EVALSHA): no fallback may hide that.
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        await admin.acl_setuser(
            "limited", enabled=True, passwords=["+s3cr3t-pw"], keys=["*"],
            commands=["+@all", "-evalsha"],
        )  # fmt: skip
    finally:
        await admin.aclose()
    url = own_redis.url.replace("redis://", "redis://limited:s3cr3t-pw@")
    lim = RedisLimiter(url, "ws", fixed(6000, 10_000_000), on_failure="local")
    await lim.start()
    try:
        with pytest.raises(LimiterError, match="refused") as info:
            await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
        assert "s3cr3t-pw" not in str(info.value)
        assert lim.snapshot()[MODEL].fallback is None
    finally:
        await asyncio.wait_for(lim.aclose(), HANG_GUARD_S)


async def test_feedback_that_cannot_reach_redis_stops_the_next_acquire(
    own_redis: RedisServer,
) -> None:
    lim = RedisLimiter(own_redis.url, "ws", fixed(6000, 10_000_000), on_failure="stop")
    await lim.start()
    try:
        await lim.acquire(MODEL, 1)
        own_redis.kill()
        lim.feedback(MODEL, status=429, headers={})  # cannot raise: it is a plain call
        with pytest.raises(LimiterError):
            await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
    finally:
        await asyncio.wait_for(lim.aclose(), HANG_GUARD_S)


async def test_redis_lost_mid_run_goes_local_at_the_reduced_share(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    rpm = 1200
    lim = RedisLimiter(
        own_redis.url,
        "ws",
        fixed(rpm, 10_000_000),
        on_failure="local",
        local_share=0.25,
        tolerance_s=0,  # strictly paced, so the local rate shows in the elapsed time
    )
    await lim.start()
    try:
        await lim.acquire(MODEL, 1)
        own_redis.kill()
        with caplog.at_level(logging.WARNING, logger="batcher"):
            began = time.monotonic()
            for _ in range(6):
                await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
            elapsed = time.monotonic() - began
            lim.feedback(MODEL, status=200, headers={})
        warnings = [r for r in caplog.records if "LOST" in r.getMessage()]
        assert len(warnings) == 1  # loud, but once
        assert own_redis.url in warnings[0].getMessage()
        # 6 admissions at a quarter of the limit: at least 5 local intervals.
        assert elapsed >= 5 / (rpm * 0.25 / 60 * HEADROOM) - 0.05
        snap = lim.snapshot()[MODEL]
        assert snap.fallback == "local"
        assert snap.rpm == rpm
        assert snap.effective_rpm <= rpm * 0.25
    finally:
        await asyncio.wait_for(lim.aclose(), HANG_GUARD_S)


# -- what both backends share ------------------------------------------------------------------


@pytest.fixture(params=["local", "redis"])
async def limiter_backend(
    request: pytest.FixtureRequest, shared_redis: SharedRedis, workspace: str
) -> AsyncIterator[Callable[..., Any]]:
    """A factory for started limiters of either backend, closed afterwards."""
    if request.param == "redis" and shared_redis.url is None:
        pytest.skip(shared_redis.skip_reason)
    made: list[Any] = []

    async def make(limits: Callable[[str], tuple[int, int]], **kw: Any) -> Any:
        kw.setdefault("headroom", HEADROOM)
        kw.setdefault("aimd_strike_requests", 0)  # every 429 cuts, as these tests expect
        lim: LocalLimiter | RedisLimiter
        if request.param == "local":
            lim = LocalLimiter(limits, **kw)
        else:
            lim = RedisLimiter(shared_redis.url or "", workspace, limits, **kw)
        await lim.start()
        made.append(lim)
        return lim

    yield make
    for lim in made:
        await lim.aclose()


async def settle(lim: Any) -> None:
    """Let feedback reach the shared state (Redis sends it from a task)."""
    drain = getattr(lim, "drain_feedback", None)
    if drain is not None:
        await drain()


async def test_cost_above_the_token_limit_is_refused_at_once(
    limiter_backend: Callable[..., Any],
) -> None:
    lim = await limiter_backend(fixed(500, 1000))
    with pytest.raises(ValueError):
        await asyncio.wait_for(lim.acquire(MODEL, 1001), 1.0)


async def test_requests_are_spaced_evenly_from_the_first(
    limiter_backend: Callable[..., Any],
) -> None:
    rpm, n = 3000, 12
    lim = await limiter_backend(fixed(rpm, 10_000_000), tolerance_s=0)
    began = time.monotonic()
    first = (await lim.acquire(MODEL, 1)).waited_s
    for _ in range(n - 1):
        await lim.acquire(MODEL, 1)
    elapsed = time.monotonic() - began
    assert first < 2.0  # an idle schedule admits at once
    assert elapsed >= (n - 1) / (rpm / 60 * HEADROOM) - 0.01  # tolerance 0: no burst


async def test_the_token_schedule_governs_large_requests(
    limiter_backend: Callable[..., Any],
) -> None:
    tpm, cost, n = 120_000, 1000, 4  # ~0.51 s of token budget per request
    lim = await limiter_backend(fixed(10_000, tpm), tolerance_s=0)
    began = time.monotonic()
    for _ in range(n):
        await asyncio.wait_for(lim.acquire(MODEL, cost), HANG_GUARD_S)
    assert time.monotonic() - began >= (n - 1) * cost / (tpm / 60 * HEADROOM) - 0.01


async def test_a_429_pauses_for_retry_after_and_shrinks_the_multiplier(
    limiter_backend: Callable[..., Any],
) -> None:
    lim = await limiter_backend(fixed(600, 60_000))
    await lim.acquire(MODEL, 10)
    before = time.monotonic()  # the pause starts after this, so it ends >= 0.6 s after it
    lim.feedback(MODEL, status=429, headers={"retry-after": "0.6"})
    await settle(lim)
    await asyncio.wait_for(lim.acquire(MODEL, 10), HANG_GUARD_S)
    assert time.monotonic() - before >= 0.6 - 0.005
    snap = lim.snapshot()[MODEL]
    assert snap.multiplier == pytest.approx(0.85, abs=0.01)
    lim.feedback(MODEL, status=429, headers={"retry-after-ms": "1"})  # within the cooldown
    await settle(lim)
    await lim.acquire(MODEL, 10)
    assert lim.snapshot()[MODEL].multiplier == pytest.approx(0.85, abs=0.01)


async def test_sending_resumes_paced_after_a_pause(limiter_backend: Callable[..., Any]) -> None:
    # A 1 s tolerance would let ~10 go at once when the pause ends; paced, 6 need 5 intervals.
    rpm, n = 600, 6
    lim = await limiter_backend(fixed(rpm, 10_000_000), adaptive=False)
    await lim.acquire(MODEL, 1)
    lim.feedback(MODEL, status=429, headers={"retry-after-ms": "300"})
    await settle(lim)
    first = await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)  # the pause has ended
    for _ in range(n - 1):
        last = await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
    # The slots on the schedule's own clock: a late wake-up of this task on a loaded machine
    # (the wall clock read after the first acquire) cannot shrink them.
    assert (last.at_us - first.at_us) / 1e6 >= (n - 1) / (rpm / 60 * HEADROOM) - 0.01


async def test_snapshot_reports_the_common_keys(limiter_backend: Callable[..., Any]) -> None:
    lim = await limiter_backend(fixed(500, 60_000))
    await lim.acquire(MODEL, 10)
    lim.feedback(MODEL, status=429, headers={"retry-after": "5"})
    await settle(lim)
    snap = lim.snapshot()[MODEL]
    assert (snap.rpm, snap.tpm) == (500, 60_000)
    assert 0.0 < snap.paused_until_s <= 5.0
    assert snap.backend in ("local", "redis")
    assert snap.decreases_429 == 1 and snap.share_reductions == 0


async def test_the_tolerance_allows_a_burst_then_paces(limiter_backend: Callable[..., Any]) -> None:
    rpm, tolerance, n = 600, 0.5, 10  # 9.85/s: ~5 at once, then one per ~0.1 s
    lim = await limiter_backend(fixed(rpm, 10_000_000), tolerance_s=tolerance)
    began = time.monotonic()
    for _ in range(n):
        await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
    assert time.monotonic() - began >= (n - 1) / (rpm / 60 * HEADROOM) - tolerance - 0.01


async def test_a_window_caps_what_the_tolerance_would_let_through(
    limiter_backend: Callable[..., Any],
) -> None:
    # 6000 RPM in a 0.5 s window: 50 requests per 0.5 s (+ margin), though pacing with a 1 s
    # tolerance could let ~99 go at once. 120 requests need three windows' worth of time.
    lim = await limiter_backend(fixed(6000, 10_000_000), **windows(0.5))
    began = time.monotonic()
    for _ in range(120):
        await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
    assert time.monotonic() - began >= 2 * 0.5 * (1 + WINDOW_MARGIN) - 0.01


NEAR_LIMIT = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "400ms"}


async def test_near_limit_headers_reveal_the_share_others_leave_us(
    limiter_backend: Callable[..., Any],
) -> None:
    # Budget 2 requests per 1 s window. After one request, "0 remaining" means others hold the
    # other: half the quota is ours, and the window caps follow (the next request waits for
    # the first to leave our 1.005 s window). After two, our own sending explains it: all ours.
    lim = await limiter_backend(fixed(120, 10_000_000), **windows(1.0))
    await lim.acquire(MODEL, 1)
    before = time.monotonic()
    lim.feedback(MODEL, status=200, headers=NEAR_LIMIT)
    await settle(lim)
    await asyncio.wait_for(lim.acquire(MODEL, 1), HANG_GUARD_S)
    assert time.monotonic() - before >= 1.0
    assert lim.snapshot()[MODEL].multiplier == pytest.approx(0.5, abs=0.02)

    other = await limiter_backend(fixed(120, 10_000_000), **windows(1.0))
    await other.acquire("gpt-4o", 1)
    await other.acquire("gpt-4o", 1)
    other.feedback("gpt-4o", status=200, headers=NEAR_LIMIT)
    await settle(other)
    await asyncio.wait_for(other.acquire("gpt-4o", 1), HANG_GUARD_S)
    assert other.snapshot()["gpt-4o"].multiplier == 1.0


async def test_remaining_headers_on_every_answer_set_the_share_not_aimd(
    limiter_backend: Callable[..., Any],
) -> None:
    # 600 RPM: a 10 s window holds 100 requests. Others hold 40 of them: 60 % is ours, however
    # often it is said (no compounding), and a 429 with the header cuts no further.
    lim = await limiter_backend(fixed(600, 10_000_000), **windows(10.0))
    for _ in range(10):
        await lim.acquire(MODEL, 1)
    for _ in range(3):
        lim.feedback(MODEL, status=200, headers={"x-ratelimit-remaining-requests": "50"})
        await settle(lim)
    await lim.acquire(MODEL, 1)
    assert lim.snapshot()[MODEL].multiplier == pytest.approx(0.6, abs=0.02)
    lim.feedback(
        MODEL, status=429, headers={"retry-after-ms": "1", "x-ratelimit-remaining-requests": "49"}
    )
    await settle(lim)
    await lim.acquire(MODEL, 1)
    assert lim.snapshot()[MODEL].multiplier == pytest.approx(0.6, abs=0.02)


async def test_packing_passes_a_head_over_a_bounded_number_of_times(
    limiter_backend: Callable[..., Any],
) -> None:
    """A 1 s window of 1,000 tokens, full; a 500 waits for it to empty, a 600 and eight 450s
    queue behind: two 450s fill a window better than the 600 with anything, so the packing
    hands them the 600's slots, at most `lookahead_passes` (2) times: the head counts them in
    both backends (uncounted, the 600 went last). Real time (Redis's clock): ~1 s between
    decisions, and only the order is checked."""
    lim = await limiter_backend(
        fixed(60_000, 60_000),
        headroom=1.0,
        window_margin=0.0,
        token_windows_s=(60.0, 1.0),
        lookahead_passes=2,
    )
    await lim.acquire(MODEL, 1)
    await asyncio.sleep(1.0)  # a second of pacing credit
    await lim.acquire(MODEL, 999)
    order: list[int] = []

    async def one(i: int, cost: int) -> None:
        await lim.acquire(MODEL, cost)
        order.append(i)

    blocker = asyncio.ensure_future(lim.acquire(MODEL, 500))  # in line first: the head
    costs = [600] + [450] * 8
    await asyncio.wait_for(asyncio.gather(blocker, *(one(i, c) for i, c in enumerate(costs))), 20)
    assert 1 <= order.index(0) <= 3  # passed over (a fill, a pack), then its own slot


async def test_the_head_hands_a_window_s_room_to_a_smaller_waiter(
    limiter_backend: Callable[..., Any],
) -> None:
    """A 1 s window of 1,000 tokens holds 400 + 400 (0.5 s apart): a 450 waits for the first
    to leave, 300, 250 and 150 queue behind it; then the 300 waits 0.5 s more and the 150
    takes the room it leaves (the 250 would delay it). The schedule runs on Redis's clock, so
    this one is in real time: the four queue within microseconds, and 0.5 s separates every
    decision (the order is what is checked, never a time)."""
    lim = await limiter_backend(
        fixed(6_000, 60_000), headroom=1.0, window_margin=0.0, token_windows_s=(60.0, 1.0)
    )
    await lim.acquire(MODEL, 1)
    await asyncio.sleep(1.0)  # a second of pacing credit
    await lim.acquire(MODEL, 400)
    await asyncio.sleep(0.5)
    await lim.acquire(MODEL, 400)
    order: list[int] = []

    async def one(cost: int) -> None:
        await lim.acquire(MODEL, cost)
        order.append(cost)

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in (450, 300, 250, 150))), 10.0)
    assert order == [450, 150, 300, 250]
