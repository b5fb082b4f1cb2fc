"""What a run returns: why it ended, what it did, where its results are. Data, never text.

The CLI renders it (`batcher.summary`), the Python API turns it into a return value or a typed
exception; neither reaches into the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from batcher.errors import BatcherError, ExitCode
from batcher.stats import RunStats


class StopReason(StrEnum):
    COMPLETED = "completed"  # every row has a result; the output is written
    INTERRUPTED = "interrupted"  # SIGINT
    TERMINATED = "terminated"  # SIGTERM
    FATAL = "fatal"  # a BatcherError stopped it: key rejected, disk full, limiter lost, ...
    OUTAGE = "outage"  # the circuit breaker saw the service fail every request
    BUDGET = "budget"  # max_cost_usd reached


@dataclass(frozen=True, slots=True)
class RunOutcome:
    exit_code: ExitCode
    reason: StopReason
    stats: RunStats
    output: Path
    journal: Path
    rows_written: int = 0  # rows in the output (COMPLETED only)
    error_rows: int = 0  # of which errors
    error: BatcherError | None = None  # what stopped the run (FATAL, OUTAGE, BUDGET)
    published_to: str | None = None  # the object storage URL the output was published to
    output_kept: bool = False  # the input had no rows: an earlier run's output was left as it was

    @property
    def completed(self) -> bool:
        return self.reason is StopReason.COMPLETED

    @property
    def saved_rows(self) -> int:
        """Rows with a result in the journal: earlier runs' and this one's."""
        return self.stats.done_before + self.stats.done
