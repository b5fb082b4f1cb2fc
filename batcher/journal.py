"""The job's append-only journal: a row is done once its result is fsynced here.

Layout, next to the output: `<output>.journal` (JSON lines) and `<output>.lock` (a note naming
the process that runs the job; the lock itself is an flock on the journal, see `JobLock`).

    {"t": "h", "version": 1, "fingerprint": "...", "created": "..."}   header, first line
    {"t": "run", "started": "...", "pid": 123, "retry_errors": false}  one per run
    {"t":"r","id":"...","status":"ok",...}                              one per finished row
    {"t": "end", "finished": "...", "complete": true}                   a run that ended

Result lines are compact (orjson, batcher/fastjson.py: the per-row path); earlier journals wrote
them with spaces like the others, and both are read.

Results are written in group commits, at most one every GROUP_COMMIT_S: every `append()` waits
until its line is written and fsynced; lines that arrive meanwhile go out together in the next
commit. `add()` (the engine's workers) hands results over without waiting and is told when
they are on disk. A crash can only tear the last line, which `open_journal` drops with a
warning. A damaged line anywhere else (or a result without an id) is skipped with a warning
naming it: every good record is kept, and the rows of skipped lines are simply sent again.
The last record for an id wins (`--retry-errors` appends a new result after an error);
`latest_mask` is the one place that rule is applied.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from time import monotonic
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from batcher import fastjson
from batcher.errors import JobLocked, JobSpecError, JournalError, StorageError
from batcher.idhashes import int64_view
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


def _result_line(result: Result) -> bytes:
    """One result record, compact: `{"t":"r","id":...}` (RESULT_PREFIXES: journals of earlier
    versions wrote `{"t": "r", "id": ...}`; both are read)."""
    return fastjson.dumps(result.to_record({"t": "r"}), _json_default) + b"\n"


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
    """An exclusive flock on the job's journal; the kernel drops it if the process dies.

    The lock is on the journal itself, not on a separate lock file: a lock file deleted during a
    run let a second run start beside the first (every row paid twice). The journal is never
    unlinked by batcher while locked (`--restart` truncates it in place), and if someone else
    deletes or replaces it, the running process finds out at its next group commit and stops
    (`Journal`). `<output>.lock` only names the holder for messages; deleting it is harmless.
    """

    def __init__(self, output: Path) -> None:
        self.path = journal_path(output)
        self.note = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # before anything is sent: the job's output path is wrong
            why = (
                "a file is in the way (a path component is not a directory)"
                if exc.errno in (errno.EEXIST, errno.ENOTDIR)
                else exc.strerror or str(exc)
            )
            raise JobSpecError(
                f"cannot create the output directory {self.path.parent}: {why}; choose another "
                "output path, or make that directory writable"
            ) from None
        for _ in range(10):  # the file we locked can be unlinked before we lock it: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise storage_error(self.path, exc, "create the journal") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise JobLocked(
                    f"this job is already running ({holder(self.note)} holds {self.path}); "
                    "wait for it to finish or stop it. Two runs of one job would pay for its "
                    "rows twice and corrupt its journal."
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise StorageError(
                f"cannot lock {self.path}: it keeps being replaced; is "
                "something else deleting files in that directory?"
            )
        self._fd = fd
        with contextlib.suppress(OSError):  # only a note for messages: never fatal
            self.note.write_text(f"pid {os.getpid()}\n")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            # A journal we created and never wrote (the run stopped before sending): remove it
            # while still locked; a process that opened it meanwhile sees another inode at the
            # path after locking and retries (`_same_file`).
            if os.fstat(self._fd).st_size == 0 and _same_file(self._fd, self.path):
                self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def holder(note: Path) -> str:
    """Who runs the job, as its lock note says ("pid 123"), for messages."""
    try:
        return note.read_text().strip() or "another process"
    except (OSError, UnicodeDecodeError):
        return "another process"


def is_locked(output: Path) -> bool:
    """Does a process hold the job's lock? (A non-blocking shared-lock probe; sends nothing.)"""
    try:
        fd = os.open(journal_path(output), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock too
    return False


def _same_file(fd: int, path: Path) -> bool:
    """Is the open file still the file at `path` (not deleted, not replaced)?"""
    own = os.fstat(fd)
    return _is_at((own.st_dev, own.st_ino), path)


def _is_at(identity: tuple[int, int], path: Path) -> bool:
    """Is the file of `identity` (device, inode) the one at `path`?"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == identity


MAX_NAMED_LINES = 20  # bad lines named in messages; the count covers the rest


@dataclass
class SkippedLines:
    """Unreadable journal lines that were skipped: how many, and the first few line numbers."""

    count: int = 0
    lines: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, lineno: int, reason: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_NAMED_LINES:
            self.lines.append(lineno)
            self.reasons.append(reason)

    def describe(self) -> str:
        """`line 7 (not JSON), line 9 (a result without an id)` and how many more."""
        named = ", ".join(
            f"line {n} ({why})" for n, why in zip(self.lines, self.reasons, strict=True)
        )
        more = self.count - len(self.lines)
        return named + (f" and {more} more" if more else "")


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
    key_hashes: pa.Array = field(default_factory=lambda: pa.array([], pa.int64()))  # per id
    spent_usd: float = 0.0  # cost_usd of every record and run, superseded ones included
    prompt_tokens: int = 0  # spent, superseded attempts included: they were paid for
    completion_tokens: int = 0
    dropped_tail: bool = False
    skipped: SkippedLines = field(default_factory=SkippedLines)
    mock: bool = False  # answers from batcher's bundled server (demo answers) are in it

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


TORN = "cut off"  # the reason of an unterminated last line: a crash mid-write, not damage


def _parse(path: Path) -> Iterator[tuple[int, int, dict[str, Any] | str]]:
    """(line number, byte offset, record or why the line is unreadable) for each line.

    The single parser behind `read_state` and `read_results`, so that the run, `status`,
    `inspect` and the writer all skip exactly the same lines. Only the last line can lack its
    newline (reason TORN).
    """
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, offset, _record(raw)
            offset += len(raw)


def _record(raw: bytes) -> dict[str, Any] | str:
    if not raw.endswith(b"\n"):
        return TORN
    try:
        rec = fastjson.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return "not JSON"
    if not isinstance(rec, dict):
        return "not a JSON object"
    if rec.get("t") == "r":
        rid = rec.get("id")
        if not isinstance(rid, str) or not rid:
            return "a result without an id"
    return rec


def _tokens(value: Any) -> int:
    """Token counts from a record, 0 for anything not a count (a damaged or foreign record)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def read_state(path: Path, *, repair: bool = False, rows: bool = True) -> JournalState:
    """Read a journal. A torn last line is dropped (and cut off the file when `repair`);
    damaged lines elsewhere are skipped (with a warning when `repair`: the run reads it).
    `rows=False`: the totals only, not which rows are answered (a --restart empties it)."""
    state = JournalState()
    if not path.exists():
        return state
    ids: list[str] | None = [] if rows else None
    oks: list[bool] = []
    keys = array("q")
    torn_at: int | None = None
    for lineno, offset, rec in _parse(path):
        if isinstance(rec, str):
            if rec == TORN:
                torn_at = offset
            else:
                state.skipped.add(lineno, rec)
            continue
        _apply(state, rec, ids, oks, keys)
    if torn_at is not None:
        state.dropped_tail = True
        if repair:  # (a reader like `status` may just be seeing a line being written)
            with path.open("r+b") as fh:
                fh.seek(torn_at)
                head = fh.read(16)
                # A run's header cut off by a full disk holds no answer: no row to send again.
                what = (
                    "that row will be sent again"
                    if head.startswith((b'{"t":"r"', b'{"t": "r"'))
                    else "it held no answer"
                )
                log.warning(
                    "journal %s: the last record was cut off by a crash; it is dropped (%s)",
                    path,
                    what,
                )
                fh.truncate(torn_at)
                os.fsync(fh.fileno())
    if repair and state.skipped.count:
        log.warning(
            "journal %s: %d unreadable %s skipped: %s. Every other record is kept; the rows "
            "of skipped results (if any) will be sent again.",
            path,
            state.skipped.count,
            "line" if state.skipped.count == 1 else "lines",
            state.skipped.describe(),
        )
    if ids:
        mask, _ = latest_mask(lambda: ids)
        id_array = pa.array(ids, pa.string())
        ok_array = pa.array(oks, pa.bool_())
        key_array = int64_view(keys)
        if mask is not None:  # reruns left superseded records: keep the last of each
            keep = pc.equal(pa.array(mask, pa.uint8()), 1)
            id_array, ok_array = pc.filter(id_array, keep), pc.filter(ok_array, keep)
            key_array = pc.filter(key_array, keep)
        state.ids, state.ok, state.key_hashes = id_array, ok_array, key_array
    return state


def key_hash(key: str | None) -> int:
    """A request key (sha256 hex) as a signed 64-bit number; 0 for none. What a rerun compares
    to tell an unchanged row's request from a changed one, in 8 bytes a row."""
    if not key:
        return 0
    try:
        return int(key[:16], 16) - (1 << 63)
    except ValueError:
        return 0


# The key journaled for a row refused before any request (bad input): its own hash, so that
# once the row is fixed its real request differs and is asked.
BAD_ROW_KEY = "8000000000000001" + "0" * 48
BAD_ROW_HASH = 1  # key_hash(BAD_ROW_KEY)


class DoneRows:
    """The rows a journal answers, and the key hash of the request each was answered for.

    16 bytes a row (the id's 64-bit hash and the key hash, sorted by the first) plus the ids
    as one Arrow array, to tell apart ids whose hashes collide: a dict of a million ids
    added ~110 MB to a rerun's peak. Looked up by binary search."""

    def __init__(self, ids: pa.Array, key_hashes: pa.Array) -> None:
        hashes = array("q")
        for start in range(0, len(ids), 65536):  # in slices: no million-string list at once
            hashes.extend(hash(i) for i in ids.slice(start, 65536).to_pylist())
        order = pc.sort_indices(int64_view(hashes))
        self._hashes = array("q", pc.take(int64_view(hashes), order).to_pylist())
        self._keys = pc.take(key_hashes, order)
        self._ids = pc.take(ids, order)

    @classmethod
    def empty(cls) -> DoneRows:
        return cls(pa.array([], pa.string()), pa.array([], pa.int64()))

    def __len__(self) -> int:
        return len(self._hashes)

    def held(self, row_id: str) -> int | None:
        """The key hash of `row_id`'s journaled result; None if the journal has none."""
        h = hash(row_id)
        i = bisect.bisect_left(self._hashes, h)
        while i < len(self._hashes) and self._hashes[i] == h:
            if self._ids[i].as_py() == row_id:
                return int(self._keys[i].as_py())
            i += 1
        return None


def _money(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) and value > 0 else 0.0


def _apply(
    state: JournalState,
    rec: dict[str, Any],
    ids: list[str] | None,
    oks: list[bool],
    keys: array[int],
) -> None:
    kind = rec.get("t")
    if kind == "r":
        if ids is not None:
            ids.append(rec["id"])
            oks.append(rec.get("status") == STATUS_OK)
            key = rec.get("key")
            keys.append(key_hash(key if isinstance(key, str) else None))
        state.spent_usd += _money(rec.get("cost_usd"))
        state.records += 1
        state.prompt_tokens += _tokens(rec.get("prompt_tokens"))
        state.completion_tokens += _tokens(rec.get("completion_tokens"))
    elif kind == "h":
        if rec.get("version") != VERSION:
            raise JournalError(
                f"journal format version {rec.get('version')} is not {VERSION}; "
                "finish it with the batcher version that wrote it, or --restart"
            )
        fingerprint = rec.get("fingerprint")
        state.fingerprint = fingerprint if isinstance(fingerprint, str) else None
        created = rec.get("created")
        state.created = created if isinstance(created, str) else "(unknown)"
    elif kind == "run":
        state.runs += 1
        started = rec.get("started")
        state.last_run = started if isinstance(started, str) else "(unknown)"
        fingerprint = rec.get("fingerprint")
        if isinstance(fingerprint, str) and state.fingerprint is not None:
            state.fingerprint = fingerprint  # the job as this run saw it (after the header)
        if rec.get("mock") is True:
            state.mock = True
    elif kind == "mock":  # a run found its server was the bundled one (serve-mock)
        state.mock = True
    elif kind == "spent":  # what the job spent before a --restart emptied the journal
        state.spent_usd += _money(rec.get("usd"))
    elif kind == "end":
        state.last_end = rec
        state.spent_usd += _money(rec.get("unrecorded_usd"))


def read_results(path: Path, skipped: SkippedLines | None = None) -> Iterator[dict[str, Any]]:
    """Every result record in journal order (superseded ones too), tolerating a torn tail and
    skipping unreadable lines (counted into `skipped` when given)."""
    for lineno, _, rec in _parse(path):
        if isinstance(rec, str):
            if skipped is not None and rec != TORN:
                skipped.add(lineno, rec)
            continue
        if rec.get("t") == "r":
            del rec["t"]
            yield rec


def latest_mask(ids: Callable[[], Iterable[str]]) -> tuple[bytearray | None, int]:
    """The "latest result per id" rule, its only copy: the last record of an id is the one
    that counts (`--retry-errors` appends a fresh result after an error).

    `ids()` yields the result records' ids in journal order and is called a second time only
    when some id repeats. Returns (mask, superseded): mask[i] is 1 when record i is its id's
    last; the mask is None (and superseded 0) when no id repeats, the usual case.

    Ids are first compared by 64-bit hash, sorted (8 bytes a record, no hash table: a hash
    table over a million ids was the run's memory peak); only the ids behind repeated hashes
    are then compared as strings, so a hash collision cannot drop a row.
    """
    hashes = array("q", (hash(i) for i in ids()))
    if len(hashes) < 2:
        return None, 0
    view = int64_view(hashes)
    ordered = pc.take(view, pc.sort_indices(view))
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    if not pc.any(same).as_py():
        return None, 0
    repeated = set(pc.filter(ordered.slice(1), same).to_pylist())
    del ordered, same
    mask = bytearray(b"\x01") * len(hashes)
    last: dict[str, int] = {}
    superseded = 0
    for seq, (h, rid) in enumerate(zip(hashes, ids(), strict=True)):
        if h in repeated:
            prev = last.get(rid)
            if prev is not None:
                mask[prev] = 0
                superseded += 1
            last[rid] = seq
    if not superseded:
        return None, 0  # only hash collisions between different ids
    return mask, superseded


def journal_latest_mask(
    path: Path, skipped: SkippedLines | None = None
) -> tuple[bytearray | None, int]:
    """`latest_mask` over the result records of a journal file (as `read_results` yields them)."""
    first = True

    def ids() -> Iterator[str]:
        nonlocal first
        counting, first = first, False  # count skipped lines once, not per pass
        return (rec["id"] for rec in read_results(path, skipped if counting else None))

    return latest_mask(ids)


# At most one group commit (one fsync) per 5 ms. Back to back, 3,000 answers a second made
# ~200 commits a second, each a hand-off to a thread and back: the thread's wake-ups and the
# GIL passed to and fro cost more CPU than the fsyncs (~50,000 context switches for 20,000
# rows). An `append` then waits up to 5 ms more for its line to be durable (the engine's
# workers do not wait: `add`); at Langdock's 500 RPM every answer still gets its own commit
# at once.
GROUP_COMMIT_S = 0.005
# A group commit whose write + fsync took less than this runs the next one on the event loop
# itself; a slower one sends the next to a thread. A thread beside a busy loop waits for the
# GIL at every step (woken, after the write, after the fsync, to hand the result back): ~10
# context switches a commit, 8,000 of a 20,000-row run's 17,000, more CPU than the writes
# and fsyncs (p50 0.3 ms here). A disk that turns slow costs the loop one commit's wait (and a
# journal deleted mid-run, the copy `_rescue` makes of it: the run stops then anyway).
INLINE_COMMIT_S = 0.001


class Journal:
    """Append side of an open journal; owns the file handle and the group-commit flusher.

    Before each group commit the open file is compared with the file at the path (device and
    inode): a journal deleted or replaced during the run would otherwise swallow every later
    answer into an unlinked file (or corrupt another's). Then the run stops with a
    StorageError (exit 4), and what the open file holds plus the lines not yet written is kept
    (`_rescue`): put back at the path if it is free, else beside it.
    """

    def __init__(self, path: Path, fh: IO[bytes], *, fsync: bool = True) -> None:
        self.path = path
        self._fh = fh  # opened "a+b": appends, and readable to rescue its contents
        own = os.fstat(fh.fileno())
        self._identity = (own.st_dev, own.st_ino)  # an open file's never changes
        self._fsync = fsync  # off only to measure what durability costs (benchmarks)
        self._pending: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        # `add`: what to call once each handed-over group of results is on disk
        self._written: list[tuple[Callable[[Sequence[Result]], None], Sequence[Result]]] = []
        # Called once when a commit fails: nobody may be waiting to hear it (`add`)
        self.on_failure: Callable[[StorageError], None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._last_commit = -math.inf  # loop time the last group commit began
        self._inline = False  # the last commit was fast: the next runs on the loop
        self._writing = 0  # lines of the commit being written now (not yet on disk either)
        self._failed: StorageError | None = None
        self._rescued: IO[bytes] | None = None  # where answers go after the journal was lost
        self.appended = 0

    async def append(self, result: Result) -> None:
        """Returns once the result is durable on disk; raises StorageError if it cannot be."""
        done = self.add([result], backlog=-1)  # past any backlog: always a future
        assert done is not None
        await done

    def add(
        self,
        results: Sequence[Result],
        written: Callable[[Sequence[Result]], None] | None = None,
        *,
        backlog: int,
    ) -> asyncio.Future[None] | None:
        """Hand `results` to the next group commit without waiting for it: `written(results)`
        is called once they are on disk (never, if the commit fails). Raises StorageError if
        the journal can no longer take them. When more than `backlog` lines wait for their
        commit or in the one being written (a slow disk), returns a future done when these
        are written: the caller waits on it, so what is answered and not yet on disk stays
        bounded. Else None."""
        lines = [_result_line(r) for r in results]
        if self._failed is not None:
            self._keep(b"".join(lines))  # answers still in flight when it failed: paid for
            raise self._failed
        self._pending.extend(lines)
        if written is not None:
            self._written.append((written, results))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        if len(self._pending) + self._writing <= backlog:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        cancelled = False
        while self._pending:
            gap = self._last_commit + GROUP_COMMIT_S - loop.time()
            if gap > 0 and not cancelled:
                try:
                    await asyncio.sleep(gap)  # what arrives meanwhile joins this commit
                except asyncio.CancelledError:
                    cancelled = True  # (at shutdown) the lines are paid for: write them first
            self._last_commit = loop.time()
            lines, self._pending = self._pending, []
            waiters, self._waiters = self._waiters, []
            written, self._written = self._written, []
            self._writing = len(lines)
            try:
                if self._inline:
                    took = self._write_sync(b"".join(lines))
                else:
                    write = asyncio.ensure_future(
                        asyncio.to_thread(self._write_sync, b"".join(lines))
                    )
                    try:
                        took = await asyncio.shield(write)
                    except asyncio.CancelledError:
                        cancelled = True  # the thread writes them anyway: see them through
                        took = await write
                self._inline = took < INLINE_COMMIT_S
            except Exception as exc:  # anything: waiters must never hang on a dead flusher
                if isinstance(exc, StorageError):
                    self._failed = exc
                elif isinstance(exc, OSError):
                    self._failed = storage_error(self.path, exc, "write the journal")
                else:
                    self._failed = StorageError(f"cannot write the journal {self.path}: {exc}")
                self._keep(b"".join(self._pending))
                for w in waiters + self._waiters:
                    if not w.done():
                        w.set_exception(self._failed)
                self._pending, self._waiters, self._written = [], [], []
                self._writing = 0
                if self.on_failure is not None:
                    self.on_failure(self._failed)
                return
            self.appended += len(lines)
            self._writing = 0
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            for call, results in written:
                call(results)
        if cancelled:
            raise asyncio.CancelledError

    def _write_sync(self, data: bytes) -> float:
        """Write and fsync one group commit; returns the seconds it took."""
        if self._failed is not None:
            self._keep(data)
            raise self._failed
        began = monotonic()
        if not _is_at(self._identity, self.path):
            self._failed = self._rescue(data)
            raise self._failed
        self._fh.write(data)
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())
        return monotonic() - began

    def _rescue(self, pending: bytes) -> StorageError:
        """The journal was deleted or replaced under us: keep what the open file holds and the
        lines not yet written, at the path if it is free, else in a file beside it."""
        deleted = not self.path.exists()
        what = "deleted" if deleted else "replaced by another file"
        records = pending.count(b"\n")
        tmp = self.path.with_name(f".{self.path.name}.rescue-{os.getpid()}")
        try:
            self._fh.flush()
            with tmp.open("wb") as out:
                fd, offset = self._fh.fileno(), 0
                while chunk := os.pread(fd, 1 << 20, offset):
                    out.write(chunk)
                    # a count for the message only
                    records += sum(chunk.count(p) for p in (b'"t": "r"', b'"t":"r"'))
                    offset += len(chunk)
                out.write(pending)
                out.flush()
                os.fsync(out.fileno())
            kept = self.path
            try:
                os.link(tmp, self.path)  # fails if the path is taken: never clobber
            except FileExistsError:
                kept = self.path.with_name(f"{self.path.name}.saved-{os.getpid()}")
                os.replace(tmp, kept)
            else:
                tmp.unlink()
            fsync_dir(self.path.parent)
            self._adopt(kept)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            return StorageError(
                f"the journal {self.path} was {what} while this run was writing it, and its "
                f"records could not be saved elsewhere ({exc.strerror or exc}); the answers "
                "of this run are lost. Do not delete or move a running job's files."
            )
        if kept == self.path:
            where = f"were written back to {kept}; run the same command again to resume"
        else:
            where = (
                f"are saved in {kept} (the file now at {self.path.name} was left alone). If "
                f"that file is not yours, move it away and rename {kept.name} to "
                f"{self.path.name}, then run the same command again to resume"
            )
        return StorageError(
            f"the journal {self.path} was {what} while this run was writing it; the run "
            f"stops. Its {records} result records (answers already paid for; answers still "
            f"in flight are added as they arrive) {where}. Do not delete or move a running "
            "job's files."
        )

    def _adopt(self, kept: Path) -> None:
        """Answers still in flight when the journal was lost go to the rescued copy; locked
        first, so a run started meanwhile is not written into."""
        fh = kept.open("ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return
        self._rescued = fh

    def _keep(self, data: bytes) -> None:
        if self._rescued is None or not data:
            return
        with contextlib.suppress(OSError):
            self._rescued.write(data)
            self._rescued.flush()
            if self._fsync:
                os.fsync(self._rescued.fileno())

    def write_meta(self, rec: dict[str, Any]) -> None:
        """Header/run/end lines: rare, written synchronously."""
        try:
            self._write_sync(json.dumps(rec).encode() + b"\n")
        except OSError as exc:
            raise storage_error(self.path, exc, "write the journal") from None

    async def drain(self) -> None:
        """Wait until every appended result is on disk; StorageError if one could not be
        written. Cancelled, it leaves the flusher writing."""
        flusher = self._flusher
        if flusher is not None:
            try:
                await asyncio.shield(flusher)
            except asyncio.CancelledError:
                if not flusher.cancelled():
                    raise  # drain itself was cancelled
        if self._failed is not None:
            raise self._failed

    def close(self) -> None:
        # After a failed write (disk full) the buffer still holds those bytes and closing
        # tries to flush them again: that failure is already reported as a StorageError, and
        # those rows were never counted as saved.
        with contextlib.suppress(OSError):
            self._fh.close()
        if self._rescued is not None:
            with contextlib.suppress(OSError):
                self._rescued.close()


def open_journal(
    output: Path,
    fingerprint: str,
    *,
    restart: bool = False,
    retry_errors: bool = False,
    fsync: bool = True,
    mock: bool = False,
) -> tuple[Journal, JournalState]:
    """Open (or create) the journal for appending; the caller holds the job lock.

    `restart` empties it but keeps what the job spent (the budget counts the whole job). The
    bundled server's demo answers never count for a run against the API: such a journal
    starts afresh (its spending too); a `mock` run refuses to mix demo answers into a journal
    of real ones unless `restart`.
    """
    path = journal_path(output)
    old: JournalState | None = None
    if path.exists():
        try:  # (a journal about to be emptied needs no repair)
            old = read_state(path, repair=not restart, rows=not restart)
        except JournalError:
            if not restart:
                raise
    carried = 0.0
    if old is not None and old.records:
        if old.mock and not mock:
            log.warning(
                "%s holds answers from batcher's bundled server (--mock or serve-mock): demo "
                "answers, not the API's. This run starts afresh and asks the API for every row",
                path.name,
            )
            restart = True
        elif mock and not old.mock and not restart:
            raise JournalError(
                f"{path} holds {old.records} answers from the API; a --mock run would put demo "
                "answers among them. Give the demo its own output (e.g. `output: "
                "out/demo.parquet`), or --restart to replace them (the API's answers stay in "
                "your response store)"
            )
        elif restart:
            carried = old.spent_usd
    if restart and path.exists():
        try:  # emptied in place, not unlinked: the job lock is an flock on this very file
            with path.open("r+b") as fh:
                fh.truncate(0)
                os.fsync(fh.fileno())
        except OSError as exc:
            raise storage_error(path, exc, "empty the old journal") from None
    state = JournalState() if restart or old is None else old
    if state.fingerprint is not None and state.fingerprint != fingerprint:
        # Not a refusal: each result carries the key of the request it answered, so the run
        # asks again exactly the rows whose request changed, and keeps the others' answers.
        log.info(
            "the job changed since %s began (model, messages, params or input): rows whose "
            "request changed are asked again, the others keep their answers",
            path.name,
        )
    if state.records and state.fingerprint is None:
        header = json.dumps(
            {"t": "h", "version": VERSION, "fingerprint": fingerprint, "created": _now()}
        )
        raise JournalError(
            f"{path}: the journal holds {state.records} results but its header (line 1, which "
            "says which job they belong to) is missing or unreadable, so batcher cannot tell "
            "whether they were answers to this job. If they were, put this line back as the "
            f"first line of the journal and run again: {header}  (or start over with "
            "--restart: rows your response store answered are not paid again)"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("a+b")
    except OSError as exc:
        raise storage_error(path, exc, "open the journal") from None
    journal = Journal(path, fh, fsync=fsync)
    if state.fingerprint is None:
        journal.write_meta(
            {"t": "h", "version": VERSION, "fingerprint": fingerprint, "created": _now()}
        )
        fsync_dir(path.parent)  # the new file's directory entry must survive a crash too
        state.fingerprint = fingerprint
    if carried:
        journal.write_meta({"t": "spent", "usd": carried, "before": "--restart"})
        state.spent_usd = carried
    journal.write_meta(
        {
            "t": "run",
            "started": _now(),
            "pid": os.getpid(),
            "retry_errors": retry_errors,
            "fingerprint": fingerprint,
            "mock": mock,
        }
    )
    state.fingerprint = fingerprint
    state.mock = state.mock or mock
    return journal, state


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def end_record(complete: bool, **extra: Any) -> dict[str, Any]:
    return {"t": "end", "finished": _now(), "complete": complete, **extra}
