"""Admission, pure: the reference schedule with a fake clock; the local backend on virtual time.

(The Redis backend runs the same schedule as Lua: tests/test_admission_equivalence.py.)
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import dataclasses
import json
import math
import random
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from batcher.admission import LocalLimiter, ModelSnapshot, Policy
from batcher.admission import schedule as sch
from batcher.admission.feedback import Signal, parse_duration, read_feedback
from batcher.admission.policy import us
from batcher.admission.schedule import State

LANGDOCK = (500, 60_000)
TEN_X = (5_000, 600_000)
BETA = Policy(1, 1).aimd_beta


class Sched:
    """One model's schedule in seconds: the reference functions on a fake clock."""

    def __init__(self, rpm: int, tpm: int, **knobs: Any) -> None:
        knobs.setdefault("aimd_strike_requests", 0)  # every 429 cuts (strikes: own test)
        self.p = Policy(rpm, tpm, **knobs)
        self.st = State()
        self.last_cost = 0

    def reserve(self, cost: int, now: float) -> float:
        """The slot (seconds) a request of `cost` asked for at `now` gets."""
        sch.check_cost("m", cost, self.p.tpm)
        self.last_cost = cost
        return sch.reserve(self.p, self.st, cost, us(now)).at / 1e6

    def feedback(self, status: int, headers: Mapping[str, str], now: float) -> bool:
        sig = read_feedback(self.p, status, headers, last_cost=self.last_cost)
        return sch.feedback(self.p, self.st, sig, us(now)).decreased

    def multiplier(self, now: float) -> float:
        return sch.status(self.p, self.st, us(now)).multiplier

    def share(self, now: float) -> float:
        return sch.status(self.p, self.st, us(now)).share

    @property
    def paused_until(self) -> float:
        return self.st.pause / 1e6


def refuse_last(sched: Sched, t: float) -> None:
    """A 429 without headers at `t`, naming the latest admission (300 tokens) as refused."""
    last = sched.st.log[-1]
    sig = read_feedback(
        sched.p, 429, {}, last_cost=300, failed=(last.seq, last.at, 300), sent_at=last.at
    )
    sch.feedback(sched.p, sched.st, sig, us(t))


def saturate(
    sched: Sched, costs: tuple[int, int], seconds: float, seed: int = 1
) -> list[tuple[float, int]]:
    """Ask for the next slot as soon as the last is taken, for `seconds`: every (slot, cost)."""
    rng = random.Random(seed)
    now, sends = 0.0, list[tuple[float, int]]()
    while True:
        cost = rng.randint(*costs)
        now = sched.reserve(cost, now)
        if now >= seconds:
            return sends
        sends.append((now, cost))


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
    sends = saturate(Sched(rpm, tpm), costs, seconds, seed)
    assert sends[0][0] == 0.0  # the first request goes at once
    for length in (60.0, 10.0, 1.0):
        assert worst_window(sends, length, tokens=False) <= rpm * length / 60
    for length in (60.0, 10.0):
        assert worst_window(sends, length, tokens=True) <= tpm * length / 60
    used = sum(c for _, c in sends) / tpm if bound == "tpm" else len(sends) / rpm
    # A 1 s window holds whole requests: 8 of Langdock's 8.33 per second.
    per_s = rpm / 60
    assert used / (seconds / 60) >= min(0.98, math.floor(per_s) / per_s * 0.99)


