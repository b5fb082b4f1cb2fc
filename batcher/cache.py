"""The response store: every answer that became an `ok` row, kept under a hash of its request.

Shared by every job of the user and by several `batcher run` processes at once, so a rerun, a
resume after `--restart`, or another job asking the same thing is answered without paying.

**The key rule** (`request_key`). The key is the sha256 of the request body's canonical JSON
(sorted keys, no whitespace, non-ASCII kept as is) after dropping `IGNORED_FIELDS`:

    temperature        the issue's rule: an identical request is served whatever the
                       temperature (that is what makes resumes and reruns free)
    stream, stream_options, user    transport and attribution only; they do not change
                                    the answer and must not split the store

Everything else counts: model, the final messages, response_format, tools, max_tokens, seed,
top_p, ... The API key and the endpoint's host never enter a body, so they are out by
construction. A second, independent hash of the same canonical bytes (blake2b, `CacheKey.check`)
is stored beside each answer and compared on read, and the stored answer carries a checksum
(zlib's adler32 when compressed, else a CRC-32): a damaged or mismatched entry is a miss, never
a wrong answer.

**The store** (`ResponseStore`) is one SQLite file in WAL mode: readers never block the writer,
a process killed mid-write loses only its open transaction (SQLite's own journal, not our code,
makes that true), and `synchronous=NORMAL` skips the fsync per commit (a power cut may lose the
last commits: those answers are asked again, nothing is corrupted). Writes are short
`BEGIN IMMEDIATE` transactions, one per `put_many` batch, and wait up to `busy_timeout_s` for
another process's write.

A store that cannot be used (not a database, permission denied, disk I/O error or full, a
schema from a newer batcher) is reported once as a warning and bypassed: the store is then
`disabled` and behaves as an empty store that stores nothing. It never fails a run.

Threads: one connection per store, opened with `check_same_thread=False`, every method under
one lock; the engine calls the methods from `asyncio.to_thread` workers. Do not carry an open
store across `fork()`; open one per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batcher import fastjson
from batcher.errors import StorageError
from batcher.paths import cache_home

log = logging.getLogger("batcher")

IGNORED_FIELDS = frozenset({"temperature", "stream", "stream_options", "user"})
SCHEMA_VERSION = 1
STORE_NAME = "responses.sqlite3"
MOCK_STORE_NAME = "responses-mock.sqlite3"
# SQLite's default limit on `?` in one statement is 32,766 (3.32+); 500 keeps statements small.
_CHUNK = 500
_INSERT = (
    "INSERT INTO entries (key, check_hash, codec, answer, model, prompt_tokens,"
    " completion_tokens, created, last_used) VALUES {}"
    " ON CONFLICT(key) DO UPDATE SET check_hash=excluded.check_hash,"
    " codec=excluded.codec, answer=excluded.answer, model=excluded.model,"
    " prompt_tokens=excluded.prompt_tokens,"
    " completion_tokens=excluded.completion_tokens, created=excluded.created,"
    " last_used=excluded.last_used"
)
_INSERT_ROW = "(?,?,?,?,?,?,?,?,?)"
# Codec byte of an answer. Short answers are stored as they are, followed by their CRC-32 (a
# 268-byte chat.completion would shrink to 189 bytes, for 5 us to compress and 2.5 us to
# decompress on every hit: a tenth of an all-hits run's CPU). Longer ones are compressed when
# that saves bytes (zlib's adler32 checks them). _RAW (no check) is only read: earlier versions
# wrote it.
_RAW, _ZLIB, _CHECKED = 0, 1, 2
_COMPRESS_FROM = 512  # bytes of JSON
# Level 1 with a 4 KB window: the default 32 KB window gives the same bytes for an answer but
# costs ten times as long, most of it setting up the window.
_ZLIB_ARGS = (1, zlib.DEFLATED, 12, 4)  # level, method, window bits, memory level
# Bytes of a row beside its answer and model name (key 32, check 16, numbers, record header);
# prune by size only uses it to guess how many rows to delete, then measures again.
_ROW_OVERHEAD = 72
# Hits are counted in memory and written in one sorted batch: stamping them per get_many touched
# a scattered page per hit and halved the all-hits throughput (37,600 -> 13,600 rows/s).
_HIT_FLUSH = 20_000

_SCHEMA = """
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,        -- insertion order: new rows append to the table's b-tree
    key BLOB NOT NULL UNIQUE,      -- sha256 of the canonical request (random: only the index
                                   -- takes the scattered writes, and its entries are small)
    check_hash BLOB NOT NULL,      -- blake2b-128 of the same bytes, compared on read
    codec INTEGER NOT NULL,        -- 2 JSON + CRC-32, 1 zlib (0 JSON: earlier versions)
    answer BLOB NOT NULL,          -- the chat.completion body as the server sent it
    model TEXT,                    -- the model the server says answered
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    created REAL NOT NULL,         -- unix seconds the answer was stored
    last_used REAL NOT NULL,       -- created, then the last hit: prune's "least recently used"
    hits INTEGER NOT NULL DEFAULT 0
)
"""
# CAST: a damaged row whose answer became TEXT must be a miss, not a UTF-8 error for the store.
_COLUMNS = (
    "id, key, check_hash, codec, CAST(answer AS BLOB), model, prompt_tokens, completion_tokens,"
    " created, hits"
)


# -- the key rule (pure) ------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built per row (see records.Request)
class CacheKey:
    """A request's identity in the store: `key` looks it up, `check` confirms it on read."""

    key: str  # sha256 hex of the canonical request
    check: bytes  # blake2b-128 of the same canonical bytes (independent of sha256)


