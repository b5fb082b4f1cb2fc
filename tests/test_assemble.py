"""The journal index reads each result line's id as JSON reads it, without parsing the line."""

from __future__ import annotations

import json
from json.decoder import scanstring  # type: ignore[attr-defined]

from hypothesis import example, given
from hypothesis import strategies as st

from batcher.assemble import _leading_string

PREFIX = b'{"t":"r","id":"'


def _as_json_reads_it(raw: bytes) -> str | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec.get("id") if isinstance(rec, dict) else None


@given(st.text(), st.booleans())
def test_an_id_reads_as_json_reads_it(row_id: str, ascii_only: bool) -> None:
    line = json.dumps(
        {"t": "r", "id": row_id, "status": "ok"}, ensure_ascii=ascii_only, separators=(",", ":")
    )
    try:
        raw = line.encode()
    except UnicodeEncodeError:  # a lone surrogate written raw: not a line the journal holds
        return
    assert raw.startswith(PREFIX)
    assert _leading_string(raw, len(PREFIX)) == _as_json_reads_it(raw) == row_id


@given(st.binary(max_size=40))
@example(tail=b'"\x80')  # a short id, then a byte that is not UTF-8: the line is damaged
def test_a_damaged_line_reads_as_the_strict_json_string_parser_reads_it(tail: bytes) -> None:
    raw = PREFIX + tail + b'","status":"ok"}\n'
    try:
        expected: str | None = scanstring(raw.decode(), len(PREFIX))[0]
    except ValueError:
        expected = None
    assert _leading_string(raw, len(PREFIX)) == expected


def test_escapes_and_control_characters_take_the_full_parser() -> None:
    assert _leading_string(PREFIX + b'a\\"b","x":1}\n', len(PREFIX)) == 'a"b'
    assert _leading_string(PREFIX + b'a\\u00e9","x":1}\n', len(PREFIX)) == "a\u00e9"
    assert _leading_string(PREFIX + b'a\tb","x":1}\n', len(PREFIX)) is None  # raw tab: invalid
    assert _leading_string(PREFIX + b'\xff","x":1}\n', len(PREFIX)) is None
    assert _leading_string(PREFIX + b"no end", len(PREFIX)) is None
