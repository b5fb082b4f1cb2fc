"""`batcher status`: a partial job's state from its journal, sending nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batcher.journal import holder, is_locked, journal_path, lock_path, read_state
from batcher.pricing import format_usd
from batcher.readers import count_rows
from batcher.sharding import shard_output
from batcher.spec import Job


def _running(output: Path) -> str | None:
    """Who holds the job lock (an flock on the journal), if anyone."""
    return holder(lock_path(output)) if is_locked(output) else None


def job_status(job: Job, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    output = shard_output(job.output, *shard) if shard else job.output
    state = read_state(journal_path(output))
    total = count_rows(job, shard)
    done = len(state.ids)
    return {
        "job_output": str(output),
        "journal": str(journal_path(output)),
        "started": state.created,
        "last_run": state.last_run,
        "runs": state.runs,
        "running_now": _running(output),
        "finished": bool(state.last_end and state.last_end.get("complete")) and done == total,
        "rows_total": total,
        "rows_done": done,
        "rows_ok": state.ok_count,
        "rows_error": state.error_count,
        "rows_remaining": max(0, total - done),
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": state.completion_tokens,
        "spent_usd": round(state.spent_usd, 6),  # every run of the job, retries included
        "max_cost_usd": job.max_cost_usd,
        "output_exists": output.exists(),
        "skipped_lines": state.skipped.count,
        "skipped_detail": state.skipped.describe(),
    }


def render_status(s: dict[str, Any]) -> str:
    if s["started"] is None:
        return f"{s['job_output']}: not started ({s['rows_total']} rows to send)"
    lines = [
        f"output:     {s['job_output']}" + ("" if s["output_exists"] else " (not written yet)"),
        f"rows:       {s['rows_done']}/{s['rows_total']} done  ok={s['rows_ok']} "
        f"error={s['rows_error']} remaining={s['rows_remaining']}",
        f"tokens:     {s['prompt_tokens']} prompt + {s['completion_tokens']} completion",
        f"spent:      {format_usd(s['spent_usd'])}"
        + (f" of max_cost_usd {format_usd(s['max_cost_usd'])}" if s["max_cost_usd"] else ""),
        f"started:    {s['started']}   last run: {s['last_run']} ({s['runs']} runs)",
    ]
    if s.get("skipped_lines"):
        lines.append(
            f"warning:    {s['skipped_lines']} unreadable journal "
            + ("line" if s["skipped_lines"] == 1 else "lines")
            + f" skipped ({s['skipped_detail']}); every other record is kept, and the next run "
            "sends the rows of skipped results again"
        )
    if s["running_now"]:
        lines.append(f"running now: {s['running_now']}")
    elif s["finished"]:
        lines.append(
            "finished" + (" (some rows are errors: --retry-errors)" if s["rows_error"] else "")
        )
    else:
        lines.append("partial: run the same job again to resume")
    return "\n".join(lines)