def canonical_request(body: Mapping[str, Any]) -> bytes:
    """The bytes both hashes are taken of: the body minus IGNORED_FIELDS, as canonical JSON.

    A body holding something JSON cannot write raises TypeError: hashing `str()` of it could
    let two different requests share one answer. Dict keys are sorted at every depth, so two
    schemas that differ only in property order share an answer; list order always counts."""
    kept = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    if _plain(kept):
        try:
            return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # a lone surrogate: json says what is wrong
            pass
    return _canonical_json(kept).encode("utf-8")


# json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False) without building
# an encoder per call. The key must never change, so this is the definition; orjson writes the
# same bytes for strings, 64-bit ints, booleans, null, lists and str-keyed dicts (tests compare
# the two on generated bodies) in a seventh of the time, but not for floats (1e-07 vs 1e-7).
_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_INT64 = (-(2**63), 2**63 - 1)


def _plain(value: Any) -> bool:
    """Only values orjson writes exactly as `_canonical_json` does (see there). A loop, not
    recursion: this runs per row, and generator-based recursion cost as much as json."""
    stack = [value]
    pop, extend = stack.pop, stack.extend
    low, high = _INT64
    budget = 100_000  # a structure holding itself (not from JSON) must not loop forever:
    while stack:  # json then says what is wrong
        budget -= 1
        if budget < 0:
            return False
        item = pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is dict:
            for key in item:
                if type(key) is not str:
                    return False
            extend(item.values())
        elif kind is list:
            extend(item)
        elif kind is int:
            if not low <= item <= high:
                return False
        else:
            return False  # floats, tuples, subclasses, ...
    return True


def cache_key(body: Mapping[str, Any]) -> CacheKey:
    return _key_of(canonical_request(body))


def _key_of(canonical: bytes) -> CacheKey:
    return CacheKey(
        key=hashlib.sha256(canonical).hexdigest(),
        check=hashlib.blake2b(canonical, digest_size=16, person=b"batcher-check").digest(),
    )


