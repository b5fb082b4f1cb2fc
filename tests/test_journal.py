"""The journal on its own: group commit, torn tails, last record wins, lock, fingerprint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batcher.errors import FingerprintMismatch, JobLocked, JournalError
from batcher.journal import JobLock, journal_path, open_journal, read_state
from batcher.records import Result
from batcher.writer import write_output_from_journal


async def _write(output: Path, results: list[Result], **kw: bool) -> None:
    journal, _ = open_journal(output, "fp1", **kw)
    await asyncio.gather(*(journal.append(r) for r in results))
    journal.close()


async def test_group_commit_and_reopen(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result(str(i), "ok", content=f"c{i}", prompt_tokens=3) for i in range(50)])
    state = read_state(journal_path(out))
    assert state.fingerprint == "fp1" and state.runs == 1 and len(state.ids) == 50
    assert state.ok_count == 50 and state.prompt_tokens == 150


async def test_torn_tail_is_dropped_and_cut(tmp_path: Path, caplog) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result("a", "ok"), Result("b", "ok")])
    path = journal_path(out)
    with path.open("ab") as fh:
        fh.write(b'{"t": "r", "id": "c", "sta')
    state = read_state(path, repair=True)
    assert sorted(state.ids.to_pylist()) == ["a", "b"] and state.dropped_tail
    assert path.read_bytes().endswith(b"\n")
    assert "cut off by a crash" in caplog.text


async def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result("a", "ok"), Result("b", "ok")])
    path = journal_path(out)
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"garbage"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalError, match="corrupt"):
        read_state(path)


async def test_last_record_wins_and_retry_errors(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result("a", "ok"), Result("b", "error", error="boom")])
    state = read_state(journal_path(out))
    assert sorted(state.done_ids(retry_errors=True).to_pylist()) == ["a"]
    assert sorted(state.done_ids(retry_errors=False).to_pylist()) == ["a", "b"]
    await _write(out, [Result("b", "ok", content="fixed")], retry_errors=True)
    state = read_state(journal_path(out))
    assert state.ok_count == 2 and state.records == 3 and state.runs == 2
    rows, errors = write_output_from_journal(journal_path(out), out, keep_names=[])
    assert (rows, errors) == (2, 0)
    table = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert table["b"]["content"] == "fixed"


async def test_fingerprint_mismatch_and_restart(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result("a", "ok")])
    with pytest.raises(FingerprintMismatch, match="--restart"):
        open_journal(out, "fp2")
    journal, state = open_journal(out, "fp2", restart=True)
    journal.close()
    assert len(state.ids) == 0


def test_lock_refuses_second_holder(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    first = JobLock(out)
    first.acquire()
    try:
        with pytest.raises(JobLocked, match="already running"):
            JobLock(out).acquire()
    finally:
        first.release()
    again = JobLock(out)
    again.acquire()
    again.release()


async def test_keep_columns_types_inferred_across_chunks(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    # The first chunk has only nulls for `n`: the type must come from later rows.
    results = [Result(str(i), "ok", keep={"n": None if i < 9000 else i}) for i in range(9100)]
    await _write(out, results)
    write_output_from_journal(journal_path(out), out, keep_names=["n"])
    assert str(pq.read_schema(out).field("n").type) == "int64"
