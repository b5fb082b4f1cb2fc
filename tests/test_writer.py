"""The writer never fails on what a journal holds: a record that does not fit is an error row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batcher.records import Result
from batcher.schema import RESULT_FIELDS, RESULT_SCHEMA
from batcher.writer import write_output_from_journal

HEADER = {"t": "h", "version": 1, "fingerprint": "f", "created": "2025-01-01T00:00:00"}


def write_journal(path: Path, records: list[dict[str, Any]]) -> Path:
    lines = [HEADER] + [{"t": "r", **r} for r in records]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def good(i: int, **extra: Any) -> dict[str, Any]:
    rec = Result(
        f"r{i}",
        "ok",
        content=f"c{i}",
        prompt_tokens=5,
        completion_tokens=1,
        total_tokens=6,
        attempts=1,
        latency_s=0.5,
        model="gpt-4o",
        keep={"n": i},
    ).to_record()
    return {**rec, **extra}


def test_tool_calls_are_a_typed_column(tmp_path: Path) -> None:
    calls = [{"id": "c1", "name": "f", "arguments": '{"x": 1}'}]
    journal = write_journal(tmp_path / "j", [good(0, content=None, tool_calls=calls), good(1)])
    out = tmp_path / "out.parquet"
    assert write_output_from_journal(journal, out, keep_names=["n"]) == (2, 0)
    table = pq.read_table(out)
    assert table.schema.field("tool_calls").type == RESULT_SCHEMA.field("tool_calls").type
    assert table.column("tool_calls").to_pylist() == [calls, None]
    assert tuple(table.column_names[: len(RESULT_FIELDS)]) == RESULT_FIELDS


def test_records_that_do_not_fit_become_error_rows(tmp_path: Path) -> None:
    hostile = [
        good(1, content=42),  # an older batcher journaled a number
        good(2, prompt_tokens="7"),
        good(3, total_tokens=7.5, finish_reason={"x": 1}),
        good(4, model={"name": "gpt-4o"}, error=None),
        good(5, attempts=2**40),
        good(6, tool_calls="not a list"),
        good(7, keep={"n": "seven"}),  # n is an integer column in the Parquet input
    ]
    journal = write_journal(tmp_path / "j", [good(0), *hostile, good(10)])
    out = tmp_path / "out.parquet"
    keep_types = pa.schema([("n", pa.int64())])
    rows, errors = write_output_from_journal(journal, out, keep_names=["n"], keep_types=keep_types)
    assert (rows, errors) == (9, 7)
    table = pq.read_table(out).to_pylist()
    by_id = {r["id"]: r for r in table}
    assert by_id["r0"]["status"] == by_id["r10"]["status"] == "ok"
    assert by_id["r0"]["n"] == 0 and by_id["r10"]["content"] == "c10"
    for rid in ("r1", "r2", "r3", "r4", "r5", "r6", "r7"):
        row = by_id[rid]
        assert row["status"] == "error", rid
        assert "does not fit the output" in row["error"] and "--retry-errors" in row["error"]
    # what fits is kept: the answer text (as text), the tokens that are integers, the id
    assert by_id["r1"]["content"] == "42" and by_id["r1"]["prompt_tokens"] == 5
    assert by_id["r2"]["prompt_tokens"] is None and by_id["r2"]["content"] == "c2"
    assert by_id["r4"]["model"] == '{"name": "gpt-4o"}'
    assert by_id["r5"]["attempts"] is None and by_id["r6"]["tool_calls"] is None
    assert by_id["r7"]["n"] is None and "(n: " in by_id["r7"]["error"]


def test_error_rows_keep_their_earlier_error(tmp_path: Path) -> None:
    rec = good(0, status="error", error="gave up after 8 attempts", prompt_tokens="3")
    journal = write_journal(tmp_path / "j", [rec])
    out = tmp_path / "out.parquet"
    assert write_output_from_journal(journal, out, keep_names=[]) == (1, 1)
    (row,) = pq.read_table(out).to_pylist()
    assert "before that: gave up after 8 attempts" in row["error"]
    assert pa.types.is_int32(pq.read_schema(out).field("attempts").type)