class KeyFrame:
    """`cache_key` for requests that differ only in the content of some messages (a messages
    template: the model, the params and the other messages are the job's, the same for every
    row). The canonical bytes are cut around those contents once; a row's key then encodes
    only its own texts (a third of the time: the key was a tenth of a store hit's CPU). Byte
    for byte `cache_key`: checked on the body the frame is cut from, and by a property test.
    """

    __slots__ = ("_pieces", "_slots")

    def __init__(self, pieces: list[bytes], slots: tuple[int, ...]) -> None:
        self._pieces = pieces  # canonical bytes before, between and after the contents
        self._slots = slots  # the messages whose content varies, in order

    @classmethod
    def around(cls, body: Mapping[str, Any], slots: Sequence[int]) -> KeyFrame | None:
        """The frame of requests shaped like `body` whose messages at `slots` vary (each
        content a string); None when one cannot be cut exactly (keys are then computed whole).
        """
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(
            0 <= i < len(messages) and isinstance(messages[i], dict) for i in slots
        ):
            return None
        framed_messages = list(messages)
        tokens = []
        for n, i in enumerate(slots):
            marker = f"\x00batcher-slot-{n}\x00"  # written \u0000...: never in real text
            framed_messages[i] = {**messages[i], "content": marker}
            tokens.append(_canonical_json(marker).encode())
        try:
            canonical = canonical_request({**body, "messages": framed_messages})
        except (TypeError, ValueError):
            return None
        pieces, rest = [], canonical
        for token in tokens:
            if canonical.count(token) != 1:
                return None
            before, _, rest = rest.partition(token)
            pieces.append(before)
        pieces.append(rest)
        frame = cls(pieces, tuple(slots))
        try:
            same = frame.key(body) == cache_key(body)
        except (TypeError, ValueError):
            return None
        return frame if same else None

    def key(self, body: Mapping[str, Any]) -> CacheKey:
        """`cache_key(body)` for a body of the frame's shape (any other content than a string
        is keyed whole, with `cache_key`'s errors)."""
        messages = body["messages"]
        pieces = self._pieces
        parts = [pieces[0]]
        for n, i in enumerate(self._slots):
            content = messages[i]["content"]
            if type(content) is not str:
                return cache_key(body)
            try:
                parts.append(orjson.dumps(content))  # as `_canonical_json` writes a string
            except TypeError:  # a lone surrogate: json says what is wrong
                return cache_key(body)
            parts.append(pieces[n + 1])
        return _key_of(b"".join(parts))


def request_key(body: Mapping[str, Any]) -> str:
    """sha256 hex of the request's canonical JSON; see the module docstring for what counts."""
    return cache_key(body).key


# -- records ------------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built per row (see records.Request)
class CacheEntry:
    """One answer to store (an `ok` row's answer only: error rows are never stored)."""

    key: CacheKey
    body: Mapping[str, Any]  # the chat.completion JSON
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(slots=True)  # not frozen: built per row (see records.Request)
class CachedAnswer:
    body: dict[str, Any]
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created: float  # unix seconds it was stored
    hits: int  # earlier hits, this one not counted
    entry: int = 0  # the entry's id: `note_hits` counts the entries served


@dataclass(frozen=True, slots=True)
class CacheStats:
    path: Path
    entries: int
    size_bytes: int  # the database file and its WAL
    hits: int
    oldest: float | None  # unix seconds the oldest entry was stored
    newest: float | None
    disabled_reason: str | None = None


# -- where it lives -----------------------------------------------------------------------------


def default_store_path(mock: bool = False) -> Path:
    """$XDG_CACHE_HOME/batcher/responses.sqlite3 (~/.cache when unset or relative, as the XDG
    spec says). The bundled server's answers go to responses-mock.sqlite3 beside it, so a demo
    can never feed a real run."""
    return cache_home() / (MOCK_STORE_NAME if mock else STORE_NAME)


def mock_variant(path: Path) -> Path:
    """cache/answers.sqlite3 -> cache/answers-mock.sqlite3"""
    return path.with_name(f"{path.stem}-mock{path.suffix}")


def resolve_store_path(configured: Path | None, job_dir: Path, *, mock: bool) -> Path:
    """The store a job uses: `cache.path` (relative to the job file, `~` expanded) or the
    default; with --mock always a separate `-mock` file."""
    if configured is None:
        return default_store_path(mock)
    try:
        path = job_dir / configured.expanduser()
    except RuntimeError:  # "~" and no home directory for this process
        raise StorageError(
            f"cache.path {configured} starts at a home directory this process has not: "
            "give an absolute path"
        ) from None
    return mock_variant(path) if mock else path


# -- the store ----------------------------------------------------------------------------------


_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)


