"""A hard cap on what a job spends: reserve the worst case before sending, settle on the answer.

Admission reserves each attempt's worst-case cost (its prompt plus every token it may answer,
at the job's prices) before it is sent; the answer settles the reservation at the cost its
`usage` reports (a 429 or a 5xx costs nothing; a 2xx we could not read costs the worst case).
So spent + reserved never exceeds the cap, whatever is in flight: the spend cannot either.

The cap is the job's, across its runs: `spent` starts at what the journal says earlier runs
spent. Cache hits are free. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from batcher.pricing import Price, cost_of


@dataclass(slots=True)
class Budget:
    cap_usd: float | None  # None: no cap (spend is still counted)
    spent_usd: float = 0.0  # settled: earlier runs' and this run's
    reserved_usd: float = 0.0  # worst cases of the attempts in flight
    exhausted: bool = False  # a reservation did not fit: admit nothing more

    def try_reserve(self, amount: float) -> bool:
        """Reserve `amount` for one attempt; False (and exhausted) when it would pass the cap."""
        if self.exhausted:
            return False
        if self.cap_usd is not None and self.spent_usd + self.reserved_usd + amount > self.cap_usd:
            self.exhausted = True
            return False
        self.reserved_usd += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """An attempt ended: release its reservation, book what it really cost."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved)
        self.spent_usd += actual

    @property
    def left_usd(self) -> float | None:
        return None if self.cap_usd is None else max(0.0, self.cap_usd - self.spent_usd)


def worst_case_usd(price: Price | None, prompt_tokens: int, max_output_tokens: int) -> float:
    """What one attempt can cost at most; 0 when the model has no price (no cap possible)."""
    return 0.0 if price is None else cost_of(price, prompt_tokens, max_output_tokens)
