"""Pay once (issue 9), through the real CLI against the bundled server, counting what the
server received: reruns after edits, --restart, another job, duplicates, the budget, samples,
and a crash with the response store on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import env_with_key, read_output, run_batcher, write_job, write_jsonl

from batcher import engine, reuse
from batcher import journal as journal_module
from batcher.history import history_path, read_history

FAST: dict[str, Any] = {"rpm": None, "tpm": None}
LIMITS = {"gpt-4o-mini": {"rpm": 1_000_000, "tpm": 1_000_000_000}}


def rows(n: int, *, edited: set[int] | None = None) -> list[dict[str, Any]]:
    edited = edited or set()
    return [
        {"id": f"r{i}", "text": f"review {i} is {'EDITED' if i in edited else 'fine'}"}
        for i in range(n)
    ]


def job(tmp: Path, url: str, **overrides: Any) -> Path:
    return write_job(tmp, url, **{"concurrency": 32, "limits": LIMITS, **overrides})


def sent(srv: Any, before: dict[str, Any]) -> int:
    return int(srv.stats()["requests"] - before["requests"])


def check(output: Path, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every input row once, in input order, ok, answering its own text."""
    out = read_output(output)
    assert [r["id"] for r in out] == [r["id"] for r in data]
    assert {r["status"] for r in out} == {"ok"}
    return out


def test_an_edit_of_200_rows_sends_200_requests_plain_or_restart(
    tmp_path: Path, mock_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = mock_server(**FAST)
    base = tmp_path / "base"
    base.mkdir()
    write_jsonl(base / "input.jsonl", rows(2000))
    job(base, srv.url)
    assert run_batcher("run", base / "job.yaml").returncode == 0
    assert sent(srv, {"requests": 0}) == 2000
    edited = set(range(0, 2000, 10))  # 200 rows
    store = Path(os.environ["XDG_CACHE_HOME"])
    for variant in ("plain", "restart"):
        work = tmp_path / variant  # each from the same starting point: journal and store
        shutil.copytree(base, work)
        shutil.copytree(store, tmp_path / f"{variant}-cache")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"{variant}-cache"))
        write_jsonl(work / "input.jsonl", rows(2000, edited=edited))
        job(work, srv.url)
        before = srv.stats()
        args = ["--restart"] if variant == "restart" else []
        res = run_batcher("run", work / "job.yaml", *args)
        assert res.returncode == 0, res.stderr
        assert sent(srv, before) == 200, variant
        out = check(work / "out/result.parquet", rows(2000, edited=edited))
        assert {r["source"] for i, r in enumerate(out) if i in edited} == {"api"}
        if variant == "restart":
            assert "1,800 rows answered from the cache" in res.stderr


