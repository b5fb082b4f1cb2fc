"""The run history: a compact time series of a job, kept beside its journal.

While a run goes, `HistoryRecorder` appends one JSON line every `interval_s` seconds to
`<output>.history.jsonl`: what was admitted and answered in that interval, 429s and retries,
latency percentiles of the answers in it, each model's effective pace and pause, the spend so
far. Every run of the job appends to the same file (a resumed job keeps its whole history);
runs are told apart by a `start` line carrying a fresh run id, and end with an `end` line, also
on a stop. `read_history` gives the report the runs back, tolerating a torn last line (a crash).

A line is ~300 bytes every few seconds: written synchronously on the event loop (a buffered
append is microseconds; an fsync would not be, and the history is not worth one: the journal
is what resume trusts).

    {"kind": "start", "run": "3f9c…", "t": 1764437000.0, "rows_total": 1000, ...}
    {"kind": "sample", "run": "3f9c…", "t": …, "dt": 5.0, "requests": 41, "tokens": 9020,
     "ok": 40, "error": 0, "responses": {"200": 40, "429": 1}, "rate_limited": 1,
     "retries": 1, "latency_s": {"n": 40, "p50": 0.8, "p90": 1.4, "p99": 2.0}, "in_flight": 8,
     "models": {"gpt-4o-mini": {"rpm": 500, "tpm": 60000, "effective_rpm": 492.5,
                "effective_tpm": 59100.0, "paused": false}}, "spend_usd": 0.0123}
    {"kind": "end", "run": "3f9c…", "t": …, "reason": "completed", ...}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from batcher.spec import Price
from batcher.stats import RunStats

log = logging.getLogger("batcher")

HISTORY_SUFFIX = ".history.jsonl"
DEFAULT_INTERVAL_S = 5.0
# Latencies kept per interval for its percentiles: a uniform sample beyond this, so memory is
# bounded at any answer rate (2,048 samples put p99 within a few tenths of a percentile).
LATENCY_SAMPLE = 2048


def history_path(output: Path) -> Path:
    """`out/labels.parquet` -> `out/labels.parquet.history.jsonl`, beside the journal."""
    return output.with_name(output.name + HISTORY_SUFFIX)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def spend_usd(stats: RunStats, prices: Mapping[str, Price] | None = None) -> float | None:
    """USD this run spent so far: the engine's own booking (`RunStats.spent_usd`, what the
    budget counts: each answer's usage at the job's prices). `prices` is accepted for callers
    that pass it; the engine already priced every answer with them."""
    del prices
    return stats.spent_usd


@dataclass
class LatencySample:
    """Latencies of one interval: all of them up to `size`, then a uniform reservoir sample."""

    size: int = LATENCY_SAMPLE
    seen: int = 0
    values: list[float] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, seconds: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(seconds)
            return
        j = self.rng.randrange(self.seen)  # Algorithm R: each kept with probability size/seen
        if j < self.size:
            self.values[j] = seconds

    def percentiles(self) -> dict[str, float] | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        return {"n": self.seen, **{f"p{q}": _quantile(ordered, q / 100) for q in (50, 90, 99)}}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted list."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo), 4)


@dataclass(frozen=True, slots=True)
class _Totals:
    """The cumulative counters a sample subtracts from the previous sample's."""

    requests: int
    tokens: int
    ok: int
    error: int
    rate_limited: int
    retries: int
    server_errors: int
    responses: Mapping[str, int]

    @classmethod
    def of(cls, s: RunStats) -> _Totals:
        return cls(
            s.requests_sent,
            s.admitted_tokens,
            s.ok,
            s.error,
            s.rate_limited,
            s.retries,
            s.server_errors,
            dict(s.responses),
        )


