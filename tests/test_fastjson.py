"""batcher/fastjson.py: orjson where it gives the standard library's results, json elsewhere."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher import fastjson

_LEAF = (
    st.text()  # lone surrogates included: json reads and writes them as \ud800 escapes
    | st.integers(-(2**80), 2**80)  # beyond 64 bits: orjson would read a float
    | st.floats()  # NaN and infinities: only json reads its NaN / Infinity tokens
    | st.booleans()
    | st.none()
)
_VALUE = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN, and an int never equal to a float of the same value."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@given(_VALUE, st.booleans(), st.booleans())
@settings(max_examples=400, deadline=None)
def test_loads_reads_what_json_reads_as_json_reads_it(
    value: Any, ascii_only: bool, as_bytes: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    raw: str | bytes = text.encode("utf-8", "surrogatepass") if as_bytes else text
    if as_bytes and not ascii_only:
        try:
            text.encode()
        except UnicodeEncodeError:
            return  # not UTF-8: json.loads(bytes) refuses it too (tested below)
    assert _same(fastjson.loads(raw), json.loads(raw))


@pytest.mark.parametrize(
    "raw",
    [b"{bad", b"", b"[1,]", b'{"a": 1} x', b'"\xff"', "{'a': 1}", b"nul"],
)
def test_what_is_not_json_raises_jsons_error(raw: str | bytes) -> None:
    with pytest.raises(ValueError) as ours:
        fastjson.loads(raw)
    with pytest.raises(ValueError) as theirs:
        json.loads(raw)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_an_id_beyond_64_bits_stays_exact() -> None:
    assert fastjson.loads(b'{"id": 123456789012345678901234567890}') == {
        "id": 123456789012345678901234567890
    }
    assert fastjson.loads('{"n": 18446744073709551616}')["n"] == 2**64


@given(_VALUE)
@settings(max_examples=400, deadline=None)
def test_dumps_writes_json_that_reads_back(value: Any) -> None:
    out = fastjson.dumps(value)
    assert isinstance(out, bytes)
    back = json.loads(out)

    def finite(v: Any) -> Any:  # NaN and infinities are written as null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list):
            return [finite(x) for x in v]
        return v

    assert _same(back, finite(value)) or _same(back, value)


def test_dumps_is_compact_utf8_and_takes_a_default_for_datetimes() -> None:
    assert fastjson.dumps({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()
    when = datetime(2026, 12, 5, 20, 0, tzinfo=UTC)
    assert fastjson.dumps({"t": when}, default=lambda v: v.isoformat()) == (
        b'{"t":"2026-12-05T20:00:00+00:00"}'
    )
    # What orjson cannot write goes through json, same layout
    assert fastjson.dumps({1: 2**70}) == b'{"1":1180591620717411303424}'
    assert fastjson.loads(fastjson.dumps({"s": "\ud800"})) == {"s": "\ud800"}


def test_a_long_run_of_digits_in_a_float_is_read_by_orjson_alike() -> None:
    """A journal's costs (0.000014849999999999998) have 19+ digit runs: they are floats, read
    alike by both; an integer run next to them still goes to json and stays exact."""
    for text in (
        '{"cost_usd": 0.000014849999999999998}',
        '{"x": 12345678901234567890.5, "y": 1234567890123456789012e-3}',
        '{"x": -0.12345678901234567890123456789}',
    ):
        assert _same(fastjson.loads(text), json.loads(text))
    assert fastjson.loads('{"c": 0.000014849999999999998, "id": 12345678901234567890123}') == {
        "c": 0.000014849999999999998,
        "id": 12345678901234567890123,
    }
    assert fastjson.loads("[-12345678901234567890123]") == [-12345678901234567890123]


def test_a_run_of_a_million_digits_is_judged_whole() -> None:
    """The run's end is found in one regex match (a byte-by-byte loop held the event loop for
    ~40 s on a hostile answer of 300 MB of digits): an integer run and a float's fraction."""
    digits = b"7" * 1_000_000
    for raw, integer in ((b"[" + digits + b"]", True), (b"[0." + digits + b"]", False)):
        masked = raw.translate(fastjson._DIGIT_MASK)
        assert fastjson._maybe_long_int(masked, masked.find(fastjson._LONG_RUN)) is integer


@given(st.integers(-(10**40), 10**40), st.integers(0, 10**40), st.integers(-300, 300))
@settings(max_examples=300, deadline=None)
def test_numbers_with_long_digit_runs_read_as_json_reads_them(
    whole: int, fraction: int, exponent: int
) -> None:
    for text in (
        f"[{whole}]",
        f"[{whole}.{fraction}]",
        f"[{whole}.{fraction:040d}e{exponent}]",
        f'{{"a": {whole}, "b": 0.{fraction:040d}}}',
    ):
        assert _same(fastjson.loads(text), json.loads(text)), text
