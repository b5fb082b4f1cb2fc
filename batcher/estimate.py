"""`batcher estimate`: tokens, money and time of a job before anything is sent.

Every row is read (streamed) and built into the very body `batcher run` would send, and its
tokens are counted by the same functions the engine's admission uses, so the figures are the
engine's own accounting, not a sample:

    prompt tokens          the chat rule (tokens.count_prompt_tokens_batch)
    reserved completion    max_tokens / max_completion_tokens (x best_of), or the job's
                           assumed_max_tokens when a request sets neither
    admission tokens       prompt + reserved: what the per-minute token limit counts

Cost is an upper bound (every answer as long as it may be) with the prompt-only cost as the
lower one. Duration is the least the configured limits allow: per model
max(rows / rpm, admission tokens / tpm) minutes, models in parallel. It cannot be shorter;
it is longer when others share the quota or the limiter keeps its headroom.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from batcher.cache import CacheKey
from batcher.prepare import Prepared, Preparer
from batcher.pricing import PRICES_AS_OF, cost_of, format_usd, price_for
from batcher.progress import format_duration
from batcher.readers import open_input, resolve_keep
from batcher.requests import RequestBuilder
from batcher.scan import KeepSeen
from batcher.spec import Job

MAX_LISTED = 100  # over-context / over-TPM rows listed by id; the count is always whole
BATCH_ROWS = 8192


@dataclass
class _ModelTotals:
    rows: int = 0
    prompt_tokens: int = 0
    reserved_completion_tokens: int = 0
    default_max_tokens_rows: int = 0
    largest_request: int = 0  # admission tokens of the biggest request
    over_tpm: int = 0  # rows the engine records as errors: they never fit the TPM limit
    over_tpm_ids: list[str] = field(default_factory=list)


class _Estimator:
    """Sums what `Preparer` makes of each batch: the very requests and errors of `run`."""

    def __init__(self) -> None:
        self.models: dict[str, _ModelTotals] = {}
        self.bad_rows = 0
        self.bad_samples: list[str] = []
        self.over_context: list[dict[str, Any]] = []
        self.over_context_count = 0

    def account(self, prepared: Prepared) -> None:
        for req, prompt, reserved in zip(
            prepared.requests, prepared.prompt_tokens, prepared.reserved_tokens, strict=True
        ):
            totals = self.models.get(req.model)
            if totals is None:
                totals = self.models[req.model] = _ModelTotals()
            totals.rows += 1
            totals.prompt_tokens += prompt
            totals.reserved_completion_tokens += reserved
            totals.largest_request = max(totals.largest_request, req.cost)
        by_id = {r.id: r for r in prepared.errors} if prepared.rejections else {}
        for rej in prepared.rejections:
            if rej.kind == "bad_row":
                self.bad_rows += 1
                if len(self.bad_samples) < 5:
                    self.bad_samples.append(by_id[rej.row_id].error or "")
            elif rej.kind == "over_context":
                self.over_context_count += 1
                if len(self.over_context) < MAX_LISTED:
                    self.over_context.append(
                        {
                            "id": rej.row_id,
                            "model": rej.model,
                            "tokens": rej.tokens,
                            "context_window": rej.limit,
                        }
                    )
            else:
                assert rej.model is not None
                totals = self.models.setdefault(rej.model, _ModelTotals())
                totals.over_tpm += 1
                if len(totals.over_tpm_ids) < MAX_LISTED:
                    totals.over_tpm_ids.append(rej.row_id)
        for model, n in prepared.default_max_tokens.items():
            self.models[model].default_max_tokens_rows += n


def estimate_job(
    job: Job,
    *,
    num_threads: int = 2,
    batch_rows: int = BATCH_ROWS,
    selected: Callable[[str], bool] | None = None,
    done: Callable[[str, CacheKey | None], bool] | None = None,
) -> dict[str, Any]:
    """Read every row, build its body, count its tokens; report cost and duration. Sends nothing.

    Raises InputDataError / JobSpecError for what `batcher run` would refuse (with
    on_bad_row: fail, the first bad row). Rows longer than their model's context window or a
    minute's TPM are the error rows `run` records without sending: not in the totals.
    `selected(id)`: only these rows (a run's shard or sample); `done(id, key)`: rows whose
    answer the job's journal already holds, left out (what a resumed run has left to ask).
    """
    started = time.monotonic()
    reader = open_input(job)
    job = resolve_keep(job, reader)
    builder = RequestBuilder(job, batch_format=reader.format == "batch")
    known = reader.column_names()
    if known is not None:
        builder.check_columns(known)
    preparer = Preparer(job, builder, fail_on_bad_row=True)
    est = _Estimator()
    # a JSONL keep_columns name no row has: refused as `run` refuses it
    keep = KeepSeen(job.keep_columns if known is None else ())
    # Counting (tiktoken's Rust encoder, GIL released) of batch k overlaps reading and
    # building batch k+1 (Python, holds the GIL): the two cores both work.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher-estimate") as pool:
        in_flight: Future[Prepared] | None = None
        for batch in reader.iter_batches(batch_rows):
            if keep.missing:
                for row in batch:
                    keep.see(row.data)
            if selected is not None:
                batch = [r for r in batch if selected(r.id)]
            built = preparer.build(batch)
            if done is not None:
                built.drop(done)
            if in_flight is not None:
                est.account(in_flight.result())
            in_flight = pool.submit(preparer.count, built, num_threads=num_threads)
        if in_flight is not None:
            est.account(in_flight.result())
    keep.check(job)
    if est.models:  # as `run` refuses it: a typo in limits: (nothing to compare without rows)
        job.check_limit_models(set(est.models))
    return _report(job, est, time.monotonic() - started)


def _report(job: Job, est: _Estimator, elapsed_s: float) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    unpriced: list[str] = []
    for name, t in sorted(est.models.items()):
        limit = job.limit_for(name)
        admission = t.prompt_tokens + t.reserved_completion_tokens
        by_rpm = t.rows / limit.rpm * 60.0
        by_tpm = admission / limit.tpm * 60.0
        price, source = price_for(name, job.prices)
        if price is None and t.rows:
            unpriced.append(name)
        models[name] = {
            "rows": t.rows,
            "prompt_tokens": t.prompt_tokens,
            "reserved_completion_tokens": t.reserved_completion_tokens,
            "admission_tokens": admission,
            "avg_prompt_tokens": round(t.prompt_tokens / t.rows, 1) if t.rows else 0.0,
            "largest_request_tokens": t.largest_request,
            "default_max_tokens_rows": t.default_max_tokens_rows,
            "cost_usd": None
            if price is None
            else round(cost_of(price, t.prompt_tokens, t.reserved_completion_tokens), 6),
            "cost_usd_prompt_only": None
            if price is None
            else round(cost_of(price, t.prompt_tokens, 0), 6),
            "price_source": source,
            "input_per_1m": None if price is None else price.input_per_1m,
            "output_per_1m": None if price is None else price.output_per_1m,
            "rpm": limit.rpm,
            "tpm": limit.tpm,
            "duration_s": round(max(by_rpm, by_tpm), 1),
            "binding_limit": "rpm" if by_rpm >= by_tpm else "tpm",
            "over_tpm_rows": t.over_tpm,
            "over_tpm_ids": t.over_tpm_ids,
        }

    def total(key: str) -> Any:
        return sum(m[key] for m in models.values())

    slowest = max(models.values(), key=lambda m: m["duration_s"], default=None)
    priced = [m for m in models.values() if m["cost_usd"] is not None]
    return {
        "rows": total("rows"),
        "bad_rows": est.bad_rows,
        "bad_row_samples": est.bad_samples,
        "over_tpm_rows": total("over_tpm_rows"),
        "prompt_tokens": total("prompt_tokens"),
        "reserved_completion_tokens": total("reserved_completion_tokens"),
        "admission_tokens": total("admission_tokens"),
        # None when a model has no price: a partial sum would pass for the whole bill
        "cost_usd": None if unpriced else round(sum(m["cost_usd"] for m in priced), 6),
        "cost_usd_prompt_only": None
        if unpriced
        else round(sum(m["cost_usd_prompt_only"] for m in priced), 6),
        "unpriced_models": unpriced,
        "prices_as_of": PRICES_AS_OF,
        "duration_s": slowest["duration_s"] if slowest else 0.0,
        "binding_limit": slowest["binding_limit"] if slowest else None,
        "default_max_tokens_rows": total("default_max_tokens_rows"),
        "assumed_max_tokens": job.assumed_max_tokens,
        "over_context": est.over_context,
        "over_context_count": est.over_context_count,
        "models": models,
        "input": str(job.input),
        "estimate_seconds": round(elapsed_s, 2),
    }


def render_estimate(report: Mapping[str, Any]) -> str:
    """The estimate for people: what it will cost, how long, what to fix first."""
    lines = [
        f"{report['input']}: {report['rows']:,} requests to send (nothing was sent)",
        f"tokens:    {report['prompt_tokens']:,} prompt + "
        f"{report['reserved_completion_tokens']:,} completion at most "
        f"= {report['admission_tokens']:,} charged at admission",
    ]
    if report["cost_usd"] is not None:
        lines.append(
            f"cost:      {format_usd(report['cost_usd_prompt_only'])} (prompts only) to "
            f"{format_usd(report['cost_usd'])} (every answer at its max_tokens)"
        )
    else:
        lines.append(
            f"cost:      unknown: no price for {', '.join(report['unpriced_models'])}; "
            "add it under prices: in the job file (input_per_1m, output_per_1m in USD)"
        )
    lines.append(
        f"duration:  at least {format_duration(report['duration_s'])} at the configured "
        f"limits ({report['binding_limit'] or '-'} is the binding limit)"
    )
    for name, m in report["models"].items():
        price = (
            f"${m['input_per_1m']:g} / ${m['output_per_1m']:g} per 1M in/out, {m['price_source']}"
            if m["input_per_1m"] is not None
            else "no price"
        )
        lines.append(
            f"  {name}: {m['rows']:,} rows, {m['prompt_tokens']:,} prompt tokens "
            f"(avg {m['avg_prompt_tokens']:g}), {m['reserved_completion_tokens']:,} reserved; "
            f"{format_usd(m['cost_usd'])}; {price}"
        )
        lines.append(
            f"  {' ' * len(name)}  limits {m['rpm']:,} rpm / {m['tpm']:,} tpm -> "
            f"{format_duration(m['duration_s'])}, bound by {m['binding_limit']}"
        )
    if report["default_max_tokens_rows"]:
        lines.append(
            f"note:      {report['default_max_tokens_rows']:,} requests set no max_tokens and "
            f"are charged {report['assumed_max_tokens']:,} tokens each at admission; set "
            "params.max_tokens to the longest answer you need to send faster and pay less"
        )
    if report["over_tpm_rows"]:
        ids = [i for m in report["models"].values() for i in m["over_tpm_ids"]][:5]
        lines.append(
            f"warning:   {report['over_tpm_rows']:,} rows need more tokens than a minute's TPM "
            f"limit and will be recorded as errors (e.g. {', '.join(ids)}); shorten them "
            "or lower max_tokens"
        )
    if report["over_context_count"]:
        sample = ", ".join(
            f"{o['id']} ({o['tokens']:,} > {o['context_window']:,})"
            for o in report["over_context"][:5]
        )
        lines.append(
            f"warning:   {report['over_context_count']:,} rows exceed their model's context "
            f"window (prompt + max output), e.g. {sample}; the server will reject them"
        )
    if report["bad_rows"]:
        lines.append(
            f"warning:   {report['bad_rows']:,} bad rows will be recorded as errors "
            f"(on_bad_row: skip), e.g. {report['bad_row_samples'][0]}"
        )
    lines.append(
        f"prices:    built-in table as of {report['prices_as_of']} (OpenAI list prices) unless "
        "the job file's prices: says otherwise; Langdock's own billing may differ"
    )
    return "\n".join(lines)
