"""The journal on its own: group commit, torn tails, damaged lines, last record wins, lock,
fingerprint, a journal deleted or replaced mid-run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batcher import journal as journal_module
from batcher.errors import JobLocked, JournalError, StorageError
from batcher.journal import (
    GROUP_COMMIT_S,
    JobLock,
    SkippedLines,
    is_locked,
    journal_path,
    key_hash,
    latest_mask,
    lock_path,
    open_journal,
    read_results,
    read_state,
)
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


def hold_writes(
    journal: journal_module.Journal, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Make the journal's writes wait: (set when a write has begun, set to let it finish)."""
    entered, release = threading.Event(), threading.Event()
    write = journal._write_sync

    def held(data: bytes) -> float:
        entered.set()
        release.wait(60)
        return write(data)

    monkeypatch.setattr(journal, "_write_sync", held)
    return entered, release


async def test_group_commits_are_at_least_the_commit_gap_apart(tmp_path: Path, monkeypatch) -> None:
    """64 writers appending without pause get one commit (one fsync) per GROUP_COMMIT_S at
    most, not one per answer that arrived while the last fsync ran; every line is on disk when
    its append returns."""
    journal, _ = open_journal(tmp_path / "o.parquet", "fp1")
    commits = 0
    write = journal._write_sync

    def counted(data: bytes) -> float:
        nonlocal commits
        commits += 1
        return write(data)

    monkeypatch.setattr(journal, "_write_sync", counted)
    loop = asyncio.get_running_loop()

    returned = 0

    async def writer(w: int) -> None:
        nonlocal returned
        for i in range(20):
            await journal.append(Result(f"{w}-{i}", "ok", content="c"))
            returned += 1
            assert journal.appended >= returned  # written (and fsynced) before it returned

    start = loop.time()
    await asyncio.gather(*(writer(w) for w in range(64)))
    elapsed = loop.time() - start
    journal.close()
    assert len(list(read_results(journal_path(tmp_path / "o.parquet")))) == 64 * 20
    assert commits <= elapsed / GROUP_COMMIT_S + 1, (commits, elapsed)


async def test_add_hands_results_over_without_waiting_and_says_when_they_are_written(
    tmp_path: Path, monkeypatch
) -> None:
    """`add` returns at once while the backlog is short, and a future to wait on past it; the
    callback gets each group once its commit is on disk, in order."""
    monkeypatch.setattr(journal_module, "GROUP_COMMIT_S", 0.0)
    journal, _ = open_journal(tmp_path / "o.parquet", "fp1")
    written: list[str] = []

    def on_disk(results: Sequence[Result]) -> None:
        assert journal.appended >= len(written) + len(results)  # counted after the write
        written.extend(r.id for r in results)

    first = journal.add([Result("a", "ok"), Result("b", "ok")], on_disk, backlog=2)
    assert first is None and written == []  # handed over, not yet written
    over = journal.add([Result("c", "ok")], on_disk, backlog=2)
    assert over is not None  # three lines wait: past the backlog, wait for this commit
    await asyncio.wait_for(over, timeout=60)
    assert written == ["a", "b", "c"]
    await journal.drain()
    journal.close()
    assert [r["id"] for r in read_results(journal_path(tmp_path / "o.parquet"))] == [
        "a",
        "b",
        "c",
    ]


async def test_add_counts_the_commit_being_written_against_the_backlog(
    tmp_path: Path, monkeypatch
) -> None:
    """Lines in the commit being written are not on disk either: while it runs, an `add` that
    brings them and the pending ones past the backlog must wait (else the rows answered and
    not on disk could reach three times the backlog)."""
    journal, _ = open_journal(tmp_path / "o.parquet", "fp1")
    entered, release = hold_writes(journal, monkeypatch)
    done: list[Result] = []
    assert journal.add([Result("a", "ok"), Result("b", "ok")], done.extend, backlog=3) is None
    assert await asyncio.to_thread(entered.wait, 60)  # the commit of a, b is being written
    assert journal.add([Result("c", "ok")], done.extend, backlog=3) is None  # 2 + 1
    wait = journal.add([Result("d", "ok")], done.extend, backlog=3)  # 2 + 2
    assert wait is not None
    release.set()
    await asyncio.wait_for(wait, timeout=60)
    await journal.drain()
    journal.close()
    assert [r.id for r in done] == ["a", "b", "c", "d"]


