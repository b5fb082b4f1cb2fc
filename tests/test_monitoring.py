"""RunMonitoring around a real run (engine in this process, real HTTP to the bundled server):
history, textfile, HTML report and webhook at the end; a webhook that is down changes nothing."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import API_KEY, review_rows, write_job, write_jsonl
from prometheus_client.parser import text_string_to_metric_families

from batcher.engine import Engine, RunOptions
from batcher.errors import ExitCode
from batcher.history import history_path, read_history
from batcher.monitoring import RunMonitoring, job_name
from batcher.spec import load_job

LIMITS = {"gpt-4o-mini": {"rpm": 60_000, "tpm": 10_000_000}}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def monitored_run(job_file: Path) -> tuple[Any, RunMonitoring]:
    job = load_job(job_file)
    engine = Engine(job, RunOptions(progress="quiet", api_key=API_KEY))
    outcome = await engine.run()  # the engine watches itself: history, metrics, webhook
    assert engine._monitor is not None
    return outcome, engine._monitor


def test_job_name() -> None:
    assert job_name(Path("/x/labels.parquet")) == "labels"


async def test_everything_at_the_end_and_a_down_webhook_changes_nothing(
    tmp_path: Path, mock_server, caplog: pytest.LogCaptureFixture
) -> None:
    srv = mock_server(rpm=None, tpm=None)
    write_jsonl(tmp_path / "input.jsonl", review_rows(12))
    job = write_job(
        tmp_path,
        srv.url,
        limits=LIMITS,
        metrics={"prometheus_port": 0, "textfile": "metrics/labels.prom"},
        report={"html": "out/report.html"},
        notify={"webhook": f"http://127.0.0.1:{closed_port()}/hook/SECRET", "timeout_s": 2},
    )
    with caplog.at_level(logging.WARNING, logger="batcher"):
        outcome, monitor = await monitored_run(job)
    assert outcome.exit_code == ExitCode.OK  # the webhook failed; the run did not
    assert "notify: webhook at 127.0.0.1 failed" in caplog.text and "SECRET" not in caplog.text

    output = tmp_path / "out/result.parquet"
    [run] = read_history(history_path(output)).runs
    assert run.run_id == monitor.run_id
    assert run.end is not None and run.end["reason"] == "completed"
    assert run.end["rows_total"] == 12  # the start line has it when the engine opens it
    assert sum(s["ok"] for s in run.samples) == 12

    text = (tmp_path / "metrics/labels.prom").read_text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = (("batcher_job", "result"), ("status", "ok"))
    assert samples[("batcher_rows_total", key)] == 12
    assert samples[("batcher_run_exit_code", (("batcher_job", "result"),))] == 0

    assert monitor.report_path == tmp_path / "out/report.html"
    assert '<figure class="chart" id="chart-rates">' in monitor.report_path.read_text()


async def test_webhook_hears_a_stopped_run_with_the_report_path(
    tmp_path: Path, mock_server
) -> None:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        srv = mock_server(rpm=None, tpm=None)
        rows = review_rows(30, marker={i: "[[fail-500]]" for i in range(15, 30)})
        write_jsonl(tmp_path / "input.jsonl", rows)
        job = write_job(
            tmp_path,
            srv.url,
            limits=LIMITS,
            concurrency=2,
            report={"html": "report.html"},
            notify={"webhook": f"http://127.0.0.1:{port}/hook"},
        )
        outcome, monitor = await monitored_run(job)
    finally:
        await runner.cleanup()
    assert outcome.exit_code == ExitCode.FATAL  # the circuit breaker saw an outage
    [payload] = got
    assert payload["outcome"] == "outage" and payload["exit_code"] == 4
    assert payload["rows_ok"] == outcome.stats.ok and 0 < payload["rows_ok"] < 30
    assert payload["report"] == str(tmp_path / "report.html")
    assert payload["run_id"] == monitor.run_id
    assert "stopped (service outage)" in payload["text"]
    history = read_history(history_path(tmp_path / "out/result.parquet"))
    assert history.runs[-1].end is not None and history.runs[-1].end["reason"] == "outage"
    assert json.loads(json.dumps(payload)) == payload
