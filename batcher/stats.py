"""Live counters of one run: what the progress display shows and the summary reports.

The engine increments these at the moment things happen (never patched afterwards); readers
only look. Rates are measured over a sliding minute of *sent* requests, the same quantity the
server's per-minute limits count.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from batcher.admission.contract import ModelSnapshot


@dataclass
class RateMeter:
    """Requests and admission tokens sent within the last `window_s` seconds.

    Counted in `bucket_s` buckets, so memory stays constant at any send rate (a display needs
    no finer resolution than a second).
    """

    window_s: float = 60.0
    bucket_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _buckets: deque[list[float]] = field(default_factory=deque)  # [start, requests, tokens]
    _requests: int = 0
    _tokens: int = 0

    def add(self, tokens: int, now: float | None = None) -> None:
        """One request of `tokens` sent at `now` (the clock's time when None)."""
        if now is None:
            now = self.clock()
        self._expire(now)
        if not self._buckets or now - self._buckets[-1][0] >= self.bucket_s:
            self._buckets.append([now, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += tokens
        self._requests += 1
        self._tokens += tokens

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._buckets and self._buckets[0][0] < cutoff:
            _, req, tok = self._buckets.popleft()
            self._requests -= int(req)
            self._tokens -= int(tok)

    def per_minute(self, elapsed_s: float) -> tuple[float, float]:
        """(requests/min, tokens/min), scaled up while the run is younger than the window."""
        self._expire(self.clock())
        span = min(self.window_s, max(elapsed_s, 1e-9))
        scale = 60.0 / span
        return self._requests * scale, self._tokens * scale


@dataclass
class RunStats:
    """Counters for one `batcher run`. `total_rows` counts this run's share of the input."""

    total_rows: int = 0  # rows of the input this run is responsible for (after sharding)
    done_before: int = 0  # rows already finished by earlier runs (resume)
    ok: int = 0
    error: int = 0
    requests_sent: int = 0  # HTTP attempts, first tries and retries
    retries: int = 0
    rate_limited: int = 0  # 429 answers
    server_errors: int = 0  # 5xx, timeouts, dropped connections, truncated answers
    truncated: int = 0  # 2xx answers we could not read: billed all the same
    truncated_tokens: int = 0  # their admission cost: the most they were billed
    spent_usd: float = 0.0  # this run's spending at the job's prices (usage; worst case if none)
    unrecorded_usd: float = 0.0  # of which billed without a row to show it (truncated answers)
    spent_before_usd: float = 0.0  # earlier runs of the job (the journal)
    cap_usd: float | None = None  # max_cost_usd
    repairs: int = 0  # structured answers asked again (invalid, or cut off by max_tokens)
    cache_hits: int = 0  # rows answered from the response store: no request, no cost
    dedupe_hits: int = 0  # rows that shared an identical request's answer
    saved_usd: float = 0.0  # what the reused answers would have cost
    prompt_tokens: int = 0  # from the server's usage
    completion_tokens: int = 0
    admitted_tokens: int = 0  # what admission charged (estimates): what TPM limits count
    in_flight: int = 0
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    finished: float | None = None
    first_sent: float = 0.0
    last_sent: float = 0.0
    limits: dict[str, tuple[int, int]] = field(default_factory=dict)  # model -> (rpm, tpm)
    meter: RateMeter = field(default_factory=RateMeter)
    # model -> effective limits now (after adaptive slow-down), filled by the engine from the
    # limiter so displays need not know the limiter.
    effective: dict[str, ModelSnapshot] = field(default_factory=dict)
    # Attempts by how they ended: "200", "429", "503", ... or a failure kind without a status
    # ("timeout", "connection"); metrics and the run history read it.
    responses: Counter[str] = field(default_factory=Counter)
    sent_by_model: dict[str, list[int]] = field(default_factory=dict)  # model -> [requests, tokens]

    def count_response(self, status: int | str) -> None:
        self.responses[str(status)] += 1

    def __post_init__(self) -> None:
        self.meter.clock = self.clock
        if not self.started:
            self.started = self.clock()

    @property
    def done(self) -> int:
        """Rows finished in this run."""
        return self.ok + self.error

    @property
    def remaining(self) -> int:
        return max(0, self.total_rows - self.done_before - self.done)

    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else self.clock()
        return max(0.0, end - self.started)

    def current_rates(self) -> tuple[float, float]:
        """(RPM, TPM) over the last minute of sending."""
        return self.meter.per_minute(self.elapsed())

    def average_rates(self) -> tuple[float, float]:
        """(RPM, TPM) over the sending span: requests sent and admission tokens per minute.

        n sends span n-1 intervals: measured from first to last send, a run paced at exactly
        the limit reads as the limit, not a little above it.
        """
        n = self.requests_sent
        if n < 2 or self.last_sent <= self.first_sent:
            minutes = max(self.elapsed(), 1e-9) / 60.0
            return n / minutes, self.admitted_tokens / minutes
        minutes = (self.last_sent - self.first_sent) / 60.0
        share = (n - 1) / n
        return (n - 1) / minutes, self.admitted_tokens * share / minutes

    def eta_s(self) -> float | None:
        """Seconds to finish at the current pace; None before there is a pace."""
        elapsed = self.elapsed()
        if self.done == 0 or elapsed <= 0:
            return None
        return self.remaining / (self.done / elapsed)

    def record_sent(self, cost: int, model: str | None = None) -> None:
        now = self.clock()
        if not self.requests_sent:
            self.first_sent = now
        self.last_sent = now
        self.requests_sent += 1
        self.admitted_tokens += cost
        self.meter.add(cost, now)  # the same clock (`__post_init__`): read once per request
        if model is not None:
            sent = self.sent_by_model.get(model)
            if sent is None:
                sent = self.sent_by_model[model] = [0, 0]
            sent[0] += 1
            sent[1] += cost

    def model_rates(self) -> dict[str, tuple[float, float]]:
        """model -> (RPM, TPM) over the run's sending span: each against its own limits."""
        n = self.requests_sent
        if n < 2 or self.last_sent <= self.first_sent:
            minutes = max(self.elapsed(), 1e-9) / 60.0
            share = 1.0
        else:
            minutes = (self.last_sent - self.first_sent) / 60.0
            share = (n - 1) / n  # n sends span n - 1 intervals (see average_rates)
        return {
            m: (r * share / minutes, t * share / minutes)
            for m, (r, t) in self.sent_by_model.items()
        }

    def as_dict(self) -> dict[str, Any]:
        rpm, tpm = self.average_rates()
        cur_rpm, cur_tpm = self.current_rates()
        return {
            "rows_total": self.total_rows,
            "rows_done_before": self.done_before,
            "rows_ok": self.ok,
            "rows_error": self.error,
            "rows_remaining": self.remaining,
            "requests_sent": self.requests_sent,
            "retries": self.retries,
            "rate_limited_429": self.rate_limited,
            "server_errors": self.server_errors,
            "truncated_answers": self.truncated,
            "structured_repairs": self.repairs,
            "rows_from_cache": self.cache_hits,
            "rows_deduplicated": self.dedupe_hits,
            "saved_usd": round(self.saved_usd, 6),
            "spent_usd": round(self.spent_usd, 6),
            "job_spent_usd": round(self.spent_before_usd + self.spent_usd, 6),
            "max_cost_usd": self.cap_usd,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "admitted_tokens": self.admitted_tokens,
            "in_flight": self.in_flight,
            "elapsed_s": round(self.elapsed(), 3),
            "avg_rpm": round(rpm, 1),
            "avg_tpm": round(tpm, 1),
            "current_rpm": round(cur_rpm, 1),
            "current_tpm": round(cur_tpm, 1),
            "eta_s": None if (eta := self.eta_s()) is None else round(eta, 1),
            "limits": {m: {"rpm": r, "tpm": t} for m, (r, t) in self.limits.items()},
            "effective": {m: asdict(snap) for m, snap in self.effective.items()},
        }
