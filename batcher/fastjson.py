"""JSON on the per-row paths (input lines, answers, journal lines, stored answers): orjson,
with the standard library's results.

orjson parses and writes 3-10x faster than `json`, which was a fifth of the CPU of a run
answered from the response store. Where the two differ, the standard library decides:

- `loads`: orjson refuses what `json` accepts (NaN, Infinity, 1e400, lone surrogates, UTF-16
  text) and then `json` parses it, or raises its own error. orjson reads an integer beyond
  64 bits as a float, so a line with a run of 19+ digits that may be an integer is read by
  `json` alone (an id like 123456789012345678901234567890 must stay exact). A run after a
  decimal point, or before one or an exponent, is part of a float, which both read alike
  (correctly rounded): the journal's costs (0.000014849999999999998) have such runs.
- `dumps`: compact separators, non-ASCII kept as UTF-8. What orjson cannot write (an integer
  beyond 64 bits, a non-string dict key, a lone surrogate) falls back to `json` with the same
  layout, non-ASCII escaped. A float NaN or infinity is written as null (`json` would write
  the invalid token NaN).

The response store's key (`cache.canonical_request`) is defined by the standard library's
bytes, which must never change under existing stores; orjson computes it only for bodies where
its bytes are the same (no floats: it writes 1e-7 where json writes 1e-07).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["dumps", "loads"]

# Every digit -> "0", "." -> ".", "e"/"E" -> "e", everything else -> " ": a run of 19 digits
# is then a plain substring search (0.3 us a line where a regex took 2.9 us, four times what
# orjson takes to parse it).
_DIGIT_MASK = bytes(
    0x30 if 0x30 <= i <= 0x39 else i if i == 0x2E else 0x65 if i in (0x45, 0x65) else 0x20
    for i in range(256)
)
_LONG_RUN = b"0" * 19
_ZEROS = re.compile(b"0+")
_json_loads = json.loads
_orjson_loads = orjson.loads
_orjson_dumps = orjson.dumps
_OrjsonError = orjson.JSONDecodeError


def loads(raw: bytes | str) -> Any:
    """json.loads(raw), faster; raises ValueError (json's) for what is not JSON."""
    probe = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    masked = probe.translate(_DIGIT_MASK)
    # `find`, not `in`: bytes.__contains__ first tries its operand as an integer, raising and
    # clearing a TypeError each time (twice the cost of the search on a journal line).
    run = masked.find(_LONG_RUN)
    if run < 0 or not _maybe_long_int(masked, run):
        try:
            return _orjson_loads(raw)
        except _OrjsonError:
            pass  # maybe something only json reads: its result or its error
    try:
        return _json_loads(raw)
    except RecursionError:  # nested past the interpreter's stack (orjson stops at 1,024)
        raise ValueError("nested too deeply to read") from None


def _maybe_long_int(masked: bytes, start: int) -> bool:
    """A run of 19+ digits that is not a float's part: not after ".", not before "." or "e".
    (Digits in a string are read alike either way; a run after "-" or "+" may be an integer
    or an exponent, and `json` reads it.) `start`: where the first run begins."""
    while start != -1:  # `find` stops at a run's first digit: the search resumes past a run
        # The run's end by a regex: a byte-by-byte loop in Python held the event loop ~40 s on
        # a hostile answer of 300 MB of digits.
        run = _ZEROS.match(masked, start)
        assert run is not None  # `find` found 19 zeros at `start`
        end = run.end()
        if masked[start - 1 : start] != b"." and masked[end : end + 1] not in (b".", b"e"):
            return True
        start = masked.find(_LONG_RUN, end)
    return False


def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON of `value`; `default` turns what JSON has no type for into a value
    (called for datetimes too, which orjson would otherwise write itself)."""
    try:
        return _orjson_dumps(value, default=default, option=orjson.OPT_PASSTHROUGH_DATETIME)
    except TypeError:  # (orjson.JSONEncodeError is one)
        # ASCII escapes: a lone surrogate in a string (which orjson refuses) stays readable.
        return json.dumps(value, separators=(",", ":"), default=default).encode()
