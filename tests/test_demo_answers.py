"""Demo answers never pass for real ones, and the job's money and output survive its reruns.

The bundled server signs its answers (`x-batcher-mock`) under `--mock` and `serve-mock`; the
`mock_server` fixture's server is unsigned unless a test asks (`marked=True`): there it plays
the real API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers import read_output, run_batcher, write_job, write_jsonl

from batcher.journal import read_state

FAST: dict[str, Any] = {"rpm": None, "tpm": None}
ROWS = [{"id": f"r{i}", "text": f"review number {i}"} for i in range(30)]
OUT = "out/result.parquet"
LIMITS = {"gpt-4o-mini": {"rpm": 1_000_000, "tpm": 1_000_000_000}}


def _job(tmp: Path, url: str, **overrides: Any) -> Path:
    write_jsonl(tmp / "input.jsonl", ROWS)
    return write_job(tmp, url, **{"limits": LIMITS, **overrides})  # --mock enforces them


def test_a_real_run_after_a_mock_run_asks_the_api_for_every_row(
    tmp_path: Path, mock_server
) -> None:
    api = mock_server(**FAST)
    job = _job(tmp_path, api.url)
    assert run_batcher("run", job, "--mock").returncode == 0
    assert read_state(tmp_path / f"{OUT}.journal").mock
    res = run_batcher("run", job)  # the README's next step: the real API
    assert res.returncode == 0, res.stderr
    assert "demo answers" in res.stderr
    assert api.stats()["requests"] == 30  # nothing taken from the demo's journal or store
    assert {r["source"] for r in read_output(tmp_path / OUT)} == {"api"}
    assert not read_state(tmp_path / f"{OUT}.journal").mock
    # and the next real run resumes the real answers as usual
    assert run_batcher("run", job).returncode == 0
    assert api.stats()["requests"] == 30


def test_serve_mock_answers_stay_out_of_the_store_and_the_journal(
    tmp_path: Path, mock_server
) -> None:
    demo = mock_server(marked=True, **FAST)  # `batcher serve-mock`
    api = mock_server(**FAST)
    job = _job(tmp_path, demo.url)
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert "bundled mock server" in res.stderr and demo.stats()["requests"] == 30
    other = tmp_path / "other"
    other.mkdir()
    real = _job(other, api.url)  # another job asking the same: nothing in the store
    assert run_batcher("run", real).returncode == 0
    assert api.stats()["requests"] == 30
    job = _job(tmp_path, api.url)  # the demo job, now against the API: asks again
    assert run_batcher("run", job).returncode == 0
    assert api.stats()["requests"] == 30  # all from the store the other job filled
    assert {r["source"] for r in read_output(tmp_path / OUT)} == {"cache"}


def test_a_mock_run_refuses_to_mix_demo_answers_into_real_ones(tmp_path: Path, mock_server) -> None:
    api = mock_server(**FAST)
    job = _job(tmp_path, api.url)
    assert run_batcher("run", job).returncode == 0
    res = run_batcher("run", job, "--mock")
    assert res.returncode == 2
    assert "demo answers among them" in res.stderr and "own output" in res.stderr
    assert {r["source"] for r in read_output(tmp_path / OUT)} == {"api"}
    assert run_batcher("run", job, "--mock", "--restart").returncode == 0


def test_restart_keeps_the_jobs_spending_and_its_last_output(tmp_path: Path, mock_server) -> None:
    api = mock_server(**FAST)
    job = _job(tmp_path, api.url)
    assert run_batcher("run", job).returncode == 0
    journal = tmp_path / f"{OUT}.journal"
    spent = read_state(journal).spent_usd
    assert spent > 0
    # A restart that pays again, stopped by a cap it reaches at once: the money spent before
    # still counts, and the complete output of the last run is still there.
    res = run_batcher("run", job, "--restart", "--no-cache", "--max-cost", str(spent * 1.01))
    assert res.returncode == 6, res.stderr
    assert read_state(journal).spent_usd >= spent
    assert len(read_output(tmp_path / OUT)) == 30


def test_the_sample_and_the_full_run_share_one_budget(tmp_path: Path, mock_server) -> None:
    api = mock_server(**FAST)
    job = _job(tmp_path, api.url)
    assert run_batcher("run", job, "--sample", "10").returncode == 0
    sample_spent = read_state(tmp_path / "out/result.sample.parquet.journal").spent_usd
    assert sample_spent > 0
    res = run_batcher("run", job, "--max-cost", str(sample_spent * 1.5), "--no-cache")
    assert res.returncode == 6, res.stderr  # the sample's spending counts
    spent = read_state(tmp_path / f"{OUT}.journal").spent_usd
    assert spent + sample_spent <= sample_spent * 1.5


def test_an_empty_input_leaves_the_last_output_alone(tmp_path: Path, mock_server) -> None:
    api = mock_server(**FAST)
    job = _job(tmp_path, api.url)
    assert run_batcher("run", job).returncode == 0
    (tmp_path / "input.jsonl").write_text("")
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert "no rows" in res.stderr and "left as it was" in res.stderr
    assert "wrote 0 rows" not in res.stdout + res.stderr  # the closing line said so, wrongly
    assert len(read_output(tmp_path / OUT)) == 30


def test_an_empty_input_with_keep_columns_or_limits_is_no_config_error(
    tmp_path: Path, mock_server
) -> None:
    """With no row to look at, a JSONL keep_columns name "no row has" and a limits: entry
    "no request names" are no typos (exit 2 said so; found by review): the run says the input
    has no rows and keeps the output, estimate says what it counted."""
    api = mock_server(**FAST)
    job = _job(tmp_path, api.url, keep_columns=["text"])  # and the limits of its model
    assert run_batcher("run", job).returncode == 0
    (tmp_path / "input.jsonl").write_text("")
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert "left as it was" in res.stderr
    assert len(read_output(tmp_path / OUT)) == 30
    assert run_batcher("estimate", job).returncode == 0


def test_limits_are_no_typo_when_every_row_is_bad(tmp_path: Path, mock_server) -> None:
    """Every line unreadable (on_bad_row: skip): the rows are error rows, not a limits typo."""
    api = mock_server(**FAST)
    job = _job(tmp_path, api.url, on_bad_row="skip")  # and the limits of its model
    (tmp_path / "input.jsonl").write_text("junk\nmore junk\n")
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    assert [r["status"] for r in read_output(tmp_path / OUT)] == ["error", "error"]
    assert api.stats()["requests"] == 0


def test_an_output_directory_that_cannot_exist_is_a_job_error(tmp_path: Path, mock_server) -> None:
    api = mock_server(**FAST)
    job = _job(tmp_path, api.url, output="input.jsonl/result.parquet")
    res = run_batcher("run", job, "--log-format", "json")
    assert res.returncode == 2
    messages = [json.loads(line)["msg"] for line in res.stderr.splitlines()]
    assert any("a file is in the way" in m and "another output path" in m for m in messages)
    assert api.stats()["requests"] == 0