@pytest.mark.parametrize(
    "limits", [LANGDOCK, (10_000_000, 10_000_000_000)], ids=["langdock", "far"]
)
@pytest.mark.parametrize("seed", range(6))
def test_reserve_s_shortcut_gives_what_the_whole_schedule_gives(
    limits: tuple[int, int], seed: int
) -> None:
    """`reserve` with no one waiting and a pace nothing has lowered takes a shortcut. A waiter
    it must skip (larger than the head, packing spent) sends the same call the whole way: both
    must return the same reply and leave the same state, through 429s, remaining-* headers and
    refunds that end the shortcut's conditions."""
    rng = random.Random(seed)
    sched = Sched(*limits, aimd_strike_requests=rng.choice([0, 3]))
    p, now, shortcuts = sched.p, 0, 0
    for _ in range(400):
        now += rng.choice([0, 1_000, 50_000, 400_000, 3_000_000])
        cost = rng.randint(1, min(2_000, p.tpm // 10))
        short, whole = copy.deepcopy(sched.st), copy.deepcopy(sched.st)
        shortcuts += short.m0 is None and short.sh0 is None
        got = sch.reserve(p, short, cost, now)
        assert got == sch.reserve(p, whole, cost, now, (cost + 1,), p.lookahead_passes)
        assert short == whole
        sched.st, sched.last_cost = short, cost
        event = rng.random()
        if event < 0.03:
            sched.feedback(429, {"retry-after": "1"}, now / 1e6)
        elif event < 0.06:
            left = str(rng.randint(0, limits[0] // 2))
            sched.feedback(200, {"x-ratelimit-remaining-requests": left}, now / 1e6)
        elif event < 0.08:
            sched.feedback(500, {}, now / 1e6)
    assert 0 < shortcuts < 400  # both ways were compared


def test_pacing_alone_overflows_a_ten_second_window() -> None:
    """Why the windows exist: pacing at 99 % leaves 100 tokens of slack per 10 s at 60k TPM."""
    sched = Sched(*LANGDOCK, request_windows_s=(600.0,), token_windows_s=(600.0,), tolerance_s=0)
    sends = saturate(sched, (150, 400), 120.0)
    assert worst_window(sends, 10.0, tokens=True) > LANGDOCK[1] / 6


def test_zero_tolerance_is_strictly_smooth() -> None:
    sched = Sched(600, 10**9, headroom=1.0, tolerance_s=0.0, window_margin=0.0)  # 10/s
    sends = saturate(sched, (1, 1), 2.0)
    assert [round(t, 6) for t, _ in sends] == [round(i / 10, 6) for i in range(20)]


def test_no_burst_at_the_start_then_the_tolerance_catches_up_a_window_hold() -> None:
    """The first admissions are paced (a 1 s server window must not see a burst); the
    tolerance lets the schedule catch up only what a window held back."""
    sched = Sched(60, 10**9, headroom=1.0, tolerance_s=1.0, window_margin=0.0)  # 1/s
    sends = saturate(sched, (1, 1), 4.5)
    assert [t for t, _ in sends] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_the_one_second_window_bounds_any_burst() -> None:
    sched = Sched(600, 10**9, headroom=1.0, tolerance_s=5.0)
    sched.reserve(1, 0.0)
    sends = saturate(sched, (1, 1), 30.0)  # idle from 0 to 20 s: a 5 s tolerance owed
    late = [t for t, _ in sends if t >= 20.0]
    assert worst_window([(t, 1) for t in late], 1.0, tokens=False) <= 10


def test_cost_above_the_minute_limit_raises_at_once() -> None:
    sched = Sched(*LANGDOCK)
    with pytest.raises(ValueError, match="more than the whole per-minute limit of 60000"):
        sched.reserve(60_001, 0.0)
    with pytest.raises(ValueError, match="negative"):
        sched.reserve(-1, 0.0)
    assert sched.reserve(60_000, 0.0) == 0.0


def test_request_bigger_than_the_short_window_goes_alone() -> None:
    sched = Sched(*LANGDOCK)  # the 10 s window holds 10,000 tokens
    sched.reserve(500, 0.0)
    slot = sched.reserve(15_000, 0.0)
    assert slot == pytest.approx(10.05)  # when the 500 leaves our (10 s + 0.5 %) window
    assert sched.reserve(100, slot) > slot + 10.0  # and nothing rides along with it


# -- look-ahead ---------------------------------------------------------------------------------


EXACT: dict[str, Any] = {
    "adaptive": False,
    "headroom": 1.0,
    "window_margin": 0.0,
    "tolerance_s": 60.0,
}


def window_bound(**knobs: Any) -> tuple[Policy, State]:
    """A 10 s window of 1,000 tokens that binds (a minute of pacing credit), 800 of it used at
    t=100 and 101: a head of 300 must wait until t=110."""
    p = Policy(600, 6_000, headroom=1.0, window_margin=0.0, tolerance_s=60.0, **knobs)
    st = State()
    sch.reserve(p, st, 1, 0)
    sch.reserve(p, st, 400, us(100))
    sch.reserve(p, st, 400, us(101))
    return p, st


def test_a_smaller_waiter_takes_the_room_the_head_leaves_without_delaying_it() -> None:
    p, st = window_bound()
    alone = sch.reserve(p, copy.deepcopy(st), 300, us(102)).at
    assert alone == us(110)
    # 300: not smaller; 250 fits at 102 but would push the head past 110; 150 fits both.
    got = sch.reserve(p, st, 300, us(102), [300, 250, 150, 100])
    assert (got.waiter, got.at) == (3, us(102))
    assert st.log[-1].cost == 150  # the waiter's admission, the head's not taken yet
    head = sch.reserve(p, st, 300, us(102), [250, 100])  # nothing else fits before 110
    assert (head.waiter, head.at) == (0, alone)


def test_without_lookahead_or_smaller_waiters_admission_is_fifo() -> None:
    p, st = window_bound(lookahead=0)
    assert sch.reserve(p, st, 300, us(102), [100, 50]).waiter == 0
    p, st = window_bound()
    assert sch.reserve(p, st, 300, us(102), [300, 400, 900]).waiter == 0
    p, st = window_bound(lookahead=1)
    assert sch.reserve(p, st, 300, us(102), [250, 100]).waiter == 0  # 100 is beyond 1


def test_a_head_held_by_pacing_alone_lets_nobody_pass() -> None:
    """Pacing is the same for every cost: only a window's room is worth filling."""
    p = Policy(600, 6_000, headroom=1.0, window_margin=0.0, tolerance_s=0.0)
    st = State()
    sch.reserve(p, st, 400, 0)
    assert sch.reserve(p, st, 300, 0, [1, 2, 3]).waiter == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lookahead_keeps_every_window_and_passes_the_head_a_bounded_number_of_times(
    seed: int,
) -> None:
    rng = random.Random(seed)
    p = Policy(*LANGDOCK)
    st = State()
    queue = [rng.randint(250, 650) for _ in range(400)]
    now, sends, fills, packs, passes = 0, list[tuple[float, int]](), 0, 0, 0
    while queue:
        head = queue[0]
        alone = sch.reserve(p, copy.deepcopy(st), head, now).at
        got = sch.reserve(p, st, head, now, queue[1 : 1 + p.lookahead], passes)
        cost = queue.pop(got.waiter)
        sends.append((got.at / 1e6, cost))
        if got.waiter:
            passes += 1
            assert got.at <= alone  # never later than the head would have gone
            if sch.reserve(p, copy.deepcopy(st), head, now).at <= alone:
                fills += 1  # in the room the head leaves: the head goes at its slot still
            else:
                packs += 1  # the head waits for a better-filled window, a bounded number of times
                assert passes <= p.lookahead_passes
        else:
            assert got.at == alone
            now, passes = got.at, 0  # the next head asks when this one goes
    for length in (60.0, 10.0, 1.0):
        assert worst_window(sends, length, tokens=False) <= LANGDOCK[0] * length / 60
    for length in (60.0, 10.0):
        assert worst_window(sends, length, tokens=True) <= LANGDOCK[1] * length / 60
    assert fills > 5 and packs > 20
    # FIFO reached ~0.966 of the TPM here, the fills alone ~0.98, packing 0.98-0.99.
    minutes = (sends[-1][0] - 60.0) / 60
    late = sum(c for t, c in sends if t > 60.0)
    assert late / minutes / LANGDOCK[1] > 0.975


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


P = Policy(*LANGDOCK)


@pytest.mark.parametrize(
    ("status", "headers", "last_cost", "expected"),
    [
        (429, {"retry-after-ms": "1500", "retry-after": "9"}, 1, Signal(True, 1.5, last_cost=1)),
        (429, {"Retry-After": "6"}, 1, Signal(True, 6.0, last_cost=1)),
        (429, {}, 1, Signal(True, 1.0, last_cost=1)),
        (429, {"retry-after": "3600"}, 1, Signal(True, 60.0, last_cost=1)),  # capped
        (200, {}, 500, Signal(last_cost=500)),
        (
            200,
            {"x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "2s"},
            500,
            Signal(last_cost=500, remaining_tokens=900),
        ),
        (
            200,
            {"x-ratelimit-remaining-tokens": "400", "x-ratelimit-reset-tokens": "120ms"},
            500,
            Signal(False, 0.12, True, by_tokens=True, last_cost=500, remaining_tokens=400),
        ),
        (
            200,
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30s"},
            1,
            Signal(False, 60.0, True, by_requests=True, last_cost=1, remaining_requests=0),
        ),
        (
            200,
            {"X-RateLimit-Remaining-Requests": "0", "X-RateLimit-Remaining-Tokens": "-3"},
            1,
            Signal(False, 1.0, True, True, True, 1, 0, 0),
        ),
        (
            429,
            {"retry-after": "2", "x-ratelimit-remaining-requests": "7"},
            1,
            Signal(True, 2.0, last_cost=1, remaining_requests=7),
        ),
        (200, {"x-ratelimit-remaining-tokens": "n/a"}, 500, Signal(last_cost=500)),
        (200, {"x-ratelimit-remaining-tokens": "inf"}, 500, Signal(last_cost=500)),
    ],
)
def test_read_feedback(
    status: int, headers: dict[str, str], last_cost: int, expected: Signal
) -> None:
    assert read_feedback(P, status, headers, last_cost=last_cost) == expected


def test_a_5xx_names_its_admission_other_answers_do_not() -> None:
    sig = read_feedback(P, 503, {}, failed=(7, 123, 400))
    assert (sig.failed_seq, sig.failed_at, sig.failed_cost) == (7, 123, 400)
    assert read_feedback(P, 0, {}, failed=(7, 123, 400)).failed_seq == 7  # no answer at all
    assert read_feedback(P, 200, {}, failed=(7, 123, 400)).failed_seq == 0


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0, 0.0])
def test_the_pause_cap_is_a_checked_setting(bad: float) -> None:
    with pytest.raises(ValueError, match="max_pause_s"):
        Policy(500, 60_000, max_pause_s=bad)


def test_the_policy_encodes_itself_by_name() -> None:
    import json

    encoded = json.loads(Policy(500, 60_000, headroom=0.9).encode())
    assert encoded["rpm"] == 500 and encoded["headroom"] == 0.9
    assert encoded["request_windows_s"] == [60.0, 10.0, 1.0]
    assert "_json" not in encoded


# -- feedback: share, pauses, AIMD -----------------------------------------------------------------


def test_near_limit_explained_by_our_own_sending_does_not_slow_us() -> None:
    sched = Sched(*LANGDOCK, tolerance_s=30.0)
    for i in range(30):  # 9,000 tokens in the last 10 s: no room for another 1,500
        sched.reserve(300, i * 0.3)
    sched.last_cost = 1500
    assert sched.feedback(200, {"x-ratelimit-remaining-tokens": "1000"}, 9.0) is False
    assert sched.multiplier(9.0) == 1.0  # 9,000 ours + 1,000 left: the whole window
    assert sched.st.pause == 0  # our windows hold the next request back


def test_remaining_headers_set_the_share_up_and_down_without_compounding() -> None:
    sched = Sched(*LANGDOCK, share_smoothing_s=0.0, share_smoothing_down_s=0.0)
    t = 0.0
    for _ in range(25):  # 5,000 tokens paced over ~5 s
        t = sched.reserve(200, t)
    now = 10.0  # the 10 s window holds 24 of them (4,800): others hold 4,200
    left = {"x-ratelimit-remaining-tokens": "1000"}
    assert sched.feedback(200, left, now) is True
    assert sched.multiplier(now) == pytest.approx(0.58)
    assert sched.st.shdown == 1
    # The same answer again (sends from before the decrease): the same share, no compounding.
    assert sched.feedback(200, left, now) is False
    assert sched.multiplier(now) == pytest.approx(0.58)
    # A 429 with the headers: the pause, the share they reveal; AIMD's cut is a safety net.
    sched.feedback(429, {"retry-after": "1", "x-ratelimit-remaining-tokens": "0"}, now)
    assert sched.multiplier(now) == pytest.approx(0.48)
    assert sched.st.m0 == BETA and sched.st.dec429 == 1
    assert sched.paused_until == now + 1.0
    # Others leave: the share goes back up at once (AIMD recovers on its own).
    assert not sched.feedback(200, {"x-ratelimit-remaining-tokens": "6000"}, now + 1)
    assert sched.share(now + 1) == 1.0
    assert sched.multiplier(now + 1) == pytest.approx(BETA + 0.01)


def test_a_revealed_share_holds_until_readings_stop_then_recovers() -> None:
    """Between two answers the share stays what the headers said (recovering from the first
    second put it above the truth by the recovery x the gap between answers, which at
    Langdock's limits is up to a request per window: 429s); without readings it recovers."""
    sched = Sched(*LANGDOCK, share_smoothing_s=0.0, share_smoothing_down_s=0.0)
    t = 0.0
    for _ in range(25):
        t = sched.reserve(200, t)
    sched.feedback(200, {"x-ratelimit-remaining-tokens": "1000"}, 10.0)
    hold = sched.p.share_hold_s
    assert sched.share(10.0) == sched.share(10.0 + hold) == pytest.approx(0.58)
    assert sched.share(10.0 + hold + 5) == pytest.approx(0.58 + 5 * sched.p.aimd_recovery_per_s)
    assert sched.share(10.0 + hold + 100) == 1.0


def test_headers_of_a_one_second_window_do_not_throttle() -> None:
    """x-ratelimit-remaining-* of the server's 1 s window, a second into the run: the 1 s
    reading is the whole window (ours + remaining), not a fraction of our 10 s budget."""
    sched = Sched(1_200, 10**6)  # 20 requests/s
    t = 0.0
    for _ in range(20):
        t = sched.reserve(1, t)
    assert sched.feedback(200, {"x-ratelimit-remaining-requests": "1"}, t) is False
    assert sched.share(t) == 1.0


def test_the_window_caps_follow_the_revealed_share() -> None:
    sched = Sched(*LANGDOCK, tolerance_s=10.0)
    t = 0.0
    for _ in range(11):  # 5,500 tokens paced over 5 s
        t = sched.reserve(500, t)
    now = 10.5  # the 10 s window holds 10 of them: 5,000, +500 left -> the share is 0.55
    sched.feedback(200, {"x-ratelimit-remaining-tokens": "500"}, now)
    assert sched.share(now) == pytest.approx(0.55)
    # Alone, 5,000 + 800 would fit the window now; at 0.55 - 0.009 of it, the oldest entry
    # (at 0.505 s) must leave our 10.05 s window first.
    assert sched.reserve(800, now) == pytest.approx(0.505 + 10.05, abs=1e-3)


def test_without_headers_a_429_cuts_the_aimd_multiplier() -> None:
    sched = Sched(*LANGDOCK)
    assert sched.feedback(429, {}, 1.0) is True
    assert sched.multiplier(1.0) == pytest.approx(BETA)
    assert sched.share(1.0) == 1.0


def test_a_429_naming_its_admission_bounds_the_share_without_headers() -> None:
    """Others use 40 % (unseen, no headers): after 30 s at 60 % of the limits, the 10 s window
    that refused held our ~6,000 tokens, the refused request included: the share drops to our
    usage without it (it fitted; with it, the window was full), and holds there."""
    sched = Sched(*LANGDOCK)
    t, slots = 0.0, []
    while t < 30.0:
        t = sched.reserve(300, t + 0.5)  # 600 tokens/s: 0.6 of the TPM
        slots.append((t, sched.st.seq))
    at, seq = slots[-1]
    sig = read_feedback(sched.p, 429, {}, last_cost=300, failed=(seq, us(at), 300), sent_at=us(at))
    assert sig.bound
    sch.feedback(sched.p, sched.st, sig, us(at + 0.1))
    fitted = sum(1 for t0, s in slots if at - 10.0 < t0 and s != seq)  # 18-19 sends
    assert sched.share(at + 0.1) == pytest.approx(fitted * 300 / 10_000)
    assert sched.share(at + sched.p.share_hold_s) == sched.share(at + 0.1)
    assert sched.st.shdown == 1


def test_a_lone_429_while_probing_above_a_revealed_share_bounds_it_at_once() -> None:
    """Past its hold the share recovers, probing above what the last 429 revealed: the 429
    that answers the probe is news, not jitter, even with no other 429 near it."""
    sched = Sched(*LANGDOCK, aimd_strike_requests=5, share_hold_s=10.0)

    t = 0.0
    while t < 30.0:
        t = sched.reserve(300, t + 0.5)
    refuse_last(sched, t)  # a lone 429 (the first): no bound
    assert sched.share(t) == 1.0
    t = sched.reserve(300, t + 0.5)
    refuse_last(sched, t)  # a strike: the share drops to what the window held
    revealed = sched.share(t)
    assert revealed < 0.7
    for _ in range(60):  # past the hold, the share recovers: more than 5 admissions later
        t = sched.reserve(300, t + 0.5)
    probe = sched.share(t)
    assert probe > revealed + 0.1
    refuse_last(sched, t)  # no strike (the last 429 was 60 admissions ago), but a probe's answer
    assert sched.share(t) < probe - 0.1  # our usage over the window that refused
    assert sched.st.shdown == 2


def test_refused_probes_double_the_hold_up_to_its_cap_and_a_header_reading_resets_it() -> None:
    """Without headers only 429s tell the share: each probe the server refuses (the share was
    recovering, not yet whole) doubles the hold before the next, up to 2**doublings x; a header
    reading says it exactly, and the next hold is the plain one again."""
    sched = Sched(*LANGDOCK, aimd_strike_requests=5, share_hold_s=10.0, share_hold_doublings=2)

    def held_for(t: float) -> float:
        """How long the share read at `t` holds (to 0.5 s): unchanged until then, higher after."""
        share, wait = sched.share(t), 0.0
        while sched.share(t + wait + 0.5) == share:
            wait += 0.5
        return wait

    t = 0.0
    while t < 30.0:
        t = sched.reserve(300, t + 0.5)
    refuse_last(sched, t)  # a lone 429 (the first): no bound
    t = sched.reserve(300, t + 0.5)
    refuse_last(sched, t)  # a strike: the share drops to what the window held, not a probe
    assert sched.share(t) < 1.0 and sched.st.shn == 0
    assert held_for(t) == 10.0
    for doubled, hold in ((1, 20.0), (2, 40.0), (3, 40.0)):  # capped at 2**2 x
        while sched.share(t) <= sched.st.sh0:  # held; then recovering: a probe
            t = sched.reserve(300, t + 0.5)
        t = sched.reserve(300, t + 3.0)
        refuse_last(sched, t)  # the probe's answer
        assert sched.st.shn == doubled
        assert held_for(t) == hold
    sched.feedback(200, {"x-ratelimit-remaining-tokens": "1000"}, t + 1.0)
    assert sched.st.shn == 0
    assert held_for(t + 1.0) == 10.0


def test_a_429_after_the_share_recovered_whole_starts_the_holds_over() -> None:
    """Others left (the share recovered to 1 with no 429) and came back: the 429 that finds
    them is a new reading, not a refused probe; its hold is the plain one."""
    sched = Sched(*LANGDOCK, aimd_strike_requests=5, share_hold_s=10.0)
    sched.st.sh0, sched.st.sht, sched.st.shn = 0.6, 0, 3  # read long ago, backed off thrice
    t = 0.0
    while t < 300.0:  # held 80 s, then +0.01/s: whole again by ~120 s
        t = sched.reserve(300, t + 0.5)
    assert sched.share(t) == 1.0
    refuse_last(sched, t)  # a probe (above sh0), but the share was whole
    assert sched.share(t) < 1.0
    assert sched.st.shn == 0


@pytest.mark.parametrize("tokens", [True, False])
def test_a_given_back_entry_leaving_a_window_frees_nothing(tokens: bool) -> None:
    """A 10 s window holds a given-back entry at t=100 (a 5xx not charged) and others after
    it; the next request waits for the first *counted* entry to leave (t=111), not for the
    given-back one (t=110), whose leaving frees nothing it was counted for. Tokens: 1,000 a
    window, a given-back 400 and a 600; the 500 at 110 would make 1,100. Requests: 2 a window,
    a given-back one and two more; a fourth at 110 would make 3."""
    if tokens:
        knobs: dict[str, Any] = {"token_windows_s": (10.0,), "request_windows_s": (60.0,)}
        p = Policy(6_000, 6_000, **knobs, **EXACT)
        costs, later = [(100.0, 400), (101.0, 600)], 500
    else:
        knobs = {"token_windows_s": (60.0,), "request_windows_s": (10.0,)}
        p = Policy(12, 10**6, **knobs, **EXACT)  # 2 requests in 10 s
        costs, later = [(100.0, 1), (101.0, 1), (101.0, 1)], 1
    st = State()
    sch.reserve(p, st, 1, 0)
    first = sch.reserve(p, st, costs[0][1], us(costs[0][0]))
    st.refunds.append(sch.Refund(first.at, first.seq, costs[0][1]))
    for t, cost in costs[1:]:
        assert sch.reserve(p, st, cost, us(t)).at == us(t)  # the given-back one not counted
    got = sch.reserve(p, st, later, us(102))
    assert got.at == us(111)  # 110 before
    win = sch._window(st, got.at - us(10))
    assert win.total - win.t_refunded <= 1_000 and win.n - win.n_refunded <= 2


def test_a_429_gives_back_the_tokens_of_its_admission_not_its_request() -> None:
    """Refused, so not charged: counted on, its tokens read as our usage in the next headers
    (a request over the share for a window at Langdock's limits)."""
    sched = Sched(*LANGDOCK, aimd_strike_requests=200)
    for i in range(3):
        sched.reserve(300, float(i))
    last = sched.st.log[-1]
    sig = read_feedback(sched.p, 429, {}, failed=(last.seq, last.at, 300), sent_at=last.at)
    sch.feedback(sched.p, sched.st, sig, us(2.1))
    sch.feedback(sched.p, sched.st, sig, us(2.2))  # the same answer twice: given back once
    win = sch._window(sched.st, -1)
    assert (win.n - win.n_refunded, win.total - win.t_refunded) == (3, 600)
    assert sched.st.refunded == 0  # "failed admissions given back" counts 5xx only


def test_a_429_bound_above_the_share_or_without_its_admission_says_nothing() -> None:
    sched = Sched(*LANGDOCK)
    t = 0.0
    while t < 30.0:
        t = sched.reserve(300, t + 0.5)
    # Without the admission it answers: no bound (only the pause and AIMD).
    assert not read_feedback(sched.p, 429, {}, last_cost=300).bound
    sched.feedback(429, {}, t)
    assert sched.share(t) == 1.0
    # Our usage fills the whole window (a lone 429 of jitter at its edge): no news.
    full = Sched(*LANGDOCK, aimd_strike_requests=200)
    t, seq = 0.0, 0
    while t < 30.0:
        t = full.reserve(300, t)
        seq = full.st.seq
    sig = read_feedback(full.p, 429, {}, last_cost=300, failed=(seq, us(t), 300), sent_at=us(t))
    sch.feedback(full.p, full.st, sig, us(t))
    assert full.share(t) == 1.0


def test_a_second_429_at_the_edge_of_the_share_lowers_it_to_the_middle_of_the_bracket() -> None:
    """The share believed (0.63, read high while ramping up) is a little above the truth: the
    window our pacing fills is refused again and again. The second 429 within the strike
    count is not jitter: the share drops between our usage without the refused request and
    with it, not by a whole request (the lower end)."""
    sched = Sched(5_000, 60_000, aimd_strike_requests=200)
    sched.st.sh0, sched.st.sht = 0.63, 0  # held for share_hold_s
    t = 0.0
    while t < 25.0:
        t = sched.reserve(100, t)
    sched.feedback(429, {"retry-after": "0"}, t)  # lone, naming no admission: jitter
    assert sched.share(t) == 0.63
    t = sched.reserve(100, t)
    last = sched.st.log[-1]
    refused = sch.Refund(last.at, last.seq, 100, 0)
    upper = sch._estimates(sched.p, sched.st, 0, sched.p.tpm, True, us(t), last.at, None)
    lower = sch._estimates(sched.p, sched.st, 0, sched.p.tpm, True, us(t), last.at, refused)
    assert upper is not None and lower is not None
    assert upper >= 0.63 - 2 * (1 - sched.p.headroom)  # at the edge: a lone one is jitter
    sig = read_feedback(
        sched.p, 429, {}, last_cost=100, failed=(last.seq, last.at, 100), sent_at=last.at
    )
    sch.feedback(sched.p, sched.st, sig, us(t))
    assert sched.share(t) == pytest.approx((lower + upper) / 2)
    assert lower < sched.share(t) < 0.63 and sched.st.shdown == 1


def test_a_429_at_the_edge_never_raises_the_share() -> None:
    """The middle of a wide bracket (the ramp's 1 s reading: our usage 0.4-0.8) can lie above
    the share believed (0.5): a 429 holds the share there, it never raises it."""
    p = Policy(500, 60_000)
    st = State()
    t0 = 10**15
    st.sh0, st.sht = 0.5, t0
    sch.feedback(p, st, read_feedback(p, 429, {"retry-after": "0"}, last_cost=400), t0)
    now = t0
    for _ in range(11):  # 8 s of sending: the 1 s ramp window still counts
        now = sch.reserve(p, st, 400, now).at
    last = st.log[-1]
    sig = read_feedback(p, 429, {}, last_cost=400, failed=(last.seq, last.at, 400), sent_at=last.at)
    upper = sch._estimates(p, st, 0, p.tpm, True, now, last.at, None)
    assert upper is not None and upper > 0.6  # the bracket's middle is above 0.5
    assert sch.feedback(p, st, sig, now + 200_000).share == 0.5  # 0.598 before
    assert st.shdown == 0


@pytest.mark.parametrize(
    ("events", "at", "expected"),
    [
        ([10.0], 10.0, BETA),
        ([10.0], 20.0, BETA + 0.1),  # recovers 0.01 per second
        ([10.0], 40.0, 1.0),  # ... up to 1, never above
        ([10.0, 11.0], 11.0, BETA + 0.01),  # within the 2 s cooldown: no compounding
        ([10.0, 12.0], 12.0, (BETA + 0.02) * BETA),
    ],
)
def test_adaptive_multiplier(events: list[float], at: float, expected: float) -> None:
    sched = Sched(*LANGDOCK)
    for t in events:
        sched.feedback(429, {"retry-after": "0"}, t)
    assert sched.multiplier(at) == pytest.approx(expected)


def test_a_lone_429_only_pauses_a_second_within_200_admissions_cuts() -> None:
    sched = Sched(600_000, 10**9, aimd_strike_requests=200)
    assert sched.feedback(429, {"retry-after": "1"}, 10.0) is False
    assert sched.multiplier(10.0) == 1.0 and sched.paused_until == 11.0
    t = 11.0
    for _ in range(300):
        t = sched.reserve(1, t)
    assert sched.feedback(429, {"retry-after": "0"}, t) is False  # 300 admissions later: lone
    for _ in range(50):
        t = sched.reserve(1, t)
    assert sched.feedback(429, {"retry-after": "0"}, t) is True  # 50 later: a run
    assert sched.multiplier(t) == pytest.approx(BETA)
    assert sched.st.dec429 == 1


def test_429_pauses_and_decreases_once_per_cooldown() -> None:
    sched = Sched(*LANGDOCK)
    assert sched.feedback(429, {"retry-after": "3"}, 10.0) is True
    assert sched.feedback(429, {"retry-after": "1"}, 10.5) is False
    assert sched.paused_until == 13.0  # a shorter retry-after never shortens the pause
    assert sched.reserve(100, 10.5) == pytest.approx(13.0)


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.0])
def test_sending_resumes_at_the_paced_rate_when_a_pause_ends(tolerance: float) -> None:
    sched = Sched(60, 10**9, headroom=1.0, tolerance_s=tolerance, adaptive=False, window_margin=0)
    sched.reserve(1, 0.0)
    sched.feedback(429, {"retry-after": "5"}, 10.0)
    now, sends = 10.0, []
    for _ in range(4):
        now = sched.reserve(1, now)
        sends.append(now)
    assert sends == [15.0, 16.0, 17.0, 18.0]


def test_non_adaptive_schedule_only_pauses() -> None:
    sched = Sched(*LANGDOCK, adaptive=False)
    assert sched.feedback(429, {}, 1.0) is False
    assert sched.multiplier(100.0) == 1.0
    assert sched.paused_until == 2.0


def failed_then_answer(remaining: int) -> Sched:
    """Four paced admissions of 250 tokens (a full 10 s window: 1,000), the third fails (503),
    then an answer reports `remaining` tokens of the window."""
    sched = Sched(600, 6_000, window_margin=0.5)  # our 10 s window: 15 s
    slots = [sched.reserve(250, 0.0) for _ in range(4)]
    assert slots[-1] == pytest.approx(7.58, abs=0.01)
    sig = read_feedback(sched.p, 503, {}, failed=(3, us(slots[2]), 250))
    sch.feedback(sched.p, sched.st, sig, us(7.6))
    sched.feedback(200, {"x-ratelimit-remaining-tokens": str(remaining)}, 7.6)
    return sched


def test_a_failed_admission_the_server_did_not_charge_is_given_back() -> None:
    sched = failed_then_answer(250)  # 250 left: the server charged 750, not our 1,000
    assert sched.st.refunded == 1 and sched.share(7.6) == 1.0
    assert sched.reserve(250, 7.6) == pytest.approx(10.1, abs=0.01)  # paced, not held


def test_a_failed_admission_the_server_charged_is_kept() -> None:
    sched = failed_then_answer(0)  # 0 left: all 1,000 charged
    assert sched.st.refunded == 0 and sched.st.sus == 0
    assert sched.reserve(250, 7.6) == pytest.approx(15.0)  # the window holds it back


# -- the local backend, on virtual time ---------------------------------------------------------


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
    return LocalLimiter(
        lambda model: (rpm, 10**9), headroom=1.0, window_margin=0.0, aimd_strike_requests=0
    )


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
        # Paced from the first: one per second, four by t=3.
        assert admitted == [0.0, 1.0, 2.0, 3.0]
        await asyncio.gather(*tasks)
        assert admitted[-1] == 9.0


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


def credited(rpm: int) -> LocalLimiter:
    """Model "m" at `rpm` and 6,000 TPM (10 s windows of 1,000 tokens), exact windows, and a
    minute of pacing credit: only the windows hold requests back."""
    limiter = LocalLimiter(
        lambda model: (rpm, 6_000), headroom=1.0, window_margin=0.0, tolerance_s=60.0
    )
    limiter.state("m").ttat = limiter.state("m").rtat = 0
    return limiter


async def test_the_head_hands_a_window_s_room_to_a_smaller_waiter() -> None:
    """A 10 s window of 1,000 tokens. While a 450 waits for room, 300, 250 and 150 queue
    behind it. At t=10 the 300 must wait until t=11, and the 150 fits the room it leaves at
    t=10; the 250 does not (it would delay the 300)."""
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = credited(600)
        await limiter.acquire("m", 400)
        await asyncio.sleep(1.0)
        await limiter.acquire("m", 400)
        admitted: list[tuple[int, float]] = []

        async def one(cost: int) -> None:
            await limiter.acquire("m", cost)
            admitted.append((cost, loop.time()))

        await asyncio.gather(*(one(c) for c in (450, 300, 250, 150)))
        assert admitted == [(450, 10.0), (150, 10.0), (300, 11.0), (250, 20.0)]


async def test_packing_passes_a_head_over_a_bounded_number_of_times() -> None:
    """A 10 s window of 1,000 tokens. A 600 waits behind a 500, forty 450s queue behind it: two
    450s fill a window better than the 600 with anything, so each time the 600 could go, the
    packing hands its slot to a 450, and a 450 fills the room before it. The head counts the
    slots it hands over: after `lookahead_passes` it takes its own (without the count, it
    waited for all forty)."""
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = credited(60_000)
        await limiter.acquire("m", 1_000)
        blocker = loop.create_task(limiter.acquire("m", 500))  # the head until t=10
        await asyncio.sleep(0)
        order: list[int] = []

        async def one(i: int, cost: int) -> None:
            await limiter.acquire("m", cost)
            order.append(i)

        costs = [600] + [450] * 40
        await asyncio.gather(blocker, *(one(i, c) for i, c in enumerate(costs)))
        passes = limiter.policy("m").lookahead_passes
        assert passes <= order.index(0) <= passes + 1  # the last: a fill that does not delay it
        assert sorted(order) == list(range(len(costs)))


async def test_a_cancelled_waiter_leaves_the_line_and_a_cancelled_head_passes_it_on() -> None:
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = per_second(60)
        await limiter.acquire("m", 1)  # the next slot is at t=1
        head = loop.create_task(limiter.acquire("m", 1))
        second = loop.create_task(limiter.acquire("m", 1))
        third = loop.create_task(limiter.acquire("m", 1))
        await asyncio.sleep(0.5)
        second.cancel()
        head.cancel()  # its slot at t=1 stays taken
        await asyncio.gather(head, second, return_exceptions=True)
        await third
        assert loop.time() == 2.0
        assert (await limiter.acquire("m", 1)).at_us == 3_000_000


async def test_acquire_returns_the_admission() -> None:
    with virtual_time():
        limiter = per_second(60)
        first = await limiter.acquire("m", 1)
        assert (first.seq, first.at_us, first.waited_s, first.cost) == (1, 0, 0.0, 1)
        second = await limiter.acquire("m", 1)
        assert (second.seq, second.waited_s) == (2, 1.0)


async def test_429_pauses_the_next_admission() -> None:
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = per_second(600)
        await limiter.acquire("gpt-4o", 1)
        limiter.feedback("gpt-4o", status=429, headers={"retry-after-ms": "5000"})
        snap = limiter.snapshot()["gpt-4o"]
        assert snap.paused_until_s == 5.0
        assert snap.multiplier == pytest.approx(BETA)
        assert snap.decreases_429 == 1 and snap.slowdown_reasons()
        await limiter.acquire("gpt-4o", 1)
        assert loop.time() == 5.0


async def test_rate_limit_headers_are_read_in_any_case() -> None:
    """Answers carry aiohttp's case-insensitive headers. A plain 200 is skipped at once, but
    one with X-RateLimit-Remaining-* in the server's own spelling is read: no request left
    after our one says others use the rest of the quota."""
    with virtual_time():
        limiter = per_second(600)
        await limiter.acquire("m", 1)
        plain = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
        limiter.feedback("m", status=200, headers=plain)
        assert limiter.snapshot()["m"].share_reductions == 0
        spent = CIMultiDictProxy(CIMultiDict({"X-RateLimit-Remaining-Requests": "0"}))
        limiter.feedback("m", status=200, headers=spent)
        snap = limiter.snapshot()["m"]
        assert snap.share_reductions == 1 and snap.share < 0.5
        other = per_second(600)  # a plain dict, the server's spelling: read too
        await other.acquire("m", 1)
        other.feedback("m", status=200, headers={"X-RateLimit-Remaining-Requests": "0"})
        assert other.snapshot()["m"].share_reductions == 1


async def test_pause_arriving_while_a_waiter_sleeps_is_honoured() -> None:
    with virtual_time():
        loop = asyncio.get_running_loop()
        limiter = LocalLimiter(
            lambda model: (60, 10**9), headroom=1.0, tolerance_s=0.0, window_margin=0.0
        )
        await limiter.acquire("m", 1)  # the next slot is at t=1
        waiter = loop.create_task(limiter.acquire("m", 1))
        await asyncio.sleep(0.5)
        limiter.feedback("m", status=429, headers={"retry-after": "2"})
        assert (await waiter).waited_s == 2.5  # asked at 0, paused at 0.5 until 2.5
        assert loop.time() == 2.5


async def test_impossible_cost_raises_without_waiting() -> None:
    with virtual_time():
        limiter = LocalLimiter(lambda model: (500, 60_000))
        with pytest.raises(ValueError, match="gpt-4o"):
            await limiter.acquire("gpt-4o", 60_001)
        assert asyncio.get_running_loop().time() == 0.0


async def test_models_are_paced_independently() -> None:
    with virtual_time():
        limiter = LocalLimiter(
            lambda model: (60, 10**9), headroom=1.0, tolerance_s=0.0, window_margin=0.0
        )
        await limiter.acquire("a", 1)
        assert (await limiter.acquire("b", 1)).waited_s == 0.0
        assert (await limiter.acquire("a", 1)).waited_s == 1.0


async def test_a_5xx_reported_with_its_admission_reaches_the_schedule() -> None:
    with virtual_time():
        limiter = LocalLimiter(lambda model: (600, 6_000), tolerance_s=30.0)
        adms = [await limiter.acquire("m", 250) for _ in range(4)]
        limiter.feedback("m", status=503, headers={}, admission=adms[2])
        limiter.feedback("m", status=200, headers={"x-ratelimit-remaining-tokens": "250"})
        assert limiter.snapshot()["m"].refunded == 1


async def test_snapshot_and_lifecycle() -> None:
    limiter = LocalLimiter(lambda model: (500, 60_000), headroom=0.9, clock=lambda: 100.0)
    await limiter.start()
    assert limiter.snapshot() == {}
    await limiter.acquire("gpt-4o", 100)
    limiter.feedback("gpt-4o", status=200, headers={})
    assert limiter.snapshot() == {
        "gpt-4o": ModelSnapshot(
            rpm=500,
            tpm=60_000,
            effective_rpm=pytest.approx(450.0),  # type: ignore[arg-type]
            effective_tpm=pytest.approx(54_000.0),  # type: ignore[arg-type]
            multiplier=1.0,
            share=1.0,
            paused_until_s=0.0,
            backend="local",
        )
    }
    assert limiter.snapshot()["gpt-4o"].slowdown_reasons() == []
    await limiter.aclose()


def test_a_bad_knob_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="headroom"):
        LocalLimiter(lambda model: (500, 60_000), headroom=1.5)


def test_the_policy_encodes_its_knobs_and_none_of_what_it_derives() -> None:
    """The Lua scripts read the knobs; the derived values (windows in µs, the shortcut's
    budgets) are the schedule's own and must not reach them."""
    p = Policy(500, 60_000, tolerance_s=2.5)
    encoded = json.loads(p.encode())
    assert set(encoded) == {f.name for f in dataclasses.fields(p) if f.init}
    assert encoded["tolerance_s"] == 2.5 and p.tolerance_us == 2_500_000


def test_the_mock_servers_quota_never_refuses_what_we_admit() -> None:
    """The bundled server's own sliding-window quota, driven by our schedule on a fake clock."""
    from batcher.mock import SlidingWindowQuota

    clock = [0.0]
    for rpm, tpm in (LANGDOCK, TEN_X):
        for costs in ((150, 400), (50, 100), (1_000, 3_000)):
            quota = SlidingWindowQuota(rpm, tpm, clock=lambda: clock[0])
            for t, cost in saturate(Sched(rpm, tpm), costs, 90.0):
                clock[0] = t + 0.02  # arrives a little after admission
                assert quota.try_admit(cost).admitted, (rpm, tpm, costs, t)
