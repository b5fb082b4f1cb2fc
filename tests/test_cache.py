"""The response store (batcher/cache.py): key rule, round trip, several processes, crashes,
damaged stores, statistics and pruning, and the `batcher cache` commands."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.cache import (
    IGNORED_FIELDS,
    CacheEntry,
    CacheKey,
    KeyFrame,
    ResponseStore,
    cache_key,
    canonical_request,
    default_store_path,
    parse_duration,
    parse_size,
    request_key,
    resolve_store_path,
)
from batcher.cli import main
from batcher.errors import JobSpecError
from batcher.spec import load_job

REPO = Path(__file__).resolve().parents[1]
DAY = 86_400.0


def body(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"review {i}"}],
        "max_tokens": 5,
        **extra,
    }


def answer(i: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{i}",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"label {i}"}}],
        "usage": {"prompt_tokens": 10 + i, "completion_tokens": 2, "total_tokens": 12 + i},
    }


def entry(i: int, **extra: Any) -> CacheEntry:
    return CacheEntry(cache_key(body(i, **extra)), answer(i), "gpt-4o-mini-2024-07-18", 10 + i, 2)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with ResponseStore.open(tmp_path / "store.sqlite3") as opened:
        yield opened


# -- the key rule -------------------------------------------------------------------------------


def test_temperature_and_transport_fields_do_not_split_the_store() -> None:
    plain = request_key(body(1))
    assert request_key(body(1, temperature=0)) == plain
    assert request_key(body(1, temperature=1.3)) == plain
    assert request_key(body(1, stream=False, user="alice", stream_options=None)) == plain


@pytest.mark.parametrize(
    "change",
    [
        {"response_format": {"type": "json_object"}},
        {"max_tokens": 6},
        {"seed": 7},
        {"top_p": 0.5},
        {"model": "gpt-4o"},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"messages": [{"role": "user", "content": "review 1 "}]},
    ],
)
def test_everything_else_counts(change: dict[str, Any]) -> None:
    assert request_key({**body(1), **change}) != request_key(body(1))


def test_key_is_canonical_and_the_check_is_independent() -> None:
    shuffled = dict(reversed(list(body(1, temperature=0).items())))
    assert cache_key(shuffled) == cache_key(body(1))
    key = cache_key({"model": "m", "messages": [{"role": "user", "content": "Grüße 🙂"}]})
    assert len(key.key) == 64 and len(key.check) == 16
    assert key.check.hex() not in key.key
    with pytest.raises(TypeError):
        request_key({"model": "m", "messages": object()})


# The key's definition is json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False);
# orjson computes it for most bodies and must give the very same bytes, or every stored answer
# would become a miss after an upgrade.
_JSON_LEAF = (
    st.text(alphabet=st.characters(exclude_categories=("Cs",)))
    | st.integers(-(2**64), 2**64)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False)
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(), _JSON, max_size=6))
@settings(max_examples=300, deadline=None)
def test_the_key_bytes_are_the_standard_librarys(value: dict[str, Any]) -> None:
    expected = json.dumps(
        {k: v for k, v in value.items() if k not in IGNORED_FIELDS},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    assert canonical_request(value) == expected


# A templated job's keys are cut around the filled-in texts (KeyFrame): the very same keys.
_TEXT = st.text()  # lone surrogates included: such a key fails as cache_key fails


def _key_or_error(fn: Any, body: dict[str, Any]) -> Any:
    try:
        return fn(body)
    except (TypeError, ValueError) as exc:  # the same error, of the same type
        return type(exc)


@given(
    params=st.dictionaries(st.text(), _JSON, max_size=4),
    fixed=st.lists(st.dictionaries(st.text(), _JSON, max_size=2), min_size=1, max_size=4),
    varying=st.lists(st.booleans(), min_size=4, max_size=4),
    rows=st.lists(st.lists(_TEXT, min_size=4, max_size=4), min_size=1, max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_a_key_frame_gives_the_keys_cache_key_gives(
    params: dict[str, Any],
    fixed: list[dict[str, Any]],
    varying: list[bool],
    rows: list[list[str]],
) -> None:
    def body(texts: list[str]) -> dict[str, Any]:
        messages = [
            {**f, "role": "user", "content": texts[i] if varying[i] else "fixed"}
            for i, f in enumerate(fixed)
        ]
        return {**params, "model": "gpt-4o-mini", "messages": messages}

    slots = [i for i in range(len(fixed)) if varying[i]]
    frame = KeyFrame.around(body(rows[0]), slots)
    if frame is None:  # could not be cut exactly (the first body is not keyable, ...)
        return
    for texts in rows:
        assert _key_or_error(frame.key, body(texts)) == _key_or_error(cache_key, body(texts))


def test_a_key_frame_is_cut_for_a_templated_job_and_keys_a_non_string_whole() -> None:
    base = {"model": "m", "temperature": 0.2, "top_p": 1e-07, "messages": []}
    first = {
        **base,
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
    }
    frame = KeyFrame.around(first, [1])
    assert frame is not None
    other = {
        **base,
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "b\u00e9\n"}],
    }
    assert frame.key(other) == cache_key(other)
    listed = {
        **base,
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
        ],
    }
    assert frame.key(listed) == cache_key(listed)
    # a marker that cannot be found exactly once: no frame, keys are computed whole
    assert KeyFrame.around({**first, "stop": "\x00batcher-slot-0\x00"}, [1]) is None


# -- reading and writing ------------------------------------------------------------------------


def test_only_the_user_reads_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "private" / "store.sqlite3"
    with ResponseStore.open(path) as store:
        store.put_many([entry(1)])
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_round_trip_and_misses(store: ResponseStore) -> None:
    assert store.put_many([entry(i) for i in range(10)]) == 10
    got = store.get_many([cache_key(body(i)) for i in range(15)])
    assert sorted(got) == sorted(request_key(body(i)) for i in range(10))
    hit = got[request_key(body(3))]
    assert hit.body == answer(3)
    assert (hit.model, hit.prompt_tokens, hit.completion_tokens) == (
        "gpt-4o-mini-2024-07-18",
        13,
        2,
    )
    # the same request at another temperature is served the same answer
    warm = store.get_many([cache_key(body(3, temperature=0.9))])
    assert warm[request_key(body(3))].body == answer(3)
    assert store.get_many([]) == {}


def test_a_large_batch_is_stored_whole_and_its_last_answer_for_a_key_wins(
    store: ResponseStore,
) -> None:
    """put_many writes many rows per statement: 300 entries take several statements, and a
    key given twice in one batch keeps the later answer, as one row per statement did."""
    batch = [entry(i) for i in range(300)]
    batch.insert(120, CacheEntry(cache_key(body(250)), {"early": True}))
    batch.append(CacheEntry(cache_key(body(7)), {"late": True}))
    assert store.put_many(batch) == 302
    got = store.get_many([cache_key(body(i)) for i in range(300)])
    assert len(got) == 300 and store.stats().entries == 300
    assert got[request_key(body(250))].body == answer(250)  # given later in the batch
    assert got[request_key(body(7))].body == {"late": True}
    assert got[request_key(body(299))].body == answer(299)
    # Each statement's undo journal stays in memory: spilled past 64 KB to /var/tmp, it cost
    # more write calls than the WAL itself.
    assert store._conn is not None
    assert store._conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY


def test_every_codec_is_read_short_answers_stored_plain_long_ones_compressed(
    store: ResponseStore,
) -> None:
    """Short answers are stored as JSON + CRC-32 (codec 2), long ones compressed (1); entries
    an earlier version wrote as bare JSON (0) are still served."""
    long = {**answer(2), "choices": [{"message": {"content": "a longer answer " * 60}}]}
    store.put_many([entry(1), CacheEntry(cache_key(body(2)), long, "m", 1, 1)])
    with sqlite3.connect(store.path) as raw:
        codecs = dict(raw.execute("SELECT prompt_tokens, codec FROM entries").fetchall())
        assert codecs == {11: 2, 1: 1}
        old = cache_key(body(3))
        raw.execute(
            "INSERT INTO entries (key, check_hash, codec, answer, model, prompt_tokens,"
            " completion_tokens, created, last_used) VALUES (?,?,0,?,?,?,?,?,?)",
            (bytes.fromhex(old.key), old.check, json.dumps(answer(3)).encode(), "m", 13, 2, 1, 1),
        )
    got = store.get_many([cache_key(body(i)) for i in (1, 2, 3)])
    assert got[request_key(body(1))].body == answer(1)
    assert got[request_key(body(2))].body == long
    assert got[request_key(body(3))].body == answer(3)


def test_a_new_answer_replaces_the_old_and_keeps_the_hit_count(store: ResponseStore) -> None:
    store.put_many([entry(1)])
    store.get_many([cache_key(body(1))])
    store.put_many([CacheEntry(cache_key(body(1)), {"new": True})])
    assert store.get_many([cache_key(body(1))])[request_key(body(1))].body == {"new": True}
    stats = store.stats()
    assert (stats.entries, stats.hits) == (1, 2)


def test_hits_are_counted_and_written_on_close(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with ResponseStore.open(path) as store:
        store.put_many([entry(i) for i in range(3)])
        for _ in range(4):
            store.get_many([cache_key(body(0)), cache_key(body(1))])
    with ResponseStore.open(path) as store:
        assert store.stats().hits == 8


def test_threads_share_one_store(store: ResponseStore) -> None:
    errors: list[BaseException] = []

    def work(base: int) -> None:
        try:
            for start in range(base, base + 200, 20):
                batch = [entry(i) for i in range(start, start + 20)]
                store.put_many(batch)
                assert len(store.get_many([e.key for e in batch])) == 20
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.stats().entries == 800


def test_a_store_held_too_long_by_another_writer_is_skipped_not_disabled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "busy.sqlite3"
    store = ResponseStore.open(path, busy_timeout_s=0.05)
    store.put_many([entry(1)])
    store.get_many([cache_key(body(1))])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock until we let go
    try:
        assert store.put_many([entry(2)]) == 0
        assert store.put_many([entry(3)]) == 0
        assert store.get_many([cache_key(body(1))])  # reading goes on (WAL)
        assert store.stats().entries == 1  # the hit counts stay pending
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.enabled
    assert store.put_many([entry(2)]) == 1
    assert store.stats().hits == 2
    store.close()
    [warning] = _warnings(caplog)
    assert "busy" in warning


# -- several processes, and a crash -------------------------------------------------------------

_WRITER = """
import sys
from batcher.cache import CacheEntry, ResponseStore, cache_key
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = ResponseStore.open(path, busy_timeout_s=60)
assert store.enabled, store.disabled_reason
print("ready", flush=True)
sys.stdin.readline()  # both start writing together
stored = 0
for start in range(0, n, 50):
    batch = [
        CacheEntry(cache_key({"model": "m", "messages": [f"{tag}-{i}"]}), {"tag": tag, "i": i})
        for i in range(start, min(n, start + 50))
    ]
    stored += store.put_many(batch)
    assert len(store.get_many([e.key for e in batch])) == len(batch)
