"""Admission control per model: smooth pacing under RPM and TPM, adaptive to foreign load.

The server (Azure behind Langdock) charges a request at admission: one request, and its prompt
plus `max_tokens` in tokens. It enforces per-minute limits over short sliding windows (1 or
10 s), so the minute's budget must be spent smoothly, never in a burst.

Pure pieces (a function of state, amount and `now`; no clock, no I/O; the Redis limiter
reuses them):

- `Pace`: GCRA / virtual scheduling of one resource. State: the theoretical arrival time
  `tat`. A request may go at `max(now, tat - tolerance)`; committing a cost `c` moves
  `tat = max(tat, now) + c / rate`. Any window of length T then carries at most
  `rate * (T + tolerance)` plus one request's cost; with tolerance 0 sending is strictly
  smooth. The default tolerance (1 s) lets the schedule catch up time a window cap cost it.
- `SlidingWindow`: an exact log of what we sent in the last `length` seconds. That one
  request's cost of overhang is what a strict sliding-window server rejects: at 60k TPM a 10 s
  window holds 10,000 tokens, and pacing at 98.5 % leaves only 150 tokens of slack for the
  request that closes the window. Pacing alone made 39 % of 150–400-token requests overflow a
  10 s window in simulation (92 % with 1,500-token requests). The log admits a request only if
  every window (60 s and 10 s, a little longer than the server's to absorb send-time jitter)
  still has room for it; the pacing keeps the sending smooth inside that cap.
- `Adaptive`: AIMD multiplier on the pacing rates, a pure function of time. A 429 that our
  own accounting let through means someone else uses the quota: multiply by `AIMD_BETA`
  (at most once per `AIMD_COOLDOWN_S`), then recover linearly. All the adaptation when answers
  carry no `x-ratelimit-remaining-*` headers (Langdock may not pass them through).
- `Share`: the share of the quota others leave us, as the headers reveal it. The server's
  window holds our sends and others'; `remaining` is what is left, so our usage over the
  window plus `remaining` is what the window allows us. Every answer with the header sets it
  (up or down: no guessing, no compounding of signals about sends made before a decrease);
  it scales both the pacing and the window caps, so we fill exactly the allowed share. It
  recovers linearly like the multiplier if the headers stop.
- `ModelSchedule`: one model's pieces together, plus the pause a 429 or near-limit headers set.
- `read_feedback`, `parse_duration`: what an answer's status and headers ask of us.

`LocalLimiter` is the thin async wrapper: per model, waiters queue FIFO on an asyncio.Lock; the
head waiter sleeps exactly the computed delay (one timer, no polling), recomputes (a 429 may
have paused the model meanwhile) and commits once the delay is 0.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from batcher.errors import parse_retry_after

# -- constants ---------------------------------------------------------------------------------

DEFAULT_HEADROOM = 0.985
# The server's windows (langdock-api.md: Azure uses 1 or 10 s; the minute itself is the
# longest), each budgeted at limit * length / 60.
DEFAULT_WINDOWS_S: tuple[float, ...] = (60.0, 10.0)
# Our windows are this much longer than the server's: a request admitted here reaches the server
# a little later, by a delay that varies from request to request.
WINDOW_MARGIN_S = 0.2
# Burst allowance of the pacing: a request may go this long before its smooth slot. It lets the
# schedule catch up the time lost when a window held a request back (with 0, saturated 150-400
# token requests at 60k TPM reached only 0.95 of the limit in simulation; with 1 s, 0.977).
# The windows still cap every burst; one second's budget at once is what a 1 s window allows.
DEFAULT_TOLERANCE_S = 1.0

AIMD_BETA = 0.85  # multiplicative decrease on an unexpected 429
AIMD_RECOVERY_PER_S = 0.01  # linear recovery of the multiplier per second
AIMD_M_MIN = 0.05  # never slower than this fraction of the limits
AIMD_COOLDOWN_S = 2.0  # 429s for requests sent before the last decrease do not compound
# Each estimate counts the sends made while the answer travelled (and while it waited on a
# busy event loop), which the server had not seen: estimates run high (by 3 % in the foreign-load
# benchmark when averaged), and at Langdock's limits one request is 3.6 % of a 10 s window. So
# a higher estimate is followed with this time constant, a lower one 4x faster (the first is
# taken as it is, so the start-up does not overshoot).
SHARE_SMOOTHING_S = 2.0
SHARE_SMOOTHING_DOWN_S = SHARE_SMOOTHING_S / 4

DEFAULT_PAUSE_S = 1.0  # a 429 without retry-after pauses the model this long
MAX_HEADER_PAUSE_S = 60.0  # a per-minute limit never needs a longer pause than the minute
# A near-limit header is "explained" by our own sending if our usage over the window plus this
# much (the answer's round trip) leaves no room for another request like the last one.
FEEDBACK_SLACK_S = 1.0

_EPS = 1e-9  # float slack: a wait this short is no wait (it would not move a float clock)


def check_cost(model: str, cost: int, tpm: int) -> None:
    """Refuse at once what can never be admitted (the engine records such rows as errors)."""
    if cost < 0:
        raise ValueError(f"negative token cost {cost} for model {model!r}")
    if cost > tpm:
        raise ValueError(
            f"a request to {model!r} costs {cost} tokens at admission, more than the whole "
            f"per-minute limit of {tpm}: it can never be sent. Shorten the prompt or lower "
            "max_tokens (or raise the model's tpm in the job file if the quota is larger)."
        )


# -- pure pacing -------------------------------------------------------------------------------


@dataclass(slots=True)
class Pace:
    """GCRA (virtual scheduling) of one resource at `rate` units per second."""

    rate: float
    tolerance: float = DEFAULT_TOLERANCE_S
    tat: float = -math.inf  # theoretical arrival time of the next unit of work

    def delay(self, cost: int, now: float) -> float:
        """Seconds until a request may go. (The cost is paid after, so it does not matter.)"""
        del cost
        return max(0.0, self.tat - self.tolerance - now)

    def commit(self, cost: int, now: float) -> None:
        self.tat = max(self.tat, now) + cost / self.rate


@dataclass(slots=True)
class SlidingWindow:
    """Exact record of the cost sent in the last `length` seconds, capped at `budget`.

    A request bigger than the budget goes alone, into an empty window: never a hang (the
    server's shorter windows do the same; the minute's window is checked by `check_cost`).
    """

    length: float
    budget: float
    entries: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def _expire(self, now: float) -> None:
        cutoff = now - self.length + _EPS
        entries = self.entries
        while entries and entries[0][0] <= cutoff:
            self.total -= entries.popleft()[1]

    def delay(self, cost: int, now: float, scale: float = 1.0) -> float:
        """Seconds until `cost` fits `scale` of the budget: after the oldest entries have left."""
        self._expire(now)
        excess = self.total + cost - self.budget * scale
        if excess <= 0 or self.total == 0:
            return 0.0
        freed = 0
        for t, c in self.entries:
            freed += c
            if freed >= excess or freed == self.total:
                return max(0.0, t + self.length - now)
        raise AssertionError("unreachable: freeing every entry always fits")

    def commit(self, cost: int, now: float) -> None:
        self._expire(now)
        if cost:
            self.entries.append((now, cost))
            self.total += cost

    def used_within(self, length: float, now: float) -> int:
        """Cost sent in (now - length, now], `length` at most this window's."""
        self._expire(now)
        cutoff, total = now - length + _EPS, self.total
        for t, c in self.entries:  # only the few oldest lie between the two lengths
            if t > cutoff:
                break
            total -= c
        return total

    def used_since(self, start: float) -> int:
        """Cost sent at or after `start` (which may lie before the window: then all we hold)."""
        return sum(c for t, c in self.entries if t >= start) if self.entries else 0