class ResponseStore:
    """Answers by request key, in one SQLite file; see the module docstring.

    Build it with `ResponseStore.open(path)` (never raises for a bad store) or
    `ResponseStore.disabled(reason)` (--no-cache, `cache: {enabled: false}`)."""

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection | None,
        *,
        disabled_reason: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._conn = conn
        self._clock = clock
        self._lock = threading.Lock()
        self.disabled_reason = disabled_reason
        self.mismatches = 0  # entries whose check hash or answer did not verify (served as misses)
        self._warned_busy = False
        self._hits: dict[int, int] = {}  # entry id -> hits not yet written
        # `note_hits` runs on the event loop: it must not wait for the connection's lock while
        # a thread writes answers, so the counts have their own.
        self._hits_lock = threading.Lock()

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path | None = None,
        *,
        mock: bool = False,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 10.0,
        warn: bool = True,
    ) -> ResponseStore:
        """Open (creating it and its directory) the store at `path`, or the default store.

        Never raises for trouble with the store itself: it returns a disabled store whose
        `disabled_reason` says why (and warns once, unless `warn=False`)."""
        path = Path(path) if path is not None else default_store_path(mock)
        conn: sqlite3.Connection | None = None
        try:
            # Answers can be as private as the prompts: only the user reads the store.
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            new = not path.exists()
            conn = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            _prepare_patiently(conn, busy_timeout_s)
            if new:
                path.chmod(0o600)  # SQLite gives its -wal and -shm files the same mode
        except (sqlite3.Error, OSError, _NotOurs) as exc:
            if conn is not None:
                conn.close()
            store = cls(path, None, clock=clock)
            store._disable(_reason(exc), warn=warn)
            return store
        return cls(path, conn, clock=clock)

    @classmethod
    def disabled(cls, reason: str, path: Path | None = None) -> ResponseStore:
        """A store that holds nothing and stores nothing, silently (e.g. for --no-cache)."""
        return cls(path or Path(os.devnull), None, disabled_reason=reason)

    @property
    def enabled(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        """Write the hit counts still in memory, then close (a killed process loses only those)."""
        with self._guard("closing") as conn:
            if conn is not None:
                self._flush_hits(conn)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ResponseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading and writing --------------------------------------------------------------------

    def get_many(
        self, keys: Iterable[CacheKey], *, count_hits: bool = True
    ) -> dict[str, CachedAnswer]:
        """The stored answers among `keys`, by `CacheKey.key`; a miss is simply absent.

        An entry whose check hash differs from the request's, or whose answer does not
        decompress to a JSON object, is a miss (warned once per store). Hits are counted in
        memory and written every _HIT_FLUSH hits, by stats(), prune() and close(); they only
        feed the statistics and LRU pruning. `count_hits=False`: the caller counts the answers
        it uses with `note_hits` (a run may find an answer and not serve it)."""
        wanted = {bytes.fromhex(k.key): k for k in keys}
        if not wanted:
            return {}
        found: dict[str, CachedAnswer] = {}
        with self._guard("reading") as conn:
            if conn is None:
                return {}
            blobs = list(wanted)
            rows: list[tuple[Any, ...]] = []
            for chunk in _chunks(blobs):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT {_COLUMNS} FROM entries WHERE key IN ({marks})"
                rows.extend(conn.execute(sql, chunk).fetchall())
            for rowid, key, check, codec, answer, model, ptok, ctok, created, hits in rows:
                want = wanted[key]
                body = _decode(codec, answer) if check == want.check else None
                if body is None:
                    self._mismatch(want.key)
                    continue
                found[want.key] = CachedAnswer(body, model, ptok, ctok, created, hits, rowid)
            if count_hits:
                self.note_hits(a.entry for a in found.values())
            if len(self._hits) >= _HIT_FLUSH:
                self._flush_hits(conn)
        return found

    def note_hits(self, entries: Iterable[int]) -> None:
        """Count a hit for each entry id (of `CachedAnswer.entry`), written at the next flush."""
        with self._hits_lock:
            pending = self._hits
            for entry in entries:
                pending[entry] = pending.get(entry, 0) + 1

    def put_many(self, entries: Iterable[CacheEntry]) -> int:
        """Store answers in one short transaction (a later answer for a key replaces the earlier
        one, keeping its hit count); returns how many were stored (0 when disabled or busy)."""
        if self._conn is None:
            return 0
        now = self._clock()
        rows = []
        for e in entries:
            codec, blob = _encode(e.body)
            rows.append(
                (
                    bytes.fromhex(e.key.key),
                    e.key.check,
                    codec,
                    blob,
                    e.model,
                    e.prompt_tokens,
                    e.completion_tokens,
                    now,
                    now,
                )
            )
        if not rows:
            return 0
        with self._guard("storing answers") as conn:
            if conn is None:
                return 0
            with _write(conn):
                # Many rows per statement: SQLite releases the GIL for each statement it
                # steps, and beside a busy event loop each release handed the GIL over and
                # back (executemany steps once per row: ~4,000 context switches in 20,000).
                # Rows later in a statement replace earlier ones of the same key.
                per = _CHUNK // len(rows[0])
                for start in range(0, len(rows), per):
                    part = rows[start : start + per]
                    conn.execute(
                        _INSERT.format(",".join([_INSERT_ROW] * len(part))),
                        [value for row in part for value in row],
                    )
            return len(rows)
        return 0  # busy: the guard swallowed it

    # -- management -----------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """Entries, size on disk, hits, oldest/newest; zeros (with the reason) when disabled."""
        with self._guard("reading statistics") as conn:
            if conn is not None:
                self._flush_hits(conn)
                entries, hits, oldest, newest = conn.execute(
                    "SELECT count(*), coalesce(sum(hits), 0), min(created), max(created)"
                    " FROM entries"
                ).fetchone()
                return CacheStats(self.path, entries, self._size_on_disk(), hits, oldest, newest)
        return CacheStats(self.path, 0, 0, 0, None, None, self.disabled_reason)

    def prune(self, older_than_s: float | None = None, max_size_bytes: int | None = None) -> int:
        """Remove entries not used (stored or hit) for `older_than_s` seconds, then the least
        recently used until the database fits `max_size_bytes`; VACUUM and checkpoint so the
        file shrinks on disk. Returns how many entries were removed."""
        removed = 0
        with self._guard("pruning") as conn:
            if conn is None:
                return 0
            self._flush_hits(conn)
            if older_than_s is not None:
                cutoff = self._clock() - older_than_s
                with _write(conn):
                    removed += conn.execute(
                        "DELETE FROM entries WHERE last_used < ?", (cutoff,)
                    ).rowcount
                if removed:
                    conn.execute("VACUUM")
            if max_size_bytes is not None:
                removed += _shrink_to(conn, max_size_bytes)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    # -- inside ---------------------------------------------------------------------------------

    def _size_on_disk(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):  # no WAL file between runs
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def _flush_hits(self, conn: sqlite3.Connection) -> None:
        """Write the counted hits in one transaction, by entry id (the table's own order), stamped
        with the time of the flush (close enough for LRU: at most one run late). If another
        process holds the write lock they stay pending for the next flush."""
        with self._hits_lock:
            taken, self._hits = self._hits, {}
        if not taken:
            return
        now = self._clock()
        rows = [(n, now, rowid) for rowid, n in sorted(taken.items())]
        try:
            with _write(conn):
                conn.executemany(
                    "UPDATE entries SET hits = hits + ?, last_used = max(last_used, ?)"
                    " WHERE id = ?",  # the table's own b-tree: no index lookup
                    rows,
                )
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in _BUSY_CODES:
                raise
            if len(taken) <= 10 * _HIT_FLUSH:  # else dropped: statistics are not worth more
                with self._hits_lock:  # pending for the next flush
                    for entry, n in taken.items():
                        self._hits[entry] = self._hits.get(entry, 0) + n
            return

    @contextmanager
    def _guard(self, doing: str) -> Iterator[sqlite3.Connection | None]:
        """Serialise the connection; a failing store is disabled (warned once), a busy one
        skipped (warned once). Yields None when there is no usable connection."""
        with self._lock:
            if self._conn is None:
                yield None
                return
            try:
                yield self._conn
            except sqlite3.Error as exc:
                if _busy(exc):  # (extended codes too: SQLITE_BUSY_SNAPSHOT, ...)
                    if not self._warned_busy:
                        self._warned_busy = True
                        log.warning(
                            "response store %s: busy (another process held it too long) while "
                            "%s; skipped, the run goes on",
                            self.path,
                            doing,
                        )
                    return
                with suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
                self._disable(f"{_reason(exc)} while {doing}")

    def _disable(self, reason: str, *, warn: bool = True) -> None:
        self.disabled_reason = reason
        if warn:
            log.warning(
                "response store %s is unusable (%s); going on without it: answers are neither "
                "served from it nor stored. %s",
                self.path,
                reason,
                _what_to_do(self.path),
            )

    def _mismatch(self, key: str) -> None:
        self.mismatches += 1
        if self.mismatches == 1:
            log.warning(
                "response store %s: the entry for request %s does not verify against the "
                "request (damaged or mismatched); asking the API instead",
                self.path,
                key[:16],
            )


class _NotOurs(Exception):
    """The file is a database batcher must not use (a newer schema, someone else's tables)."""


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _BUSY_CODES  # extended codes: SQLITE_BUSY_*


def _prepare_patiently(conn: sqlite3.Connection, timeout_s: float) -> None:
    """`_prepare`, retried while another process holds the file: two processes creating one
    new store at once got SQLITE_BUSY from `PRAGMA journal_mode=WAL` at once, without SQLite
    waiting its busy timeout (the mode switch needs an exclusive lock the other one held)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _prepare(conn)
            return
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _prepare(conn: sqlite3.Connection) -> None:
    """WAL, and the schema created or checked; raises for a store we must not use."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    # A many-row upsert keeps a statement journal (the pages it changed, to undo it alone);
    # past 64 KB SQLite spills it to a file in /var/tmp: 33,000 pwrite calls in a 20,000-row
    # run, more than the WAL's. In memory it is at most a few hundred KB.
    conn.execute("PRAGMA temp_store=MEMORY")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise _NotOurs(
            f"written by a newer batcher (store schema {version}, this one knows "
            f"{SCHEMA_VERSION}); upgrade batcher"
        )
    with _write(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process won
        if version == SCHEMA_VERSION:
            return
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise _NotOurs("a SQLite database that is not a batcher response store")
        conn.execute(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One short write transaction; BEGIN IMMEDIATE takes the write lock up front, so two
    writers queue on busy_timeout instead of failing with a deadlock on upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _shrink_to(conn: sqlite3.Connection, max_size_bytes: int) -> int:
    """Delete the least recently used rows until the database fits. Rows sit in pages beside
    index entries and free space, so a round scales the excess by the file's bytes per stored
    byte, deletes the rows whose stored bytes cover it, VACUUMs and measures again (rows
    freed at random places free no page until the VACUUM). One or two rounds in practice."""
    removed = 0
    for _ in range(8):
        size = _live_bytes(conn)
        if size <= max_size_bytes:
            break
        stored, entries = conn.execute(
            "SELECT coalesce(sum(length(answer) + coalesce(length(model), 0) + ?), 0), count(*)"
            " FROM entries",
            (_ROW_OVERHEAD,),
        ).fetchone()
        if entries == 0:
            break  # what is left is the schema itself
        to_free = stored * (size - max_size_bytes) / size
        count, freed = 0, 0
        for (row_bytes,) in conn.execute(
            "SELECT length(answer) + coalesce(length(model), 0) + ? FROM entries"
            " ORDER BY last_used, id",
            (_ROW_OVERHEAD,),
        ):
            count += 1
            freed += row_bytes
            if freed >= to_free:
                break
        with _write(conn):
            removed += conn.execute(
                "DELETE FROM entries WHERE id IN"
                " (SELECT id FROM entries ORDER BY last_used, id LIMIT ?)",
                (count,),
            ).rowcount
        conn.execute("VACUUM")
    return removed


def _live_bytes(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def _chunks(items: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _encode(body: Mapping[str, Any]) -> tuple[int, bytes]:
    raw = fastjson.dumps(body)
    if len(raw) < _COMPRESS_FROM:
        return _checked(raw)
    packer = zlib.compressobj(*_ZLIB_ARGS)
    packed = packer.compress(raw) + packer.flush()
    return (_ZLIB, packed) if len(packed) < len(raw) else _checked(raw)


def _checked(raw: bytes) -> tuple[int, bytes]:
    return _CHECKED, raw + zlib.crc32(raw).to_bytes(4, "big")


def _decode(codec: int, blob: bytes) -> dict[str, Any] | None:
    """The answer, or None when it does not decode (the checksum catches damaged bytes)."""
    try:
        if codec == _ZLIB:
            body = fastjson.loads(_decompress(blob))
        elif codec == _CHECKED:
            raw = blob[:-4]
            if zlib.crc32(raw).to_bytes(4, "big") != blob[-4:]:
                return None
            body = fastjson.loads(raw)
        elif codec == _RAW:
            body = fastjson.loads(blob)
        else:
            return None
    except (zlib.error, ValueError, TypeError):  # UnicodeDecodeError is a ValueError
        return None
    return body if type(body) is dict else None


_decompress = zlib.decompress


# -- for the CLI --------------------------------------------------------------------------------


def _unusable(path: Path, reason: str) -> StorageError:
    return StorageError(f"response store {path} is unusable: {reason}. {_what_to_do(path)}")


def _what_to_do(path: Path) -> str:
    """Delete a damaged store, never a file that is no store at all (a mistyped cache.path
    naming the input, say): the advice depends on which it is."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError:
        head = b""
    if head and head != b"SQLite format 3\x00":
        return (
            "It is not an SQLite file, so no store batcher made (it was left as it was): set "
            "cache.path (or --path) to another place"
        )
    return "Delete the file to start a new store, or set cache.path to another place"


def store_stats(path: Path) -> CacheStats:
    """`batcher cache stats`: a missing store is an empty one (not created); an unusable one
    raises StorageError saying what to do."""
    if not path.exists():
        return CacheStats(path, 0, 0, 0, None, None)
    with ResponseStore.open(path, warn=False) as store:
        stats = store.stats()
    if stats.disabled_reason:
        raise _unusable(path, stats.disabled_reason)
    return stats


def prune_store(
    path: Path, older_than_s: float | None, max_size_bytes: int | None
) -> tuple[int, CacheStats]:
    """`batcher cache prune`: (entries removed, stats after)."""
    if not path.exists():
        return 0, CacheStats(path, 0, 0, 0, None, None)
    with ResponseStore.open(path, warn=False) as store:
        removed = store.prune(older_than_s, max_size_bytes)
        stats = store.stats()
    if stats.disabled_reason:
        raise _unusable(path, stats.disabled_reason)
    return removed, stats


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.I)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", re.I)
_SIZE_UNITS = {
    "b": 1,
    **{f"{p}b": 1000**i for i, p in enumerate("kmgt", 1)},
    **{f"{p}ib": 1024**i for i, p in enumerate("kmgt", 1)},
}


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' -> seconds; ValueError saying how to write it."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit: 30d, 12h, 90m, 45s or 2w"
        )
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '4096' (bytes) -> bytes; ValueError saying how to write it.
    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a size; write a number and a unit: 2GB, 500MB, 1.5GiB (or bytes)"
        )
    value = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large")
    return int(value)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def stats_record(stats: CacheStats) -> dict[str, Any]:
    """The --json form of CacheStats."""
    return {
        "path": str(stats.path),
        "entries": stats.entries,
        "size_bytes": stats.size_bytes,
        "hits": stats.hits,
        "oldest": _when(stats.oldest),
        "newest": _when(stats.newest),
    }


def render_stats(stats: CacheStats) -> str:
    lines = [
        f"response store: {stats.path}",
        f"  entries: {stats.entries:,}",
        f"  size:    {human_bytes(stats.size_bytes)}",
        f"  hits:    {stats.hits:,}",
    ]
    if stats.oldest is not None:
        lines.append(f"  stored:  {_when(stats.oldest)} .. {_when(stats.newest)}")
    return "\n".join(lines)
