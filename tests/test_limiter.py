"""The limiter: pure pacing and windows with a fake clock; the async wrapper on virtual time."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import random
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

from batcher.limiter import (
    AIMD_BETA,
    DEFAULT_PAUSE_S,
    Adaptive,
    FeedbackSignal,
    LocalLimiter,
    ModelSchedule,
    Pace,
    Share,
    SlidingWindow,
    parse_duration,
    read_feedback,
    revealed_share,
)

LANGDOCK = (500, 60_000)
TEN_X = (5_000, 600_000)

# -- pure pacing: saturated demand against a strict sliding-window server ------------------------


def saturate(
    sched: ModelSchedule, costs: tuple[int, int], seconds: float, seed: int = 1
) -> list[tuple[float, int]]:
    """Send as fast as the schedule allows for `seconds`; the (time, cost) of every send."""
    rng = random.Random(seed)
    now, sends = 0.0, []
    cost = rng.randint(*costs)
    while True:
        wait = sched.delay(cost, now)
        if wait > 0:
            now += wait
            continue
        if now >= seconds:
            return sends
        sched.commit(cost, now)
        sends.append((now, cost))
        cost = rng.randint(*costs)


def worst_window(sends: list[tuple[float, int]], length: float, tokens: bool) -> float:
    """Most requests (or tokens) any window (t - length, t] ending at a send ever held."""
    times = [t for t, _ in sends]
    prefix = [0]
    for _, c in sends:
        prefix.append(prefix[-1] + (c if tokens else 1))
    return max(
        prefix[k + 1] - prefix[bisect.bisect_right(times, t - length)] for k, t in enumerate(times)
    )


@pytest.mark.parametrize("limits", [LANGDOCK, TEN_X], ids=["langdock", "10x"])
@pytest.mark.parametrize(
    ("costs", "bound"),
    [((150, 400), "tpm"), ((50, 100), "rpm"), ((50, 400), "tpm")],
    ids=["tpm-bound", "rpm-bound", "mixed"],
)
@pytest.mark.parametrize("seed", [1, 2])
def test_saturated_pacing_stays_within_every_window(
    limits: tuple[int, int], costs: tuple[int, int], bound: str, seed: int
) -> None:
    rpm, tpm = limits
    seconds = 120.0
    sends = saturate(ModelSchedule(rpm, tpm), costs, seconds, seed)
    assert sends[0][0] == 0.0  # the first request goes at once
    for length in (60.0, 10.0):
        assert worst_window(sends, length, tokens=False) <= rpm * length / 60
        assert worst_window(sends, length, tokens=True) <= tpm * length / 60
    used = sum(c for _, c in sends) / tpm if bound == "tpm" else len(sends) / rpm
    assert used / (seconds / 60) >= 0.97


def test_pacing_alone_overflows_a_ten_second_window() -> None:
    """Why the windows exist: GCRA at 98.5 % leaves 150 tokens of slack per 10 s at 60k TPM."""
    sched = ModelSchedule(*LANGDOCK, windows_s=(), tolerance_s=0.0)
    sends = saturate(sched, (150, 400), 120.0)
    assert worst_window(sends, 10.0, tokens=True) > LANGDOCK[1] / 6


def test_zero_tolerance_is_strictly_smooth() -> None:
    sched = ModelSchedule(600, 10**9, headroom=1.0, tolerance_s=0.0)  # 10 requests/s
    sends = saturate(sched, (1, 1), 2.0)
    assert [round(t, 9) for t, _ in sends] == [round(i / 10, 9) for i in range(20)]


def test_tolerance_allows_one_seconds_burst_then_smooth() -> None:
    sched = ModelSchedule(60, 10**9, headroom=1.0, tolerance_s=1.0)  # 1 request/s
    sends = saturate(sched, (1, 1), 4.5)
    assert [t for t, _ in sends] == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_cost_above_the_minute_limit_raises_at_once() -> None:
    sched = ModelSchedule(*LANGDOCK)
    with pytest.raises(ValueError, match="more than the whole per-minute limit of 60000"):
        sched.delay(60_001, 0.0)
    with pytest.raises(ValueError, match="negative"):
        sched.delay(-1, 0.0)
    assert sched.delay(60_000, 0.0) == 0.0


def test_request_bigger_than_the_short_window_goes_alone() -> None:
    sched = ModelSchedule(*LANGDOCK)  # the 10 s window holds 10,000 tokens
    sched.commit(500, 0.0)
    wait = sched.delay(15_000, 0.0)
    assert wait == pytest.approx(10.2)  # when the 500 leaves our (10 s + margin) window
    sched.commit(15_000, wait)
    assert sched.delay(100, wait) > 10.0  # and nothing rides along with it


def test_pace_arithmetic() -> None:
    pace = Pace(rate=100.0, tolerance=0.0)
    assert pace.delay(50, 0.0) == 0.0
    pace.commit(50, 0.0)
    assert pace.tat == 0.5
    assert pace.delay(50, 0.2) == pytest.approx(0.3)
    pace.commit(50, 2.0)  # idle time is not banked beyond the tolerance
    assert pace.tat == 2.5


def test_sliding_window_arithmetic() -> None:
    win = SlidingWindow(length=10.0, budget=100)
    win.commit(60, 0.0)
    win.commit(30, 1.0)
    assert win.delay(10, 1.0) == 0.0
    assert win.delay(50, 2.0) == pytest.approx(8.0)  # the 60 at t=0 must leave
    assert win.delay(80, 2.0) == pytest.approx(9.0)  # both must leave
    assert win.delay(50, 10.0) == 0.0
    assert win.total == 30


# -- adaptive multiplier ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "at", "expected"),
    [
        ([], 100.0, 1.0),
        ([10.0], 10.0, AIMD_BETA),
        ([10.0], 20.0, AIMD_BETA + 0.1),  # recovers 0.01 per second
        ([10.0], 40.0, 1.0),  # ... up to 1, never above
        ([10.0, 11.0], 11.0, AIMD_BETA + 0.01),  # within the 2 s cooldown: no compounding
        ([10.0, 12.0], 12.0, (AIMD_BETA + 0.02) * AIMD_BETA),
        ([float(t) for t in range(0, 200, 2)], 198.0, 0.017 / 0.15),  # m = (m + 0.02) * beta
    ],
)
def test_adaptive_multiplier(events: list[float], at: float, expected: float) -> None:
    aimd = Adaptive()
    for t in events:
        aimd.on_rate_limited(t)
    assert aimd.value(at) == pytest.approx(expected)


def test_adaptive_floor() -> None:
    aimd = Adaptive(cooldown_s=0.0)
    for _ in range(30):
        aimd.on_rate_limited(5.0)
    assert aimd.value(5.0) == 0.05


def test_adaptive_reports_whether_it_decreased() -> None:
    aimd = Adaptive()
    assert aimd.on_rate_limited(5.0) is True
    assert aimd.on_rate_limited(6.9) is False
    assert aimd.on_rate_limited(7.0) is True


# -- header parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("6.5s", 6.5),
        ("0.25", 0.25),
        ("7", 7.0),
        (" 2S ", 2.0),
        ("", None),
        ("soon", None),
        ("1s junk", None),
        ("-1", None),
        (None, None),
    ],
)
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    ("status", "headers", "last_cost", "expected"),
    [
        (429, {"retry-after-ms": "1500", "retry-after": "9"}, 1, FeedbackSignal(True, 1.5, False)),
        (429, {"Retry-After": "6"}, 1, FeedbackSignal(True, 6.0, False)),
        (429, {}, 1, FeedbackSignal(True, DEFAULT_PAUSE_S, False)),
        (200, {}, 500, FeedbackSignal(False, 0.0, False)),
        (
            200,
            {"x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "2s"},
            500,
            FeedbackSignal(False, 0.0, False, remaining_tokens=900),
        ),
        (
            200,
            {"x-ratelimit-remaining-tokens": "400", "x-ratelimit-reset-tokens": "120ms"},
            500,
            FeedbackSignal(False, 0.12, True, ("tokens",), remaining_tokens=400),
        ),
        (
            200,
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30s"},
            1,
            FeedbackSignal(False, 60.0, True, ("requests",), 0),  # capped at a minute
        ),
        (
            200,
            {"X-RateLimit-Remaining-Requests": "0", "X-RateLimit-Remaining-Tokens": "-3"},
            1,
            FeedbackSignal(False, DEFAULT_PAUSE_S, True, ("requests", "tokens"), 0, 0),
        ),
        (
            429,
            {"retry-after": "2", "x-ratelimit-remaining-requests": "7"},
            1,
            FeedbackSignal(True, 2.0, False, remaining_requests=7),
        ),
        (200, {"x-ratelimit-remaining-tokens": "n/a"}, 500, FeedbackSignal(False, 0.0, False)),
    ],
)
def test_read_feedback(
    status: int, headers: dict[str, str], last_cost: int, expected: FeedbackSignal
) -> None:
    assert read_feedback(status, headers, last_cost=last_cost) == expected


def test_near_limit_explained_by_our_own_sending_does_not_slow_us() -> None:
    sched = ModelSchedule(*LANGDOCK)
    for i in range(30):  # 9,000 tokens in the last 10 s: no room for another 1,500
        sched.commit(300, i * 0.3)
    signal = read_feedback(200, {"x-ratelimit-remaining-tokens": "1000"}, last_cost=1500)
    sched.last_cost = 1500
    assert sched.feedback(signal, 9.0) is False
    assert sched.multiplier(9.0) == 1.0  # 9,000 ours + 1,000 left: the whole window
    assert sched.paused_until == -math.inf  # our windows hold the next request back


# (server window, our usage over it, its budget) per window, remaining -> revealed share
@pytest.mark.parametrize(
    ("windows", "remaining", "expected"),
    [
        ([(60.0, 36_000, 60_000), (10.0, 6_000, 10_000)], 0, 0.6),  # steady at a 60 % share
        ([(60.0, 3_000, 60_000), (10.0, 3_000, 10_000)], 3_000, 0.6),  # 3 s in: the 10 s window
        ([(60.0, 36_000, 60_000), (10.0, 9_000, 10_000)], 1_000, 1.0),  # all ours
        ([(10.0, 9_900, 10_000)], 300, 1.0),  # a little over 1: timing, capped
        ([(10.0, 9_000, 10_000)], 3_000, 1.0),  # sends the server has not seen yet: capped
        ([], 3_000, None),
        ([(10.0, 0, 10_000)], 0, 0.0),  # others take everything
    ],
)
def test_revealed_share(
    windows: list[tuple[float, int, float]], remaining: int, expected: float | None
) -> None:
    got = revealed_share(windows, remaining)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("reveals", "at", "expected"),
    [
        ([(0.0, 0.6)], 0.0, 0.6),  # the first estimate as it is
        ([(0.0, 0.6)], 10.0, 0.7),  # then recovers 0.01/s without news
        ([(0.0, 0.6), (2.0, 0.4)], 2.0, 0.62 - (1 - math.exp(-4)) * 0.22),  # lower: faster
        ([(0.0, 0.4), (2.0, 0.6)], 2.0, 0.42 + (1 - math.exp(-1)) * 0.18),  # higher: smoothed
        ([(0.0, 0.4), (0.0, 0.6)], 0.0, 0.4),  # at once: no weight
        ([(0.0, 0.4), (100.0, 0.6)], 100.0, 0.6),  # long after: all weight
        ([(0.0, 0.0)], 0.0, 0.05),  # floor
    ],
)
def test_share_follows_the_estimates_smoothly(
    reveals: list[tuple[float, float]], at: float, expected: float
) -> None:
    share = Share()
    assert share.value(0.0) == 1.0
    for t, x in reveals:
        share.reveal(x, t)
    assert share.value(at) == pytest.approx(expected)


def test_remaining_headers_set_the_share_up_and_down_without_compounding() -> None:
    sched = ModelSchedule(*LANGDOCK)
    assert sched.share is not None
    sched.share.smoothing_s = 0.0  # each estimate as it is
    for i in range(25):  # 5,000 tokens over 5 s
        sched.commit(200, i * 0.2)
    left = {"x-ratelimit-remaining-tokens": "1000"}  # others hold 4,000 of the 10 s window
    assert sched.feedback(read_feedback(200, left, last_cost=200), 5.0) is True
    assert sched.multiplier(5.0) == pytest.approx(0.6)
    assert sched.share_of_windows(5.0) == pytest.approx(0.6 - 0.012)  # with a margin
    # The same answer again (sends from before the decrease): the same share, no compounding.
    assert sched.feedback(read_feedback(200, left, last_cost=200), 5.0) is False
    assert sched.multiplier(5.0) == pytest.approx(0.6)
    # A 429 with the headers: the pause, the share they reveal; AIMD's cut (to 0.85) is only
    # a safety net below it.
    hit = read_feedback(429, {"retry-after": "1", "x-ratelimit-remaining-tokens": "0"})
    sched.feedback(hit, 5.0)
    assert sched.multiplier(5.0) == pytest.approx(0.5)
    assert sched.adaptive is not None and sched.adaptive.value(5.0) == AIMD_BETA
    assert sched.paused_until == 6.0
    # Others leave: the share goes back up at once (AIMD recovers on its own).
    assert not sched.feedback(read_feedback(200, {"x-ratelimit-remaining-tokens": "5000"}), 6.0)
    assert sched.share_of_windows(6.0) == 1.0
    assert sched.multiplier(6.0) == pytest.approx(AIMD_BETA + 0.01)


def test_the_window_caps_follow_the_revealed_share() -> None:
    sched = ModelSchedule(*LANGDOCK, tolerance_s=10.0)  # only the windows hold it back
    for i in range(11):
        sched.commit(500, i * 0.1)
    assert sched.delay(800, 1.0) == 0.0  # 5,500 + 800 fit the full 10,000
    sched.feedback(read_feedback(200, {"x-ratelimit-remaining-tokens": "500"}), 1.0)
    assert sched.share_of_windows(1.0) == pytest.approx(0.6 - 0.012)
    # ... not the 5,880 left to us: the oldest entry must leave our 10.2 s window first.
    assert sched.delay(800, 1.0) == pytest.approx(10.2 - 1.0)


def test_without_headers_a_429_cuts_the_aimd_multiplier() -> None:
    sched = ModelSchedule(*LANGDOCK)
    assert sched.feedback(read_feedback(429, {}), 1.0) is True
    assert sched.multiplier(1.0) == pytest.approx(AIMD_BETA)
    assert sched.share_of_windows(1.0) == 1.0


def test_429_pauses_and_decreases_once_per_cooldown() -> None:
    sched = ModelSchedule(*LANGDOCK)
    assert sched.feedback(read_feedback(429, {"retry-after": "3"}), 10.0) is True
    assert sched.feedback(read_feedback(429, {"retry-after": "1"}), 10.5) is False
    assert sched.paused_until == 13.0  # a shorter retry-after never shortens the pause
    assert sched.delay(100, 10.5) == pytest.approx(2.5)


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.0])
def test_sending_resumes_at_the_paced_rate_when_a_pause_ends(tolerance: float) -> None:
    # Idle during the pause, the pacing would otherwise owe a tolerance's burst at its end.
    sched = ModelSchedule(60, 10**9, headroom=1.0, tolerance_s=tolerance, adaptive=False)
    sched.commit(1, 0.0)
    sched.pause(5.0, 10.0)
    now, sends = 10.0, []
    while len(sends) < 4:
        wait = sched.delay(1, now)
        if wait > 0:
            now += wait
            continue
        sched.commit(1, now)
        sends.append(now)
    assert sends == [15.0, 16.0, 17.0, 18.0]


def test_non_adaptive_schedule_only_pauses() -> None:
    sched = ModelSchedule(*LANGDOCK, adaptive=False)
    assert sched.feedback(read_feedback(429, {}), 1.0) is False
    assert sched.multiplier(100.0) == 1.0
    assert sched.paused_until == 1.0 + DEFAULT_PAUSE_S


# -- the async wrapper, on virtual time ---------------------------------------------------------


@contextlib.contextmanager
def virtual_time() -> Iterator[None]:
    """Run the current event loop on a clock that jumps to the next timer instead of sleeping.

    The loop's `time()` reads a virtual clock starting at 0; its selector, asked to block for
    `timeout` seconds, advances that clock instead and polls without blocking.
    """
    loop = asyncio.get_running_loop()
    now = [0.0]
    real_select = loop._selector.select  # type: ignore[attr-defined]

    def select(timeout: float | None = None) -> Any:
        if timeout is not None and timeout > 0:
            now[0] += timeout
        return real_select(0)

    with (
        mock.patch.object(loop, "time", lambda: now[0]),
        mock.patch.object(loop._selector, "select", select),  # type: ignore[attr-defined]
    ):
        yield


def per_second(rpm: int) -> LocalLimiter:
    """A limiter with exactly rpm/60 requests per second and tokens to spare."""
    return LocalLimiter(lambda model: (rpm, 10**9), headroom=1.0)


async def test_exactly_how_many_got_through_by_t3() -> None:
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = per_second(60)
        admitted: list[float] = []

        async def one() -> None:
            await limiter.acquire("gpt-4o", 10)
            admitted.append(loop.time())

        tasks = [loop.create_task(one()) for _ in range(10)]
        await asyncio.sleep(3.5)
        # One second of tolerance: two at t=0, then one per second; five by t=3.
        assert admitted == [0.0, 0.0, 1.0, 2.0, 3.0]
        await asyncio.gather(*tasks)
        assert admitted[-1] == 8.0


async def test_waiters_are_admitted_fifo() -> None:
    with virtual_time():
        limiter = LocalLimiter(lambda model: (6_000, 6_000), headroom=1.0)  # 100 tokens/s
        order: list[int] = []

        async def one(i: int, cost: int) -> None:
            await limiter.acquire("gpt-4o", cost)
            order.append(i)

        costs = [90, 5, 80, 1, 70, 2, 60, 3]  # small ones behind big ones still wait their turn
        await asyncio.gather(*(one(i, c) for i, c in enumerate(costs)))
        assert order == list(range(len(costs)))


async def test_acquire_returns_the_seconds_waited() -> None:
    with virtual_time():
        limiter = per_second(60)
        assert await limiter.acquire("m", 1) == 0.0
        assert await limiter.acquire("m", 1) == 0.0
        assert await limiter.acquire("m", 1) == 1.0


async def test_429_pauses_the_next_admission() -> None:
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = per_second(600)
        await limiter.acquire("gpt-4o", 1)
        limiter.feedback("gpt-4o", status=429, headers={"retry-after-ms": "5000"})
        snap = limiter.snapshot()["gpt-4o"]
        assert snap["paused_until_s"] == 5.0
        assert snap["multiplier"] == pytest.approx(AIMD_BETA)
        await limiter.acquire("gpt-4o", 1)
        assert loop.time() == 5.0


async def test_pause_arriving_while_a_waiter_sleeps_is_honoured() -> None:
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = LocalLimiter(lambda model: (60, 10**9), headroom=1.0, tolerance_s=0.0)
        await limiter.acquire("m", 1)  # the next slot is at t=1
        waiter = loop.create_task(limiter.acquire("m", 1))
        await asyncio.sleep(0.5)
        limiter.feedback("m", status=429, headers={"retry-after": "2"})
        assert await waiter == 2.5  # asked at 0, paused at 0.5 until 2.5
        assert loop.time() == 2.5


async def test_cancelled_waiters_reserve_nothing() -> None:
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = LocalLimiter(lambda model: (60, 10**9), headroom=1.0, tolerance_s=0.0)
        await limiter.acquire("m", 1)
        head = loop.create_task(limiter.acquire("m", 1))  # sleeping until t=1
        queued = loop.create_task(limiter.acquire("m", 1))  # waiting on the lock
        behind = loop.create_task(limiter.acquire("m", 1))
        await asyncio.sleep(0.25)
        head.cancel()
        queued.cancel()
        assert await behind == 1.0  # takes the head's slot: nothing was reserved for either
        with pytest.raises(asyncio.CancelledError):
            await head
        with pytest.raises(asyncio.CancelledError):
            await queued
        sched = limiter.schedule("m")
        assert sched.requests.tat == 2.0
        assert sched.request_windows[0].total == 2


async def test_impossible_cost_raises_without_waiting() -> None:
    with virtual_time():
        limiter = LocalLimiter(lambda model: (500, 60_000))
        with pytest.raises(ValueError, match="gpt-4o"):
            await limiter.acquire("gpt-4o", 60_001)
        assert asyncio.get_running_loop().time() == 0.0


async def test_models_are_paced_independently() -> None:
    with virtual_time():
        limiter = LocalLimiter(lambda model: (60, 10**9), headroom=1.0, tolerance_s=0.0)
        await limiter.acquire("a", 1)
        assert await limiter.acquire("b", 1) == 0.0
        assert await limiter.acquire("a", 1) == 1.0


async def test_snapshot_and_lifecycle() -> None:
    limiter = LocalLimiter(lambda model: (500, 60_000), headroom=0.9, clock=lambda: 100.0)
    await limiter.start()
    assert limiter.snapshot() == {}
    await limiter.acquire("gpt-4o", 100)
    limiter.feedback("gpt-4o", status=200, headers={})
    assert limiter.snapshot() == {
        "gpt-4o": {
            "rpm": 500,
            "tpm": 60_000,
            "effective_rpm": pytest.approx(450.0),
            "effective_tpm": pytest.approx(54_000.0),
            "multiplier": 1.0,
            "paused_until_s": 0.0,
            "backend": "local",
        }
    }
    await limiter.aclose()


def test_the_mock_servers_quota_never_refuses_what_we_admit() -> None:
    """The bundled server's own sliding-window quota, driven by our schedule on a fake clock."""
    from batcher.mock import SlidingWindowQuota

    clock = [0.0]
    for rpm, tpm in (LANGDOCK, TEN_X):
        for costs in ((150, 400), (50, 100), (1_000, 3_000)):
            quota = SlidingWindowQuota(rpm, tpm, clock=lambda: clock[0])
            for t, cost in saturate(ModelSchedule(rpm, tpm), costs, 90.0):
                clock[0] = t + 0.05  # arrives a little after admission
                assert quota.try_admit(cost).admitted, (rpm, tpm, costs, t)