# -- pure adaptive rate ------------------------------------------------------------------------


@dataclass(slots=True)
class Adaptive:
    """AIMD multiplier m(t) = min(1, m0 + recovery_per_s * (t - t0)), lowered by 429s."""

    beta: float = AIMD_BETA
    recovery_per_s: float = AIMD_RECOVERY_PER_S
    m_min: float = AIMD_M_MIN
    cooldown_s: float = AIMD_COOLDOWN_S
    m0: float = 1.0
    t0: float = 0.0
    last_decrease: float = -math.inf

    def value(self, now: float) -> float:
        return min(1.0, self.m0 + self.recovery_per_s * max(0.0, now - self.t0))

    def on_rate_limited(self, now: float) -> bool:
        """A signal that someone else uses the quota: decrease unless within the cooldown."""
        if now - self.last_decrease < self.cooldown_s:
            return False
        self.m0 = max(self.m_min, self.value(now) * self.beta)
        self.t0 = self.last_decrease = now
        return True


@dataclass(slots=True)
class Share:
    """s(t) = min(1, s0 + recovery_per_s * (t - t0)): the quota share the headers revealed.

    An estimate moves s0 toward it by 1 - exp(-dt / smoothing), dt since the last estimate,
    the smoothing 4x shorter downwards; the first is taken as it is.
    """

    recovery_per_s: float = AIMD_RECOVERY_PER_S
    smoothing_s: float = SHARE_SMOOTHING_S
    s0: float = 1.0
    t0: float = -math.inf  # no estimate yet

    def value(self, now: float) -> float:
        if self.t0 == -math.inf:
            return self.s0
        return min(1.0, self.s0 + self.recovery_per_s * max(0.0, now - self.t0))

    def reveal(self, share: float, now: float) -> None:
        share = min(1.0, max(AIMD_M_MIN, share))
        current = self.value(now)
        tau = self.smoothing_s if share > current else self.smoothing_s / 4
        if self.t0 != -math.inf and tau > 0:
            weight = 1.0 - math.exp(-max(0.0, now - self.t0) / tau)
            share = current + weight * (share - current)
        self.s0, self.t0 = share, now