async def test_a_failed_commit_is_told_at_once_and_nothing_of_it_is_counted(
    tmp_path: Path, monkeypatch
) -> None:
    """Nobody waits on an `add`: a commit that fails calls `on_failure` once, its rows are
    never reported written, the next `add` and the drain raise the same StorageError."""
    journal, _ = open_journal(tmp_path / "o.parquet", "fp1")

    def full(data: bytes) -> float:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal, "_write_sync", full)
    failures: list[StorageError] = []
    journal.on_failure = failures.append
    written: list[Result] = []
    assert journal.add([Result("a", "ok")], written.extend, backlog=10) is None
    with pytest.raises(StorageError, match="free disk space"):
        await journal.drain()
    assert len(failures) == 1 and written == []
    with pytest.raises(StorageError):
        journal.add([Result("b", "ok")], written.extend, backlog=10)
    journal.close()


async def test_a_fast_commit_runs_the_next_on_the_loop_a_slow_one_in_a_thread(
    tmp_path: Path, monkeypatch
) -> None:
    """The first commit goes to a thread; one that took less than INLINE_COMMIT_S sends the
    next to the loop itself (a thread hop costs more than a fast fsync), one that took longer
    sends the next back to a thread (a slow disk must not hold the loop)."""
    monkeypatch.setattr(journal_module, "GROUP_COMMIT_S", 0.0)
    journal, _ = open_journal(tmp_path / "o.parquet", "fp1")
    write = journal._write_sync
    durations = iter([0.0, 0.0, 5.0, 0.0, 0.0])  # what each commit reports it took
    threads: list[bool] = []  # per commit: did it run on the loop's thread

    def reported(data: bytes) -> float:
        threads.append(threading.get_ident() == loop_thread)
        write(data)
        return next(durations)

    monkeypatch.setattr(journal, "_write_sync", reported)
    loop_thread = threading.get_ident()
    for i in range(5):  # one append at a time: one commit each
        await journal.append(Result(f"r{i}", "ok", content="c"))
    journal.close()
    assert threads == [False, True, True, False, True]
    assert [r["id"] for r in read_results(journal_path(tmp_path / "o.parquet"))] == [
        f"r{i}" for i in range(5)
    ]


async def test_a_flusher_cancelled_in_its_commit_gap_still_writes(
    tmp_path: Path, monkeypatch
) -> None:
    """A cancelled drain cancels the flusher; if it waits out the commit gap, the lines it
    holds (answers paid for) are written first and their appends return."""
    monkeypatch.setattr(journal_module, "GROUP_COMMIT_S", 3600.0)  # surely in the gap
    journal, _ = open_journal(tmp_path / "o.parquet", "fp1")
    await journal.append(Result("a", "ok", content="c"))
    second = asyncio.ensure_future(journal.append(Result("b", "ok", content="c")))
    await asyncio.sleep(0)  # the append starts the flusher ...
    await asyncio.sleep(0)  # ... which begins to wait out the gap
    flusher = journal._flusher
    assert flusher is not None and not flusher.done()
    flusher.cancel()
    await asyncio.wait_for(second, timeout=60)
    with pytest.raises(asyncio.CancelledError):
        await flusher
    journal.close()
    assert [r["id"] for r in read_results(journal_path(tmp_path / "o.parquet"))] == ["a", "b"]


async def test_a_flusher_cancelled_while_it_writes_sees_the_write_through(
    tmp_path: Path, monkeypatch
) -> None:
    """Cancelled while its thread writes, the flusher still tells the appends waiting for that
    write that their lines are on disk, instead of leaving them waiting for ever."""
    journal, _ = open_journal(tmp_path / "o.parquet", "fp1")
    entered, release = hold_writes(journal, monkeypatch)
    pending = asyncio.ensure_future(journal.append(Result("a", "ok", content="c")))
    assert await asyncio.to_thread(entered.wait, 60)
    flusher = journal._flusher
    assert flusher is not None
    flusher.cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(pending, timeout=60)
    with pytest.raises(asyncio.CancelledError):
        await flusher
    journal.close()
    assert [r["id"] for r in read_results(journal_path(tmp_path / "o.parquet"))] == ["a"]


