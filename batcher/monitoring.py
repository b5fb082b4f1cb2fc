"""Everything that watches a run from outside, behind one object the engine holds.

    async with RunMonitoring(job, stats, output, restart=opts.restart) as monitor:
        ...                                   # the run; per answer:
        monitor.observe_latency(result.latency_s)
        outcome = ...
        await monitor.finish(outcome)         # textfile, HTML report, webhook

While the run goes: the run history (always) and `/metrics` (metrics.prometheus_port). When it
ends, finished or stopped: the history's end line, the Prometheus textfile (metrics.textfile),
the HTML report (report.html), then the webhook (notify.webhook), which is told where the
report is. None of these can change the run's outcome or exit code: their failures are logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from batcher.errors import BatcherError
from batcher.history import DEFAULT_INTERVAL_S, HistoryRecorder, history_path, spend_usd
from batcher.outcome import RunOutcome
from batcher.spec import Job
from batcher.stats import RunStats

if TYPE_CHECKING:  # prometheus_client is imported only by a job that asks for metrics
    from batcher.metrics import MetricsServer

log = logging.getLogger("batcher")


def _job_path(job: Job, path: Path) -> Path:
    """Paths in the job file are relative to it, like input and output."""
    return path if path.is_absolute() else job.job_dir / path


def job_name(output: Path) -> str:
    """The `batcher_job` label and the webhook's `job`: the output's name without suffix."""
    return output.name.split(".")[0] if output.name else "batcher"


class RunMonitoring:
    def __init__(
        self,
        job: Job,
        stats: RunStats,
        output: Path,
        *,
        restart: bool = False,
        run_id: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        rows_done_before: int | None = None,
    ) -> None:
        """`rows_done_before`: the rows the journal answers as the run starts (for the history's
        start line; the run counts the exact figure only as it reads the input)."""
        self.job, self.stats, self.output = job, stats, output
        self.name = job_name(output)
        self.history = HistoryRecorder(
            history_path(output),
            stats,
            run_id,
            interval_s,
            prices=job.prices,
            restart=restart,
            rows_done_before=rows_done_before,
        )
        self.metrics: MetricsServer | None = None
        if job.metrics.prometheus_port is not None:
            from batcher.metrics import MetricsServer

            self.metrics = MetricsServer(
                stats,
                port=job.metrics.prometheus_port,
                host=job.metrics.host,
                job_name=self.name,
                prices=job.prices,
            )
        self.report_path: Path | None = None
        self._finished = False

    @property
    def run_id(self) -> str:
        return self.history.run_id

    def observe_latency(self, seconds: float | None) -> None:
        self.history.observe_latency(seconds)

    async def __aenter__(self) -> RunMonitoring:
        if self.metrics is not None:
            self.metrics.start()  # a port in use is a JobSpecError: before anything is sent
        try:
            await self.history.__aenter__()
        except OSError as exc:
            log.warning("run history %s: cannot open (%s)", self.history.path, exc)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Without `finish` (a crash, a bug): the history still gets its end line."""
        await self.history.__aexit__(exc_type, exc, tb)
        if self.metrics is not None:
            self.metrics.stop()

    async def finish(self, outcome: RunOutcome) -> None:
        """The end of a run, finished or stopped. Never raises for its own failures."""
        if self._finished:
            return
        self._finished = True
        self.history.end_reason = str(outcome.reason)
        await self.history.__aexit__(None, None, None)  # the end line, before the report reads
        if self.metrics is not None:
            self.metrics.stop()
        spend = spend_usd(self.stats, self.job.prices)
        if self.job.metrics.textfile is not None:
            from batcher.metrics import write_textfile

            try:
                write_textfile(
                    _job_path(self.job, self.job.metrics.textfile),
                    self.stats,
                    job_name=self.name,
                    prices=self.job.prices,
                    exit_code=outcome.exit_code,
                    ended_at=time.time(),
                )
            except BatcherError as exc:
                log.warning("%s", exc)
        if self.job.report.html is not None:
            self.report_path = await asyncio.to_thread(self._write_report)
        if self.job.notify.webhook is not None:
            from batcher.notify import notify_run_end

            await notify_run_end(
                self.job.notify.webhook,
                outcome,
                job=self.name,
                timeout_s=self.job.notify.timeout_s,
                spend_usd=spend,
                report=None if self.report_path is None else str(self.report_path),
                run_id=self.run_id,
            )

    def _write_report(self) -> Path | None:
        assert self.job.report.html is not None
        from batcher.report import build_report, write_html

        path = _job_path(self.job, self.job.report.html)
        try:
            return write_html(build_report(self.output, self.job.prices), path)
        except BatcherError as exc:
            log.warning("report.html: %s", exc)
            return None
