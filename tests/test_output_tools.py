"""inspect / report / status / cache on the jobs a user review found them wrong for, through the
real CLI against the bundled server: a Batch-format output, a merged sharded job, a finished
journal, a run that sent nothing, a job never run, errors that must keep their real wording."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from helpers import review_rows, run_batcher, write_job, write_jsonl

from batcher.history import history_path, read_history
from batcher.journal import journal_path

FAST = {"rpm": None, "tpm": None}


def _batch_job(tmp: Path, url: str, rows: int = 12) -> Path:
    write_jsonl(tmp / "input.jsonl", review_rows(rows, marker={4: "[[fail-400]]"}))
    return write_job(tmp, url, output="outb/labels.jsonl", output_format="batch")


def test_inspect_and_report_read_a_batch_output(tmp_path: Path, mock_server) -> None:
    job = _batch_job(tmp_path, mock_server(**FAST).url)
    assert run_batcher("run", job).returncode == 3  # one row refused
    output = tmp_path / "outb/labels.jsonl"
    for target in (output, job):
        res = run_batcher("inspect", target)
        assert res.returncode == 0, res.stderr
        assert "12 rows (Batch-API output JSONL)" in res.stdout
        assert "status:        ok 11 · error 1" in res.stdout
        assert "Invalid request (the test asked for it with [[fail-400]])" in res.stdout
        assert "e.g. ids r4" in res.stdout
        assert journal_path(output).name in res.stdout  # where latency and attempts are
    data = json.loads(run_batcher("inspect", output, "--json").stdout)
    assert data["source"] == "batch" and data["rows"] == 12
    assert data["tokens"]["prompt"] > 0 and data["cost_usd"] > 0
    assert data["attempts"] == {} and data["latency_s"] == {"rows": 0}

    res = run_batcher("report", job)
    assert res.returncode == 0, res.stderr
    assert "12 rows (Batch-API output JSONL)" in res.stdout
    assert "latency distribution (s):" in res.stdout  # from the journal beside it
    report = json.loads(run_batcher("report", output, "--json").stdout)
    assert report["latency_histogram"]["n"] == 11 and report["runs"]


def test_inspect_refuses_a_file_that_is_no_output(tmp_path: Path) -> None:
    (tmp_path / "notes.jsonl").write_text('{"text": "hello"}\n')
    res = run_batcher("inspect", tmp_path / "notes.jsonl")
    assert res.returncode == 2
    assert "neither a Parquet output nor a Batch-API output JSONL" in res.stderr
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    write_jsonl(tmp_path / "requests.jsonl", [line])
    res = run_batcher("inspect", tmp_path / "requests.jsonl")
    assert res.returncode == 2 and "looks like Batch-API input" in res.stderr
    res = run_batcher("inspect", tmp_path)  # a directory: a usage error, not exit 1
    assert res.returncode == 2 and "cannot read: Is a directory" in res.stderr


def test_status_of_a_merged_sharded_job(tmp_path: Path, mock_server) -> None:
    write_jsonl(tmp_path / "input.jsonl", review_rows(30))
    job = write_job(tmp_path, mock_server(**FAST).url)
    assert run_batcher("run", job, "--shard", "1/2", "-q").returncode == 0
    half = run_batcher("status", job)
    assert half.returncode == 0, half.stderr
    assert "not started" not in half.stdout and "partial" in half.stdout
    assert run_batcher("run", job, "--shard", "2/2", "-q").returncode == 0
    assert "not merged yet: batcher merge JOB --shards 2" in run_batcher("status", job).stdout
    assert run_batcher("merge", job, "--shards", "2").returncode == 0
    res = run_batcher("status", job)
    assert res.returncode == 0, res.stderr
    assert "rows:       30/30 done  ok=30 error=0 remaining=0" in res.stdout
    assert "finished and merged" in res.stdout
    st = json.loads(run_batcher("status", job, "--json").stdout)
    assert st["finished"] and st["shards"] == 2 and st["rows_done"] == 30


def test_inspect_a_finished_journal_says_finished(tmp_path: Path, mock_server) -> None:
    write_jsonl(tmp_path / "input.jsonl", review_rows(5))
    job = write_job(tmp_path, mock_server(**FAST).url)
    assert run_batcher("run", job).returncode == 0
    res = run_batcher("inspect", journal_path(tmp_path / "out/result.parquet"))
    assert res.returncode == 0, res.stderr
    assert "5 rows (journal of a finished job)" in res.stdout


def test_report_of_a_run_that_sent_nothing_and_resumed_rows(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(6))
    job = write_job(tmp_path, srv.url)
    assert run_batcher("run", job).returncode == 0
    assert run_batcher("run", job).returncode == 0  # everything answered: nothing to send
    res = run_batcher("report", job)
    assert res.returncode == 0, res.stderr
    second = res.stdout[res.stdout.index("run 2 ") :]
    assert "nothing was sent in this run" in second and "peak 0" not in second
    history = read_history(history_path(tmp_path / "out/result.parquet"))
    assert [run.end and run.end["rows_done_before"] for run in history.runs] == [0, 6]
    data = json.loads(run_batcher("report", job, "--json").stdout)
    assert [r["resumed_rows"] for r in data["runs"]] == [0, 6]


def test_report_of_a_job_never_run(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    job = write_job(tmp_path, "http://127.0.0.1:9")
    res = run_batcher("report", job)
    assert res.returncode == 2
    assert "the job has not run yet" in res.stderr and "give the job file" not in res.stderr


def test_status_numbers_have_thousands_separators(tmp_path: Path, mock_server) -> None:
    long_text = "a fairly long review of a product " * 10
    rows = [{"id": f"r{i}", "text": long_text} for i in range(20)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    job = write_job(tmp_path, mock_server(**FAST).url)
    assert run_batcher("run", job).returncode == 0
    st = json.loads(run_batcher("status", job, "--json").stdout)
    assert st["prompt_tokens"] >= 1000
    out = run_batcher("status", job).stdout
    assert f"tokens:     {st['prompt_tokens']:,} prompt" in out


def test_errors_show_a_real_message_and_the_model_name(tmp_path: Path, mock_server) -> None:
    big = [{"id": "big1", "text": "word " * 3000}, {"id": "big2", "text": "other " * 4000}]
    rows = [*review_rows(4), *big]
    write_jsonl(tmp_path / "input.jsonl", rows)
    limits = {"gpt-4o-mini": {"rpm": 1000, "tpm": 2000}}
    job = write_job(tmp_path, mock_server(**FAST).url, limits=limits)
    assert run_batcher("run", job).returncode == 3
    res = run_batcher("inspect", job)
    assert res.returncode == 0, res.stderr
    assert "errors:        2 rows, 1 kind" in res.stdout  # still grouped
    assert "TPM limit of gpt-4o-mini: it can never be sent" in res.stdout  # a real message
    assert "<n>" not in res.stdout and "<id>" not in res.stdout
    top = json.loads(run_batcher("inspect", job, "--json").stdout)["errors"]["top"][0]
    assert top["count"] == 2 and "<n> TPM limit of gpt-4o-mini" in top["kind"]


def test_cache_stats_of_a_missing_store_and_prune_floor(tmp_path: Path, mock_server) -> None:
    typo = tmp_path / "typo.sqlite3"
    res = run_batcher("cache", "stats", "--path", typo)
    assert res.returncode == 0 and f"no response store at {typo}" in res.stdout
    assert "entries" not in res.stdout and not typo.exists()
    assert (
        json.loads(run_batcher("cache", "stats", "--path", typo, "--json").stdout)["exists"]
        is False
    )
    res = run_batcher("cache", "prune", "--max-size", "1KB", "--path", typo)
    assert res.returncode == 0 and "nothing to remove" in res.stdout
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    job = write_job(tmp_path, mock_server(**FAST).url)
    assert run_batcher("run", job).returncode == 0
    stats = json.loads(run_batcher("cache", "stats", "--json").stdout)
    assert stats["entries"] == 3
    res = run_batcher("cache", "prune", "--max-size", "1KB")
    assert res.returncode == 0, res.stderr
    assert "it cannot shrink to 1.0 KB" in res.stdout


def test_inspect_of_parquet_output_still_works(tmp_path: Path, mock_server) -> None:
    write_jsonl(tmp_path / "input.jsonl", review_rows(4))
    job = write_job(tmp_path, mock_server(**FAST).url)
    assert run_batcher("run", job).returncode == 0
    assert pq.read_table(tmp_path / "out/result.parquet").num_rows == 4
    assert "4 rows (Parquet output)" in run_batcher("inspect", job).stdout
