"""A `RunOutcome` rendered for people (text) and machines (one JSON object).

The engine returns data; this is the CLI's way of saying it. The figures come from
`progress.render_summary` (counts, tokens, rates); the closing line says what happened and
what to do next.
"""

from __future__ import annotations

from typing import Any

from batcher.outcome import RunOutcome, StopReason
from batcher.progress import render_summary

RERUN = "run the same command again to resume"


def closing_message(outcome: RunOutcome) -> str:
    """What happened, in one or two lines, and the next step."""
    saved = (
        f"{outcome.saved_rows} of {outcome.stats.total_rows} rows are saved in {outcome.journal}."
    )
    reason = outcome.reason
    if reason is StopReason.COMPLETED:
        message = f"wrote {outcome.rows_written} rows to {outcome.output}"
        if outcome.error_rows:
            return message + (
                f"; {outcome.error_rows} rows are errors (`batcher inspect {outcome.output}` "
                "groups them; send just those again with --retry-errors)"
            )
        return message + f" (`batcher inspect {outcome.output}` summarises it)"
    if reason in (StopReason.INTERRUPTED, StopReason.TERMINATED):
        return f"interrupted. {saved} To continue, {RERUN}."
    if reason is StopReason.OUTAGE:
        return f"{outcome.error}\n{saved} Once the service answers again, {RERUN}."
    return f"{outcome.error}\n{saved} Fix the problem, then {RERUN}."


def render_outcome(outcome: RunOutcome) -> str:
    return f"{render_summary(outcome.stats)}\n{closing_message(outcome)}"


def outcome_record(outcome: RunOutcome) -> dict[str, Any]:
    """The summary as one JSON-able object (`--log-format json`, webhooks, the Python API)."""
    return {
        "event": "summary",
        "exit_code": int(outcome.exit_code),
        "outcome": str(outcome.reason),
        "output": str(outcome.output),
        "error": None if outcome.error is None else str(outcome.error),
        **outcome.stats.as_dict(),
    }
