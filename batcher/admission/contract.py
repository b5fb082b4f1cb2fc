"""What the engine sees of admission: the `Limiter` protocol, an `Admission`, the snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(slots=True)  # not frozen (one per request, see Signal); a value: never changed
class Admission:
    """One admitted request: what `acquire` returns and a failed attempt hands back."""

    model: str
    cost: int
    seq: int  # its number in the model's schedule
    at_us: int  # its slot, on the schedule's clock (µs)
    waited_s: float  # how long acquire() waited


# The admission the current task's last acquire() returned: an answer reported from the same
# task (as the engine does) belongs to it, so feedback() needs no handle passed around.
current_admission: ContextVar[Admission | None] = ContextVar("admission", default=None)


def answered(model: str, admission: Admission | None) -> Admission | None:
    """The admission an answer of `model` belongs to: the one given, else this task's last."""
    if admission is None:
        admission = current_admission.get()
    return admission if admission is not None and admission.model == model else None


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """One model's admission state, for progress and the run summary."""

    rpm: int
    tpm: int
    effective_rpm: float  # the pace now: limit x headroom x multiplier
    effective_tpm: float
    multiplier: float  # fraction of the limits the pacing allows now (1: not slowed)
    share: float  # our share of the quota, as headers or 429s revealed others' load (1: all)
    paused_until_s: float  # seconds until admission resumes after a 429; 0: not paused
    backend: Literal["local", "redis"]
    # Why it slowed down: AIMD decreases on 429s, on near-limit headers, and header readings
    # that showed others' load (lowered the share). Counted for the schedule (in Redis: by
    # every process of the workspace).
    decreases_429: int = 0
    decreases_near_limit: int = 0
    share_reductions: int = 0
    refunded: int = 0  # failed (5xx) admissions the server had not charged, given back
    fallback: Literal["local"] | None = None  # redis lost: a local limiter paces this process
    workspace: str | None = None
    redis_round_trips: int = 0

    @property
    def slowed(self) -> bool:
        return self.multiplier < 0.999

    def slowdown_reasons(self) -> list[str]:
        """Why the pace is below the limits, in words; empty when nothing slowed it."""
        reasons = []
        if self.decreases_429:
            reasons.append(f"slowed by {self.decreases_429} unexpected 429 answer(s)")
        if self.decreases_near_limit:
            reasons.append(f"slowed by {self.decreases_near_limit} near-limit answer(s)")
        if self.share_reductions and self.share < 0.999:
            reasons.append(
                f"others' load, read from rate-limit headers or 429s, left {self.share:.0%} of "
                "the quota (or `limits:` are set above the server's own)"
            )
        return reasons


LimiterSnapshot = Mapping[str, ModelSnapshot]


class Limiter(Protocol):
    """What the engine needs of a limiter; LocalLimiter and RedisLimiter both provide it.

    `acquire` waits for the model's next slot (FIFO per model, except that the schedule's
    look-ahead may let a request behind the head go first: a smaller one into room the head
    leaves, or one that packs a window better, passing the head a bounded number of times)
    and returns the `Admission`; it raises ValueError at once for a cost that can never fit.
    Every answer goes to `feedback`: 429s and near-limit headers pause and slow the model,
    x-ratelimit-remaining-* headers set the share. `admission` (default: the one this task's
    last acquire returned) anchors the headers to when the request was sent; a 5xx, or status
    0 for no answer at all (dropped connection, timeout), is given back if the headers of that
    answer or the next show the server did not charge it; a 429's tokens are given back at
    once. `headers`: names in any case.
    """

    backend: str

    async def start(self) -> None: ...  # connect/check; local: no-op

    async def acquire(self, model: str, cost: int) -> Admission: ...

    def feedback(
        self,
        model: str,
        *,
        status: int,
        headers: Mapping[str, str],
        admission: Admission | None = None,
    ) -> None: ...

    def snapshot(self) -> dict[str, ModelSnapshot]: ...

    async def aclose(self) -> None: ...
