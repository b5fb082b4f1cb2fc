"""Workspace-wide limits through the real CLI: several `batcher run` processes, one Redis, one
server enforcing the quota; foreign load; Redis failures; shards and merge."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import read_output, review_rows, run_batcher, start_batcher, write_job, write_jsonl
from redis_server import RedisServer, SharedRedis, redis_binary


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    shared = SharedRedis()
    if shared.url is None:
        pytest.skip(shared.skip_reason)
    yield shared.url
    shared.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisServer().start()
    yield server
    server.stop()


def _job(tmp: Path, name: str, url: str, rows: int, **overrides: object) -> Path:
    d = tmp / name
    d.mkdir()
    write_jsonl(d / "input.jsonl", review_rows(rows))
    return write_job(d, url, **overrides)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_share_one_quota(
    tmp_path: Path, mock_server, redis_url: str, processes: int
) -> None:
    rpm = 2400  # the server's whole quota; the 10 s window allows 400
    srv = mock_server(rpm=rpm, tpm=None, latency_s=0.02, latency_jitter_s=0.03)
    limiter = {"backend": "redis", "url": redis_url, "workspace": f"ws-{uuid.uuid4().hex[:8]}"}
    per_process = 2400 // 60 * 8 // processes  # ~8 s of the whole quota, split
    jobs = [
        _job(
            tmp_path,
            f"p{i}",
            srv.url,
            per_process,
            concurrency=16,
            limiter=limiter,
            limits={"gpt-4o-mini": {"rpm": rpm, "tpm": 10_000_000}},
        )
        for i in range(processes)
    ]
    start = time.monotonic()
    procs = [start_batcher("run", job) for job in jobs]
    ends = []
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        ends.append(time.monotonic() - start)
        assert proc.returncode == 0, err
    for job in jobs:
        rows = read_output(job.parent / "out/result.parquet")
        assert len(rows) == per_process and {r["status"] for r in rows} == {"ok"}
    stats = srv.stats()
    total = stats["requests"]
    assert stats["rate_limited"] <= max(1, total // 100), stats  # (almost) no 429s
    # Fair shares: equal jobs under one shared quota finish at about the same time.
    assert max(ends) - min(ends) < 0.35 * max(ends), ends


def test_without_redis_the_same_processes_trip_the_quota(tmp_path: Path, mock_server) -> None:
    """The control for the test above: in-process limiters cannot see each other. Keyed to
    counts, not to timing: the server allows 60 requests a minute, the three processes send
    120 within it (each paces itself to 1,200 rpm)."""
    srv = mock_server(rpm=60, tpm=None, windows_s=(60.0,))
    jobs = [
        _job(
            tmp_path,
            f"p{i}",
            srv.url,
            40,
            concurrency=16,
            limits={"gpt-4o-mini": {"rpm": 1200, "tpm": 10_000_000}},
            retry={"max_attempts": 20, "initial_wait_s": 0.05, "max_wait_s": 0.5},
        )
        for i in range(3)
    ]
    procs = [start_batcher("run", job) for job in jobs]
    deadline = time.monotonic() + 120
    # The first 429 proves it; the rest of the run would only wait for the minute to pass.
    while srv.stats()["rate_limited"] == 0 and time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for proc in procs:
        proc.terminate()
        proc.communicate(timeout=60)
    assert srv.stats()["rate_limited"] > 0


def test_adapts_to_foreign_load(tmp_path: Path, mock_server) -> None:
    # 40% of the quota is used by others the limiter cannot see.
    srv = mock_server(rpm=3000, tpm=None, foreign_share=0.4, latency_s=0.01)
    job = _job(
        tmp_path,
        "j",
        srv.url,
        300,
        concurrency=32,
        limits={"gpt-4o-mini": {"rpm": 3000, "tpm": 10_000_000}},
        retry={"max_attempts": 20, "initial_wait_s": 0.1, "max_wait_s": 2},
    )
    res = run_batcher("run", job, timeout=180)
    assert res.returncode == 0, res.stderr
    rows = read_output(job.parent / "out/result.parquet")
    assert len(rows) == 300 and {r["status"] for r in rows} == {"ok"}
    stats = srv.stats()
    assert stats["rate_limited"] <= 0.1 * stats["requests"], stats
    assert "slow-down" in res.stderr  # the summary says the rate was lowered, and why


def test_redis_unreachable_at_start(tmp_path: Path, mock_server) -> None:
    srv = mock_server(rpm=None, tpm=None)
    url = "redis://:hunter2@127.0.0.1:1/0"
    job = _job(tmp_path, "j", srv.url, 5, limiter={"backend": "redis", "url": url})
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr
    assert "127.0.0.1:1" in res.stderr and "hunter2" not in res.stderr
    assert srv.stats()["requests"] == 0


@pytest.mark.parametrize("on_failure", ["stop", "local"])
def test_redis_lost_mid_run(
    tmp_path: Path, mock_server, own_redis: RedisServer, on_failure: str
) -> None:
    srv = mock_server(rpm=1200, tpm=None)
    limiter = {
        "backend": "redis",
        "url": own_redis.url,
        "workspace": "lost",
        "on_limiter_failure": on_failure,
        "local_share": 1.0,  # the fallback's pace is not what this is about
    }
    job = _job(
        tmp_path,
        "j",
        srv.url,
        100,
        concurrency=8,
        limiter=limiter,
        limits={"gpt-4o-mini": {"rpm": 1200, "tpm": 10_000_000}},
    )
    journal = job.parent / "out/result.parquet.journal"
    proc = start_batcher("run", job)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until rows are being answered
        if journal.exists() and journal.read_text().count('"t":"r"') >= 10:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    own_redis.kill()
    _, err = proc.communicate(timeout=120)
    assert journal.exists(), err
    done_before = journal.read_text().count('"t":"r"')
    assert done_before >= 10
    if on_failure == "stop":
        assert proc.returncode == 4, err
        assert "redis" in err.lower() and "resume" in err
        # Resume without Redis: nothing persisted is lost, nothing answered is sent again.
        before = srv.stats()["accepted"]
        job.write_text(job.read_text().replace("backend: redis", "backend: local"))
        res = run_batcher("run", job)
        assert res.returncode == 0, res.stderr
        assert srv.stats()["accepted"] - before == 100 - done_before
    else:
        assert proc.returncode == 0, err
        assert "local" in err.lower() and "warn" in err.lower()
    rows = read_output(job.parent / "out/result.parquet")
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(100))
    assert srv.stats()["duplicates"] == 0


def test_shards_and_merge(tmp_path: Path, mock_server) -> None:
    srv = mock_server(rpm=None, tpm=None)
    job = _job(tmp_path, "j", srv.url, 101)
    procs = [start_batcher("run", job, "--shard", f"{k}/4") for k in range(1, 5)]
    counts = []
    for k, proc in enumerate(procs, start=1):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        counts.append(pq.read_table(job.parent / f"out/result.shard-{k}-of-4.parquet").num_rows)
    assert sum(counts) == 101 and min(counts) > 0
    res = run_batcher("merge", job, "--shards", "4")
    assert res.returncode == 0, res.stderr
    rows = read_output(job.parent / "out/result.parquet")
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(101))
    assert srv.stats()["requests"] == 101


def test_merge_refuses_missing_or_mismatched_shards(tmp_path: Path, mock_server) -> None:
    srv = mock_server(rpm=None, tpm=None)
    job = _job(tmp_path, "j", srv.url, 20)
    assert run_batcher("run", job, "--shard", "1/2").returncode == 0
    res = run_batcher("merge", job, "--shards", "2")
    assert res.returncode == 2 and "shard-2-of-2" in res.stderr
    bad = run_batcher("run", job, "--shard", "0/2")
    assert bad.returncode == 2 and "1..N" in bad.stderr
