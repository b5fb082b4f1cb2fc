"""How a run stops early, whatever the cause: one way for a signal, a rejected key, a full disk,
the budget or an outage.

Nothing new is admitted; the tasks with a request in flight (`busy`) finish within the grace
period and hand their answers to the journal, which the engine drains; then everything is
cancelled. A second signal, or a stop on top of another stop, cancels at once. The engine
reads `stopping` before each admission and `reason` / `error` for its outcome.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from batcher.errors import BatcherError, ExitCode
from batcher.outcome import StopReason

log = logging.getLogger("batcher")


class RunStop:
    def __init__(self, grace_period_s: float) -> None:
        self.grace_period_s = grace_period_s
        self.stopping = False
        self.reason: StopReason | None = None  # why the run stops early; None: it completes
        self.error: BatcherError | None = None
        self.busy: set[asyncio.Task[Any]] = set()  # a request in flight
        self.workers: list[asyncio.Task[None]] = []
        self.producer: asyncio.Task[None] | None = None

    def on_signal(self, signum: int) -> None:
        """First signal: finish what is in flight (grace period). Second: stop at once."""
        if self.reason in (StopReason.INTERRUPTED, StopReason.TERMINATED):
            log.warning("stopping now")
            self.cancel_all()
            return
        reason = StopReason.INTERRUPTED if signum == signal.SIGINT else StopReason.TERMINATED
        if self.stopping:  # already stopping for another reason: a signal means "now"
            self.cancel_all()
            return
        self.stop(reason)

    def stop(self, reason: StopReason, error: BatcherError | None = None) -> None:
        """Admit nothing more; requests in flight finish and persist within the grace period."""
        if self.stopping:
            return
        self.stopping = True
        self.reason, self.error = reason, error
        if error is not None:
            log.error("stopping: %s", error)
        log.warning(
            "stopping: no new requests; waiting up to %g s for %d in flight%s",
            self.grace_period_s,
            len(self.busy),
            " (press Ctrl-C again to stop at once; answered rows are kept either way)"
            if error is None
            else "",
        )
        if self.producer is not None:
            self.producer.cancel()
        for task in self.workers:
            if task not in self.busy and task is not asyncio.current_task():
                task.cancel()
        asyncio.get_running_loop().call_later(self.grace_period_s, self.cancel_all)

    def failed(self, error: BatcherError) -> None:
        """The run could not go on before or after its tasks ran (setup, the last drain): a
        fatal stop with nothing left to cancel. An earlier stop's reason stands."""
        self.stopping = True
        if self.reason is None or self.error is None:
            self.reason, self.error = StopReason.FATAL, error

    def cancel_all(self) -> None:
        for task in [*self.workers, self.producer]:
            if task is not None:
                task.cancel()

    async def drive(self) -> None:
        """Run producer and workers to the end; a bug (not a BatcherError) stops everything."""
        tasks: set[asyncio.Task[None]] = {*self.workers}
        assert self.producer is not None
        tasks.add(self.producer)
        while tasks:
            try:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            except asyncio.CancelledError:
                # Cancelled from outside (a notebook cell interrupted): as on SIGINT, what is
                # in flight finishes and is journaled within the grace period, then it ends.
                self.stop(StopReason.INTERRUPTED)
                await asyncio.wait(tasks, timeout=self.grace_period_s)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            for task in done:
                if task.cancelled():
                    continue
                exc = task.exception()
                if isinstance(exc, BatcherError):  # from the producer: reading, journal
                    self.stop(StopReason.FATAL, exc)
                elif exc is not None:
                    self.stopping = True
                    for other in tasks:
                        other.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise exc

    def exit_code(self, reason: StopReason, error_rows: int = 0) -> ExitCode:
        if reason is StopReason.COMPLETED:
            return ExitCode.ROW_ERRORS if error_rows else ExitCode.OK
        if reason is StopReason.INTERRUPTED:
            return ExitCode.INTERRUPTED
        if reason is StopReason.TERMINATED:
            return ExitCode.TERMINATED
        return self.error.exit_code if self.error is not None else ExitCode.FATAL
