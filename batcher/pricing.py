"""What tokens cost: a dated built-in price table, overridable per job (`prices:`).

Prices are OpenAI's public list prices in USD per 1M tokens, as of `PRICES_AS_OF`. Langdock
bills through its own plans and Azure prices can differ by region, so every figure we print
says where its price came from; a workspace with its own rates puts them in the job file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from batcher.spec import Price

PRICES_AS_OF = "2025-01"
PRICES_SOURCE = "OpenAI list prices (openai.com/api/pricing)"

PRICE_SOURCE_JOB = "job file"
PRICE_SOURCE_BUILTIN = f"built-in table as of {PRICES_AS_OF}"
PRICE_SOURCE_UNKNOWN = "unknown"

BUILTIN_PRICES: dict[str, Price] = {
    "gpt-4o": Price(input_per_1m=2.50, output_per_1m=10.00),
    "gpt-4o-mini": Price(input_per_1m=0.15, output_per_1m=0.60),
    "o1-preview": Price(input_per_1m=15.00, output_per_1m=60.00),
    "o3-mini": Price(input_per_1m=1.10, output_per_1m=4.40),
    "gpt-4": Price(input_per_1m=30.00, output_per_1m=60.00),
    "gpt-35-turbo": Price(input_per_1m=0.50, output_per_1m=1.50),
}

# OpenAI's spelling of the Azure name.
_ALIASES = {"gpt-3.5-turbo": "gpt-35-turbo"}

# Snapshot suffixes: "-2024-07-18" (current style) or "-0613" (older gpt-4 / gpt-35 style).
_DATED_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


def base_model_name(model: str) -> str:
    """`gpt-4o-mini-2024-07-18` -> `gpt-4o-mini`; names without a date come back unchanged.

    Only a date is stripped: `gpt-4-turbo-2024-04-09` becomes `gpt-4-turbo`, never `gpt-4`,
    which costs something else.
    """
    name = _DATED_SUFFIX.sub("", model.strip().lower())
    return _ALIASES.get(name, name)


def price_for(model: str, overrides: Mapping[str, Price]) -> tuple[Price | None, str]:
    """The price of `model` and where it came from (job file, built-in table, or unknown).

    The job file wins, by exact name first, then by base name, so `prices: {gpt-4o: ...}` also
    prices the dated `gpt-4o-2024-08-06` the server reports.
    """
    base = base_model_name(model)
    for name in (model, base):
        if name in overrides:
            return overrides[name], PRICE_SOURCE_JOB
    lowered = {k.lower(): v for k, v in overrides.items()}
    for name in (model.lower(), base):
        if name in lowered:
            return lowered[name], PRICE_SOURCE_JOB
    if base in BUILTIN_PRICES:
        return BUILTIN_PRICES[base], PRICE_SOURCE_BUILTIN
    return None, PRICE_SOURCE_UNKNOWN


def cost_of(price: Price, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price.input_per_1m + completion_tokens * price.output_per_1m) / 1e6


def cost_usd(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    overrides: Mapping[str, Price] | None = None,
) -> float | None:
    """USD for these tokens, or None when the model has no known price."""
    price, _ = price_for(model, overrides or {})
    if price is None:
        return None
    return cost_of(price, prompt_tokens, completion_tokens)


def format_usd(value: float | None) -> str:
    """Dollars for people: cents from $1 up, four decimals below (a cheap job's $0.0042)."""
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if value >= 1 else f"${value:.4f}"
