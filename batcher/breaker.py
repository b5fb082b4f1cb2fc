"""Circuit breaker: an outage stops the run instead of burning every row's attempts.

When the service fails every request (429 forever, 500 on everything, no answer, truncated
bodies), retrying row after row costs each remaining row all its attempts and the night's run
ends with thousands of error rows that were the server's fault. The breaker watches attempts
across rows: once the last `failures` attempts all failed (429s, 5xx, drops, timeouts,
truncated bodies: an outage mixes them, an overloaded Azure answers 429 and 503 in turn), with
no success in between, within `window_s`, and from more than one row, it trips. The engine
then stops admitting, lets what is in flight finish, records none of the outage's failures as
row errors, and exits 4: a plain rerun once the service is back finishes the job.

Why these defaults trip before a row can use up its attempts: at concurrency c the failing
attempts are spread over about c rows, so 10 consecutive failures cost a row about 10 / c
attempts (2.5 at c = 4, one at c >= 10), well under the default 8. The "more than one row"
condition keeps one row that fails on its own (a poisoned prompt at concurrency 1) from being
taken for an outage.

Pure: the caller passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def cause(kinds: dict[str, int]) -> str:
    """What a streak of failures says about the service."""
    if set(kinds) == {"429"}:
        return "rate-limited"
    if "429" in kinds:
        return "overloaded"  # Azure answers an overload with 429s and 503s in turn
    return "unavailable"


@dataclass(slots=True)
class CircuitBreaker:
    failures: int = 10
    window_s: float = 60.0
    _streak: int = 0
    _first_at: float = 0.0
    _rows: set[str] = field(default_factory=set)
    kinds: dict[str, int] = field(default_factory=dict)  # the streak's failures by kind
    tripped: str | None = None  # the cause, once tripped: rate-limited, overloaded, unavailable

    def success(self) -> None:
        self._streak = 0
        self._rows.clear()
        self.kinds.clear()

    def failure(self, kind: str, row_id: str, now: float) -> bool:
        """Record a failed attempt; True when this one trips the breaker."""
        if self.tripped is not None:
            return False
        if self._streak == 0 or now - self._first_at > self.window_s:
            self._streak, self._first_at = 0, now
            self._rows.clear()
            self.kinds.clear()
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self._streak += 1
        if len(self._rows) < 2:
            self._rows.add(row_id)
        if self._streak >= self.failures and len(self._rows) > 1:
            self.tripped = cause(self.kinds)
            return True
        return False
