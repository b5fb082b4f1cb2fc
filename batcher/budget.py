"""A hard cap on what a job spends: reserve the worst case before sending, settle on the answer.

Admission reserves each attempt's worst-case cost (its prompt plus every token it may answer,
at the job's prices) before it is sent; the answer settles the reservation at the cost its
`usage` reports (a 429 or a 5xx costs nothing; a 2xx we could not read costs the worst case).
So spent + reserved never exceeds the cap, whatever is in flight: the spend cannot either.

The cap is the job's, across its runs: `spent` starts at what the journal says earlier runs
spent. Cache hits are free. `Budget` is pure (no I/O, no clock); `Spending` adds the prices and
books the run's spend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batcher.errors import BudgetReached, JobSpecError
from batcher.pricing import Price, cost_of, format_usd, price_for
from batcher.records import Request
from batcher.stats import RunStats


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


class Spending:
    """The job's money in one place: prices per model, the cap, what each attempt reserves,
    what each answer cost, and the run's spend in `stats` (what the summary, the history and
    the metrics read)."""

    def __init__(self, prices: Mapping[str, Price], cap_usd: float | None, stats: RunStats) -> None:
        self.budget = Budget(cap_usd)
        self.stats = stats
        self._overrides = prices
        self._prices: dict[str, Price | None] = {}

    def price(self, model: str) -> Price | None:
        if model not in self._prices:
            self._prices[model] = price_for(model, self._overrides)[0]
        return self._prices[model]

    def check_priced(self, models: Iterable[str]) -> None:
        """Before sending: a cap needs a price for every model the job sends to."""
        unpriced = sorted(m for m in models if self.price(m) is None)
        if self.budget.cap_usd is not None and unpriced:
            raise JobSpecError(
                f"max_cost_usd needs a price for {', '.join(unpriced)}: add it under prices: "
                "in the job file (input_per_1m, output_per_1m in USD)"
            )

    def reserve(self, req: Request) -> float:
        """Reserve one attempt's worst case; BudgetReached when it would pass the cap."""
        worst = worst_case_usd(self.price(req.model), req.cost - req.max_output, req.max_output)
        if not self.budget.try_reserve(worst):
            raise BudgetReached(self.message())
        return worst

    def release(self, reserved: float, *, billed: bool = False) -> None:
        """An attempt that got no answer: free its reservation, or book it whole if the server
        may have billed it (a truncated 2xx, a request cancelled after it was sent)."""
        cost = reserved if billed else 0.0
        self.budget.settle(reserved, cost)
        self.stats.spent_usd += cost
        self.stats.unrecorded_usd += cost  # in no row's cost_usd: the journal's end record

    def settle(
        self, req: Request, reserved: float, prompt: int | None, completion: int | None
    ) -> float | None:
        """Book an answered attempt at what its usage says (the worst case if it says none);
        None when the model has no price."""
        price = self.price(req.model)
        if price is None:
            self.budget.settle(reserved, 0.0)
            return None
        if prompt is None and completion is None:
            actual = reserved
        else:
            actual = cost_of(price, prompt or 0, completion or 0)
        self.budget.settle(reserved, actual)
        self.stats.spent_usd += actual
        return actual

    def value(self, model: str | None, prompt: int | None, completion: int | None) -> float:
        """What an answer would have cost (the savings of reused answers); 0 without a price."""
        price = self.price(model) if model else None
        return 0.0 if price is None else cost_of(price, prompt or 0, completion or 0)

    def message(self) -> str:
        b = self.budget
        return (
            f"the budget is reached: {format_usd(b.spent_usd)} of max_cost_usd "
            f"{format_usd(b.cap_usd)} spent (this job, all its runs), and the next request "
            "could cost more than what is left. To go on, raise the cap (max_cost_usd in the "
            "job file or --max-cost) and run the same command again: it resumes"
        )

    def over_budget_warning(self, estimate: Mapping[str, Any]) -> str | None:
        """Before the first request: what the cap will buy if the estimate exceeds it."""
        worst, left = estimate.get("cost_usd"), self.budget.left_usd
        if worst is None or left is None or worst <= left:
            return None
        rows = estimate.get("rows") or 0
        buys = int(rows * left / worst) if worst else rows
        return (
            f"the estimate (up to {format_usd(worst)} for the {rows} rows left to ask) exceeds "
            f"what is left of max_cost_usd ({format_usd(left)} of "
            f"{format_usd(self.budget.cap_usd)}): the run stops at the cap, after about {buys} "
            "rows (every answer at its max_tokens, none from the response store; usually more)"
        )
