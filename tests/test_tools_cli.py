"""estimate / inspect / status / init / progress / structured output, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from helpers import read_output, review_rows, run_batcher, write_job, write_jsonl

from batcher.spec import load_job
from batcher.tokens import admission_cost

FAST = {"rpm": None, "tpm": None}

SCHEMA_PARAMS = {
    "max_tokens": 50,
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "label",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                    "score": {"type": "integer", "minimum": 1, "maximum": 5},
                },
                "required": ["sentiment", "score"],
                "additionalProperties": False,
            },
        },
    },
}


def test_estimate_matches_engine_accounting(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(40))
    job_file = write_job(tmp_path, srv.url)
    res = run_batcher("estimate", job_file, "--json")
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)
    for key in (
        "rows",
        "prompt_tokens",
        "reserved_completion_tokens",
        "cost_usd",
        "duration_s",
        "binding_limit",
    ):
        assert key in est
    assert est["rows"] == 40 and est["binding_limit"] == "rpm"
    assert srv.stats()["requests"] == 0  # estimate sends nothing
    # The engine's own accounting for the same rows: its admission charge per request.
    run = run_batcher("run", job_file, "--log-format", "json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["admitted_tokens"] == est["prompt_tokens"] + est["reserved_completion_tokens"]
    rows = read_output(tmp_path / "out/result.parquet")
    assert sum(r["prompt_tokens"] for r in rows) == est["prompt_tokens"]  # server's usage agrees
    job = load_job(job_file)
    costs = 0
    for row in review_rows(40):
        messages = [
            {"role": "system", "content": "You label reviews."},
            {"role": "user", "content": f"Review: {row['text']}"},
        ]
        body = {"model": job.model, **job.params, "messages": messages}
        costs += admission_cost(body, "gpt-4o-mini", job.assumed_max_tokens)
    assert costs == summary["admitted_tokens"]


def test_plain_progress_lines_when_not_a_terminal(tmp_path: Path, mock_server) -> None:
    srv = mock_server(rpm=600, tpm=None)  # ~10 rows/s: a few seconds of run
    write_jsonl(tmp_path / "input.jsonl", review_rows(30))
    job = write_job(
        tmp_path,
        srv.url,
        limits={"gpt-4o-mini": {"rpm": 600, "tpm": 1_000_000}},
        progress_interval_s=0.5,
    )
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "progress:" in ln]
    assert len(lines) >= 2
    assert "rows" in lines[-1] and "rpm=" in lines[-1] and "tpm=" in lines[-1]
    assert "429s=" in lines[-1] and "eta=" in lines[-1]


def test_json_log_format_progress(tmp_path: Path, mock_server) -> None:
    srv = mock_server(rpm=600, tpm=None)
    write_jsonl(tmp_path / "input.jsonl", review_rows(20))
    job = write_job(
        tmp_path,
        srv.url,
        limits={"gpt-4o-mini": {"rpm": 600, "tpm": 1_000_000}},
        progress_interval_s=0.5,
    )
    res = run_batcher("run", job, "--log-format", "json")
    assert res.returncode == 0, res.stderr
    events = [json.loads(ln) for ln in res.stderr.splitlines() if ln.startswith("{")]
    assert any(e.get("event") == "progress" for e in events)


def test_quiet_prints_nothing_on_success(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(5))
    res = run_batcher("run", write_job(tmp_path, srv.url), "--quiet")
    assert res.returncode == 0 and res.stderr == "" and res.stdout == ""


def test_structured_output_typed_and_broken_answers_are_errors(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(12, marker={4: "[[broken-json]]"}))
    job = write_job(tmp_path, srv.url, params=SCHEMA_PARAMS, structured={"max_repairs": 0})
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    table = pq.read_table(tmp_path / "out/result.parquet")
    parsed_type = table.schema.field("parsed").type
    assert str(parsed_type.field("sentiment").type) == "string"
    assert str(parsed_type.field("score").type) == "int64"
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["r4"]["status"] == "error" and "JSON" in rows["r4"]["error"]
    assert rows["r4"]["content"] is not None  # the raw answer is kept for debugging
    ok = rows["r0"]
    assert ok["parsed"]["sentiment"] in ("positive", "negative", "neutral")
    assert 1 <= ok["parsed"]["score"] <= 5


def test_an_invalid_structured_answer_repairs_itself(tmp_path: Path, mock_server) -> None:
    """The mock breaks the JSON of a row whose last user message has the marker; the repair
    turn is the last user message then, so one repair gives a valid answer."""
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(6, marker={2: "[[broken-json]]"}))
    job = write_job(tmp_path, srv.url, params=SCHEMA_PARAMS)
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    rows = {r["id"]: r for r in read_output(tmp_path / "out/result.parquet")}
    assert rows["r2"]["status"] == "ok" and rows["r2"]["parsed"]["score"] >= 1
    assert rows["r2"]["attempts"] == 2  # the first answer and one repair, both paid
    assert srv.stats()["requests"] == 7


def test_inspect_known_output(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(
        tmp_path / "input.jsonl", review_rows(20, marker={2: "[[fail-400]]", 9: "[[fail-400]]"})
    )
    job = write_job(tmp_path, srv.url)
    assert run_batcher("run", job).returncode == 3
    res = run_batcher("inspect", tmp_path / "out/result.parquet", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    text = json.dumps(report)
    assert report["rows"] == 20
    assert '"ok": 18' in text and '"error": 2' in text
    human = run_batcher("inspect", tmp_path / "out/result.parquet").stdout
    assert "r2" in human or "r9" in human  # sample ids of the common error
    assert "p50" in human


def test_inspect_and_status_on_job_file(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(6))
    job = write_job(tmp_path, srv.url)
    before = run_batcher("status", job)
    assert before.returncode == 0 and "not started" in before.stdout
    assert run_batcher("run", job).returncode == 0
    st = json.loads(run_batcher("status", job, "--json").stdout)
    assert st["rows_done"] == 6 and st["rows_remaining"] == 0 and st["finished"]
    assert run_batcher("inspect", job).returncode == 0


def test_init_writes_a_runnable_job(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "batcher", "init", "mylabels"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert res.returncode == 0, res.stderr
    written = [p for p in tmp_path.rglob("*.yaml")]
    assert written
    job_file = written[0]
    assert "#" in job_file.read_text()  # commented
    again = subprocess.run(
        [sys.executable, "-m", "batcher", "init", "mylabels"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert again.returncode != 0  # refuses to overwrite
    run = run_batcher("run", job_file, "--mock", timeout=120)
    assert run.returncode == 0, run.stderr


def test_an_answer_cut_by_max_tokens_is_asked_again_with_more(tmp_path: Path, mock_server) -> None:
    """max_tokens 4 cuts the JSON (finish_reason: length): asked again with 8, then 16, ...
    up to structured.max_tokens_ceiling; each repair paid and counted."""
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    params = {**SCHEMA_PARAMS, "max_tokens": 4}
    job = write_job(
        tmp_path, srv.url, params=params, structured={"max_repairs": 4, "max_tokens_ceiling": 64}
    )
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["attempts"] > 1 for r in rows)  # the cut answer and its repairs
    assert srv.stats()["requests"] == sum(r["attempts"] for r in rows)


def test_a_cut_answer_at_the_ceiling_is_an_error_row_keeping_it(
    tmp_path: Path, mock_server
) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(2))
    params = {**SCHEMA_PARAMS, "max_tokens": 4}
    job = write_job(
        tmp_path, srv.url, params=params, structured={"max_repairs": 2, "max_tokens_ceiling": 4}
    )
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert {r["status"] for r in rows} == {"error"}
    assert all(r["content"] for r in rows)  # the last answer is kept
    assert srv.stats()["requests"] == 2  # nothing to repair with: the ceiling is reached
