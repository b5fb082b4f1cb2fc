"""`batcher run` end to end: the real CLI, over real HTTP, against the bundled local server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    API_KEY,
    env_with_key,
    read_output,
    review_rows,
    run_batcher,
    write_job,
    write_jsonl,
)

from batcher import command

FAST = {"rpm": None, "tpm": None}  # server without limits: for tests about other things


def _ids(rows: list[dict]) -> list[str]:
    return sorted(r["id"] for r in rows)


def test_jsonl_all_rows_ok(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(60))
    job = write_job(tmp_path, srv.url, keep_columns=["text"])
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert _ids(rows) == sorted(f"r{i}" for i in range(60))
    assert {r["status"] for r in rows} == {"ok"}
    first = rows[0]
    assert first["content"] and first["finish_reason"] in ("stop", "length")
    assert first["prompt_tokens"] > 0 and first["total_tokens"] > first["prompt_tokens"]
    assert first["attempts"] == 1 and first["error"] is None
    assert first["model"].startswith("gpt-4o-mini")  # the server's dated name
    assert first["text"].startswith("review number")
    schema = pq.read_schema(tmp_path / "out/result.parquet")
    assert schema.field("id").type == pa.string()
    assert schema.field("prompt_tokens").type == pa.int64()
    assert "rows" in res.stderr and "wrote 60 rows" in res.stderr
    assert "slow-down" not in res.stderr  # a clean run: no 429, nobody else's load
    assert srv.stats()["duplicates"] == 0


def test_parquet_input_keeps_typed_columns(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    table = pa.table(
        {
            "doc": pa.array([100 + i for i in range(40)], pa.int64()),
            "text": [f"text {i}" for i in range(40)],
            "score": pa.array([i / 3 for i in range(40)], pa.float32()),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=7)
    job = write_job(tmp_path, srv.url, input="in.parquet", id_column="doc", keep_columns=["score"])
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    out = pq.read_table(tmp_path / "out/result.parquet")
    assert sorted(out.column("id").to_pylist()) == sorted(str(100 + i) for i in range(40))
    assert out.schema.field("score").type == pa.float32()


def test_position_ids_by_default(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", [{"text": f"t{i}"} for i in range(12)])
    job = write_job(tmp_path, srv.url, id_column=None)
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert _ids(read_output(tmp_path / "out/result.parquet")) == sorted(str(i) for i in range(12))


def test_batch_api_input(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    lines = [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o" if i % 2 else "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"Say hi {i}"}],
                "max_tokens": 10,
            },
        }
        for i in range(20)
    ]
    write_jsonl(tmp_path / "batch.jsonl", lines)
    job = write_job(
        tmp_path,
        srv.url,
        input="batch.jsonl",
        messages=None,
        id_column=None,
        model=None,
        params={"temperature": 0},
    )
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert _ids(rows) == sorted(f"request-{i}" for i in range(20))
    models = {r["id"]: r["model"] for r in rows}
    assert models["request-1"].startswith("gpt-4o-2") and models["request-0"].startswith(
        "gpt-4o-mini"
    )


def test_rows_with_messages_column(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    rows = [{"id": i, "messages": [{"role": "user", "content": f"hello {i}"}]} for i in range(5)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    job = write_job(tmp_path, srv.url, messages=None)
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert len(read_output(tmp_path / "out/result.parquet")) == 5


def test_429_storm_and_faults_are_retried_to_completion(tmp_path: Path, mock_server) -> None:
    # The storm is keyed to request numbers (the 2nd to 8th requests get 429), not to the
    # server's start time: on a loaded machine batcher's first request came after a 1-second
    # storm had ended. Shorter than 10 in a row, which batcher takes for an outage. The 5xx
    # and drops are drawn per request number too.
    srv = mock_server(
        rpm=None,
        tpm=None,
        rate_limit_storm_requests=(2, 8),
        storm_retry_after_s=0.05,
        error_rate_5xx=0.15,
        drop_rate=0.05,
        seed=3,
    )
    write_jsonl(tmp_path / "input.jsonl", review_rows(80))
    job = write_job(
        tmp_path, srv.url, retry={"max_attempts": 30, "initial_wait_s": 0.05, "max_wait_s": 0.3}
    )
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 80 and {r["status"] for r in rows} == {"ok"}
    stats = srv.stats()
    assert stats["rate_limited"] > 0
    assert any(r["attempts"] > 1 for r in rows)
    assert stats["duplicates"] == 0


def test_bad_request_rows_are_recorded_not_retried(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(
        tmp_path / "input.jsonl", review_rows(30, marker={5: "[[fail-400]]", 17: "[[fail-400]]"})
    )
    job = write_job(tmp_path, srv.url)
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr  # finished, with row errors
    rows = {r["id"]: r for r in read_output(tmp_path / "out/result.parquet")}
    assert len(rows) == 30
    for rid in ("r5", "r17"):
        assert rows[rid]["status"] == "error"
        assert rows[rid]["attempts"] == 1
        assert "400" in rows[rid]["error"]
        assert rows[rid]["content"] is None
    assert sum(r["status"] == "ok" for r in rows.values()) == 28
    assert srv.stats()["by_status"].get("400") == 2


def test_bad_key_stops_after_one_request(tmp_path: Path, mock_server) -> None:
    srv = mock_server(api_keys={"the-right-key"}, **FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(500))
    job = write_job(tmp_path, srv.url, concurrency=64)
    start = time.monotonic()
    res = run_batcher("run", job, env=env_with_key("a-wrong-key-123"))
    assert res.returncode == 4, res.stderr
    assert time.monotonic() - start < 30
    assert "API key" in res.stderr and "TEST_LANGDOCK_KEY" in res.stderr
    assert "a-wrong-key-123" not in res.stderr + res.stdout
    assert srv.stats()["requests"] == 1  # the first request goes alone


def test_wrong_model_or_url_costs_few_requests(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(200))
    job = write_job(tmp_path, srv.url.replace("/openai/eu/v1", "/openai/xx/v1"), concurrency=32)
    res = run_batcher("run", job)
    assert res.returncode == 2, res.stderr
    assert "the first request failed" in res.stderr and "404" in res.stderr
    assert srv.stats()["requests"] == 1


def test_model_the_workspace_lacks_costs_one_request(tmp_path: Path, mock_server) -> None:
    srv = mock_server(models=("gpt-4o",), **FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(100))
    job = write_job(tmp_path, srv.url, model="my-deployment", allow_any_model=True)
    res = run_batcher("run", job)
    assert res.returncode == 2, res.stderr
    assert "check endpoint.region / endpoint.base_url and model" in res.stderr
    assert srv.stats()["requests"] == 1
    assert not (tmp_path / "out/result.parquet").exists()


def test_unreachable_server_stops_with_a_clear_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    write_jsonl(tmp_path / "input.jsonl", review_rows(50))
    job = write_job(tmp_path, f"http://127.0.0.1:{port}/openai/eu/v1")
    start = time.monotonic()
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr  # a typo or a network down: "run again" either way
    assert f"127.0.0.1:{port}" in res.stderr and "first request failed" in res.stderr
    assert time.monotonic() - start < 30


def test_first_rows_failing_for_their_own_reasons_do_not_stop_the_job(
    tmp_path: Path, mock_server
) -> None:
    srv = mock_server(**FAST)
    marker = {0: "[[fail-400]]", 1: "[[fail-400]]"}
    write_jsonl(tmp_path / "input.jsonl", review_rows(40, marker=marker))
    res = run_batcher("run", write_job(tmp_path, srv.url))
    assert res.returncode == 3, res.stderr
    assert len(read_output(tmp_path / "out/result.parquet")) == 40


def test_o_series_max_tokens_is_translated(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(5))
    job = write_job(
        tmp_path,
        srv.url,
        model="o3-mini",
        params={"max_tokens": 20},
        messages=[{"role": "user", "content": "Review: {text}"}],
    )
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr


def test_key_never_written_anywhere(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(10, marker={3: "[[fail-400]]"}))
    job = write_job(tmp_path, srv.url)
    res = run_batcher("run", job, "--log-format", "json")
    assert res.returncode == 3
    assert API_KEY not in res.stdout + res.stderr
    for path in (tmp_path / "out").iterdir():
        assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("key", ["e", "none"])
def test_a_short_key_leaves_the_answers_whole(tmp_path: Path, mock_server, key: str) -> None:
    """Local OpenAI-compatible servers take keys like "none": the key masking that error
    messages need must not rewrite the letters of an answer (with "e", every answer had become
    unreadable JSON and the run stopped blaming the service)."""
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", [{"id": i, "text": f"none left {i}"} for i in range(5)])
    job = write_job(tmp_path, srv.url, params={"max_tokens": 64})
    res = run_batcher("run", job, env=env_with_key(key))
    assert res.returncode == 0, res.stderr
    rows = read_output(tmp_path / "out/result.parquet")
    assert [r["status"] for r in rows] == ["ok"] * 5
    assert all("***" not in r["content"] for r in rows)
    assert all(f"You said: Review: none left {r['id']}" in r["content"] for r in rows)


def test_json_summary_on_stdout(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(10))
    job = write_job(tmp_path, srv.url)
    res = run_batcher("run", job, "--log-format", "json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["event"] == "summary" and summary["rows_ok"] == 10


# ---- bad input: a clear message before any request is sent ----


@pytest.mark.parametrize(
    ("overrides", "rows", "expected"),
    [
        ({"params": {"max_tokens": 5, "n": 2}}, None, "n not supported"),
        ({"params": {"stream_options": {}}}, None, "stream_options not supported"),
        ({"model": "gpt-5-turbo"}, None, "unknown model 'gpt-5-turbo'"),
        (
            {"messages": [{"role": "user", "content": "{title}: {text}"}]},
            None,
            "no column 'title'",
        ),
        ({"model": "o3-mini", "params": {"temperature": 0.2}}, None, "temperature"),
        ({"bogus_key": 1}, None, "bogus_key: unknown key"),
        ({}, [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "duplicate ids"),
    ],
)
def test_bad_job_or_input_is_refused_before_sending(
    tmp_path: Path, mock_server, overrides: dict, rows: list | None, expected: str
) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", rows or review_rows(5))
    job = write_job(tmp_path, srv.url, **overrides)
    res = run_batcher("run", job)
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr
    assert srv.stats()["requests"] == 0


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    (tmp_path / "input.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    job = write_job(tmp_path, srv.url)
    res = run_batcher("run", job)
    assert res.returncode == 2
    assert "input.jsonl:2" in res.stderr and "on_bad_row" in res.stderr
    assert srv.stats()["requests"] == 0


def test_missing_column_in_a_row_names_it(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "txt": "y"}])
    job = write_job(tmp_path, srv.url)
    res = run_batcher("run", job)
    assert res.returncode == 2
    assert "input.jsonl:2" in res.stderr and "'text'" in res.stderr
    assert srv.stats()["requests"] == 0


def test_bad_rows_skipped_are_recorded_as_errors(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    (tmp_path / "input.jsonl").write_text(
        '{"id": "a", "text": "x"}\nnot json\n{"id": "c", "txt": "y"}\n{"id": "d", "text": "z"}\n'
    )
    job = write_job(tmp_path, srv.url, on_bad_row="skip")
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    rows = {r["id"]: r for r in read_output(tmp_path / "out/result.parquet")}
    assert rows["a"]["status"] == rows["d"]["status"] == "ok"
    assert rows["<line 2>"]["status"] == "error" and "not valid JSON" in rows["<line 2>"]["error"]
    assert rows["c"]["status"] == "error" and "'text'" in rows["c"]["error"]
    assert srv.stats()["requests"] == 2


def test_missing_key_variable(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    job = write_job(tmp_path, srv.url)
    res = run_batcher("run", job, env=env_with_key(None))
    assert res.returncode == 2
    assert "TEST_LANGDOCK_KEY is not set" in res.stderr


def test_unwritable_output(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    (tmp_path / "blocker").write_text("a file where a directory should be")
    job = write_job(tmp_path, srv.url, output="blocker/out.parquet")
    res = run_batcher("run", job)
    assert res.returncode == 2, res.stderr  # the job's output path is wrong: nothing was sent
    assert "blocker" in res.stderr and "a file is in the way" in res.stderr
    assert srv.stats()["requests"] == 0


def test_missing_input_file(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    job = write_job(tmp_path, srv.url, input="nope.jsonl")
    res = run_batcher("run", job)
    assert res.returncode == 2 and "nope.jsonl: input file not found" in res.stderr


def test_kept_columns_of_any_type_survive(tmp_path: Path, mock_server) -> None:
    import datetime as dt
    from decimal import Decimal

    srv = mock_server(**FAST)
    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    table = pa.table(
        {
            "id": [f"d{i}" for i in range(5)],
            "text": ["hello"] * 5,
            "created": pa.array([when] * 5, pa.timestamp("us")),
            "price": pa.array([Decimal("1.25")] * 5, pa.decimal128(5, 2)),
            "tags": [["a", "b"]] * 5,
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    job = write_job(
        tmp_path, srv.url, input="in.parquet", keep_columns=["created", "price", "tags"]
    )
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    out = pq.read_table(tmp_path / "out/result.parquet")
    row = out.to_pylist()[0]
    assert row["created"] == "2026-01-02T03:04:05" and row["price"] == "1.25"
    assert row["tags"] == ["a", "b"]


def test_jsonl_kept_column_with_mixed_types(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    rows = [{"id": f"m{i}", "text": "x", "meta": i if i % 2 else "s"} for i in range(10)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    res = run_batcher("run", write_job(tmp_path, srv.url, keep_columns=["meta"]))
    assert res.returncode == 0, res.stderr
    out = {r["id"]: r["meta"] for r in read_output(tmp_path / "out/result.parquet")}
    assert out["m1"] == "1" and out["m2"] == "s"


@pytest.mark.parametrize("order", ["input", "completion"])
def test_kept_columns_come_from_the_current_input_in_either_order(
    tmp_path: Path, mock_server, order: str
) -> None:
    """A kept column is no part of the request: a rerun after it changed asks nothing, and the
    output holds the new values. In completion order they came from the journal, stale, and a
    column added to keep_columns was empty (found by review)."""
    srv = mock_server(**FAST)
    rows = [{"id": f"m{i}", "text": f"row {i}", "meta": "v1"} for i in range(6)]
    write_jsonl(tmp_path / "input.jsonl", rows)
    res = run_batcher(
        "run", write_job(tmp_path, srv.url, keep_columns=["meta"], output_order=order)
    )
    assert res.returncode == 0, res.stderr
    sent = srv.stats()["requests"]
    write_jsonl(tmp_path / "input.jsonl", [{**r, "meta": "v2"} for r in rows])
    job = write_job(tmp_path, srv.url, keep_columns=["meta", "text"], output_order=order)
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert srv.stats()["requests"] == sent  # nothing asked again
    out = read_output(tmp_path / "out/result.parquet")
    assert {(r["meta"], r["text"]) for r in out} == {("v2", f"row {i}") for i in range(6)}


def test_output_must_not_be_the_input(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    res = run_batcher("run", write_job(tmp_path, srv.url, output="input.jsonl"))
    assert res.returncode == 2 and "output is the input file" in res.stderr


@pytest.mark.parametrize("kind", ["symlink", "fifo", "job file", "text file", "journal"])
def test_an_output_batcher_would_destroy_is_refused_before_sending(
    tmp_path: Path, mock_server, kind: str
) -> None:
    """The output is replaced whole (a new file renamed over it): a link became a plain file
    (its target never written), a FIFO or /dev/null was replaced by a file, the job file or a
    text file was overwritten with Parquet, another job's journal was lost (found by review).
    Each is refused with exit 2 before any request; the thing named is left as it was. (A
    device is refused as the FIFO is; not tested on /dev/null: a regression would replace it.)"""
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    target = tmp_path / "real.parquet"
    output = {
        "symlink": "link.parquet",
        "fifo": "fifo.parquet",
        "job file": "job.yaml",
        "text file": "notes.parquet",
        "journal": "other.parquet.journal",
    }[kind]
    if kind == "symlink":
        (tmp_path / output).symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(tmp_path / output)
    elif kind == "text file":
        (tmp_path / output).write_text("my notes\n")
    job = write_job(tmp_path, srv.url, output=output)
    before = {p.name: (p.lstat().st_mode, p.lstat().st_size) for p in tmp_path.iterdir()}
    res = run_batcher("run", job)
    assert res.returncode == 2, res.stderr
    said = {
        "symlink": "symbolic link",
        "fifo": "not a regular file",
        "job file": "this job file",
        "text file": "not a Parquet file",
        "journal": "batcher's own files",
    }
    assert said[kind] in res.stderr
    assert srv.stats()["requests"] == 0
    assert {p.name: (p.lstat().st_mode, p.lstat().st_size) for p in tmp_path.iterdir()} == before
    assert not target.exists()


def test_a_line_nested_too_deeply_is_a_bad_row_not_a_traceback(tmp_path: Path, mock_server) -> None:
    """orjson stops at 1,024 levels and json.loads then ran out of stack: RecursionError, exit 1,
    whatever on_bad_row said. It is now a bad row like any line that is not JSON."""
    srv = mock_server(**FAST)
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "input.jsonl").write_text(
        '{"id": "b", "text": "fine"}\n{"id": "a", "text": "x", "deep": ' + deep + "}\n"
    )
    res = run_batcher("run", write_job(tmp_path, srv.url, on_bad_row="skip"))
    assert "Traceback" not in res.stderr, res.stderr
    rows = {r["id"]: r for r in read_output(tmp_path / "out/result.parquet")}
    assert rows["b"]["status"] == "ok"
    errors = [r["error"] for r in rows.values() if r["status"] == "error"]
    assert errors == [f"{tmp_path / 'input.jsonl'}:2: not valid JSON (nested too deeply to read)"]


def test_keep_columns_all_copies_every_input_column_with_its_type(
    tmp_path: Path, mock_server
) -> None:
    srv = mock_server(**FAST)
    table = pa.table(
        {
            "doc": [f"d{i}" for i in range(12)],
            "text": [f"text {i}" for i in range(12)],
            "score": pa.array([i / 4 for i in range(12)], pa.float32()),
            "tags": [["a", "b"][: i % 3] for i in range(12)],
        }
    )
    pq.write_table(table, tmp_path / "input.parquet")
    job = write_job(tmp_path, srv.url, input="input.parquet", id_column="doc", keep_columns="all")
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    out = pq.read_table(tmp_path / "out/result.parquet")
    assert out.column("id").to_pylist() == table.column("doc").to_pylist()  # input order
    assert out.schema.field("score").type == pa.float32()
    assert out.column("tags").to_pylist() == table.column("tags").to_pylist()
    assert "doc" not in out.column_names  # the id column appears once, as id


def test_keep_columns_all_refuses_an_input_column_named_like_a_result(
    tmp_path: Path, mock_server
) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", [{"id": "a", "text": "x", "model": "mine"}])
    job = write_job(tmp_path, srv.url, keep_columns="all")
    res = run_batcher("run", job)
    assert res.returncode == 2 and "'model'" in res.stderr, res.stderr
    assert srv.stats()["requests"] == 0


def test_what_the_command_keeps_out_says_where_to_go() -> None:
    keep_out = command._KeepOut("pandas")
    with pytest.raises(ModuleNotFoundError, match=r"does not load pandas.*Python API"):
        keep_out.find_spec("pandas.core.frame")
    assert keep_out.find_spec("pandasql") is None and keep_out.find_spec("json") is None


@pytest.mark.parametrize("worker", ["none", "thread"])
def test_the_command_ends_without_teardown_keeping_what_exit_does(worker: str) -> None:
    """`entry` ends the process with os._exit once the command is done (the interpreter's
    teardown costs ~0.1 s of CPU a run). What an exit does that matters still happens: the
    status, atexit functions, buffered output (a pipe's stdout is block-buffered); a thread
    that is not a daemon still finishes its work (then the process exits normally). The
    thread waits for a gate that only the interpreter's own exit opens (the hook
    concurrent.futures uses, run before it joins the threads): alive when `_leave` looks,
    whatever the timing, and it prints only if the normal exit ran."""
    probe = (
        "import atexit, sys, threading\n"
        "from batcher.command import _leave\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "sys.stdout.write('buffered ' * 100)\n"
        "if sys.argv[1] == 'thread':\n"
        "    gate = threading.Event()\n"
        "    threading._register_atexit(gate.set)\n"
        "    threading.Thread(target=lambda: (gate.wait(), print('thread done'))).start()\n"
        "_leave(3)\n"
    )
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    res = subprocess.run(
        [sys.executable, "-c", probe, worker],
        env=buffered,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 3, res.stderr
    assert res.stdout.count("buffered") == 100 and "atexit ran" in res.stdout
    assert ("thread done" in res.stdout) == (worker == "thread")
    if worker == "thread":
        return
    message = subprocess.run(
        [sys.executable, "-c", "from batcher.command import _leave; _leave('no such job')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (message.returncode, message.stderr.strip()) == (1, "no such job")
    # Started with its stdout closed (cron can): Python gives sys.stdout = None.
    closed = subprocess.run(
        [sys.executable, "-m", "batcher", "--help"],
        preexec_fn=lambda: os.close(1),
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert closed.returncode == 0, closed.stderr


def test_the_command_does_not_load_pandas_or_numpy(tmp_path: Path, mock_server) -> None:
    """pyarrow imports numpy at its import and pandas (both installed with the test extras) on
    its first conversion, only to look for DataFrames: ~0.35 s and ~50 MB per command. The
    command's process keeps them out and still reads, journals and writes everything. A job
    without images or metrics does not import Pillow or prometheus_client either, nor rich
    without a live display (stderr is no terminal here). The HTML report's matplotlib still
    gets numpy (pyarrow is the one kept from it)."""
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(30))
    job = write_job(tmp_path, srv.url, keep_columns=["text"])
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('loaded:', [m for m in ('pandas', 'numpy', 'PIL', "
        "'prometheus_client', 'rich') if m in sys.modules]))\n"
        "from batcher.command import entry\n"
        "sys.argv[0] = 'batcher'\n"
        "entry()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, "run", str(job)],
        env=env_with_key(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "loaded: []" in res.stdout
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 30 and {r["status"] for r in rows} == {"ok"}
    page = tmp_path / "report.html"
    report = subprocess.run(
        [sys.executable, "-m", "batcher", "report", str(job), "--html", str(page)],
        env=env_with_key(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert page.stat().st_size > 10_000 and b"<svg" in page.read_bytes()
