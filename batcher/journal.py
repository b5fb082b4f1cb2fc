"""The job's append-only journal: a row is done once its result is fsynced here.

Layout, next to the output: `<output>.journal` (JSON lines) and `<output>.lock`.

    {"t": "h", "version": 1, "fingerprint": "...", "created": "..."}   header, first line
    {"t": "run", "started": "...", "pid": 123, "retry_errors": false}  one per run
    {"t": "r", "id": "...", "status": "ok", ...}                        one per finished row
    {"t": "end", "finished": "...", "complete": true}                   a run that ended

Results are written in group commits: every `append()` waits until its line is written and
fsynced; lines that arrive while one fsync runs go out together in the next. A crash can only
tear the last line, which `open_journal` drops with a warning. The last record for an id wins
(`--retry-errors` appends a new result after an error).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from batcher.errors import FingerprintMismatch, JobLocked, JournalError, StorageError
from batcher.records import STATUS_OK, Result

log = logging.getLogger("batcher")
VERSION = 1


def _json_default(value: Any) -> Any:
    """Kept Parquet values JSON has no type for: dates and times as ISO text, the rest as text."""
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    return str(value)  # Decimal, timedelta, ...


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".journal")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def storage_error(path: Path, exc: OSError, action: str) -> StorageError:
    hint = {
        errno.ENOSPC: "free disk space, then run the same command again to resume",
        errno.EDQUOT: "free disk quota, then run the same command again to resume",
        errno.EACCES: "make the directory writable, or choose another output path",
        errno.EROFS: "the file system is read-only; choose another output path",
    }.get(exc.errno or 0, "fix the problem, then run the same command again to resume")
    return StorageError(f"cannot {action} {path}: {exc.strerror or exc}; {hint}")


class JobLock:
    """An exclusive flock on `<output>.lock`; the kernel drops it if the process dies."""

    def __init__(self, output: Path) -> None:
        self.path = lock_path(output)
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self.path.open("a+")
        except OSError as exc:
            raise storage_error(self.path, exc, "create the lock file") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise JobLocked(
                f"this job is already running ({holder} holds {self.path}); wait for it to "
                "finish or stop it. Two runs of one job would corrupt its journal."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


@dataclass
class JournalState:
    """What an existing journal says, read once at open."""

    fingerprint: str | None = None
    created: str | None = None
    last_run: str | None = None
    last_end: dict[str, Any] | None = None
    runs: int = 0
    records: int = 0  # result lines, superseded ones included
    ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # latest per id
    ok: pa.Array = field(default_factory=lambda: pa.array([], pa.bool_()))
    prompt_tokens: int = 0  # spent, superseded attempts included: they were paid for
    completion_tokens: int = 0
    dropped_tail: bool = False

    @property
    def ok_count(self) -> int:
        return int(pc.sum(self.ok).as_py() or 0) if len(self.ok) else 0

    @property
    def error_count(self) -> int:
        return len(self.ok) - self.ok_count

    def done_ids(self, retry_errors: bool) -> pa.Array:
        """Ids not to send again: all finished rows, or only the ok ones with --retry-errors."""
        if retry_errors:
            return pc.filter(self.ids, self.ok)
        return self.ids


def _iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line) for each line, the last possibly unterminated."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, offset, raw
            offset += len(raw)


def read_state(path: Path, *, repair: bool = False) -> JournalState:
    """Read a journal. A torn last line is dropped (and cut off the file when `repair`)."""
    state = JournalState()
    if not path.exists():
        return state
    ids: list[str] = []
    oks: list[bool] = []
    torn_at: int | None = None
    prev: tuple[int, int, bytes] | None = None
    for item in _iter_lines(path):
        if prev is not None:
            _apply(state, prev, ids, oks, last=False)
        prev = item
    if prev is not None and not _apply(state, prev, ids, oks, last=True):
        torn_at = prev[1]
    if torn_at is not None:
        state.dropped_tail = True
        if repair:  # (a reader like `status` may just be seeing a line being written)
            log.warning(
                "journal %s: the last record was cut off by a crash; it is dropped and that "
                "row will be sent again",
                path,
            )
            with path.open("r+b") as fh:
                fh.truncate(torn_at)
                os.fsync(fh.fileno())
    if ids:
        table = pa.table({"id": pa.array(ids, pa.string()), "ok": pa.array(oks, pa.bool_())})
        latest = table.group_by("id", use_threads=False).aggregate([("ok", "last")])
        state.ids = latest.column("id").combine_chunks()
        state.ok = latest.column("ok_last").combine_chunks()
    return state


def _apply(
    state: JournalState, item: tuple[int, int, bytes], ids: list[str], oks: list[bool], last: bool
) -> bool:
    lineno, _, raw = item
    try:
        if not raw.endswith(b"\n"):
            raise ValueError("unterminated")
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except ValueError:
        if last:
            return False
        raise JournalError(
            f"journal line {lineno} is corrupt (not a torn tail: a line in the middle). "
            "Inspect the file, or start over with --restart."
        ) from None
    kind = rec.get("t")
    if kind == "r":
        ids.append(rec["id"])
        oks.append(rec.get("status") == STATUS_OK)
        state.records += 1
        state.prompt_tokens += rec.get("prompt_tokens") or 0
        state.completion_tokens += rec.get("completion_tokens") or 0
    elif kind == "h":
        if rec.get("version") != VERSION:
            raise JournalError(
                f"journal format version {rec.get('version')} is not {VERSION}; "
                "finish it with the batcher version that wrote it, or --restart"
            )
        state.fingerprint = rec.get("fingerprint")
        state.created = rec.get("created")
    elif kind == "run":
        state.runs += 1
        state.last_run = rec.get("started")
    elif kind == "end":
        state.last_end = rec
    return True


def read_results(path: Path) -> Iterator[dict[str, Any]]:
    """Every result record in journal order (superseded ones too), tolerating a torn tail."""
    for _, _, raw in _iter_lines(path):
        if not raw.endswith(b"\n"):
            return
        try:
            rec = json.loads(raw)
        except ValueError:
            return
        if rec.get("t") == "r":
            del rec["t"]
            yield rec


class Journal:
    """Append side of an open journal; owns the file handle and the group-commit flusher."""

    def __init__(self, path: Path, fh: IO[bytes], *, fsync: bool = True) -> None:
        self.path = path
        self._fh = fh
        self._fsync = fsync  # off only to measure what durability costs (benchmarks)
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._failed: StorageError | None = None
        self.appended = 0

    async def append(self, result: Result) -> None:
        """Returns once the result is durable on disk; raises StorageError if it cannot be."""
        if self._failed is not None:
            raise self._failed
        rec = {"t": "r", **result.to_record()}
        line = json.dumps(rec, ensure_ascii=False, default=_json_default)
        self._pending.append(line.encode() + b"\n")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        await fut

    async def _flush_loop(self) -> None:
        while self._pending:
            lines, self._pending = self._pending, []
            waiters, self._waiters = self._waiters, []
            try:
                await asyncio.to_thread(self._write_sync, b"".join(lines))
            except Exception as exc:  # anything: waiters must never hang on a dead flusher
                self._failed = (
                    storage_error(self.path, exc, "write the journal")
                    if isinstance(exc, OSError)
                    else StorageError(f"cannot write the journal {self.path}: {exc}")
                )
                for w in waiters + self._waiters:
                    if not w.done():
                        w.set_exception(self._failed)
                self._pending, self._waiters = [], []
                return
            self.appended += len(lines)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _write_sync(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def write_meta(self, rec: dict[str, Any]) -> None:
        """Header/run/end lines: rare, written synchronously."""
        try:
            self._write_sync(json.dumps(rec).encode() + b"\n")
        except OSError as exc:
            raise storage_error(self.path, exc, "write the journal") from None

    async def drain(self) -> None:
        """Wait until every appended result is on disk (or has failed)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    def close(self) -> None:
        # After a failed write (disk full) the buffer still holds those bytes and closing
        # tries to flush them again: that failure is already reported as a StorageError, and
        # those rows were never counted as saved.
        with contextlib.suppress(OSError):
            self._fh.close()


