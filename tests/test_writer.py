"""The writer never fails on what a journal holds: a record that does not fit is an error row.
The ordered output: each input row's latest record, in input or journal order."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import assemble, writer
from batcher.errors import BatcherError
from batcher.readers import Row
from batcher.records import Result
from batcher.schema import RESULT_FIELDS, RESULT_SCHEMA
from batcher.writer import write_output_from_journal, write_output_ordered

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


# ---- the output in input order, joined with the journal (batcher/assemble.py) ----


def input_batches(ids: list[str], size: int = 3) -> Callable[[], Iterator[list[Row]]]:
    rows = [Row(i, n + 1, {"id": i, "text": f"t-{i}"}) for n, i in enumerate(ids)]
    return lambda: iter([rows[k : k + size] for k in range(0, len(rows), size)])


@pytest.mark.parametrize("release_from", [writer.RELEASE_FROM_BYTES, 0], ids=["small", "large"])
def test_ordered_output_takes_each_rows_latest_record_in_input_or_journal_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release_from: int
) -> None:
    # Small chunks and row groups, so the join and the grouping cross their boundaries; a
    # "large" journal gives memory back around the index first (a small one skips that).
    monkeypatch.setattr(assemble, "CHUNK_ROWS", 2)
    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(writer, "RELEASE_FROM_BYTES", release_from)
    n = 11
    answered = [good(i) for i in reversed(range(n))]  # completion order: the reverse
    answered[3] = good(7, status="error", error="boom", content=None)  # r7, then again:
    answered.append(good(7, content="second"))  # the latest record wins
    answered.append(good(99))  # a row that has since left the input
    journal = write_journal(tmp_path / "j", answered)
    ids = [f"r{i}" for i in range(n)]
    out = tmp_path / "out.parquet"

    rows = write_output_ordered(
        journal, out, input_batches(ids), keep_names=["text"], expected_rows=n
    )
    assert rows == (n, 0)
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ids
    assert table.column("content").to_pylist()[7] == "second"
    assert table.column("text").to_pylist() == [f"t-{i}" for i in ids]
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # 4 + 4 + 3 rows

    write_output_ordered(journal, out, input_batches(ids), order="completion", keep_names=[])
    got = pq.read_table(out).column("id").to_pylist()
    assert got == [f"r{i}" for i in reversed(range(n)) if i != 7] + ["r7"]


def test_ordered_output_leaves_out_rows_without_a_record_and_checks_the_count(
    tmp_path: Path,
) -> None:
    journal = write_journal(tmp_path / "j", [good(2), good(0)])
    out = tmp_path / "out.parquet"
    ids = ["r0", "r1", "r2"]
    assert write_output_ordered(journal, out, input_batches(ids), keep_names=[]) == (2, 0)
    assert pq.read_table(out).column("id").to_pylist() == ["r0", "r2"]
    with pytest.raises(BatcherError, match="would hold 2 rows but the input has 3"):
        write_output_ordered(journal, out, input_batches(ids), keep_names=[], expected_rows=3)
    empty = write_journal(tmp_path / "empty", [])
    assert write_output_ordered(empty, out, input_batches(ids), keep_names=[]) == (0, 0)


def test_journal_index_finds_the_latest_record_of_each_id(tmp_path: Path) -> None:
    journal = write_journal(tmp_path / "j", [good(1), good(2), good(1, content="new")])
    index = assemble.JournalIndex(journal)
    assert len(index) == 3 and index.latest("r3") is None
    with assemble.RecordReader(journal) as reader:
        offset = index.latest("r1")
        assert offset is not None and reader.at(offset, "r1")["content"] == "new"
        offset = index.latest("r2")
        assert offset is not None and reader.at(offset, "r2")["content"] == "c2"
        with pytest.raises(BatcherError, match="share a 64-bit hash"):
            reader.at(offset, "r1")