class HistoryRecorder:
    """Samples `stats` every `interval_s` into the history file while the run goes.

        async with HistoryRecorder(history_path(output), stats, run_id) as history:
            ...  # the run; call history.observe_latency(result.latency_s) per answer
            history.end_reason = str(outcome.reason)  # optional: said in the end line

    `sample()` takes one sample now (tests call it directly instead of waiting). Leaving the
    block takes a last sample and writes the `end` line, whatever ended the run.
    """

    def __init__(
        self,
        path: Path,
        stats: RunStats,
        run_id: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        prices: Mapping[str, Price] | None = None,
        restart: bool = False,
        wall_clock: Callable[[], float] = time.time,
        meta: Mapping[str, Any] | None = None,
        rows_done_before: int | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.path = Path(path)
        self.stats = stats
        self.run_id = run_id or new_run_id()
        self.interval_s = interval_s
        self.prices = prices
        self.restart = restart  # --restart: the old history belongs to the old job
        self.wall_clock = wall_clock
        self.meta = dict(meta or {})
        # The start line is written before the run reads its input, when `stats.done_before`
        # (counted batch by batch as the input is read past the journal) is still 0: the
        # caller passes what the journal answers instead. The end line has the exact count.
        self.rows_done_before = rows_done_before
        self.end_reason: str | None = None
        self.samples = 0
        self._latency = LatencySample()
        self._last = _Totals.of(stats)
        self._last_mono = stats.clock()
        self._file: IO[str] | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- the engine's hooks ----

    def observe_latency(self, seconds: float | None) -> None:
        """One answer's latency (cheap: an append, or a reservoir draw past the cap)."""
        if seconds is not None:
            self._latency.add(seconds)

    # ---- life cycle ----

    def open(self) -> None:
        """Open the file and write the `start` line (the async context manager calls it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w" if self.restart else "a", encoding="utf-8")  # noqa: SIM115
        s = self.stats
        self._write(
            {
                "kind": "start",
                "run": self.run_id,
                "t": round(self.wall_clock(), 3),
                "pid": os.getpid(),
                "rows_total": s.total_rows,
                "rows_done_before": (
                    s.done_before if self.rows_done_before is None else self.rows_done_before
                ),
                "interval_s": self.interval_s,
                **self.meta,
            }
        )
        self._last = _Totals.of(s)
        self._last_mono = s.clock()

    def close(self) -> None:
        """Last sample and the `end` line; safe to call twice."""
        if self._file is None:
            return
        try:
            self.sample()
            s = self.stats
            self._write(
                {
                    "kind": "end",
                    "run": self.run_id,
                    "t": round(self.wall_clock(), 3),
                    "reason": self.end_reason,
                    "elapsed_s": round(s.elapsed(), 3),
                    "rows_total": s.total_rows,
                    # exact by now: the run counts them as it reads the input past the journal
                    "rows_done_before": s.done_before,
                    "rows_ok": s.ok,
                    "rows_error": s.error,
                    "requests": s.requests_sent,
                    "spend_usd": spend_usd(s, self.prices),
                }
            )
        finally:
            self._file.close()
            self._file = None

    async def __aenter__(self) -> HistoryRecorder:
        self.open()
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()

    # ---- one sample ----

    def sample(self) -> dict[str, Any]:
        """Record the interval since the last sample; returns the record written."""
        s = self.stats
        now = _Totals.of(s)
        prev = self._last
        mono = s.clock()
        responses = {
            k: v - prev.responses.get(k, 0)
            for k, v in now.responses.items()
            if v != prev.responses.get(k, 0)
        }
        models: dict[str, Any] = {}
        for model, (rpm, tpm) in s.limits.items():
            entry: dict[str, Any] = {"rpm": rpm, "tpm": tpm}
            snap = s.effective.get(model)
            if snap is not None:
                entry["effective_rpm"] = round(snap.effective_rpm, 1)
                entry["effective_tpm"] = round(snap.effective_tpm, 1)
                entry["paused"] = snap.paused_until_s > 0
            models[model] = entry
        record: dict[str, Any] = {
            "kind": "sample",
            "run": self.run_id,
            "t": round(self.wall_clock(), 3),
            "dt": round(mono - self._last_mono, 3),
            "requests": now.requests - prev.requests,
            "tokens": now.tokens - prev.tokens,
            "ok": now.ok - prev.ok,
            "error": now.error - prev.error,
            "responses": responses,
            "rate_limited": now.rate_limited - prev.rate_limited,
            "retries": now.retries - prev.retries,
            "server_errors": now.server_errors - prev.server_errors,
            "latency_s": self._latency.percentiles(),
            "in_flight": s.in_flight,
            "models": models,
            "spend_usd": spend_usd(s, self.prices),
        }
        self._latency = LatencySample()
        self._last, self._last_mono = now, mono
        self._write(record)
        self.samples += 1
        return record

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:  # a full disk must not stop the run for its history's sake
            log.warning("run history %s: cannot write (%s); it will have a gap", self.path, exc)


# ---- reading ----


@dataclass
class RunHistory:
    """One run of a job: its start line, its samples, its end line (None: it crashed)."""

    run_id: str
    start: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None

    @property
    def started_at(self) -> float:
        return float(self.start.get("t", 0.0))


@dataclass
class History:
    runs: list[RunHistory] = field(default_factory=list)
    skipped_lines: int = 0  # unreadable lines (a torn tail after a crash)

    def samples(self) -> Iterator[tuple[RunHistory, dict[str, Any]]]:
        for run in self.runs:
            for sample in run.samples:
                yield run, sample


def read_history(path: Path) -> History:
    """The runs in a history file, in the order they started; an absent file has none."""
    history = History()
    by_id: dict[str, RunHistory] = {}
    try:
        handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except FileNotFoundError:
        return history
    with handle:
        for line in handle:
            try:
                rec = json.loads(line)
            except ValueError:
                history.skipped_lines += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("run"), str):
                history.skipped_lines += 1
                continue
            run_id, kind = rec["run"], rec.get("kind")
            run = by_id.get(run_id)
            if run is None:
                # A sample without its start line (cut off): the run still counts.
                run = by_id[run_id] = RunHistory(run_id, rec if kind == "start" else {})
                history.runs.append(run)
            if kind == "start":
                run.start = rec
            elif kind == "sample":
                run.samples.append(rec)
            elif kind == "end":
                run.end = rec
            else:
                history.skipped_lines += 1
    return history
