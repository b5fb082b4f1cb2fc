"""A `RunOutcome` rendered for people (text) and machines (one JSON object).

The engine returns data; this is the CLI's way of saying it. The figures come from
`progress.render_summary` (counts, tokens, rates); the closing line says what happened and
what to do next.
"""

from __future__ import annotations

import shlex
from typing import Any

from batcher.outcome import RunOutcome, StopReason
from batcher.pricing import format_usd
from batcher.progress import render_summary
from batcher.stats import RunStats

RERUN = "run the same command again to resume"


def plural(n: int, word: str, many: str | None = None) -> str:
    """ "1 row", "2 rows", "1,000 rows" (`many` for an irregular plural)."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def saved_rows(outcome: RunOutcome) -> str:
    """ "7 of 10 rows are saved", in agreement for one row."""
    saved, total = outcome.saved_rows, outcome.stats.total_rows
    return f"{saved} of {plural(total, 'row')} {'is' if saved == 1 else 'are'} saved"


def closing_message(outcome: RunOutcome) -> str:
    """What happened, in one or two lines, and the next step."""
    saved = f"{saved_rows(outcome)} in {outcome.journal}."
    reason = outcome.reason
    if reason is StopReason.COMPLETED:
        where = outcome.published_to or outcome.output
        if outcome.output_kept:
            return f"the input has no rows: {where}, an earlier run's output, is left as it was"
        message = f"wrote {plural(outcome.rows_written, 'row')} to {where}"
        if outcome.error_rows:
            errors = outcome.error_rows
            return message + (
                f"; {plural(errors, 'row')} {'is an error' if errors == 1 else 'are errors'} "
                f"(`batcher inspect {shlex.quote(str(outcome.output))}` groups them; send just "
                f"{'that one' if errors == 1 else 'those'} again with --retry-errors)"
            )
        return message + f" (`batcher inspect {shlex.quote(str(outcome.output))}` summarises it)"
    if reason in (StopReason.INTERRUPTED, StopReason.TERMINATED):
        return f"interrupted. {saved} To continue, {RERUN}."
    if reason is StopReason.BUDGET:
        return f"{outcome.error}.\n{saved}"
    if reason is StopReason.OUTAGE:
        return f"{outcome.error}\n{saved} Once the service answers again, {RERUN}."
    return f"{outcome.error}\n{saved} Fix the problem, then {RERUN}."


def money_lines(stats: RunStats) -> list[str]:
    """Where the answers came from and what the job spent (against its cap)."""
    lines = []
    if stats.cache_hits or stats.dedupe_hits:
        lines.append(
            f"reused:   {plural(stats.cache_hits, 'row')} answered from the cache, "
            f"{stats.dedupe_hits:,} shared an identical request, "
            f"saving {format_usd(stats.saved_usd)}"
        )
    spent = f"spent:    {format_usd(stats.spent_usd)} this run"
    if stats.spent_before_usd:
        spent += f", {format_usd(stats.spent_before_usd + stats.spent_usd)} for the whole job"
    if stats.cap_usd is not None:
        spent += f" (max_cost_usd {format_usd(stats.cap_usd)})"
    lines.append(spent)
    return lines


def render_outcome(outcome: RunOutcome) -> str:
    lines = [render_summary(outcome.stats), *money_lines(outcome.stats), closing_message(outcome)]
    return "\n".join(lines)


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
