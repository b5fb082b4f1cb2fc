import pytest

from batcher.models import SUPPORTED_MODELS
from batcher.pricing import (
    BUILTIN_PRICES,
    PRICE_SOURCE_BUILTIN,
    PRICE_SOURCE_JOB,
    PRICE_SOURCE_UNKNOWN,
    PRICES_AS_OF,
    base_model_name,
    cost_usd,
    format_usd,
    price_for,
)
from batcher.spec import Price


def test_every_supported_model_has_a_price() -> None:
    assert set(SUPPORTED_MODELS) <= set(BUILTIN_PRICES)


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-05-13", "gpt-4o"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o1-preview-2024-09-12", "o1-preview"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-35-turbo-0125", "gpt-35-turbo"),
        ("gpt-3.5-turbo-0125", "gpt-35-turbo"),
        ("GPT-4o", "gpt-4o"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),  # not gpt-4: another price
        ("my-deployment", "my-deployment"),
    ],
)
def test_base_model_name(name: str, base: str) -> None:
    assert base_model_name(name) == base


def test_builtin_price_and_source_names_the_date() -> None:
    price, source = price_for("gpt-4o-mini-2024-07-18", {})
    assert price == Price(input_per_1m=0.15, output_per_1m=0.60)
    assert source == PRICE_SOURCE_BUILTIN
    assert PRICES_AS_OF in source


def test_job_file_overrides_by_exact_or_base_name() -> None:
    mine = Price(input_per_1m=1.0, output_per_1m=2.0)
    assert price_for("gpt-4o", {"gpt-4o": mine}) == (mine, PRICE_SOURCE_JOB)
    assert price_for("gpt-4o-2024-08-06", {"gpt-4o": mine}) == (mine, PRICE_SOURCE_JOB)
    assert price_for("my-deployment", {"my-deployment": mine}) == (mine, PRICE_SOURCE_JOB)


def test_unknown_model_has_no_price() -> None:
    assert price_for("my-deployment", {}) == (None, PRICE_SOURCE_UNKNOWN)
    assert cost_usd("my-deployment", 100, 100, {}) is None


def test_cost_usd() -> None:
    # 1M prompt tokens at 2.50 + 500k completion tokens at 10.00
    assert cost_usd("gpt-4o", 1_000_000, 500_000, {}) == pytest.approx(7.50)
    assert cost_usd("gpt-4o-mini", 0, 0) == 0.0
    mine = {"gpt-4o": Price(input_per_1m=1.0, output_per_1m=0.0)}
    assert cost_usd("gpt-4o", 2_000_000, 999, mine) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "unknown"),
        (0.0, "$0.0000"),
        (0.00421, "$0.0042"),
        (1, "$1.00"),
        (12345.678, "$12,345.68"),
    ],
)
def test_format_usd(value: float | None, text: str) -> None:
    assert format_usd(value) == text
