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
from typing import Any


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


# A 403 or a 404 may be one row's or the whole job's: a web application firewall refuses one
# prompt with 403 as a revoked key refuses every request; a model that one row names may not
# be deployed, as a deployment deleted mid-run answers 404 for all. The streak tells them
# apart by what happened after a refusal came back, never before: requests sent earlier may
# reach the server in any order (one connection each), so their answers and refusals show the
# server as it was around the refusal, not after it.
# - An answer from the model to a request sent after the refusal came back makes it the row's
#   own (the key and the deployment work).
# - A refusal of a request sent after the first refusal came back shows the refusals went on:
#   this many rows refused that way with that status (the first included) make it the job's (a
#   key refused for two rows in a row is the key). Two blocked prompts sent together are not.
REFUSAL_ROWS = {403: 2, 404: 3}


@dataclass(slots=True)
class RefusalStreak:
    """Rows refused with a status of `REFUSAL_ROWS` that no later request of their model has
    cleared, per (status, model), in the run's send order: the number of the refused request
    (`sent`), how many requests the run had sent when its refusal came back (`known`: a
    request numbered higher was sent after it), and what the engine holds for the row (its
    error row) until the streak decides. Pure."""

    rows_needed: dict[int, int] = field(default_factory=lambda: dict(REFUSAL_ROWS))
    _rows: dict[tuple[int, str], dict[str, tuple[int, int, Any]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        """Refusals wait for a decision."""
        return bool(self._rows)

    def watches(self, status: int | None) -> bool:
        return status in self.rows_needed

    def answered(self, model: str, seq: int) -> list[Any]:
        """`model` answered the request numbered `seq`: refusals that came back before it was
        sent were their rows' own. Returns what was held for them."""
        cleared = []
        for key, rows in list(self._rows.items()):
            if key[1] == model:
                for row_id in [r for r, (_, known, _) in rows.items() if known < seq]:
                    cleared.append(rows.pop(row_id)[2])
                if not rows:
                    del self._rows[key]
        return cleared

    def take_all(self) -> list[Any]:
        """Everything held, the streak emptied (the run's end)."""
        held = [item for rows in self._rows.values() for _, _, item in rows.values()]
        self._rows.clear()
        return held

    def first_seq(self, status: int, model: str) -> int:
        """When the earliest refusal of (status, model)'s streak came back (its `known`)."""
        return min(
            (known for _, known, _ in self._rows.get((status, model), {}).values()), default=0
        )

    def refused(
        self, status: int, model: str, row_id: str, sent: int, known: int, held: Any = None
    ) -> bool:
        """Record the refusal of request number `sent`, back when `known` had been sent,
        holding `held` for it; True when the refusals are now the job's (stop): enough rows
        refused, the first one back and those sent after it came back."""
        rows = self._rows.setdefault((status, model), {})
        rows[row_id] = (sent, known, held)
        first = min(k for _, k, _ in rows.values())
        went_on = sum(1 for sent_at, _, _ in rows.values() if sent_at > first)
        return 1 + went_on >= self.rows_needed[status]
