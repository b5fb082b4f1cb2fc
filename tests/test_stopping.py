"""RunStop: how a run stops early (pure asyncio, and one engine run against the bundled server;
no test waits for the grace period)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from helpers import API_KEY, review_rows, write_job, write_jsonl

from batcher.engine import Engine, RunOptions
from batcher.errors import BudgetReached, ExitCode
from batcher.outcome import StopReason
from batcher.spec import load_job
from batcher.stopping import RunStop


async def _forever() -> None:
    await asyncio.Event().wait()


async def _tasks(halt: RunStop) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
    idle, busy = asyncio.create_task(_forever()), asyncio.create_task(_forever())
    halt.workers = [idle, busy]
    halt.producer = asyncio.create_task(_forever())
    halt.busy.add(busy)
    await asyncio.sleep(0)  # all three started
    return idle, busy


async def test_a_stop_cancels_idle_tasks_and_lets_busy_ones_finish() -> None:
    halt = RunStop(grace_period_s=3600)
    idle, busy = await _tasks(halt)
    halt.stop(StopReason.BUDGET, BudgetReached("cap reached"))
    await asyncio.sleep(0)
    assert idle.cancelled() and halt.producer is not None and halt.producer.cancelled()
    assert not busy.done()  # a request in flight: it finishes and is journaled
    assert halt.stopping and halt.reason is StopReason.BUDGET
    halt.stop(StopReason.FATAL)  # a later stop does not change why the run stopped
    assert halt.reason is StopReason.BUDGET
    assert halt.exit_code(StopReason.BUDGET) == BudgetReached("").exit_code
    halt.on_signal(signal.SIGINT)  # a signal on top of a stop: now
    await asyncio.sleep(0)
    assert busy.cancelled()


async def test_second_signal_stops_at_once() -> None:
    halt = RunStop(grace_period_s=3600)
    _, busy = await _tasks(halt)
    halt.on_signal(signal.SIGTERM)
    await asyncio.sleep(0)
    assert halt.reason is StopReason.TERMINATED and not busy.done()
    halt.on_signal(signal.SIGTERM)
    await asyncio.sleep(0)
    assert busy.cancelled()
    assert halt.exit_code(StopReason.TERMINATED) == ExitCode.TERMINATED


def test_failed_keeps_an_earlier_reason_and_exit_codes() -> None:
    halt = RunStop(grace_period_s=1)
    assert halt.exit_code(StopReason.COMPLETED) == ExitCode.OK
    assert halt.exit_code(StopReason.COMPLETED, error_rows=2) == ExitCode.ROW_ERRORS
    assert halt.exit_code(StopReason.INTERRUPTED) == ExitCode.INTERRUPTED
    halt.failed(BudgetReached("cap"))
    assert halt.stopping and halt.reason is StopReason.FATAL
    halt.failed(BudgetReached("another"))
    assert str(halt.error) == "cap"


async def test_drive_reraises_a_bug_and_cancels_the_rest() -> None:
    halt = RunStop(grace_period_s=3600)

    async def bug() -> None:
        raise RuntimeError("a bug")

    other = asyncio.create_task(_forever())
    halt.workers = [other]
    halt.producer = asyncio.create_task(bug())
    with pytest.raises(RuntimeError, match="a bug"):
        await halt.drive()
    assert other.cancelled() and halt.stopping


async def test_a_stop_waits_for_requests_in_flight_not_for_idle_workers(
    tmp_path: Path, mock_server
) -> None:
    """A worker is busy from its send until the journal has its answer, no longer: stopped
    after a few answers, with nothing or little in flight, the run ends at once, not after the
    grace period (an hour here). Keyed to answers counted, not to time."""
    srv = mock_server(rpm=None, tpm=None)
    write_jsonl(tmp_path / "input.jsonl", review_rows(40))
    job_file = write_job(
        tmp_path,
        srv.url,
        grace_period_s=3600,
        limits={"gpt-4o-mini": {"rpm": 240, "tpm": 10_000_000}},  # 4 a second: 10 s in all
    )
    engine = Engine(
        load_job(job_file), RunOptions(progress="quiet", api_key=API_KEY, handle_signals=False)
    )
    run = asyncio.ensure_future(engine.run())
    while engine.stats.ok < 3:
        assert not run.done()
        await asyncio.sleep(0.01)
    engine.request_stop()
    outcome = await asyncio.wait_for(run, timeout=60)
    assert outcome.reason is StopReason.INTERRUPTED
    assert 3 <= outcome.stats.ok < 40 and not engine._halt.busy
