"""The Lua scripts are the reference schedule: random traces, compared reply by reply and state
by state.

Each trace mixes reservations, 200s with and without x-ratelimit-remaining-* headers, near-limit
headers, 429s with and without retry-after, and 5xx answers naming their admission, at clock
values both sides are given (`now` passed to the Lua in place of Redis TIME). After every step
the Lua's reply equals `schedule.reserve` / `schedule.feedback`'s, and the Redis state (hash,
log, refunds) equals the Python `State`. Some signals ride along with a RESERVE, as the Redis
backend sends them. Needs BATCHER_TEST_REDIS_URL; skipped without it.
"""

from __future__ import annotations

import copy
import os
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from batcher.admission import schedule
from batcher.admission.feedback import Signal, read_feedback
from batcher.admission.policy import Policy, us
from batcher.admission.redis_backend import RedisLimiter, keys
from batcher.admission.schedule import Entry, Refund, State

REDIS_URL = os.environ.get("BATCHER_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="BATCHER_TEST_REDIS_URL is not set")
MODEL = "gpt-4o"

POLICIES: list[dict[str, Any]] = [
    {"rpm": 120, "tpm": 6_000},
    {"rpm": 600, "tpm": 20_000, "headroom": 0.9, "tolerance_s": 0.0},
    {"rpm": 60, "tpm": 100_000, "adaptive": False},
    {"rpm": 3_000, "tpm": 60_000, "window_margin": 0.02, "max_pause_s": 5.0, "share_hold_s": 0.0},
    {"rpm": 300, "tpm": 30_000, "aimd_strike_requests": 0, "share_smoothing_s": 0.0},
    {"rpm": 500, "tpm": 60_000, "tolerance_s": 30.0, "lookahead": 3},
    {"rpm": 240, "tpm": 12_000, "tolerance_s": 60.0, "window_margin": 0.0, "lookahead": 0},
]

INT_FIELDS = [
    "rtat",
    "ttat",
    "last",
    "start",
    "pause",
    "t0",
    "tdec",
    "sht",
    "shn",
    "cum",
    "seq",
    "dec429",
    "decnear",
    "shdown",
    "refunded",
    "sus",
    "susat",
    "suscost",
]


@pytest_asyncio.fixture
async def limiter() -> AsyncIterator[RedisLimiter]:
    assert REDIS_URL is not None
    lim = RedisLimiter(REDIS_URL, f"eq-{uuid.uuid4().hex[:8]}", lambda m: (1, 1))
    await lim.start()
    yield lim
    assert lim._redis is not None
    await lim._redis.delete(*keys(lim.workspace, MODEL))
    await lim.aclose()


async def redis_state(lim: RedisLimiter) -> State:
    assert lim._redis is not None
    pace, log, refunds = keys(lim.workspace, MODEL)
    h = {str(k): str(v) for k, v in (await lim._redis.hgetall(pace)).items()}
    st = State()
    for name in INT_FIELDS:
        if name in h:
            setattr(st, name, int(h[name]))
    for name in ("m0", "sh0"):
        if name in h:
            setattr(st, name, float(h[name]))
    entries: Any = await lim._redis.zrange(log, 0, -1, withscores=True)
    for member, score in entries:
        cum, seq, cost = (int(x) for x in str(member).split(":"))
        st.log.append(Entry(int(score), cum, seq, cost))
    refunded: Any = await lim._redis.zrange(refunds, 0, -1, withscores=True)
    for member, score in refunded:
        seq, cost, req = (int(x) for x in str(member).split(":"))
        st.refunds.append(Refund(int(score), seq, cost, req))
    st.refunds.sort()
    return st


def comparable(st: State) -> dict[str, Any]:
    """The Python state as Redis stores it (absent fields: the defaults the Lua reads)."""
    out = {name: getattr(st, name) for name in (*INT_FIELDS, "m0", "sh0")}
    out["log"] = list(st.log)
    out["refunds"] = sorted(st.refunds)
    return out


def random_answer(
    rng: random.Random, p: Policy, admissions: list[tuple[int, int, int]]
) -> tuple[int, dict[str, str], tuple[int, int, int]]:
    """(status, headers, failed admission) of one random answer."""
    headers: dict[str, str] = {}
    kind = rng.random()
    status = 200
    failed = (0, 0, 0)
    if kind < 0.15:
        status = 429
        if admissions and rng.random() < 0.6:
            failed = rng.choice(admissions[-5:])  # names its admission: a bound on the share
        if rng.random() < 0.5:
            headers["retry-after"] = str(rng.choice([0, 1, 2, 7, 120]))
        elif rng.random() < 0.5:
            headers["retry-after-ms"] = str(rng.randint(1, 3000))
    elif kind < 0.25 and admissions:
        status = rng.choice([500, 503])
        failed = rng.choice(admissions[-5:])
    if rng.random() < (0.3 if status == 429 else 0.6):
        w = rng.choice([1, 10, 60])
        headers["x-ratelimit-remaining-requests"] = str(rng.randint(0, max(1, p.rpm * w // 60)))
        headers["x-ratelimit-remaining-tokens"] = str(rng.randint(0, max(1, p.tpm * w // 60)))
        if rng.random() < 0.3:
            headers["x-ratelimit-reset-requests"] = rng.choice(["120ms", "1s", "6s", "1m0s"])
            headers["x-ratelimit-reset-tokens"] = rng.choice(["250ms", "2s", "2m"])
        if rng.random() < 0.2:
            del headers["x-ratelimit-remaining-requests"]
    return status, headers, failed


@pytest.mark.parametrize("seed", range(14))
async def test_random_traces_give_equal_slots_and_states(limiter: RedisLimiter, seed: int) -> None:
    rng = random.Random(seed)
    knobs = POLICIES[seed % len(POLICIES)]
    policy = Policy(**knobs)
    limiter.policy = lambda model: policy
    st = State()
    now = 1_700_000_000_000_000 + rng.randint(0, 10**6)
    admissions: list[tuple[int, int, int]] = []
    last_cost = 0
    ridealong: list[Signal] = []
    for step in range(160):
        now += rng.choice([0, 0, rng.randint(1, 2_000), rng.randint(1, 200_000), 3_000_000])
        if rng.random() < 0.55:
            cost = rng.choice([0, 1, rng.randint(1, policy.tpm // 20), policy.tpm // 6])
            for sig in ridealong:
                schedule.feedback(policy, st, sig, now)
            limiter._queued[MODEL] = ridealong
            ridealong = []
            # The costs queued behind it: a smaller one may take the head's room, a larger
            # one may pack it better; `passed` at the bound stops the packing.
            waiting = [
                rng.randint(0, max(1, cost * rng.choice([1, 2])))
                for _ in range(rng.choice([0, 1, 4, 12, 20]))
            ]
            passed = rng.choice([0, 0, 3, policy.lookahead_passes])
            want = schedule.reserve(policy, st, cost, now, waiting, passed)
            got = await limiter.reserve(MODEL, cost, now_us=now, waiting=waiting, passed=passed)
            admissions.append(
                (want.seq, want.at, waiting[want.waiter - 1] if want.waiter else cost)
            )
            last_cost = admissions[-1][2]
        else:
            status, headers, failed = random_answer(rng, policy, admissions)
            sent_at = rng.choice([0, *[a[1] for a in admissions[-8:]]])
            sig = read_feedback(
                policy, status, headers, last_cost=last_cost, failed=failed, sent_at=sent_at
            )
            if not sig.urgent and rng.random() < 0.5:
                ridealong.append(sig)  # goes with the next RESERVE
                continue
            want = schedule.feedback(policy, st, sig, now)
            got = await limiter.send_feedback(MODEL, sig, now_us=now)
        assert got == want, (seed, step)
        assert comparable(await redis_state(limiter)) == comparable(st), (seed, step)
    assert st.seq > 30  # the trace really reserved


async def test_lookahead_hands_the_same_slots(limiter: RedisLimiter) -> None:
    """A waiter tried and taken back (it would delay the head), one handed the head's room,
    then the head: equal replies and states, the log in order after each."""
    policy = Policy(600, 6_000, headroom=1.0, window_margin=0.0, tolerance_s=60.0)
    limiter.policy = lambda model: policy
    st = State()
    # 100 and 50 fit at 102 but push the 500 past 110: both taken back.
    steps: list[tuple[float, int, list[int]]] = [
        (0.0, 1, []),
        (100.0, 400, []),
        (101.0, 400, []),
        (101.5, 100, []),
    ]
    steps += [(102.0, 500, [100, 50])]
    # A minute later: the 150 takes the room the 300 leaves, then the 100.
    steps += [(300.0, 400, []), (301.0, 400, []), (302.0, 300, [300, 250, 150, 100])]
    steps += [(302.0, 300, [250, 100]), (302.0, 300, [250, 100])]
    handed = []
    for t, cost, waiting in steps:
        want = schedule.reserve(policy, st, cost, us(t), waiting)
        got = await limiter.reserve(MODEL, cost, now_us=us(t), waiting=waiting)
        assert got == want
        assert comparable(await redis_state(limiter)) == comparable(st)
        handed.append(want.waiter)
    assert handed == [0, 0, 0, 0, 0, 0, 0, 3, 0, 2]
    assert st.seq == len(steps)  # a waiter taken back left no entry
    assert [(e.at, e.cost) for e in st.log[-4:]] == [
        (us(301), 400),
        (us(302), 150),
        (us(310), 300),
        (us(310), 100),
    ]


async def test_packing_hands_the_same_slots(limiter: RedisLimiter) -> None:
    """A queue at Langdock's limits with the share below 1, as the backends drive it (the head
    asks again after each hand-over, counting them): equal replies and states, and the packing
    (a waiter that delays the head) really chose, up to the pass bound."""
    policy = Policy(500, 60_000)
    limiter.policy = lambda model: policy
    st = State()
    rng = random.Random(5)
    queue = [rng.randint(300, 420) for _ in range(40)]
    now, passed, packs, most, head_packs = 10**15, 0, 0, 0, 0
    st.sh0, st.sht = 0.6, now  # the share headers revealed, on both sides
    assert limiter._redis is not None
    await limiter._redis.hset(keys(limiter.workspace, MODEL)[0], mapping={"sh0": 0.6, "sht": now})
    for _ in range(150):
        look = queue[1 : 1 + policy.lookahead]
        alone = schedule.reserve(policy, copy.deepcopy(st), queue[0], now).at
        want = schedule.reserve(policy, st, queue[0], now, look, passed)
        got = await limiter.reserve(MODEL, queue[0], now_us=now, waiting=look, passed=passed)
        assert got == want
        assert comparable(await redis_state(limiter)) == comparable(st)
        if want.waiter:
            passed += 1
            if schedule.reserve(policy, copy.deepcopy(st), queue[0], now).at > alone:
                packs += 1
                head_packs += 1
                most = max(most, head_packs)
        else:
            now, passed, head_packs = max(now, want.at), 0, 0
        queue.pop(want.waiter)
        queue.append(rng.randint(300, 420))
    assert packs > 10
    assert most <= policy.lookahead_passes  # a head delayed by packing at most this often


@pytest.mark.parametrize(
    ("rpm", "cost", "share", "seconds", "lowered"),
    [
        (5_000, 100, 0.63, 25.0, True),  # full windows at 0.63: lowered to the bracket's middle
        (500, 400, 0.5, 0.0, False),  # the ramp's wide bracket: its middle above 0.5, held
    ],
)
async def test_a_strike_at_the_share_s_edge_sets_the_same_share(
    limiter: RedisLimiter, rpm: int, cost: int, share: float, seconds: float, lowered: bool
) -> None:
    """Without headers, a second 429 while our windows are full up to the believed share:
    the share goes to the middle of the bracket, never above where it was; equal on both sides
    (the share was read `seconds` before, so the smoothing takes the new value in full)."""
    policy = Policy(rpm, 60_000, aimd_strike_requests=200)
    limiter.policy = lambda model: policy
    st = State()
    now = 10**15
    st.sh0, st.sht = share, now
    assert limiter._redis is not None
    pace = keys(limiter.workspace, MODEL)[0]
    await limiter._redis.hset(pace, mapping={"sh0": repr(share), "sht": now})
    lone = read_feedback(policy, 429, {"retry-after": "0"}, last_cost=cost)
    want = schedule.feedback(policy, st, lone, now)
    assert await limiter.send_feedback(MODEL, lone, now_us=now) == want
    begin = now
    for _ in range(400):
        want = schedule.reserve(policy, st, cost, now)
        assert await limiter.reserve(MODEL, cost, now_us=now) == want
        now = want.at
        if len(st.log) >= 11 and now - begin >= us(seconds):
            break
    last = st.log[-1]
    sig = read_feedback(
        policy, 429, {}, last_cost=cost, failed=(last.seq, last.at, cost), sent_at=last.at
    )
    want = schedule.feedback(policy, st, sig, now + 200_000)
    assert await limiter.send_feedback(MODEL, sig, now_us=now + 200_000) == want
    assert comparable(await redis_state(limiter)) == comparable(st)
    if lowered:
        assert st.shdown == 1 and want.share < share - 0.005
    else:
        assert st.shdown == 0 and want.share == share


@pytest.mark.parametrize("tokens", [True, False])
async def test_a_given_back_entry_frees_nothing_on_both_sides(
    limiter: RedisLimiter, tokens: bool
) -> None:
    """test_limiter's case: the next slot waits for the first counted entry to leave, not
    for a given-back one (tokens: a 5xx's 400 of 1,000; requests: one of 2 a window)."""
    exact: dict[str, Any] = {
        "adaptive": False,
        "headroom": 1.0,
        "window_margin": 0.0,
        "tolerance_s": 60.0,
    }
    if tokens:
        policy = Policy(6_000, 6_000, token_windows_s=(10.0,), request_windows_s=(60.0,), **exact)
        costs, later = [400, 600], 500
    else:
        policy = Policy(12, 10**6, token_windows_s=(60.0,), request_windows_s=(10.0,), **exact)
        costs, later = [1, 1, 1], 1
    limiter.policy = lambda model: policy
    st = State()
    assert limiter._redis is not None
    refunds_key = keys(limiter.workspace, MODEL)[2]
    steps = [(0.0, 1), (100.0, costs[0])] + [(101.0, c) for c in costs[1:]] + [(102.0, later)]
    for i, (t, cost) in enumerate(steps):
        want = schedule.reserve(policy, st, cost, us(t))
        assert await limiter.reserve(MODEL, cost, now_us=us(t)) == want
        if i == 1:  # given back (a 5xx the server did not charge), on both sides
            st.refunds.append(Refund(want.at, want.seq, cost))
            await limiter._redis.zadd(refunds_key, {f"{want.seq}:{cost}:1": want.at})
        assert comparable(await redis_state(limiter)) == comparable(st)
    assert want.at == us(111)


async def test_traces_cover_every_branch(limiter: RedisLimiter) -> None:
    """Windows hold slots back, pauses and AIMD happen, headers lower the share, a 5xx is
    given back: the comparison above is not only about idle paths."""
    policy = Policy(rpm=60, tpm=1_000, aimd_strike_requests=0)
    st = State()
    now = 10**15
    slots = [schedule.reserve(policy, st, 100, now) for _ in range(12)]
    assert slots[-1].at - now > 9_000_000  # the 10 s token window (166 tokens) held them back
    sig = read_feedback(policy, 429, {"retry-after": "3"}, last_cost=100)
    out = schedule.feedback(policy, st, sig, now)
    assert out.decreased and st.dec429 == 1 and st.pause == now + 3_000_000
    # remaining-* of the minute: (our 1200 + 0 left) / 1000 -> capped at 1; of 10 s windows:
    # others use most of it.
    sig = read_feedback(
        policy,
        200,
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "0"},
        last_cost=100,
    )
    schedule.feedback(policy, st, sig, now + 1)
    failed = (slots[0].seq, slots[0].at, 100)
    sig = read_feedback(policy, 503, {}, failed=failed)
    schedule.feedback(policy, st, sig, now + 2)
    assert st.sus == slots[0].seq


async def test_a_429_bound_lowers_the_same_share(limiter: RedisLimiter) -> None:
    """Without headers, a 429 naming its admission bounds the share: equal on both sides."""
    policy = Policy(500, 60_000, aimd_strike_requests=0)  # every 429 is a strike
    limiter.policy = lambda model: policy
    st = State()
    now, want = 10**15, None
    for _ in range(60):  # 300 tokens every 0.5 s: 0.6 of the TPM
        now += 500_000
        want = schedule.reserve(policy, st, 300, now)
        assert await limiter.reserve(MODEL, 300, now_us=now) == want
    assert want is not None
    sig = read_feedback(
        policy, 429, {}, last_cost=300, failed=(want.seq, want.at, 300), sent_at=want.at
    )
    out = schedule.feedback(policy, st, sig, now + 100_000)
    assert await limiter.send_feedback(MODEL, sig, now_us=now + 100_000) == out
    assert comparable(await redis_state(limiter)) == comparable(st)
    assert st.shdown == 1 and 0.55 < out.share < 0.65
