"""A word when a run ends: one JSON POST to `notify.webhook` when it finishes or stops.

The payload carries the figures (job, outcome, exit code, rows, spend, duration, report path)
and a `text` field with the same in one line, which is all a Slack (or Mattermost, Teams
workflow) incoming webhook needs. A webhook that fails, is down or is slow is logged and
forgotten after `timeout_s`: it never changes the run's exit code. Its URL is never logged
(Slack's carries a secret in its path): the host alone says which one failed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from batcher.outcome import RunOutcome, StopReason
from batcher.pricing import format_usd
from batcher.progress import format_duration

log = logging.getLogger("batcher")

_VERB = {
    StopReason.COMPLETED: "finished",
    StopReason.INTERRUPTED: "was interrupted",
    StopReason.TERMINATED: "was terminated",
    StopReason.FATAL: "stopped",
    StopReason.OUTAGE: "stopped (service outage)",
}


def summary_payload(
    outcome: RunOutcome,
    *,
    job: str,
    spend_usd: float | None = None,
    report: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """The webhook's JSON body: the data, plus `text` for chat webhooks."""
    s = outcome.stats
    duration = round(s.elapsed(), 3)
    verb = _VERB.get(outcome.reason, str(outcome.reason))
    text = (
        f"batcher job {job} {verb} (exit {int(outcome.exit_code)}): "
        f"{s.ok:,} rows ok, {s.error:,} errors"
        + (f", {s.done_before:,} done earlier" if s.done_before else "")
        + f", {outcome.saved_rows:,}/{s.total_rows:,} saved in {format_duration(duration)}"
        + (f", spend {format_usd(spend_usd)}" if spend_usd is not None else "")
        + (f". {outcome.error}" if outcome.error is not None else "")
        + (f". Report: {report}" if report else "")
    )
    return {
        "text": text,
        "job": job,
        "run_id": run_id,
        "outcome": str(outcome.reason),
        "completed": outcome.completed,
        "exit_code": int(outcome.exit_code),
        "rows_ok": s.ok,
        "rows_error": s.error,
        "rows_done_before": s.done_before,
        "rows_total": s.total_rows,
        "rows_saved": outcome.saved_rows,
        "rows_written": outcome.rows_written,
        "requests_sent": s.requests_sent,
        "rate_limited_429": s.rate_limited,
        "retries": s.retries,
        "spend_usd": spend_usd,
        "duration_s": duration,
        "output": str(outcome.output),
        "report": report,
        "error": None if outcome.error is None else str(outcome.error),
    }


def _where(url: str) -> str:
    return urlsplit(url).hostname or "the webhook"


async def post_webhook(url: str, payload: dict[str, Any], *, timeout_s: float = 10.0) -> bool:
    """POST `payload`; True when the receiver took it (2xx). Never raises for its failures."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, json=payload) as resp,
        ):
            if 200 <= resp.status < 300:
                return True
            log.warning(
                "notify: webhook at %s answered HTTP %d; the run's result is unchanged",
                _where(url),
                resp.status,
            )
    except TimeoutError:
        log.warning("notify: webhook at %s did not answer within %g s", _where(url), timeout_s)
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        log.warning(
            "notify: webhook at %s failed (%s); the run's result is unchanged",
            _where(url),
            type(exc).__name__,
        )
    return False


async def notify_run_end(
    url: str,
    outcome: RunOutcome,
    *,
    job: str,
    timeout_s: float = 10.0,
    spend_usd: float | None = None,
    report: str | None = None,
    run_id: str | None = None,
) -> bool:
    """The engine's one call at the end of a run (finished or stopped)."""
    payload = summary_payload(outcome, job=job, spend_usd=spend_usd, report=report, run_id=run_id)
    try:
        return await post_webhook(url, payload, timeout_s=timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug here must not cost the run its exit code either
        log.warning("notify: webhook failed unexpectedly: %s", type(exc).__name__)
        return False
