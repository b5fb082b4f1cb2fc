"""The result's columns and their Arrow types: the one place they are written down.

`records.Result` holds these fields, the journal stores them as JSON, `writer` publishes them
as Parquet and `inspect` reads them back; all take the names and types from here. The kept
input columns and `parsed` (structured output) follow them in the output, typed per job.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard

import pyarrow as pa

# One function call the model asked for; `arguments` is the JSON text the model wrote (it may
# not parse: the model's text is kept as it came).
TOOL_CALL_TYPE = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("content", pa.string()),
        ("tool_calls", pa.list_(TOOL_CALL_TYPE)),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("attempts", pa.int32()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("source", pa.string()),  # api | cache | dedupe: where the answer came from
        ("cost_usd", pa.float64()),  # what this row's requests cost (None: no price known)
    ]
)
RESULT_FIELDS: tuple[str, ...] = tuple(RESULT_SCHEMA.names)

_STRINGS = frozenset(f.name for f in RESULT_SCHEMA if pa.types.is_string(f.type))
_INT_MAX = {
    f.name: 2 ** (f.type.bit_width - 1) - 1 for f in RESULT_SCHEMA if pa.types.is_integer(f.type)
}
_TOOL_CALL_KEYS = tuple(TOOL_CALL_TYPE.field(i).name for i in range(TOOL_CALL_TYPE.num_fields))


def as_text(value: Any) -> str | None:
    """A string column's value: strings as they are, anything else as its JSON text."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def coerce_result_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """The result fields of a record, each made to fit its column (what does not fit: None).

    For records a journal holds that the normal path did not write (an older batcher, a hand
    edit): strings are kept as text, counts must be non-negative integers, tool calls
    name/arguments strings. Used only when a batch will not convert as it is.
    """
    out: dict[str, Any] = {}
    for name in RESULT_FIELDS:
        value = rec.get(name)
        if name in _STRINGS:
            out[name] = as_text(value)
        elif name in _INT_MAX:
            out[name] = value if is_count(value) and value <= _INT_MAX[name] else None
        elif pa.types.is_floating(RESULT_SCHEMA.field(name).type):  # latency_s, cost_usd
            out[name] = float(value) if is_number(value) and math.isfinite(value) else None
        elif name == "tool_calls":
            out[name] = _tool_calls(value)
    out["id"] = out["id"] or ""
    out["status"] = out["status"] or "error"
    return out


def is_count(value: Any) -> TypeGuard[int]:
    """A token count or attempt number: a non-negative int (bool is not a number here)."""
    if type(value) is int:  # the usual case, quickly
        return 0 <= value < 2**63
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tool_calls(value: Any) -> list[dict[str, str | None]] | None:
    if not isinstance(value, list):
        return None
    calls = []
    for call in value:
        if not isinstance(call, dict):
            return None
        calls.append({k: as_text(call.get(k)) for k in _TOOL_CALL_KEYS})
    return calls
