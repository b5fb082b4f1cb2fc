"""`batcher status`: a partial job's state from its journal, sending nothing.

A job run in shards (`--shard K/N`) has no journal of its own: each shard keeps one beside its
shard output, and `batcher merge` writes the job's output from the shard outputs. So for the
whole job, status sums the shards' journals and says whether the merge is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from batcher.journal import JournalState, holder, is_locked, journal_path, lock_path, read_state
from batcher.pricing import format_usd
from batcher.readers import count_rows
from batcher.sharding import shard_output, shards_beside
from batcher.spec import Job


def _running(output: Path) -> str | None:
    """Who holds the job lock (an flock on the journal), if anyone."""
    return holder(lock_path(output)) if is_locked(output) else None


def _complete(state: JournalState) -> bool:
    return bool(state.last_end and state.last_end.get("complete"))


def _sum_states(states: list[JournalState]) -> JournalState:
    """The shards' journals as one: counts summed, first start and last run."""
    total = JournalState()
    started = [s.created for s in states if s.created is not None]
    runs = [s.last_run for s in states if s.last_run is not None]
    total.created = min(started) if started else None
    total.last_run = max(runs) if runs else None
    total.runs = sum(s.runs for s in states)
    total.ids = pa.concat_arrays([s.ids for s in states]) if states else total.ids
    total.ok = pa.concat_arrays([s.ok for s in states]) if states else total.ok
    total.spent_usd = sum(s.spent_usd for s in states)
    total.prompt_tokens = sum(s.prompt_tokens for s in states)
    total.completion_tokens = sum(s.completion_tokens for s in states)
    for s in states:
        total.skipped.count += s.skipped.count
        total.skipped.lines += s.skipped.lines
        total.skipped.reasons += s.skipped.reasons
    if states and all(_complete(s) for s in states):
        total.last_end = {"complete": True}
    return total


def job_status(job: Job, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    output = shard_output(job.output, *shard) if shard else job.output
    state = read_state(journal_path(output))
    shards = None
    running = _running(output)
    if shard is None and state.created is None:
        shards = shards_beside(output)
        if shards is not None:
            outputs = [shard_output(output, k, shards) for k in range(1, shards + 1)]
            state = _sum_states([read_state(journal_path(p)) for p in outputs])
            running = next((who for p in outputs if (who := _running(p))), None)
    total = count_rows(job, shard)
    done = len(state.ids)
    report: dict[str, Any] = {
        "job_output": str(output),
        "journal": str(journal_path(output)),
        "started": state.created,
        "last_run": state.last_run,
        "runs": state.runs,
        "running_now": running,
        "finished": _complete(state) and done == total,
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
    if shards is not None:
        report["shards"] = shards  # the journals are the shards': no journal of the job's own
        report["journal"] = str(journal_path(shard_output(output, 1, shards))).replace(
            "shard-1-of", "shard-*-of"
        )
    return report


def render_status(s: dict[str, Any]) -> str:
    if s["started"] is None:
        if s["output_exists"]:
            return (
                f"{s['job_output']}: written, but no journal beside it ({s['journal']}), so "
                "there is nothing more to tell; `batcher inspect` summarises the output"
            )
        return f"{s['job_output']}: not started ({s['rows_total']:,} rows to send)"
    lines = [
        f"output:     {s['job_output']}" + ("" if s["output_exists"] else " (not written yet)"),
        f"rows:       {s['rows_done']:,}/{s['rows_total']:,} done  ok={s['rows_ok']:,} "
        f"error={s['rows_error']:,} remaining={s['rows_remaining']:,}",
        f"tokens:     {s['prompt_tokens']:,} prompt + {s['completion_tokens']:,} completion",
        f"spent:      {format_usd(s['spent_usd'])}"
        + (f" of max_cost_usd {format_usd(s['max_cost_usd'])}" if s["max_cost_usd"] else ""),
        f"started:    {s['started']}   last run: {s['last_run']} ({s['runs']:,} runs)",
    ]
    shards = s.get("shards")
    if shards:
        lines.append(
            f"shards:     {shards} (--shard K/{shards}; their journals: {Path(s['journal']).name})"
        )
    if s.get("skipped_lines"):
        lines.append(
            f"warning:    {s['skipped_lines']:,} unreadable journal "
            + ("line" if s["skipped_lines"] == 1 else "lines")
            + f" skipped ({s['skipped_detail']}); every other record is kept, and the next run "
            "sends the rows of skipped results again"
        )
    if s["running_now"]:
        lines.append(f"running now: {s['running_now']}")
    elif s["finished"]:
        errors = " (some rows are errors: --retry-errors)" if s["rows_error"] else ""
        if shards and not s["output_exists"]:
            lines.append(
                f"every shard finished{errors}; not merged yet: batcher merge JOB --shards {shards}"
            )
        else:
            lines.append("finished" + (" and merged" if shards else "") + errors)
    elif shards:
        lines.append(f"partial: run the unfinished shards again (--shard K/{shards}) to resume")
    else:
        lines.append("partial: run the same job again to resume")
    return "\n".join(lines)
