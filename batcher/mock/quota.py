"""Azure's per-minute limits over sliding windows, charged at admission (pure, clock injected).

`SlidingWindowQuota` holds one model's RPM/TPM limits; `try_admit` answers "admitted" or "fits
in this many seconds". No I/O: unit-tested with a fake clock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The verdict on one request. `retry_after_s` is exact: after that long it fits."""

    admitted: bool
    retry_after_s: float | None = None  # None when admitted, or when it can never fit
    limited_by: str | None = None  # "requests" | "tokens" when refused
    too_large: bool = False  # more than the whole minute's quota: no wait helps


@dataclass(frozen=True, slots=True)
class QuotaState:
    """What the x-ratelimit-* headers report: the tightest window, right now."""

    remaining_requests: int | None  # None: unlimited
    remaining_tokens: int | None
    reset_requests_s: float  # until the tightest window's oldest entry expires
    reset_tokens_s: float


class _Window:
    """One sliding window: the client usage of the last `length_s` seconds."""

    __slots__ = ("events", "length_s", "request_cap", "requests", "strict", "token_cap", "tokens")

    def __init__(
        self, length_s: float, request_cap: float | None, token_cap: float | None, strict: bool
    ) -> None:
        self.length_s = length_s
        self.request_cap = request_cap
        self.token_cap = token_cap
        self.strict = strict
        self.events: deque[tuple[float, int]] = deque()  # (time, tokens); tokens 0 = failed
        self.requests = 0
        self.tokens = 0

    def expire(self, now: float) -> None:
        # An entry made at t counts while now < t + length_s.
        cutoff = now - self.length_s
        events = self.events
        while events and events[0][0] <= cutoff:
            _, tok = events.popleft()
            self.requests -= 1
            self.tokens -= tok

    def add(self, now: float, tokens: int) -> None:
        self.events.append((now, tokens))
        self.requests += 1
        self.tokens += tokens

    def _fits(self, requests: int, tokens: int, cost: int) -> bool:
        if not self.strict and requests == 0:
            # A short window holds at least one request, else a small limit (or a prompt bigger
            # than limit*w/60) could never pass; the 60 s window still caps the minute.
            return True
        if self.request_cap is not None and requests + 1 > self.request_cap + _EPS:
            return False
        return self.token_cap is None or tokens + cost <= self.token_cap + _EPS

    def blocked_by(self, cost: int) -> str:
        if self.request_cap is not None and self.requests + 1 > self.request_cap + _EPS:
            return "requests"
        return "tokens"

    def wait_for(self, cost: int, now: float) -> float | None:
        """Seconds until a request of `cost` tokens fits; 0 now; None never."""
        requests, tokens = self.requests, self.tokens
        if self._fits(requests, tokens, cost):
            return 0.0
        for t, tok in self.events:
            requests -= 1
            tokens -= tok
            if self._fits(requests, tokens, cost):
                return max(0.0, t + self.length_s - now)
        return None

    def remaining(self) -> tuple[float | None, float | None]:
        r = None if self.request_cap is None else self.request_cap - self.requests
        t = None if self.token_cap is None else self.token_cap - self.tokens
        return r, t

    def reset_s(self, now: float) -> float:
        return max(0.0, self.events[0][0] + self.length_s - now) if self.events else 0.0


class SlidingWindowQuota:
    """One model's RPM/TPM limits, enforced like Azure: over sliding windows, at admission.

    Each window of `w` seconds allows `limit * w / 60` requests and tokens; a request is admitted
    only if it fits every window for both. The longest window (60 s) is strict: a request that
    cannot fit even an empty minute is "too large". Shorter windows always take one request
    when they hold none, so small limits still make progress at the minute's pace.

    Foreign load (other users of the workspace, invisible to clients) is modelled as usage at
    the constant rate `foreign_share * limit` per minute. Sliding over a constant-rate stream,
    every window always holds `foreign_share` of its allowance, so clients keep
    `(1 - foreign_share)` of each window: exactly what the caps here are.
    """

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        windows_s: tuple[float, ...] = (60.0, 10.0),
        foreign_share: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not windows_s or min(windows_s) <= 0:
            raise ValueError("windows_s needs at least one positive window length")
        longest = max(windows_s)
        keep = 1.0 - foreign_share
        self.rpm = rpm
        self.tpm = tpm
        self.clock = clock
        self._windows = [
            _Window(
                w,
                None if rpm is None else rpm * w / 60.0 * keep,
                None if tpm is None else tpm * w / 60.0 * keep,
                strict=(w == longest),
            )
            for w in sorted(set(windows_s), reverse=True)
        ]

    def _expire(self, now: float) -> None:
        for w in self._windows:
            w.expire(now)

    def try_admit(self, tokens: int) -> QuotaDecision:
        """Admit and charge `tokens` now, or say how long until this request would fit."""
        now = self.clock()
        self._expire(now)
        worst = 0.0
        limited_by: str | None = None
        for w in self._windows:
            wait = w.wait_for(tokens, now)
            if wait is None:
                return QuotaDecision(False, None, w.blocked_by(tokens), too_large=True)
            if wait > 0 and (limited_by is None or wait > worst):
                worst, limited_by = wait, w.blocked_by(tokens)
        if limited_by is not None:
            return QuotaDecision(False, worst, limited_by)
        for w in self._windows:
            w.add(now, tokens)
        return QuotaDecision(True)

    def record_failed(self) -> None:
        """A refused request that still counts as a request (Azure: failures may count)."""
        now = self.clock()
        self._expire(now)
        for w in self._windows:
            w.add(now, 0)

    def state(self) -> QuotaState:
        now = self.clock()
        self._expire(now)
        req: tuple[float, float] | None = None  # (remaining, reset) of the tightest window
        tok: tuple[float, float] | None = None
        for w in self._windows:
            r, t = w.remaining()
            if r is not None and (req is None or r < req[0]):
                req = (r, w.reset_s(now))
            if t is not None and (tok is None or t < tok[0]):
                tok = (t, w.reset_s(now))
        return QuotaState(
            remaining_requests=None if req is None else max(0, math.floor(req[0] + _EPS)),
            remaining_tokens=None if tok is None else max(0, math.floor(tok[0] + _EPS)),
            reset_requests_s=0.0 if req is None else req[1],
            reset_tokens_s=0.0 if tok is None else tok[1],
        )

    def clear(self) -> None:
        for w in self._windows:
            w.events.clear()
            w.requests = w.tokens = 0


def format_reset(seconds: float) -> str:
    """OpenAI-style duration for x-ratelimit-reset-*: "120ms", "6s", "6.5s", "1m30s"."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    sec = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{sec}s" if minutes >= 1 else f"{sec}s"