def open_journal(
    output: Path,
    fingerprint: str,
    *,
    restart: bool = False,
    retry_errors: bool = False,
    fsync: bool = True,
) -> tuple[Journal, JournalState]:
    """Open (or create) the journal for appending; the caller holds the job lock.

    Refuses to continue a journal whose fingerprint differs, unless `restart`.
    """
    path = journal_path(output)
    if restart and path.exists():
        try:
            path.unlink()
        except OSError as exc:
            raise storage_error(path, exc, "remove the old journal") from None
    state = read_state(path, repair=True)
    if state.fingerprint is not None and state.fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"{output}: the job changed since this output was started (model, messages, "
            f"params or input differ from journal {path.name}). Answers already paid for "
            "belong to the old requests. Run with --restart to start over, or undo the edit. "
            "(Only limits, concurrency and other pacing settings may change between runs.)"
        )
    if state.records and state.fingerprint is None:
        raise JournalError(f"{path}: journal has results but no header; use --restart")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("ab")
    except OSError as exc:
        raise storage_error(path, exc, "open the journal") from None
    journal = Journal(path, fh, fsync=fsync)
    if state.fingerprint is None:
        journal.write_meta(
            {"t": "h", "version": VERSION, "fingerprint": fingerprint, "created": _now()}
        )
        fsync_dir(path.parent)  # the new file's directory entry must survive a crash too
        state.fingerprint = fingerprint
    journal.write_meta(
        {"t": "run", "started": _now(), "pid": os.getpid(), "retry_errors": retry_errors}
    )
    return journal, state


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def end_record(complete: bool, **extra: Any) -> dict[str, Any]:
    return {"t": "end", "finished": _now(), "complete": complete, **extra}