def revealed_share(windows: list[tuple[float, int, float]], remaining: int) -> float | None:
    """The share of the quota a `remaining` header leaves us; None without windows.

    `windows`: (the server's length, our usage over it, its full budget) per window, the
    server's windows being ours. The header reports the server's tightest window, which one
    we cannot tell. For that window, (usage + remaining) / budget is the true share; for the
    others the estimate is lower. So the largest estimate is the share when others' load is
    even over the windows, as it is at a steady rate. (Sends the server had not yet seen push
    an estimate above 1 at full speed: capped.)
    """
    estimates = [(used + remaining) / budget for _, used, budget in windows if budget > 0]
    return min(1.0, max(estimates)) if estimates else None


# -- pure feedback -----------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds from an OpenAI-style duration ("1s", "6m0s", "120ms", "1h2m3.5s") or a number."""
    if value is None:
        return None
    text = value.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                return None
            number, unit = float(match.group(1)), match.group(2)
            seconds += number * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
            pos = match.end()
        if pos == 0 or pos != len(text):
            return None
    return seconds if seconds >= 0 and math.isfinite(seconds) else None


def _parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return math.floor(float(value.strip()))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class FeedbackSignal:
    """What an answer asks of the limiter."""

    is_429: bool
    pause_s: float  # pause admission this long from now; 0 for none
    near_limit: bool  # headers say the next request like the last one would be refused
    limited_by: tuple[str, ...] = ()  # "requests" / "tokens": which headers said so
    remaining_requests: int | None = None  # x-ratelimit-remaining-*, when sent
    remaining_tokens: int | None = None


