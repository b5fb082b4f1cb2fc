"""What is wrong with a job or its rows is said before anything is sent, in words that say
what to fix: message roles, parameter ranges, the output's name against its format, kept
columns no row has; and the bundled server refuses bad roles and ranges as the real API does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import env_with_key, read_output, run_batcher, write_job, write_jsonl

from batcher.errors import AuthenticationError, JobSpecError, classify
from batcher.spec import load_job

FAST = {"rpm": None, "tpm": None}


def _job(tmp_path: Path, **overrides: Any) -> Path:
    """A job file (sent nowhere: these jobs are only validated)."""
    return write_job(tmp_path, "http://127.0.0.1:9", **overrides)


def _rows(n: int = 3) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"review {i}", "product": f"p{i}"} for i in range(n)]


# ---- roles and parameters ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["estimate", "run"])
def test_a_misspelt_role_is_refused_by_estimate_and_run(
    tmp_path: Path, mock_server, command: str
) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", _rows())
    job = write_job(tmp_path, srv.url, messages=[{"role": "usr", "content": "{text}"}])
    res = run_batcher(command, job)
    assert res.returncode == 2, res.stderr
    assert "messages.0.role: role 'usr' is not a chat role (did you mean 'user'?)" in res.stderr
    assert "system, developer, user, assistant, tool, function" in res.stderr
    assert srv.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"temperature": 7}, "params.temperature: must be a number from 0 to 2 (not 7)"),
        ({"temperature": "0"}, "params.temperature: must be a number from 0 to 2 (not '0')"),
        ({"top_p": 1.5}, "params.top_p: must be a number from 0 to 1 (not 1.5)"),
        ({"presence_penalty": -3}, "params.presence_penalty: must be a number from -2 to 2"),
        ({"frequency_penalty": 2.1}, "params.frequency_penalty: must be a number from -2 to 2"),
        ({"seed": 1.5}, "params.seed: must be a whole number (not 1.5)"),
        ({"seed": True}, "params.seed: must be a whole number (not True)"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "params.stop: takes at most 4 stop sequences"),
        ({"stop": [1]}, "params.stop: must be a string or a list of strings"),
        ({"max_tokens": 0}, "params.max_tokens: must be a whole number of tokens, at least 1"),
    ],
)
def test_out_of_range_params_are_refused(tmp_path: Path, params: dict[str, Any], says: str) -> None:
    with pytest.raises(JobSpecError) as info:
        load_job(_job(tmp_path, params=params))
    assert says in str(info.value)
    assert "params: params" not in str(info.value)


def test_params_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    params = {
        "temperature": 2,
        "top_p": 0,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "seed": 7,
        "stop": ["a", "b", "c", "d"],
        "max_tokens": 1,
    }
    assert load_job(_job(tmp_path, params=params)).params == params
    load_job(_job(tmp_path, params={"temperature": None, "stop": "END"}))


def test_the_params_prefix_is_not_doubled(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError) as info:
        load_job(_job(tmp_path, params={"n": 2}))
    assert "\n  params: n not supported by the Langdock API; remove it" in str(info.value)
    assert "params: params" not in str(info.value)


def test_bad_roles_and_ranges_in_rows_are_bad_rows_found_before_sending(
    tmp_path: Path, mock_server
) -> None:
    srv = mock_server(**FAST)
    good = {"role": "user", "content": "hi"}
    write_jsonl(
        tmp_path / "input.jsonl",
        [
            {"id": "a", "messages": [good]},
            {"id": "b", "messages": [{"role": "usr", "content": "hi"}]},
        ],
    )
    job = write_job(tmp_path, srv.url, messages=None)
    res = run_batcher("run", job)
    assert res.returncode == 2
    assert "input.jsonl:2 (id b): messages[0]: role 'usr' is not a chat role" in res.stderr
    assert srv.stats()["requests"] == 0
    # The same from a Batch-API body, with an out-of-range temperature: the row's own error.
    lines = [
        {"custom_id": "x", "body": {"model": "gpt-4o-mini", "messages": [good]}},
        {"custom_id": "y", "body": {"messages": [good], "temperature": 9}},
    ]
    write_jsonl(tmp_path / "batch.jsonl", lines)
    job = write_job(
        tmp_path, srv.url, input="batch.jsonl", messages=None, id_column=None, on_bad_row="skip"
    )
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    rows = {r["id"]: r for r in read_output(tmp_path / "out/result.parquet")}
    assert rows["x"]["status"] == "ok"
    assert "body.temperature: must be a number from 0 to 2 (not 9)" in rows["y"]["error"]
    assert srv.stats()["requests"] == 1


def test_the_bundled_server_answers_400_for_a_bad_role_or_temperature(mock_server) -> None:
    srv = mock_server(**FAST)
    for body, param in (
        ({"model": "gpt-4o-mini", "messages": [{"role": "usr", "content": "hi"}]}, "role"),
        (
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": 7,
            },
            "temperature",
        ),
    ):
        request = urllib.request.Request(
            f"{srv.url}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            # No proxy from the environment: the server is on 127.0.0.1.
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
        assert info.value.code == 400
        error = json.loads(info.value.read())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"].endswith(param)


# ---- the output's name against its format -----------------------------------------------------


@pytest.mark.parametrize("name", ["labels.jsonl", "labels.csv", "labels.json"])
def test_a_text_suffix_with_parquet_output_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(JobSpecError) as info:
        load_job(_job(tmp_path, output=f"out/{name}"))
    message = str(info.value)
    assert "Name it labels.parquet, or set output_format: batch" in message


def test_a_parquet_suffix_with_batch_output_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match=r"Name it results\.jsonl"):
        load_job(_job(tmp_path, output="out/results.parquet", output_format="batch"))


@pytest.mark.parametrize(
    ("output", "fmt"),
    [
        ("out/r.parquet", None),
        ("out/r.pq", None),
        ("out/r.arrow", None),
        ("out/r", None),
        ("out/r.jsonl", "batch"),
        ("out/r.out", "batch"),
    ],
)
def test_agreeing_or_unknown_suffixes_are_accepted(
    tmp_path: Path, output: str, fmt: str | None
) -> None:
    load_job(_job(tmp_path, output=output, output_format=fmt))


def test_the_bundled_jobs_still_validate() -> None:
    jobs = sorted((Path(__file__).parent.parent / "jobs").glob("*/job.yaml"))
    assert jobs
    for path in jobs:
        load_job(path)


# ---- kept columns of a JSONL input ------------------------------------------------------------


def test_a_kept_column_no_jsonl_row_has_is_refused_before_sending(
    tmp_path: Path, mock_server
) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", _rows(5))
    job = write_job(tmp_path, srv.url, keep_columns=["prodcut"])
    res = run_batcher("run", job)
    assert res.returncode == 2
    assert "keep_columns names 'prodcut', which no row of the input has" in res.stderr
    assert "(did you mean 'product'?)" in res.stderr
    assert "the rows' columns: text, product" in res.stderr
    assert srv.stats()["requests"] == 0
    est = run_batcher("estimate", job)  # refused alike before a run
    assert est.returncode == 2 and "keep_columns names 'prodcut'" in est.stderr


def test_a_kept_column_some_rows_have_is_kept(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    rows = _rows(4)
    for row in rows[:3]:
        del row["product"]  # only the last row has it
    write_jsonl(tmp_path / "input.jsonl", rows)
    res = run_batcher("run", write_job(tmp_path, srv.url, keep_columns=["product"]))
    assert res.returncode == 0, res.stderr
    out = {r["id"]: r["product"] for r in read_output(tmp_path / "out/result.parquet")}
    assert out == {"r0": None, "r1": None, "r2": None, "r3": "p3"}


def test_a_row_without_the_templated_column_lists_its_columns(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", [{"id": "a", "txt": "x", "product": "p"}])
    res = run_batcher("run", write_job(tmp_path, srv.url))
    assert res.returncode == 2
    assert "the row has no column 'text' (its columns: id, product, txt)" in res.stderr


# ---- small messages ----------------------------------------------------------------------------


def test_an_empty_key_is_said_to_be_empty(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", _rows())
    job = write_job(tmp_path, srv.url)
    res = run_batcher("run", job, env=env_with_key(""))
    assert res.returncode == 2
    assert "TEST_LANGDOCK_KEY is set but empty" in res.stderr
    res = run_batcher("run", job, env=env_with_key(None))
    assert "TEST_LANGDOCK_KEY is not set" in res.stderr


def test_a_401_message_has_one_period() -> None:
    body = {"error": {"message": "Incorrect API key provided. Check your workspace settings."}}
    error = classify(401, {}, body)
    assert isinstance(error, AuthenticationError)
    assert "settings. Check that the key" in str(error) and ".." not in str(error)


def test_one_row_is_said_in_the_singular(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", [{"id": "a", "text": "hi [[fail-400]]"}])
    res = run_batcher("run", write_job(tmp_path, srv.url))
    assert res.returncode == 3, res.stderr
    assert "wrote 1 row to" in res.stderr
    assert "; 1 row is an error (" in res.stderr
    assert "1 rows are" not in res.stderr  # (engine.py's "sending 1 rows" is not ours)