async def test_torn_tail_is_dropped_and_cut(tmp_path: Path, caplog) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result("a", "ok"), Result("b", "ok")])
    path = journal_path(out)
    with path.open("ab") as fh:
        fh.write(b'{"t": "r", "id": "c", "sta')
    state = read_state(path, repair=True)
    assert sorted(state.ids.to_pylist()) == ["a", "b"] and state.dropped_tail
    assert path.read_bytes().endswith(b"\n")
    assert "cut off by a crash; it is dropped (that row will be sent again)" in caplog.text
    caplog.clear()
    with path.open("ab") as fh:  # a run's header cut off (a full disk at the start)
        fh.write(b'{"t": "run", "started')
    state = read_state(path, repair=True)
    assert sorted(state.ids.to_pylist()) == ["a", "b"] and state.dropped_tail
    assert "it is dropped (it held no answer)" in caplog.text


async def test_corrupt_middle_lines_are_skipped_by_every_reader(tmp_path: Path, caplog) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result(x, "ok", prompt_tokens=1) for x in "abcd"])
    path = journal_path(out)
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"garbage"  # line 3: the result of "a"
    lines[4] = b'{"t": "r", "status": "ok", "prompt_tokens": 5}'  # line 5: no id
    lines.insert(5, b'["not", "an", "object"]')  # line 6
    path.write_bytes(b"\n".join(lines))
    state = read_state(path, repair=True)
    assert sorted(state.ids.to_pylist()) == ["b", "d"] and state.prompt_tokens == 2
    assert state.skipped.count == 3 and state.skipped.lines == [3, 5, 6]
    assert "line 3 (not JSON)" in caplog.text and "line 5 (a result without an id)" in caplog.text
    skipped = SkippedLines()
    assert [r["id"] for r in read_results(path, skipped)] == ["b", "d"]
    assert skipped.lines == [3, 5, 6]
    # A run goes on: the journal keeps its lines, the skipped rows are simply not done yet.
    journal, state = open_journal(out, "fp1")
    journal.close()
    assert sorted(state.done_ids(False).to_pylist()) == ["b", "d"]
    assert write_output_from_journal(path, out, keep_names=[]) == (2, 0)


async def test_records_with_odd_fields_do_not_break_the_state(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "o.parquet")
    path.write_text(
        '{"t": "h", "version": 1, "fingerprint": "fp1", "created": null}\n'
        '{"t": "r", "id": "a", "status": "ok", "prompt_tokens": "7", "completion_tokens": 1.5}\n'
        '{"t": "r", "id": 17, "status": "ok"}\n'
        '{"t": "r", "id": "", "status": "ok"}\n'
    )
    state = read_state(path)
    assert state.ids.to_pylist() == ["a"] and state.prompt_tokens == 0
    assert state.skipped.count == 2 and state.created == "(unknown)"


def test_latest_mask_is_exact() -> None:
    assert latest_mask(lambda: ["a", "b", "c"]) == (None, 0)
    assert latest_mask(lambda: []) == (None, 0)
    mask, superseded = latest_mask(lambda: ["a", "b", "a", "c", "b", "a"])
    assert mask == bytearray([0, 0, 0, 1, 1, 1]) and superseded == 3


def test_latest_mask_survives_hash_collisions(monkeypatch) -> None:
    # Every id hashes alike: only the string comparison tells them apart.
    import builtins

    monkeypatch.setattr(builtins, "hash", lambda _: 42)
    assert latest_mask(lambda: ["a", "b", "c"]) == (None, 0)
    mask, superseded = latest_mask(lambda: ["a", "b", "a"])
    assert mask == bytearray([0, 1, 1]) and superseded == 1


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


async def test_a_changed_job_keeps_its_answers_and_restart_forgets_them(tmp_path: Path) -> None:
    """Each result carries its request's key: a changed job is no refusal (the engine asks
    again just the rows whose request changed); the journal says which job it now holds."""
    out = tmp_path / "o.parquet"
    await _write(out, [Result("a", "ok", key="ab" * 32)])
    journal, state = open_journal(out, "fp2")
    journal.close()
    assert state.ids.to_pylist() == ["a"] and state.fingerprint == "fp2"
    assert state.key_hashes.to_pylist() == [key_hash("ab" * 32)] != [0]
    journal, state = open_journal(out, "fp2", restart=True)
    journal.close()
    assert len(state.ids) == 0