def read_feedback(status: int, headers: Mapping[str, str], *, last_cost: int = 1) -> FeedbackSignal:
    """Classify one answer. `last_cost`: the token cost of the model's last admitted request.

    A 429 pauses for `retry-after(-ms)`, else `DEFAULT_PAUSE_S`. Any answer whose
    `x-ratelimit-remaining-requests` is 0, or whose `x-ratelimit-remaining-tokens` is below
    `last_cost`, is near the limit: pause until the matching `x-ratelimit-reset-*`.
    The remaining counts are passed on (on 429s too). Absent headers mean no signal.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    left = {r: _parse_int(lower.get(f"x-ratelimit-remaining-{r}")) for r in ("requests", "tokens")}
    rem = {f"remaining_{r}": None if v is None else max(0, v) for r, v in left.items()}
    if status == 429:
        retry = parse_retry_after(lower)
        return FeedbackSignal(True, DEFAULT_PAUSE_S if retry is None else retry, False, **rem)
    limited: list[str] = []
    pause = 0.0
    for resource, threshold in (("requests", 1), ("tokens", max(1, last_cost))):
        remaining = left[resource]
        if remaining is None or remaining >= threshold:
            continue
        limited.append(resource)
        reset = parse_duration(lower.get(f"x-ratelimit-reset-{resource}"))
        pause = max(pause, min(MAX_HEADER_PAUSE_S, DEFAULT_PAUSE_S if reset is None else reset))
    return FeedbackSignal(False, pause, bool(limited), tuple(limited), **rem)


# -- one model's schedule ----------------------------------------------------------------------


class ModelSchedule:
    """Pacing, window caps, adaptive multiplier and pause of one model. Pure: `now` is given."""

    def __init__(
        self,
        rpm: int,
        tpm: int,
        *,
        headroom: float = DEFAULT_HEADROOM,
        adaptive: bool = True,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        windows_s: tuple[float, ...] = DEFAULT_WINDOWS_S,
        window_margin_s: float = WINDOW_MARGIN_S,
        name: str = "",
    ) -> None:
        if rpm <= 0 or tpm <= 0:
            raise ValueError(f"limits must be positive, got rpm={rpm} tpm={tpm}")
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {headroom}")
        self.name = name  # for messages only
        self.rpm, self.tpm, self.headroom = rpm, tpm, headroom
        self.adaptive = Adaptive() if adaptive else None
        self.share = Share() if adaptive else None
        self.window_margin_s = window_margin_s
        self.requests = Pace(rpm / 60.0 * headroom, tolerance_s)
        self.tokens = Pace(tpm / 60.0 * headroom, tolerance_s)
        self.request_windows = [
            SlidingWindow(w + window_margin_s, rpm * w / 60.0) for w in windows_s
        ]
        self.token_windows = [SlidingWindow(w + window_margin_s, tpm * w / 60.0) for w in windows_s]
        self.paused_until = -math.inf
        self.last_cost = 0

    def multiplier(self, now: float) -> float:
        """The pacing's fraction of the limits: AIMD's guess, or less if headers say so."""
        if self.adaptive is None or self.share is None:
            return 1.0
        return min(self.adaptive.value(now), self.share.value(now))

    def share_of_windows(self, now: float) -> float:
        """The fraction of every window's budget we may fill: the revealed share.

        Alone (share 1) our log is exact; a revealed share below 1 is an estimate that may run
        a request high at Langdock's limits (a 10 s window holds ~25 requests), so the further
        below 1, the more margin: 2 x (1 - headroom) x (1 - share), 1.2 % of the quota at 0.6.
        """
        share = self.share.value(now) if self.share is not None else 1.0
        return share - 2.0 * (1.0 - self.headroom) * (1.0 - share)

    def _set_rates(self, now: float) -> None:
        m = self.multiplier(now)
        self.requests.rate = self.rpm / 60.0 * self.headroom * m
        self.tokens.rate = self.tpm / 60.0 * self.headroom * m

    def delay(self, cost: int, now: float) -> float:
        """Seconds until a request of `cost` tokens may go; 0: now. ValueError if never."""
        check_cost(self.name, cost, self.tpm)
        self._set_rates(now)
        waits = [self.paused_until - now, self.requests.delay(1, now), self.tokens.delay(cost, now)]
        scale = self.share_of_windows(now)
        waits += [w.delay(1, now, scale) for w in self.request_windows]
        waits += [w.delay(cost, now, scale) for w in self.token_windows]
        wait = max(waits)
        return wait if wait > _EPS else 0.0

    def commit(self, cost: int, now: float) -> None:
        """Record a request admitted at `now` (call only when `delay` said 0)."""
        self._set_rates(now)
        self.requests.commit(1, now)
        self.tokens.commit(cost, now)
        for w in self.request_windows:
            w.commit(1, now)
        for w in self.token_windows:
            w.commit(cost, now)
        self.last_cost = cost

    def pause(self, seconds: float, now: float) -> None:
        """Admit nothing before `now + seconds`, then resume at the paced rate.

        During a pause `tat` falls into the past; without moving it the tolerance would let a
        second's worth go at once when the pause ends, into a window that just freed one entry.
        """
        self.paused_until = max(self.paused_until, now + seconds)
        for p in (self.requests, self.tokens):
            p.tat = max(p.tat, self.paused_until + p.tolerance)

    def _explained_by_us(self, signal: FeedbackSignal, now: float) -> bool:
        """Does our own recent sending alone leave no room for another request like the last?"""
        pairs: list[tuple[SlidingWindow, int]] = []
        if "requests" in signal.limited_by:
            pairs += [(w, 1) for w in self.request_windows]
        if "tokens" in signal.limited_by:
            pairs += [(w, self.last_cost) for w in self.token_windows]
        scale = self.share_of_windows(now)
        return any(
            w.used_since(now - w.length - FEEDBACK_SLACK_S) + cost > w.budget * scale
            for w, cost in pairs
        )

    def revealed(self, signal: FeedbackSignal, now: float) -> float | None:
        """The share of the quota the answer's remaining-* headers reveal, if they do."""
        shares = []
        for windows, remaining in (
            (self.request_windows, signal.remaining_requests),
            (self.token_windows, signal.remaining_tokens),
        ):
            if remaining is None or not windows:
                continue
            server = [
                (length, w.used_within(length, now), w.budget)
                for w in windows
                for length in [w.length - self.window_margin_s]
            ]
            share = revealed_share(server, remaining)
            if share is not None:
                shares.append(share)
        return min(shares, default=None)

    def feedback(self, signal: FeedbackSignal, now: float) -> bool:
        """Apply an answer's signal; True if the multiplier was decreased.

        With remaining-* headers the share they reveal sets the pace (repeated near-limit
        answers about sends made before a decrease cannot compound). A 429 also decreases the
        AIMD multiplier, once per cooldown: without the headers that is all the adaptation;
        with them it only bites if 429s persist although the revealed share said there was
        room (headers that mean something else than our windows assume).
        """
        before = self.multiplier(now)
        share = self.revealed(signal, now) if self.share is not None else None
        if share is not None and self.share is not None:
            self.share.reveal(share, now)
        # A near-limit signal our own sending (within the share) explains needs no pause: our
        # windows hold the next request back until it fits.
        if signal.is_429 or (signal.near_limit and not self._explained_by_us(signal, now)):
            if signal.pause_s > 0:
                self.pause(signal.pause_s, now)
            if self.adaptive is not None and (signal.is_429 or share is None):
                self.adaptive.on_rate_limited(now)
        return self.multiplier(now) < before - _EPS


