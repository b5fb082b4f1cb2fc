"""Hostile state and config (issue 11, items 5, 8, 10, 11): each case refused with a message
that names the key, the row or the line, or skipped with a warning; never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batcher.errors import InputDataError, JobSpecError
from batcher.inspect_output import inspect_path, render_inspection
from batcher.journal import journal_path, open_journal, read_state
from batcher.readers import open_input
from batcher.records import Result
from batcher.spec import load_job
from batcher.status import job_status, render_status


def _job(tmp_path: Path, text: str | None = None, **fields: Any) -> Path:
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "x"}\n', encoding="utf-8")
    raw = {"input": "in.jsonl", "output": "out.parquet", "model": "gpt-4o-mini", **fields}
    path = tmp_path / "job.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw), encoding="utf-8")
    return path


# ---- item 8: config errors found before the first request ----


@pytest.mark.parametrize("column", ["id", "content", "model", "status", "error", "parsed"])
def test_keep_columns_naming_a_result_column_is_refused(tmp_path: Path, column: str) -> None:
    with pytest.raises(JobSpecError, match=rf"keep_columns: '{column}' would overwrite"):
        load_job(_job(tmp_path, keep_columns=["text", column]))


def test_keep_columns_listed_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="keep_columns: 'text' listed twice"):
        load_job(_job(tmp_path, keep_columns=["text", "text"]))


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://user:sk-SECRET-INURL@127.0.0.1:8000/v1", "must not carry credentials"),
        ("http://127.0.0.1:notaport/v1", "not a usable URL"),
        ("ftp://127.0.0.1/v1", "must start with https://"),
    ],
)
def test_a_base_url_with_credentials_or_no_usable_port_is_refused_unprinted(
    tmp_path: Path, url: str, said: str
) -> None:
    """user:password@ in base_url was logged with the URL, then a ValueError traceback."""
    with pytest.raises(JobSpecError, match=said) as caught:
        load_job(_job(tmp_path, endpoint={"base_url": url}))
    assert "SECRET" not in str(caught.value)


def test_an_input_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    """A folder of Parquet parts ended in an IsADirectoryError traceback (run and estimate)."""
    (tmp_path / "parts").mkdir()
    with pytest.raises(InputDataError, match="input is a directory"):
        open_input(load_job(_job(tmp_path, input="parts")))


def test_output_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    with pytest.raises(JobSpecError, match=r"output: .*results is a directory"):
        load_job(_job(tmp_path, output="results"))


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [-1, 0, 1.5, "100", True, None])
def test_max_tokens_must_be_a_positive_integer(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(JobSpecError, match=rf"params\.{key}: must be a whole number"):
        load_job(_job(tmp_path, model="gpt-4o", params={key: value}))


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"limits": {"gpt-4o": {"rpm": True, "tpm": 1000}}}, r"limits\.gpt-4o\.rpm"),
        ({"concurrency": True}, "concurrency"),
        ({"max_cost_usd": True}, "max_cost_usd"),
        ({"endpoint": {"timeout_s": False}}, r"endpoint\.timeout_s"),
    ],
)
def test_a_yes_or_no_where_a_number_goes_is_refused(
    tmp_path: Path, changes: dict[str, Any], where: str
) -> None:
    """YAML reads `rpm: yes` as true, which pydantic took for 1 (one request a minute)."""
    with pytest.raises(JobSpecError, match=rf"{where}: should be a number, not true or false"):
        load_job(_job(tmp_path, model="gpt-4o", **changes))


def test_a_section_left_empty_is_its_defaults(tmp_path: Path) -> None:
    """`batcher init`'s template invites commenting out a section's lines, which leaves
    `params:` empty: it was 'Input should be a valid dictionary' (found by review)."""
    text = (
        "input: in.jsonl\noutput: out.parquet\nmodel: gpt-4o-mini\n"
        "params:\nlimits:\nendpoint:\ncache:\nretry:\n"
    )
    job = load_job(_job(tmp_path, text))
    assert job.params == {} and job.limits == {}
    assert job.endpoint.timeout_s == 600.0 and job.cache.enabled and job.retry.max_attempts == 8


def test_max_tokens_in_a_batch_body_is_checked_too() -> None:
    from batcher.spec import check_params

    with pytest.raises(ValueError, match=r"body\.max_tokens: must be a whole number"):
        check_params({"max_tokens": -5}, where="body")
    check_params({"max_tokens": 5}, where="body")


def test_limits_for_a_model_the_job_does_not_use_is_refused(tmp_path: Path) -> None:
    limits = {"gpt-4o-mni": {"rpm": 10, "tpm": 1000}}
    with pytest.raises(JobSpecError, match=r"limits: 'gpt-4o-mni' is not a model this job"):
        load_job(_job(tmp_path, messages=[{"role": "user", "content": "{text}"}], limits=limits))
    ok = load_job(
        _job(
            tmp_path,
            messages=[{"role": "user", "content": "{text}"}],
            limits={"gpt-4o-mini": {"rpm": 10, "tpm": 1000}},
        )
    )
    assert ok.limit_for("gpt-4o-mini").rpm == 10


def test_limits_of_a_batch_job_are_checked_against_the_models_its_bodies_name(
    tmp_path: Path,
) -> None:
    job = load_job(
        _job(tmp_path, input_format="batch", limits={"gpt-4o": {"rpm": 5}, "o3-mini": {"rpm": 5}})
    )
    job.check_limit_models({"gpt-4o", "o3-mini", "gpt-4o-mini"})
    with pytest.raises(JobSpecError, match=r"limits: 'o3-mini' is not a model .*name: gpt-4o\)"):
        job.check_limit_models({"gpt-4o"})


def test_duplicate_keys_are_refused_with_key_and_lines(tmp_path: Path) -> None:
    text = (
        "input: in.jsonl\noutput: out.parquet\nmodel: gpt-4o\n"
        "params:\n  temperature: 0\n  temperature: 1\n"
    )
    with pytest.raises(
        JobSpecError, match=r"job.yaml:6: key 'temperature' is given twice .*line 5"
    ):
        load_job(_job(tmp_path, text))
    text = "input: in.jsonl\noutput: out.parquet\nmodel: gpt-4o\nmodel: gpt-4o-mini\n"
    with pytest.raises(JobSpecError, match=r"job.yaml:4: key 'model' is given twice"):
        load_job(_job(tmp_path, text))


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = (
        "defaults: &d {rpm: 10, tpm: 100}\n"
        "input: in.jsonl\noutput: out.parquet\nmodel: gpt-4o-mini\n"
        "limits:\n  gpt-4o-mini:\n    <<: *d\n    rpm: 20\n"
    )
    # `defaults` is not a job key; the merge itself is fine (the error names the unknown key).
    with pytest.raises(JobSpecError, match="defaults: unknown key"):
        load_job(_job(tmp_path, text))


@pytest.mark.parametrize("bad", ["", "a\x00b"])
def test_unusable_paths_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(JobSpecError, match="output: must be a file path"):
        load_job(_job(tmp_path, output=bad))


def test_infinite_timeouts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match=r"endpoint\.timeout_s"):
        load_job(_job(tmp_path, endpoint={"timeout_s": float("inf")}))


# ---- item 10: input ----


def _rows(tmp_path: Path, lines: list[str] | None = None, **fields: Any) -> list[Any]:
    job = load_job(_job(tmp_path, **fields))
    if lines is not None:
        job.input.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return [row for batch in open_input(job).iter_batches() for row in batch]


def test_empty_inputs_yield_no_rows(tmp_path: Path) -> None:
    assert _rows(tmp_path, []) == []
    assert _rows(tmp_path, ["", "  "], id_column="id") == []
    table = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    pq.write_table(table, tmp_path / "empty.parquet")
    assert _rows(tmp_path, input="empty.parquet", id_column="id") == []


def test_float_ids_are_refused_naming_row_and_rule(tmp_path: Path) -> None:
    lines = ['{"id": "a", "text": "x"}', '{"id": 2.0, "text": "y"}']
    with pytest.raises(InputDataError, match=r"in\.jsonl:2: id column 'id' holds the number 2\.0"):
        _rows(tmp_path, lines, id_column="id")
    pq.write_table(pa.table({"id": [1.0, 2.5], "text": ["x", "y"]}), tmp_path / "f.parquet")
    with pytest.raises(InputDataError, match=r"row 1: .*ids must be strings or integers"):
        _rows(tmp_path, input="f.parquet", id_column="id")
    with pytest.raises(InputDataError, match="ids must be strings or integers"):
        _rows(tmp_path, ['{"id": true, "text": "x"}'], id_column="id")
    rows = _rows(tmp_path, ['{"id": 7, "text": "x"}'], id_column="id")
    assert [r.id for r in rows] == ["7"]


def test_made_up_ids_of_skipped_lines_cannot_clash_with_real_ids(tmp_path: Path) -> None:
    lines = ['{"id": "a", "text": "x"}', "not json", '{"id": "<line 2>", "text": "y"}']
    rows = _rows(tmp_path, lines, id_column="id", on_bad_row="skip")
    assert [r.id for r in rows] == ["a", "<line 2>", "<line 3>"]
    assert "not valid JSON" in (rows[1].error or "")
    assert "has the form batcher gives to unreadable lines" in (rows[2].error or "")
    # Without an id column the ids are positions; a bad line keeps its own position.
    rows = _rows(tmp_path, ['{"text": "x"}', "[1]", '{"text": "z"}'], on_bad_row="skip")
    assert [r.id for r in rows] == ["0", "1", "2"] and rows[1].error


def test_skipped_batch_line_keeps_its_custom_id(tmp_path: Path) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    lines = [
        json.dumps(
            {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": body}
        ),
        json.dumps(
            {"custom_id": "r2", "method": "GET", "url": "/v1/chat/completions", "body": body}
        ),
        json.dumps({"custom_id": "r3", "body": "not an object"}),
        json.dumps({"body": body}),
    ]
    rows = _rows(tmp_path, lines, input_format="batch", on_bad_row="skip")
    assert [r.id for r in rows] == ["r1", "r2", "r3", "<line 4>"]
    assert [r.error is None for r in rows] == [True, False, False, False]
    assert "GET" in (rows[1].error or "") and "custom_id" in (rows[3].error or "")


# ---- item 11: the API key, and JSON logs ----

KEY = "sk-live-1234567890abcdef"


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (KEY[:10] + "\n" + KEY[10:], "line break"),
        (KEY[:10] + "\x1b" + KEY[10:], "control character (U+001B)"),
        (KEY[:10] + "\x00" + KEY[10:], "control character (U+0000)"),
        (KEY[:10] + " " + KEY[10:], "a space"),
        (KEY[:10] + "\u2019" + KEY[10:], "non-ASCII"),
        ("Bearer " + KEY, "starts with 'Bearer '"),
    ],
)
def test_unusable_api_keys_are_refused_without_showing_them(raw: str, said: str) -> None:
    from batcher.secrets import check_api_key

    with pytest.raises(JobSpecError, match=re.escape(said)) as info:
        check_api_key(raw, source="the environment variable LANGDOCK_API_KEY")
    message = str(info.value)
    assert "LANGDOCK_API_KEY" in message
    assert KEY[:6] not in message and KEY[-6:] not in message


def test_api_key_surrounding_whitespace_is_dropped_and_a_missing_key_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batcher.secrets import check_api_key, resolve_api_key

    job = load_job(_job(tmp_path))
    monkeypatch.setenv("LANGDOCK_API_KEY", f"  {KEY}\n")
    assert resolve_api_key(job) == KEY
    monkeypatch.setenv("LANGDOCK_API_KEY", f"{KEY}\n{KEY}")  # two keys pasted
    with pytest.raises(JobSpecError, match="LANGDOCK_API_KEY contains a line break") as info:
        resolve_api_key(job)
    assert KEY[:6] not in str(info.value)
    monkeypatch.delenv("LANGDOCK_API_KEY")
    with pytest.raises(JobSpecError, match="LANGDOCK_API_KEY is not set"):
        resolve_api_key(job)
    with pytest.raises(JobSpecError, match="the API key in --api-key is empty"):
        check_api_key(" \n", source="--api-key")


def test_every_stderr_line_is_json_in_json_mode() -> None:
    """Our log lines, Python warnings, other libraries' loggers, lines the CLI writes itself
    and an uncaught exception: all JSON objects on stderr."""
    code = """if True:
        import asyncio, logging, warnings
        from batcher.logs import setup_logging, stderr_error, stderr_line
        setup_logging("json")
        logging.getLogger("batcher").info("ours", extra={"rows": 3})
        warnings.warn("a library's warning", UserWarning)
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        stderr_line("closing message")
        stderr_error("the job stopped")
        raise RuntimeError("a bug")
    """
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    objs = [json.loads(line) for line in lines]  # every line parses
    assert [o["msg"] for o in objs[:5]] == [
        "ours",
        objs[1]["msg"],
        "Task exception was never retrieved",
        "closing message",
        "the job stopped",
    ]
    assert objs[0]["rows"] == 3 and "a library's warning" in objs[1]["msg"]
    assert objs[4]["level"] == "error"
    assert objs[5]["level"] == "critical" and "RuntimeError: a bug" in objs[5]["msg"]
    assert "Traceback" in objs[5]["exc"] and len(objs) == 6


def test_text_mode_cli_lines_are_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    from batcher.logs import setup_logging, stderr_error, stderr_line

    setup_logging("text")
    stderr_line("wrote 3 rows")
    stderr_error("the job stopped")
    assert capsys.readouterr().err == "wrote 3 rows\nerror: the job stopped\n"


# ---- item 5: a damaged journal, as status and inspect show it ----


async def _journal_with_damage(tmp_path: Path) -> Any:
    job = load_job(_job(tmp_path, id_column="id"))
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": x, "text": x}) + "\n" for x in "abcd"), encoding="utf-8"
    )
    journal, _ = open_journal(job.output, "fp1")
    for x in "abc":
        await journal.append(Result(x, "ok", prompt_tokens=10, completion_tokens=1, model="m"))
    journal.close()
    path = journal_path(job.output)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"t": "r", "id": "a", "sta\n'  # line 3: torn in the middle of the file
    lines.append(b'{"t": "r", "status": "ok"}\n')  # line 6: a result without an id
    lines.append(  # line 7: odd types a summary must survive
        b'{"t": "r", "id": "d", "status": "ok", "prompt_tokens": "7", "latency_s": "slow"}\n'
    )
    path.write_bytes(b"".join(lines))
    return job


async def test_status_names_skipped_journal_lines(tmp_path: Path) -> None:
    job = await _journal_with_damage(tmp_path)
    status = job_status(job)
    assert status["rows_done"] == 3 and status["rows_remaining"] == 1  # b, c, d; a again
    assert status["skipped_lines"] == 2
    text = render_status(status)
    assert "2 unreadable journal lines skipped" in text
    assert "line 3 (not JSON), line 6 (a result without an id)" in text


async def test_inspect_names_skipped_journal_lines(tmp_path: Path) -> None:
    job = await _journal_with_damage(tmp_path)
    report = inspect_path(job.output)
    assert report["source"] == "journal" and report["rows"] == 3
    assert report["skipped_lines"] == {
        "count": 2,
        "lines": [3, 6],
        "reasons": ["not JSON", "a result without an id"],
    }
    assert report["tokens"]["prompt"] == 20  # "7" is not a count
    text = render_inspection(report)
    assert "warning: 2 unreadable journal lines skipped: line 3 (not JSON)" in text


async def test_status_shows_the_lock_holder(tmp_path: Path) -> None:
    from batcher.journal import JobLock

    job = load_job(_job(tmp_path))
    lock = JobLock(job.output)
    lock.acquire()
    try:
        assert job_status(job)["running_now"] == f"pid {os.getpid()}"
    finally:
        lock.release()
    assert job_status(job)["running_now"] is None


# ---- items 6 and 7 through the real CLI ----


def test_lock_note_deleted_and_journal_deleted_mid_run(tmp_path: Path, mock_server) -> None:
    """The lock note deleted: a second run is still refused (exit 5). The journal deleted: the
    run stops with exit 4 at its next commit, the answer it held is written back, and a plain
    rerun pays only for the rows not answered."""
    from helpers import review_rows, run_batcher, start_batcher, write_job, write_jsonl

    srv = mock_server(rpm=None, tpm=None, slow_marker_s=1.0)
    rows = review_rows(6, marker=dict.fromkeys(range(6), "[[slow]]"))
    write_jsonl(tmp_path / "input.jsonl", rows)
    job = write_job(tmp_path, srv.url, concurrency=1)
    output = tmp_path / "out" / "result.parquet"
    path, note = journal_path(output), output.with_name(output.name + ".lock")
    first = start_batcher("run", job, "--quiet")
    try:
        # Key to the journal's contents: the run line is written just before the first send,
        # and the first (probe) answer takes 1 s to come back.
        deadline = 60.0
        while b'{"t": "run"' not in (path.read_bytes() if path.exists() else b""):
            assert first.poll() is None, first.communicate()
            deadline -= 0.01
            assert deadline > 0, "the first run did not start"
            time.sleep(0.01)
        assert b'"t":"r"' not in path.read_bytes()
        note.unlink()
        second = run_batcher("run", job)
        assert second.returncode == 5 and "already running" in second.stderr
        path.unlink()
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 4, err
    assert "was deleted while this run was writing it" in err
    assert f"were written back to {path}" in err
    kept = read_state(path)
    assert kept.records >= 1 and srv.stats()["requests"] == kept.records
    fast = mock_server(rpm=None, tpm=None, slow_marker_s=0.0)
    write_job(tmp_path, fast.url, concurrency=2)
    rerun = run_batcher("run", job)
    assert rerun.returncode == 0, rerun.stderr
    assert fast.stats()["requests"] == 6 - kept.records  # nothing paid twice
    assert len(pq.read_table(output)) == 6


def test_run_goes_on_past_a_corrupt_journal_line(tmp_path: Path, mock_server) -> None:
    """A damaged line in the middle: the rerun warns naming it, keeps every good record, sends
    only the row whose result was on it, and status and inspect say so."""
    from helpers import review_rows, run_batcher, write_job, write_jsonl

    srv = mock_server(rpm=None, tpm=None)
    write_jsonl(tmp_path / "input.jsonl", review_rows(6))
    job = write_job(tmp_path, srv.url)
    output = tmp_path / "out" / "result.parquet"
    assert run_batcher("run", job).returncode == 0
    assert srv.stats()["requests"] == 6
    path = journal_path(output)
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines[3].startswith(b'{"t":"r"')
    lines[3] = b"\x00" * 20 + b"\n"  # line 4: what a crash can leave in the middle
    path.write_bytes(b"".join(lines))

    status = run_batcher("status", job)
    assert status.returncode == 0, status.stderr
    assert "1 unreadable journal line skipped (line 4 (not JSON))" in status.stdout
    inspected = run_batcher("inspect", path)
    assert inspected.returncode == 0, inspected.stderr
    assert "5 rows" in inspected.stdout and "line 4 (not JSON)" in inspected.stdout

    rerun = run_batcher("run", job)
    assert rerun.returncode == 0, rerun.stderr
    assert "line 4 (not JSON)" in rerun.stderr
    # The row whose result was lost is asked again, and the response store answers it:
    # nothing is paid twice.
    assert srv.stats()["requests"] == 6
    assert "1 row answered from the cache" in rerun.stderr
    table = pq.read_table(output)
    assert sorted(table.column("id").to_pylist()) == [f"r{i}" for i in range(6)]
