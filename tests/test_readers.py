"""A small input held after one complete reading reads exactly as the file does."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.readers import HELD_ROW_BYTES, InputReader, Row
from batcher.spec import Job


def job(tmp_path: Path, name: str, **kw: object) -> Job:
    return Job.model_validate(
        {
            "input": tmp_path / name,
            "output": tmp_path / "out.parquet",
            "model": "gpt-4o-mini",
            "id_column": "id",
            "on_bad_row": "skip",
            "messages": [{"role": "user", "content": "{text}"}],
            **kw,
        }
    )


def write_lines(path: Path, texts: list[str]) -> None:
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )


def rows(reader: InputReader, size: int) -> list[Row]:
    return [r for batch in reader.iter_batches(size) for r in batch]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_held_rows_are_the_rows_read_and_the_file_is_not_read_again(
    tmp_path: Path, fmt: str
) -> None:
    texts = [f"text {i}" for i in range(10)]
    if fmt == "jsonl":
        write_lines(tmp_path / "in.jsonl", texts)
    else:
        pq.write_table(
            pa.table({"id": [f"r{i}" for i in range(10)], "text": texts}), tmp_path / "in.parquet"
        )
    reader = InputReader(job(tmp_path, f"in.{fmt}"))
    reader.select({"id", "text"})
    reader.hold(1 << 20)
    first = rows(reader, 3)
    if fmt == "jsonl":
        (tmp_path / "in.jsonl").unlink()  # held: the later readings do not touch the file
    assert rows(reader, 4) == first == rows(reader, 100)
    assert all(a is b for a, b in zip(first, rows(reader, 5), strict=True))  # the same rows
    assert [len(b) for b in reader.iter_batches(4)] == [4, 4, 2]


def test_a_larger_input_is_read_afresh_each_time(tmp_path: Path) -> None:
    write_lines(tmp_path / "in.jsonl", ["a", "b"])
    reader = InputReader(job(tmp_path, "in.jsonl"))
    reader.hold((tmp_path / "in.jsonl").stat().st_size - 1)
    assert [r.data["text"] for r in rows(reader, 10)] == ["a", "b"]
    write_lines(tmp_path / "in.jsonl", ["c", "d"])
    assert [r.data["text"] for r in rows(reader, 10)] == ["c", "d"]


def test_a_reading_stopped_early_holds_nothing(tmp_path: Path) -> None:
    write_lines(tmp_path / "in.jsonl", ["a", "b", "c"])
    reader = InputReader(job(tmp_path, "in.jsonl"))
    reader.hold(1 << 20)
    batches = reader.iter_batches(1)
    assert next(batches)[0].data["text"] == "a"
    batches.close()
    write_lines(tmp_path / "in.jsonl", ["x", "y", "z"])
    assert [r.data["text"] for r in rows(reader, 10)] == ["x", "y", "z"]


def test_bad_rows_are_held_as_they_were_read_and_select_reads_again(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": "r0", "text": "a"}\nnot json\n')
    reader = InputReader(job(tmp_path, "in.jsonl"))
    reader.hold(1 << 20)
    first = rows(reader, 10)
    assert first[1].error is not None and "not valid JSON" in first[1].error
    assert rows(reader, 10) == first
    (tmp_path / "in.jsonl").write_text('{"id": "r0", "text": "b"}\n')
    reader.select({"id", "text"})  # other columns: the held rows no longer apply
    assert [r.data["text"] for r in rows(reader, 10)] == ["b"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_rows_that_take_more_memory_than_the_budget_are_not_held(tmp_path: Path, fmt: str) -> None:
    """The budget is the rows' memory (text + HELD_ROW_BYTES a row), not the file's size: short
    rows take ~16x their JSONL size, compressed Parquet far more."""
    n = 100
    if fmt == "jsonl":
        write_lines(tmp_path / "in.jsonl", ["x"] * n)
    else:
        pq.write_table(
            pa.table({"id": [f"r{i}" for i in range(n)], "text": ["x"] * n}),
            tmp_path / "in.parquet",
        )
    budget = max((tmp_path / f"in.{fmt}").stat().st_size, HELD_ROW_BYTES * n - 1)
    reader = InputReader(job(tmp_path, f"in.{fmt}"))
    reader.select({"id", "text"})
    reader.hold(budget)  # the file fits; its rows do not
    first = rows(reader, 7)
    again = rows(reader, 7)
    assert again == first and len(first) == n
    assert all(a is not b for a, b in zip(first, again, strict=True))  # read afresh, not held


def test_a_binary_id_column_gives_its_text_and_bytes_that_are_not_text_a_bad_row(
    tmp_path: Path,
) -> None:
    """A Parquet `binary` id b"a" was written as the id "b'a'", which joins back to nothing."""
    pq.write_table(
        pa.table({"id": pa.array([b"a", b"\xff\xfe"], pa.binary()), "text": ["x", "y"]}),
        tmp_path / "in.parquet",
    )
    read = rows(InputReader(job(tmp_path, "in.parquet")), 10)
    assert [r.id for r in read if r.error is None] == ["a"]
    [bad] = [r for r in read if r.error is not None]
    assert "holds bytes that are not UTF-8 text" in bad.error


def test_a_missing_id_column_names_the_rows_columns(tmp_path: Path) -> None:
    """`id_column: nosuch` said only 'missing or null' (found by review)."""
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": null, "text": "y"}\n')
    [missing, _] = rows(InputReader(job(tmp_path, "in.jsonl", id_column="nosuch")), 10)
    assert "id column 'nosuch' is missing (the row's columns: id, text; check id_column)" in (
        missing.error or ""
    )
    [_, null] = rows(InputReader(job(tmp_path, "in.jsonl")), 10)
    assert "id column 'id' is null" in (null.error or "")
