"""The end-of-run webhook: a real aiohttp receiver on 127.0.0.1; failures never raise."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batcher.errors import APIError, ExitCode
from batcher.notify import notify_run_end, summary_payload
from batcher.outcome import RunOutcome, StopReason
from batcher.stats import RunStats

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def outcome(reason: StopReason = StopReason.COMPLETED) -> RunOutcome:
    t = [0.0]
    stats = RunStats(clock=lambda: t[0], total_rows=100, done_before=10)
    stats.ok, stats.error, stats.requests_sent = 85, 5, 97
    t[0] = 125.0
    stats.finished = 125.0
    stopped = reason is not StopReason.COMPLETED
    return RunOutcome(
        exit_code=ExitCode.FATAL if stopped else ExitCode.ROW_ERRORS,
        reason=reason,
        stats=stats,
        output=Path("/data/out/labels.parquet"),
        journal=Path("/data/out/labels.parquet.journal"),
        rows_written=0 if stopped else 100,
        error_rows=0 if stopped else 5,
        error=APIError("the service failed") if stopped else None,
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[[Handler | None], Awaitable[str]]]:
    """Start a local webhook receiver; the default handler records the JSON it gets."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler | None = None) -> str:
        app = web.Application()
        got: list[Any] = []

        async def record(request: web.Request) -> web.Response:
            got.append(await request.json())
            return web.json_response({"ok": True})

        app.router.add_post("/hook/T000/SECRET", handler or record)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        start.got = got  # type: ignore[attr-defined]
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/hook/T000/SECRET"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_webhook_gets_the_summary(receiver: Any) -> None:
    url = await receiver()
    ok = await notify_run_end(
        url,
        outcome(),
        job="labels",
        spend_usd=0.0123,
        report="/data/out/report.html",
        run_id="abc",
    )
    assert ok
    [got] = receiver.got
    assert got["job"] == "labels" and got["run_id"] == "abc"
    assert got["outcome"] == "completed" and got["exit_code"] == 3 and got["completed"]
    assert got["rows_ok"] == 85 and got["rows_error"] == 5 and got["rows_saved"] == 100
    assert got["spend_usd"] == 0.0123 and got["duration_s"] == 125.0
    assert got["report"] == "/data/out/report.html"
    # Slack-compatible: a `text` saying it in one line.
    assert got["text"].startswith("batcher job labels finished (exit 3): 85 rows ok, 5 errors")
    assert "$0.0123" in got["text"] and "2m05s" in got["text"]


def test_a_stop_says_so() -> None:
    payload = summary_payload(outcome(StopReason.OUTAGE), job="labels")
    assert payload["outcome"] == "outage" and not payload["completed"]
    assert payload["exit_code"] == 4 and payload["error"] == "the service failed"
    assert "stopped (service outage)" in payload["text"]


async def test_receiver_down_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed at once: nothing listens there
    url = f"http://127.0.0.1:{port}/hook/T000/SECRET"
    with caplog.at_level(logging.WARNING, logger="batcher"):
        assert await notify_run_end(url, outcome(), job="labels", timeout_s=5) is False
    assert "webhook at 127.0.0.1 failed" in caplog.text
    assert "SECRET" not in caplog.text  # a Slack URL's path is its secret


async def test_failing_and_slow_receivers_are_logged(
    receiver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500)

    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()  # never answers: only our timeout ends the POST
        return web.Response()

    with caplog.at_level(logging.WARNING, logger="batcher"):
        assert await notify_run_end(await receiver(fail), outcome(), job="j") is False
        assert "answered HTTP 500" in caplog.text
        slow = await receiver(hang)
        assert await notify_run_end(slow, outcome(), job="j", timeout_s=0.2) is False
        assert "did not answer within 0.2 s" in caplog.text
    never.set()
    assert "SECRET" not in caplog.text