# -- the async wrapper -------------------------------------------------------------------------


class Limiter(Protocol):
    """What the engine needs of a limiter; LocalLimiter and RedisLimiter both provide it."""

    async def start(self) -> None: ...  # connect/check; local: no-op

    async def acquire(self, model: str, cost: int) -> float: ...  # waits; returns seconds waited

    def feedback(self, model: str, *, status: int, headers: Mapping[str, str]) -> None: ...

    def snapshot(self) -> dict[str, dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class LocalLimiter:
    """An in-process `Limiter`: one `ModelSchedule` per model, FIFO waiters, one timer."""

    backend = "local"

    def __init__(
        self,
        limits: Callable[[str], tuple[int, int]],
        *,
        headroom: float = DEFAULT_HEADROOM,
        adaptive: bool = True,
        clock: Callable[[], float] | None = None,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        windows_s: tuple[float, ...] = DEFAULT_WINDOWS_S,
    ) -> None:
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {headroom}")
        self._limits = limits
        self.headroom = headroom
        self.adaptive = adaptive
        self._clock = clock
        self._tolerance_s = tolerance_s
        self._windows_s = windows_s
        self._schedules: dict[str, ModelSchedule] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # outside a loop: the clock the default loop uses
            return time.monotonic()

    def schedule(self, model: str) -> ModelSchedule:
        sched = self._schedules.get(model)
        if sched is None:
            rpm, tpm = self._limits(model)
            sched = self._schedules[model] = ModelSchedule(
                rpm,
                tpm,
                headroom=self.headroom,
                adaptive=self.adaptive,
                tolerance_s=self._tolerance_s,
                windows_s=self._windows_s,
                name=model,
            )
        return sched

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def acquire(self, model: str, cost: int) -> float:
        """Wait until `model` may take a request of `cost` tokens; seconds waited.

        ValueError at once if the cost can never fit. Waiters of one model go FIFO. Cancelled
        while waiting, nothing is reserved: only the head waiter commits, and only at delay 0.
        """
        sched = self.schedule(model)
        check_cost(model, cost, sched.tpm)
        start = self._now()
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            while True:
                now = self._now()
                wait = sched.delay(cost, now)
                if wait <= 0:
                    sched.commit(cost, now)
                    return now - start
                await asyncio.sleep(wait)

    def feedback(self, model: str, *, status: int, headers: Mapping[str, str]) -> None:
        """Report an answer of `model`: 429s pause it; remaining-* headers or AIMD set its pace."""
        sched = self.schedule(model)
        signal = read_feedback(status, headers, last_cost=sched.last_cost)
        if (
            signal.is_429
            or signal.near_limit
            or signal.remaining_requests is not None
            or signal.remaining_tokens is not None
        ):
            sched.feedback(signal, self._now())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self._now()
        out: dict[str, dict[str, Any]] = {}
        for model, sched in sorted(self._schedules.items()):
            m = sched.multiplier(now)
            out[model] = {
                "rpm": sched.rpm,
                "tpm": sched.tpm,
                "effective_rpm": sched.rpm * self.headroom * m,
                "effective_tpm": sched.tpm * self.headroom * m,
                "multiplier": m,
                "paused_until_s": max(0.0, sched.paused_until - now),
                "backend": self.backend,
            }
        return out
