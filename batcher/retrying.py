"""Retry policy from tenacity's pieces plus one wait that honours the server's retry-after.

Deciding ("wait 4 s, then try again") lives here; the engine does the sending. The engine's
loop asks `RetryPolicy` after each failure instead of running tenacity's `AsyncRetrying` per
row: a row that succeeds at once (almost all of them) then costs no retry machinery at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tenacity import RetryCallState, wait_exponential_jitter
from tenacity.wait import wait_base

from batcher.errors import APIError, RetryableAPIError
from batcher.spec import Retry


# Named like tenacity's own strategies (wait_exponential_jitter, stop_after_attempt).
class wait_retry_after_or(wait_base):
    """Wait what the server asked for (retry-after-ms / retry-after), else the fallback.

    The server's figure gets a little jitter on top so a crowd of waiters does not return in
    the same millisecond; it is capped by `max_s` so a confused gateway cannot stall a job.
    """

    def __init__(self, fallback: wait_base, max_s: float = 60.0, jitter: float = 0.1) -> None:
        self.fallback = fallback
        self.max_s = max_s
        self.jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, APIError) and exc.retry_after is not None:
            extra = exc.retry_after * self.jitter * random.random()
            return min(self.max_s, exc.retry_after + extra)
        return self.fallback(retry_state)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """429, 5xx, timeouts and dropped connections are retried; everything else is final."""

    max_attempts: int
    wait: wait_base

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        return isinstance(exc, RetryableAPIError) and attempt < self.max_attempts

    def wait_s(self, exc: BaseException, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        state.set_exception((type(exc), exc, None))
        return float(self.wait(state))


def retry_policy(cfg: Retry) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=cfg.max_attempts,
        wait=wait_retry_after_or(
            wait_exponential_jitter(multiplier=cfg.initial_wait_s, max=cfg.max_wait_s, jitter=1.0),
            max_s=cfg.max_wait_s,
        ),
    )
