"""The admission policy: every constant and limit of one model's schedule, in one frozen object.

Both backends read it: the Python reference (`schedule.py`) takes its fields as attributes, the
Lua scripts take `encode()` (a JSON object of the same names) as their first argument. A new
constant is added here once and read by name on both sides; nothing travels by position.

The server (Azure behind Langdock) charges a request at admission and enforces per-minute limits
over short sliding windows (1 or 10 s, langdock-api.md), so the minute's budget is spent
smoothly (pacing), and never more than a window allows (window caps).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

# Fraction of each limit the pacing aims for. The window caps (below) hold the short-term
# excess; 0.99 pacing under 0.995 caps reached >= 0.985 of the limit in bench_quota.
DEFAULT_HEADROOM = 0.99
# The server's windows (Azure: 1 or 10 s; the minute is the longest), each capped at
# limit * length / 60. Requests are also capped over 1 s: a server counting RPM over 1 s
# windows would refuse the burst the tolerance allows (tokens are not: one request of a few
# hundred tokens is a large part of a 1 s token budget, and 1 s packing would waste quota).
DEFAULT_REQUEST_WINDOWS_S: tuple[float, ...] = (60.0, 10.0, 1.0)
DEFAULT_TOKEN_WINDOWS_S: tuple[float, ...] = (60.0, 10.0)
# Our windows are this fraction longer than the server's: a request admitted here reaches the
# server a little later, by a delay that varies. Relative, so that a 1 s cap does not cost the
# 17 % an absolute 0.2 s did; 0.5 % of 10 s is 50 ms of send-time jitter.
DEFAULT_WINDOW_MARGIN = 0.005
# The windows an x-ratelimit-remaining-* header may describe (the documents leave it open).
# The share is the largest estimate over them (see schedule.py); while the schedule has been
# sending for less than the shortest of them, the ramp-up windows count too: a header of a 1 s
# window read against a 10 s window we have not filled yet would say "others use 80 %".
DEFAULT_HEADER_WINDOWS_S: tuple[float, ...] = (60.0, 10.0)
DEFAULT_RAMP_HEADER_WINDOWS_S: tuple[float, ...] = (1.0,)


@dataclass(frozen=True, slots=True)
class Policy:
    """One model's admission: its limits and every knob of the schedule.

    Times in seconds here; the schedule itself runs in whole microseconds (`us`).
    """

    rpm: int
    tpm: int
    headroom: float = DEFAULT_HEADROOM
    adaptive: bool = True  # AIMD on 429s and the share the headers reveal
    # Pacing (GCRA) burst allowance: a request may go this long before its smooth slot, which
    # lets the schedule catch up time a window cap cost it. The 1 s request window bounds it.
    tolerance_s: float = 1.0
    # Look-ahead: when the head of the queue must wait for room in a window, one of the next
    # this many requests may go first: a smaller one that fits the room the head leaves
    # (never delaying the head), or the one that best packs the room at the head's slot. At
    # Langdock's limits a 10 s window holds ~17-20 requests and strict FIFO left 3-4 % of it
    # unused (sim_packing.py: 0.956 of the share with fills only, 0.967 packing 16). 0: FIFO.
    lookahead: int = 16
    # Packing may pass the head over this many times (then it takes its own slot): a request
    # that fits no pair well still goes after at most this many others.
    lookahead_passes: int = 16
    request_windows_s: tuple[float, ...] = DEFAULT_REQUEST_WINDOWS_S
    token_windows_s: tuple[float, ...] = DEFAULT_TOKEN_WINDOWS_S
    window_margin: float = DEFAULT_WINDOW_MARGIN
    header_windows_s: tuple[float, ...] = DEFAULT_HEADER_WINDOWS_S
    ramp_header_windows_s: tuple[float, ...] = DEFAULT_RAMP_HEADER_WINDOWS_S
    aimd_beta: float = 0.85  # multiplicative decrease on an unexpected 429
    aimd_recovery_per_s: float = 0.01  # linear recovery of multiplier and share per second
    aimd_min: float = 0.05  # never slower than this fraction of the limits
    aimd_cooldown_s: float = 2.0  # 429s for sends before the last decrease do not compound
    # A 429 cuts the multiplier only if another came within this many admissions before it.
    # A lone 429 is arrival jitter at the edge of a window (its pause absorbs it), and a cut
    # costs ~2 % of a minute's quota (x beta, then +0.01/s): 4 processes at 10x saw one in
    # ~2,000 requests. Others' load brings 429s more often than 1 in 200 (0.5 %), whatever the
    # request rate. 0: every 429 cuts.
    aimd_strike_requests: int = 200
    # A revealed share counts sends the server had not yet seen (estimates run ~3 % high), so a
    # higher estimate is followed with this time constant, a lower one 4x faster; the first is
    # taken as it is, so start-up does not overshoot.
    share_smoothing_s: float = 2.0
    share_smoothing_down_s: float = 0.5
    # A revealed share holds this long before it recovers like the multiplier: headers on the
    # next answers say whether others left. Recovering from the first second biased it high by
    # the recovery rate x the time between answers (0.5-1 s at Langdock's limits: +0.5-1 % of
    # the quota, the margin below it, and 2 % of the answers were 429s with others using 40 %).
    # Without headers only 429s reveal it (an upper bound: our usage over the window that
    # refused): each costs a pause, so it is probed again only this rarely (10 s: 7 % 429s at
    # Langdock's limits with others using 40 %, 30 s: 3-4 %).
    share_hold_s: float = 30.0
    # Without headers, a probe the server refuses shows the share has not grown: the next waits
    # twice as long, up to 2**this x the hold (4 min), and the share is read afresh once it has
    # recovered whole. Others' load on a nightly run changes in minutes, not seconds, and at
    # Langdock's limits every 30 s probe cost a 429 (1.5 % of the answers, over the 3 % target
    # with the learning at the start).
    share_hold_doublings: int = 3
    # The window caps keep this x (1 - headroom) x (1 - share) below a revealed share: it is an
    # estimate, off by a request at Langdock's limits (a 10 s window holds ~25 requests).
    share_margin_factor: float = 2.0
    default_pause_s: float = 1.0  # a 429 without retry-after pauses the model this long
    # Every pause a server asks for is capped (issue 11): a per-minute limit never needs more.
    max_pause_s: float = 60.0
    # A near-limit header is "explained" by our own sending if our usage over the window plus
    # this much (the answer's round trip) leaves no room for another request like the last.
    feedback_slack_s: float = 1.0
    idle_ttl_s: float = 600.0  # Redis: an idle model's state vanishes after this long
    _json: str = field(default="", init=False, repr=False, compare=False)
    # Derived once (the schedule reads them per admission); not part of the encoding.
    # The longest window with its margin: log entries older than that expire.
    longest_us: int = field(default=0, init=False, repr=False, compare=False)
    # The smallest window budgets: a log that fits these fits every window (a shortcut).
    least_requests: float = field(default=0.0, init=False, repr=False, compare=False)
    least_tokens: float = field(default=0.0, init=False, repr=False, compare=False)
    tolerance_us: int = field(default=0, init=False, repr=False, compare=False)
    share_hold_us: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rpm <= 0 or self.tpm <= 0:
            raise ValueError(f"limits must be positive, got rpm={self.rpm} tpm={self.tpm}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")
        for name in (
            "tolerance_s",
            "window_margin",
            "feedback_slack_s",
            "default_pause_s",
            "share_hold_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.max_pause_s) and self.max_pause_s > 0):
            raise ValueError(f"max_pause_s must be a finite number > 0, got {self.max_pause_s!r}")
        for name in (
            "request_windows_s",
            "token_windows_s",
            "header_windows_s",
            "ramp_header_windows_s",
        ):
            windows = getattr(self, name)
            if name != "ramp_header_windows_s" and not windows:
                raise ValueError(f"{name} needs at least one window")
            if any(not (math.isfinite(w) and w > 0) for w in windows):
                raise ValueError(f"{name} must be positive lengths, got {windows!r}")
            object.__setattr__(self, name, tuple(float(w) for w in windows))
        if self.lookahead < 0 or self.lookahead_passes < 0:
            raise ValueError(
                f"lookahead and lookahead_passes must be >= 0, got {self.lookahead} and "
                f"{self.lookahead_passes}"
            )
        if self.aimd_strike_requests < 0:
            raise ValueError(f"aimd_strike_requests must be >= 0, got {self.aimd_strike_requests}")
        if not 0 <= self.share_hold_doublings <= 16:
            raise ValueError(
                f"share_hold_doublings must be in [0, 16], got {self.share_hold_doublings}"
            )
        if not 0 < self.aimd_beta < 1 or not 0 < self.aimd_min <= 1:
            raise ValueError("aimd_beta must be in (0, 1) and aimd_min in (0, 1]")
        values = asdict(self)
        for f in fields(self):
            if not f.init:  # derived below, not part of the encoding
                del values[f.name]
        object.__setattr__(self, "_json", json.dumps(values, separators=(",", ":")))
        windows = (*self.request_windows_s, *self.token_windows_s)
        object.__setattr__(
            self, "longest_us", max(us(w * (1 + self.window_margin)) for w in windows)
        )
        # the very expressions the schedule compares with (same float rounding)
        least_requests = min(self.rpm * w / 60 for w in self.request_windows_s)
        least_tokens = min(self.tpm * w / 60 for w in self.token_windows_s)
        object.__setattr__(self, "least_requests", least_requests)
        object.__setattr__(self, "least_tokens", least_tokens)
        object.__setattr__(self, "tolerance_us", us(self.tolerance_s))
        object.__setattr__(self, "share_hold_us", us(self.share_hold_s))

    def encode(self) -> str:
        """The Lua scripts' policy argument: a JSON object, field names as here."""
        return self._json

    def scaled(self, share: float) -> Policy:
        """The same policy at `share` of both limits (the local fallback of a lost Redis)."""
        return replace(self, rpm=max(1, int(self.rpm * share)), tpm=max(1, int(self.tpm * share)))


def us(seconds: float) -> int:
    """Seconds -> whole microseconds, rounded as the Lua scripts round them."""
    return math.floor(seconds * 1_000_000 + 0.5)