def test_lock_refuses_second_holder(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    first = JobLock(out)
    first.acquire()
    try:
        assert is_locked(out)
        with pytest.raises(JobLocked, match=f"already running .pid {os.getpid()} holds"):
            JobLock(out).acquire()
        # The note naming the holder is only a note: deleting it frees nothing.
        lock_path(out).unlink()
        with pytest.raises(JobLocked, match="already running"):
            JobLock(out).acquire()
    finally:
        first.release()
    assert not is_locked(out)
    assert not journal_path(out).exists()  # created for the lock, never written: removed
    again = JobLock(out)
    again.acquire()
    again.release()


async def test_lock_is_kept_through_restart(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result("a", "ok")])
    lock = JobLock(out)
    lock.acquire()
    try:
        journal, state = open_journal(out, "fp2", restart=True)  # emptied in place
        journal.close()
        assert len(state.ids) == 0
        with pytest.raises(JobLocked):
            JobLock(out).acquire()
    finally:
        lock.release()
    assert read_state(journal_path(out)).fingerprint == "fp2"


async def test_lock_in_another_process_is_seen(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    code = (
        "import sys, time; from pathlib import Path; from batcher.journal import JobLock; "
        f"JobLock(Path({str(out)!r})).acquire(); print('locked', flush=True); "
        "sys.stdin.readline()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        with pytest.raises(JobLocked, match=f"pid {proc.pid}"):
            JobLock(out).acquire()
    finally:
        proc.kill()
        proc.wait()
    JobLock(out).acquire()  # the kernel dropped the dead holder's lock


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_journal_deleted_or_replaced_mid_run_stops_and_keeps_records(
    tmp_path: Path, how: str
) -> None:
    out = tmp_path / "o.parquet"
    path = journal_path(out)
    journal, _ = open_journal(out, "fp1")
    await asyncio.gather(*(journal.append(Result(str(i), "ok")) for i in range(5)))
    if how == "deleted":
        path.unlink()
    else:
        path.rename(tmp_path / "moved")
        path.write_text("someone else's file\n")
    with pytest.raises(StorageError, match=f"was {how}") as info:
        await journal.append(Result("5", "ok"))
    with pytest.raises(StorageError):  # a later answer fails the same way, but is kept
        await journal.append(Result("6", "ok"))
    with pytest.raises(StorageError):
        journal.write_meta({"t": "end"})
    journal.close()
    message = str(info.value)
    assert "6 result records" in message
    if how == "deleted":
        assert "written back" in message
        kept = path
    else:
        assert path.read_text() == "someone else's file\n"  # left alone
        kept = next(tmp_path.glob("o.parquet.journal.saved-*"))
        assert kept.name in message
    state = read_state(kept)
    assert sorted(state.ids.to_pylist(), key=int) == [str(i) for i in range(7)]
    assert state.fingerprint == "fp1"


async def test_keep_columns_types_inferred_across_chunks(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    # The first chunk has only nulls for `n`: the type must come from later rows.
    results = [Result(str(i), "ok", keep={"n": None if i < 9000 else i}) for i in range(9100)]
    await _write(out, results)
    write_output_from_journal(journal_path(out), out, keep_names=["n"])
    assert str(pq.read_schema(out).field("n").type) == "int64"


async def test_damaged_header_says_how_to_keep_the_answers(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    await _write(out, [Result("a", "ok"), Result("b", "ok")])
    path = journal_path(out)
    lines = path.read_bytes().split(b"\n")
    lines[0] = b"\x00\x00garbage"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalError, match="holds 2 results but its header") as info:
        open_journal(out, "fp1")
    header = str(info.value).split("run again: ")[1].split("  (or")[0]
    lines[0] = header.encode()
    path.write_bytes(b"\n".join(lines))
    journal, state = open_journal(out, "fp1")
    journal.close()
    assert sorted(state.ids.to_pylist()) == ["a", "b"]
