"""batcher: a rate-limit-aware batch engine for OpenAI-compatible chat-completion APIs.

    import batcher
    labeled = batcher.run("job.yaml", data=df)   # the rows of df, in order, with answers

`run` / `arun` are imported on first use, so `batcher --help` does not load the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batcher.errors import (
    APIError,
    AuthenticationError,
    BatcherError,
    BudgetReached,
    ExitCode,
    InputDataError,
    JobLocked,
    JobSpecError,
    JournalError,
    LimiterError,
    RateLimited,
    StorageError,
)

if TYPE_CHECKING:
    from batcher.api import RunInterrupted, arun, run
    from batcher.outcome import RunOutcome, StopReason
    from batcher.spec import Job, load_job

__version__ = "0.1.0"
__all__ = [
    "APIError",
    "AuthenticationError",
    "BatcherError",
    "BudgetReached",
    "ExitCode",
    "InputDataError",
    "Job",
    "JobLocked",
    "JobSpecError",
    "JournalError",
    "LimiterError",
    "RateLimited",
    "RunInterrupted",
    "RunOutcome",
    "StopReason",
    "StorageError",
    "__version__",
    "arun",
    "load_job",
    "run",
]

_LAZY = {
    "run": "batcher.api",
    "arun": "batcher.api",
    "RunInterrupted": "batcher.api",
    "RunOutcome": "batcher.outcome",
    "StopReason": "batcher.outcome",
    "Job": "batcher.spec",
    "load_job": "batcher.spec",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batcher' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