def test_duplicates_in_a_job_are_sent_once_at_temperature_0(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    data = [{"id": f"r{i}", "text": f"review {i % 700}"} for i in range(1000)]  # 300 repeats
    write_jsonl(tmp_path / "input.jsonl", data)
    job(tmp_path, srv.url)
    res = run_batcher("run", tmp_path / "job.yaml")
    assert res.returncode == 0, res.stderr
    assert srv.stats()["requests"] == 700
    out = check(tmp_path / "out/result.parquet", data)
    by_text: dict[str, str] = {}
    for row, answer in zip(data, out, strict=True):  # duplicates share one answer
        assert by_text.setdefault(row["text"], answer["content"]) == answer["content"]
    assert sum(r["source"] in ("dedupe", "cache") for r in out) == 300


def test_duplicates_are_journaled_in_few_commits(tmp_path: Path, mock_server, monkeypatch) -> None:
    """400 rows, 4 distinct requests: the rows that wait for an identical request's answer go
    to the journal with it, in one commit, not a commit (and a commit gap) each."""
    srv = mock_server(**FAST)
    data = [{"id": f"r{i}", "text": f"review {i % 4}"} for i in range(400)]
    write_jsonl(tmp_path / "input.jsonl", data)
    job(tmp_path, srv.url)
    commits = 0
    write = journal_module.Journal._write_sync

    def counted(self: journal_module.Journal, data: bytes) -> float:
        nonlocal commits
        commits += data.count(b'{"t":"r"') > 0
        return write(self, data)

    monkeypatch.setattr(journal_module.Journal, "_write_sync", counted)
    res = run_batcher("run", tmp_path / "job.yaml")
    assert res.returncode == 0, res.stderr
    assert srv.stats()["requests"] == 4
    check(tmp_path / "out/result.parquet", data)
    assert 1 <= commits <= 12, commits  # (at least one: the count sees the result lines)


def test_dedupe_false_gives_each_row_its_own_request(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    data = [{"id": f"r{i}", "text": f"review {i % 5}"} for i in range(20)]
    write_jsonl(tmp_path / "input.jsonl", data)
    job(tmp_path, srv.url, dedupe=False)
    assert run_batcher("run", tmp_path / "job.yaml").returncode == 0
    assert srv.stats()["requests"] == 20


def test_a_second_job_asking_the_same_sends_nothing(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", rows(300))
    job(tmp_path, srv.url)
    assert run_batcher("run", tmp_path / "job.yaml").returncode == 0
    before = srv.stats()
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "input.jsonl", rows(300))
    job(other, srv.url, output="elsewhere/labels.parquet")
    res = run_batcher("run", other / "job.yaml")
    assert res.returncode == 0, res.stderr
    assert sent(srv, before) == 0
    check(other / "elsewhere/labels.parquet", rows(300))
    assert store_hits() == 300
    # --no-cache asks afresh: the store's answers it found and did not use are no hits
    res = run_batcher("run", other / "job.yaml", "--restart", "--no-cache")
    assert res.returncode == 0 and sent(srv, before) == 300
    assert store_hits() == 300


def store_hits() -> int:
    res = run_batcher("cache", "stats", "--json")
    assert res.returncode == 0, res.stderr
    return int(json.loads(res.stdout)["hits"])


def test_the_budget_stops_at_the_cap_and_a_higher_cap_finishes_without_paying_twice(
    tmp_path: Path, mock_server
) -> None:
    srv = mock_server(**FAST)
    data = rows(400)
    write_jsonl(tmp_path / "input.jsonl", data)
    path = job(tmp_path, srv.url, params={"max_tokens": 40, "temperature": 0})
    estimate = json.loads(run_batcher("estimate", path, "--json").stdout)
    cap = round(estimate["cost_usd"] * 0.3, 8)
    res = run_batcher("run", path, "--max-cost", str(cap))
    assert res.returncode == 6, res.stderr
    assert "budget is reached" in res.stderr and "raise the cap" in res.stderr
    assert "exceeds what is left of max_cost_usd" in res.stderr  # warned before sending
    # What the server's usage says was spent never exceeds the cap.
    journal = tmp_path / "out/result.parquet.journal"
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    results = [r for r in records if r.get("t") == "r"]
    price = (0.15, 0.60)  # gpt-4o-mini, built-in table
    spent = sum(
        (r["prompt_tokens"] * price[0] + r["completion_tokens"] * price[1]) / 1e6 for r in results
    )
    assert 0 < spent <= cap
    assert abs(sum(r["cost_usd"] for r in results) - spent) < 1e-9
    first = srv.stats()["accepted"]
    assert first == len(results) < 400
    # A cap that covers the rows left (but not the whole input again): no warning, the rest
    # is asked, nothing is paid twice.
    spent_so_far = json.loads(run_batcher("status", path, "--json").stdout)["spent_usd"]
    res = run_batcher("run", path, "--max-cost", str(spent_so_far + estimate["cost_usd"] * 0.9))
    assert res.returncode == 0, res.stderr
    assert "exceeds what is left" not in res.stderr
    assert srv.stats()["accepted"] == 400  # nothing paid twice
    check(tmp_path / "out/result.parquet", data)
    status = run_batcher("status", path, "--json")
    assert json.loads(status.stdout)["spent_usd"] > cap
    # The stopped run and the one that finished are both in the job's history, told apart.
    history = read_history(history_path(tmp_path / "out/result.parquet"))
    assert [run.end["reason"] for run in history.runs if run.end] == ["budget", "completed"]


def test_a_sample_first_then_the_full_run_sends_the_rest(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    data = rows(500)
    write_jsonl(tmp_path / "input.jsonl", data)
    path = job(tmp_path, srv.url)
    res = run_batcher("run", path, "--sample", "50")
    assert res.returncode == 0, res.stderr
    sample = read_output(tmp_path / "out/result.sample.parquet")
    assert len(sample) == 50 and srv.stats()["requests"] == 50
    # The same rows each time (a hash of the id), in input order.
    again = run_batcher("run", path, "--sample", "50", "--restart")
    assert again.returncode == 0
    assert [r["id"] for r in read_output(tmp_path / "out/result.sample.parquet")] == [
        r["id"] for r in sample
    ]
    assert srv.stats()["requests"] == 50
    res = run_batcher("run", path)
    assert res.returncode == 0, res.stderr
    assert srv.stats()["requests"] == 500  # the full run: rows - 50
    check(tmp_path / "out/result.parquet", data)


def test_kill_9_with_the_store_on_then_rerun(tmp_path: Path, mock_server) -> None:
    srv = mock_server(rpm=None, tpm=None, latency_s=0.02)
    data = rows(400)
    write_jsonl(tmp_path / "input.jsonl", data)
    path = job(tmp_path, srv.url, concurrency=8)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(path), "-q"],
        env=env_with_key(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = tmp_path / "out/result.parquet.journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # keyed to answers journaled, not to time
        if journal.exists() and journal.read_text().count('"t":"r"') >= 100:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    res = run_batcher("run", path)
    assert res.returncode == 0, res.stderr
    check(tmp_path / "out/result.parquet", data)
    # At most the requests in flight when it died, and the answers waiting for their group
    # commit (up to `concurrency` of each), are paid twice.
    assert srv.stats()["duplicates"] <= 2 * 8
    stores = list(Path(os.environ["XDG_CACHE_HOME"]).rglob("*.sqlite3"))
    assert stores
    for store in stores:
        with sqlite3.connect(store) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("enabled", [False])
def test_cache_enabled_false_stores_nothing(tmp_path: Path, mock_server, enabled: bool) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", rows(10))
    path = job(tmp_path, srv.url, cache={"enabled": enabled})
    assert run_batcher("run", path).returncode == 0
    assert run_batcher("run", path, "--restart").returncode == 0
    assert srv.stats()["requests"] == 20


def test_without_a_home_the_store_is_off_and_the_run_goes_on(
    tmp_path: Path, mock_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's user with neither $XDG_CACHE_HOME, $HOME nor a passwd entry: no default
    store (said once, with what to set), every row still answered; a `~` cache.path says so."""
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", rows(10))
    path = job(tmp_path, srv.url)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    real_expanduser = Path.expanduser

    def expanduser(self: Path) -> Path:
        if str(self).startswith("~"):
            no_home()
        return real_expanduser(self)

    monkeypatch.setattr(Path, "home", no_home)
    monkeypatch.setattr(Path, "expanduser", expanduser)
    res = run_batcher("run", path)
    assert res.returncode == 0, res.stderr
    assert "the response store is off" in res.stderr and "set XDG_CACHE_HOME" in res.stderr
    assert srv.stats()["requests"] == 10
    check(tmp_path / "out/result.parquet", rows(10))
    tilde = job(tmp_path, srv.url, cache={"path": "~/answers.sqlite3"})
    res = run_batcher("run", tilde, "--restart")
    assert res.returncode == 0, res.stderr
    assert "cache.path ~/answers.sqlite3 starts at a home directory" in res.stderr


def test_a_fixed_bad_row_is_asked_and_a_row_gone_bad_is_an_error(
    tmp_path: Path, mock_server
) -> None:
    srv = mock_server(**FAST)
    data = rows(6)
    broken = [dict(r) for r in data]
    del broken[3]["text"]  # the template's column is missing: a bad row
    write_jsonl(tmp_path / "input.jsonl", broken)
    path = job(tmp_path, srv.url, on_bad_row="skip")
    assert run_batcher("run", path).returncode == 3
    assert srv.stats()["requests"] == 5
    write_jsonl(tmp_path / "input.jsonl", data)  # fixed
    res = run_batcher("run", path)
    assert res.returncode == 0, res.stderr
    assert srv.stats()["requests"] == 6  # the fixed row, and only it
    check(tmp_path / "out/result.parquet", data)


def test_no_cache_still_sends_duplicates_once(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    data = [{"id": f"r{i}", "text": f"review {i % 100}"} for i in range(600)]
    write_jsonl(tmp_path / "input.jsonl", data)
    path = job(tmp_path, srv.url)
    assert run_batcher("run", path, "--no-cache").returncode == 0
    assert srv.stats()["requests"] == 100


def test_no_cache_dedupes_far_apart_duplicates_through_the_store(
    tmp_path: Path, mock_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-cache: the run's own answers reach its duplicates through the store, not only
    through the bounded memory of recent answers; earlier runs' answers are asked afresh."""
    # Memory holds the last 300 answers (more than are ever waiting to be stored: one read
    # batch of 64 and the queue of 64); the duplicates are 512 answers apart.
    monkeypatch.setattr(reuse, "RECENT_MAX", 300)
    monkeypatch.setattr(reuse, "FLUSH_AT", 1)
    monkeypatch.setattr(engine, "READ_BATCH", 64)
    srv = mock_server(**FAST)
    data = [{"id": f"r{i}", "text": f"review {i % 512}"} for i in range(1024)]
    write_jsonl(tmp_path / "input.jsonl", data)
    path = job(tmp_path, srv.url)
    assert run_batcher("run", path, "--no-cache").returncode == 0
    assert srv.stats()["requests"] == 512
    sources = [r["source"] for r in check(tmp_path / "out/result.parquet", data)]
    assert sources.count("api") == 512 and sources.count("dedupe") == 512
    res = run_batcher("run", path, "--restart", "--no-cache")
    assert res.returncode == 0, res.stderr
    assert srv.stats()["requests"] == 1024  # afresh: not served the first run's answers