print(stored, store.disabled_reason, store._warned_busy, flush=True)
store.close()
"""

_CRASHER = """
import sys
from batcher.cache import CacheEntry, ResponseStore, cache_key
store = ResponseStore.open(sys.argv[1])
assert store.enabled, store.disabled_reason
batch_no = 0
while True:
    store.put_many(
        CacheEntry(cache_key({"model": "m", "messages": [f"{batch_no}-{i}"]}), {"i": i})
        for i in range(100)
    )
    print(batch_no, flush=True)  # this batch is committed
    batch_no += 1
"""


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _watchdog(proc: subprocess.Popen[str], seconds: float = 120) -> threading.Timer:
    """A stuck child is killed, so the test fails instead of hanging."""
    timer = threading.Timer(seconds, proc.kill)
    timer.start()
    return timer


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    n = 1500
    procs = [_python(_WRITER, str(path), tag, str(n)) for tag in ("a", "b")]
    timers = [_watchdog(p) for p in procs]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate()[0].split() for p in procs]
    finally:
        for t in timers:
            t.cancel()
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [[str(n), "None", "False"]] * 2
    with ResponseStore.open(path) as store:
        assert store.stats().entries == 2 * n
        for tag in ("a", "b"):
            keys = [cache_key({"model": "m", "messages": [f"{tag}-{i}"]}) for i in range(n)]
            got = store.get_many(keys)
            assert [got[k.key].body for k in keys] == [{"tag": tag, "i": i} for i in range(n)]


def test_sigkill_mid_write_keeps_every_committed_batch(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    proc = _python(_CRASHER, str(path))
    timer = _watchdog(proc)
    committed = -1
    try:
        assert proc.stdout is not None
        while committed < 40:  # by batches committed, not by time
            line = proc.stdout.readline()
            assert line, "the writer died early"
            committed = int(line)
        proc.send_signal(signal.SIGKILL)  # it is already writing the next batch
        proc.wait()
    finally:
        timer.cancel()
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with ResponseStore.open(path) as store:
        assert store.enabled
        keys = [
            cache_key({"model": "m", "messages": [f"{b}-{i}"]})
            for b in range(committed + 1)
            for i in range(100)
        ]
        assert len(store.get_many(keys)) == len(keys)
        # the batches committed after the last line we read are whole too: all or nothing
        entries = store.stats().entries
        assert entries >= len(keys) and entries % 100 == 0


# -- damaged, foreign and unusable stores -------------------------------------------------------


def _bypassed(store: ResponseStore) -> None:
    assert not store.enabled and store.disabled_reason
    assert store.get_many([cache_key(body(1))]) == {}
    assert store.put_many([entry(1)]) == 0
    stats = store.stats()
    assert stats.entries == 0 and stats.disabled_reason == store.disabled_reason
    assert store.prune(older_than_s=0) == 0


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_file_that_is_not_a_database_is_reported_once_and_bypassed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.sqlite3"
    path.write_bytes(b"this is not SQLite at all\n" * 500)
    store = ResponseStore.open(path)
    _bypassed(store)
    assert "not a database" in (store.disabled_reason or "")
    [warning] = _warnings(caplog)
    assert "unusable" in warning and "not an SQLite file" in warning  # never "delete it"
    assert "Delete" not in warning


def test_damage_found_mid_run_disables_the_store_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.sqlite3"
    with ResponseStore.open(path) as store:
        store.put_many([entry(i) for i in range(300)])
    data = bytearray(path.read_bytes())
    page = 4096
    data[page:] = b"\xa5" * (len(data) - page)  # keep the header, ruin every page after it
    path.write_bytes(bytes(data))
    store = ResponseStore.open(path)
    assert store.enabled  # the header still reads fine
    assert store.get_many([cache_key(body(i)) for i in range(300)]) == {}
    _bypassed(store)
    assert len(_warnings(caplog)) == 1


def test_a_store_from_a_newer_batcher_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.sqlite3"
    ResponseStore.open(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    store = ResponseStore.open(path)
    _bypassed(store)
    assert "newer batcher" in (store.disabled_reason or "")


def test_someone_elses_database_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "theirs.sqlite3"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE notes (x)")
    store = ResponseStore.open(path)
    _bypassed(store)
    assert "not a batcher response store" in (store.disabled_reason or "")
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]


def test_a_path_that_cannot_be_created_is_bypassed(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    store = ResponseStore.open(tmp_path / "file" / "store.sqlite3")  # its parent is a file
    _bypassed(store)


def test_disabled_store_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    _bypassed(ResponseStore.disabled("--no-cache"))
    assert _warnings(caplog) == []


def test_an_entry_that_does_not_match_its_request_is_never_served(
    store: ResponseStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.put_many([entry(1), entry(2)])
    good = cache_key(body(1))
    assert store.get_many([CacheKey(good.key, b"\x00" * 16)]) == {}  # the check differs
    # a damaged answer: its checksum refuses it
    damaged = bytes.fromhex(request_key(body(2)))
    with sqlite3.connect(store.path) as raw:
        (blob,) = raw.execute("SELECT answer FROM entries WHERE key = ?", (damaged,)).fetchone()
        flipped = blob[:20] + bytes([blob[20] ^ 0x10]) + blob[21:]
        raw.execute("UPDATE entries SET answer = ? WHERE key = ?", (flipped, damaged))
    assert store.get_many([cache_key(body(2))]) == {}
    with sqlite3.connect(store.path) as raw:  # damage that turned the answer into text
        raw.execute("UPDATE entries SET answer = 'x' || x'ff' WHERE key = ?", (damaged,))
    assert store.get_many([cache_key(body(2))]) == {}
    assert store.mismatches == 3
    assert len(_warnings(caplog)) == 1
    assert store.get_many([good])[good.key].body == answer(1)  # the store itself is fine


# -- statistics and pruning ---------------------------------------------------------------------


def test_stats(tmp_path: Path) -> None:
    clock = FakeClock()
    with ResponseStore.open(tmp_path / "s.sqlite3", clock=clock) as store:
        empty = store.stats()
        assert (empty.entries, empty.hits, empty.oldest, empty.newest) == (0, 0, None, None)
        store.put_many([entry(i) for i in range(5)])
        clock.now += 50
        store.put_many([entry(i) for i in range(5, 8)])
        store.get_many([cache_key(body(0)), cache_key(body(7))])
        stats = store.stats()
    assert (stats.entries, stats.hits) == (8, 2)
    assert (stats.oldest, stats.newest) == (clock.now - 50, clock.now)
    assert stats.size_bytes > 0


def test_prune_by_age_keeps_what_was_used(tmp_path: Path) -> None:
    clock = FakeClock()
    with ResponseStore.open(tmp_path / "s.sqlite3", clock=clock) as store:
        store.put_many([entry(i) for i in range(10)])
        clock.now += 20 * DAY
        store.get_many([cache_key(body(0)), cache_key(body(1))])  # used: young again
        store.put_many([entry(i) for i in range(10, 15)])
        clock.now += 15 * DAY
        assert store.prune(older_than_s=30 * DAY) == 8
        left = store.get_many([cache_key(body(i)) for i in range(15)])
        assert sorted(left) == sorted(request_key(body(i)) for i in (0, 1, *range(10, 15)))


def test_prune_by_size_removes_the_least_recently_used(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "s.sqlite3"
    with ResponseStore.open(path, clock=clock) as store:
        for start in range(0, 3000, 500):
            clock.now += 1
            store.put_many([entry(i) for i in range(start, start + 500)])
        clock.now += 1
        store.get_many([cache_key(body(0))])  # the oldest, but used last
        full = store.stats().size_bytes
        limit = full // 3
        removed = store.prune(max_size_bytes=limit)
        stats = store.stats()
        assert 0 < removed < 3000
        assert stats.entries == 3000 - removed
        assert stats.size_bytes <= limit  # VACUUMed and checkpointed: the file itself shrank
        assert path.stat().st_size <= limit
        kept = store.get_many([cache_key(body(i)) for i in range(3000)])
        newest_first = [request_key(body(i)) for i in (0, *range(2999, 0, -1))]
        assert set(kept) == set(newest_first[: len(kept)])
        assert store.prune(max_size_bytes=1) == len(kept)
        assert store.stats().entries == 0


# -- where it lives, the job file, the commands -------------------------------------------------


def test_default_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "batcher" / "responses.sqlite3"
    assert default_store_path(mock=True) == tmp_path / "batcher" / "responses-mock.sqlite3"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says: ignore it
    assert default_store_path() == Path.home() / ".cache" / "batcher" / "responses.sqlite3"
    job_dir = tmp_path / "job"
    assert resolve_store_path(Path("a.sqlite3"), job_dir, mock=False) == job_dir / "a.sqlite3"
    assert resolve_store_path(Path("a.sqlite3"), job_dir, mock=True) == job_dir / "a-mock.sqlite3"
    assert resolve_store_path(None, job_dir, mock=True) == default_store_path(mock=True)


def test_job_file_cache_section(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input: in.jsonl\noutput: out.parquet\nmodel: gpt-4o-mini\n")
    assert load_job(job).cache.enabled and load_job(job).cache.path is None
    job.write_text(
        "input: in.jsonl\noutput: out.parquet\nmodel: gpt-4o-mini\n"
        "cache: {enabled: false, path: answers.sqlite3}\n"
    )
    loaded = load_job(job)
    assert not loaded.cache.enabled and loaded.cache.path == Path("answers.sqlite3")
    job.write_text("input: in.jsonl\noutput: out.parquet\ncache: {enable: true}\n")
    with pytest.raises(JobSpecError, match=r"cache\.enable: unknown key"):
        load_job(job)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * DAY), ("12h", 43_200), ("90m", 5_400), ("45s", 45), ("2w", 14 * DAY)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2_000_000_000), ("500MB", 500_000_000), ("1.5GiB", 1_610_612_736), ("4096", 4096)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["30", "30x", "d", "-1d", ""])
def test_bad_durations_say_how_to_write_one(bad: str) -> None:
    with pytest.raises(ValueError, match="30d, 12h, 90m"):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["2XB", "GB", "-5MB", "1e9"])
def test_bad_sizes_say_how_to_write_one(bad: str) -> None:
    with pytest.raises(ValueError, match=r"2GB, 500MB, 1\.5GiB"):
        parse_size(bad)


def _cli(*args: str | Path) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cache_stats_command(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    missing = _cli("cache", "stats", "--path", path, "--json")
    assert missing.exit_code == 0 and json.loads(missing.stdout)["entries"] == 0
    assert not path.exists()  # looking does not create a store
    with ResponseStore.open(path) as store:
        store.put_many([entry(i) for i in range(4)])
        store.get_many([cache_key(body(0))])
    result = _cli("cache", "stats", "--path", path, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["entries"], record["hits"], record["path"]) == (4, 1, str(path))
    text = _cli("cache", "stats", "--path", path)
    assert "entries: 4" in text.stdout and str(path) in text.stdout


def test_cache_stats_uses_the_default_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with ResponseStore.open(mock=True) as store:
        store.put_many([entry(1)])
    real = json.loads(_cli("cache", "stats", "--json").stdout)
    mock = json.loads(_cli("cache", "stats", "--mock", "--json").stdout)
    assert (real["entries"], mock["entries"]) == (0, 1)


def test_cache_prune_command(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with ResponseStore.open(path) as store:
        store.put_many([entry(i) for i in range(50)])
    kept = _cli("cache", "prune", "--older-than", "30d", "--path", path)
    assert kept.exit_code == 0 and "removed 0 entries; 50 left" in kept.stdout
    emptied = _cli("cache", "prune", "--max-size", "1KB", "--path", path)
    assert emptied.exit_code == 0 and "removed 50 entries; 0 left" in emptied.stdout


def test_cache_command_errors(tmp_path: Path) -> None:
    bad_age = _cli("cache", "prune", "--older-than", "30 days", "--path", tmp_path / "s")
    assert bad_age.exit_code == 2 and "--older-than" in bad_age.output
    assert "30d, 12h, 90m" in bad_age.output
    nothing = _cli("cache", "prune", "--path", tmp_path / "s")
    assert nothing.exit_code == 2 and "--older-than AGE and/or --max-size SIZE" in nothing.output
    broken = tmp_path / "broken.sqlite3"
    broken.write_bytes(b"garbage" * 1000)
    damaged = tmp_path / "damaged.sqlite3"  # an SQLite file, its pages garbage
    damaged.write_bytes(b"SQLite format 3\x00" + b"garbage" * 1000)
    for args in (("stats",), ("prune", "--older-than", "1d")):
        result = _cli("cache", *args, "--path", broken)
        assert result.exit_code == 4
        # Not a store at all (an input named by mistake): never told to delete it.
        assert "is unusable" in result.stderr and "not an SQLite file" in result.stderr
        assert "Delete" not in result.stderr
        result = _cli("cache", *args, "--path", damaged)
        assert result.exit_code == 4
        assert "is unusable" in result.stderr and "Delete the file" in result.stderr
    assert broken.read_bytes() == b"garbage" * 1000  # reported, never overwritten
