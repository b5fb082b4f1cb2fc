"""Prometheus metrics of a run: `/metrics` while it goes, a textfile when it ends.

A custom collector reads `RunStats` at scrape time, so the engine counts nothing twice and a
scrape costs nothing between scrapes. Names follow Prometheus conventions: base units
(seconds, tokens, requests), `_total` counters, the per-minute limits given per second.

    batcher_rows_total{status="ok"|"error"}            rows finished by this run
    batcher_requests_total{status="200"|"429"|...}    HTTP attempts by how they ended
    batcher_tokens_total{kind="admitted"|"prompt"|"completion"}
    batcher_rate_limited_total, batcher_retries_total, batcher_in_flight_requests
    batcher_input_rows, batcher_rows_remaining         this run's rows / rows still to do
    batcher_limit_{requests,tokens}_per_second{model}      configured
    batcher_effective_{requests,tokens}_per_second{model}  the limiter's pace now
    batcher_admission_paused{model}                     1 while a 429 pauses the model
    batcher_cost_usd_total, batcher_eta_seconds, batcher_elapsed_seconds
    batcher_run_exit_code, batcher_run_end_timestamp_seconds  (the textfile, at the end)

Every series carries `batcher_job` (the output's name unless given), so several jobs' textfiles
can sit in one node_exporter directory. The `/metrics` server binds 127.0.0.1 unless told.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batcher.errors import ExitCode, JobSpecError, StorageError
from batcher.history import spend_usd
from batcher.spec import Price
from batcher.stats import RunStats

log = logging.getLogger("batcher")


class RunCollector(Collector):
    """Reads a `RunStats` whenever Prometheus scrapes (or the textfile is written)."""

    def __init__(
        self,
        stats: RunStats,
        *,
        job_name: str,
        prices: Mapping[str, Price] | None = None,
        exit_code: int | None = None,
        ended_at: float | None = None,
    ) -> None:
        self.stats = stats
        self.job_name = job_name
        self.prices = prices
        self.exit_code = exit_code
        self.ended_at = ended_at

    def collect(self) -> Iterator[Metric]:
        s, job = self.stats, self.job_name
        j = ["batcher_job"]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=j)
            family.add_metric([job], value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=j)
            family.add_metric([job], value)
            return family

        rows = CounterMetricFamily(
            "batcher_rows", "Rows finished by this run, by status.", labels=[*j, "status"]
        )
        rows.add_metric([job, "ok"], s.ok)
        rows.add_metric([job, "error"], s.error)
        yield rows
        requests = CounterMetricFamily(
            "batcher_requests",
            "HTTP attempts (first tries and retries) by how they ended: the status code, or "
            "timeout/connection/truncated.",
            labels=[*j, "status"],
        )
        for status, n in sorted(s.responses.items()):
            requests.add_metric([job, status], n)
        yield requests
        yield counter("batcher_requests_sent", "HTTP attempts sent.", s.requests_sent)
        tokens = CounterMetricFamily(
            "batcher_tokens",
            "Tokens: admitted (what admission charged against TPM, estimates) and used "
            "(prompt/completion, from the server's usage).",
            labels=[*j, "kind"],
        )
        tokens.add_metric([job, "admitted"], s.admitted_tokens)
        tokens.add_metric([job, "prompt"], s.prompt_tokens)
        tokens.add_metric([job, "completion"], s.completion_tokens)
        yield tokens
        yield counter("batcher_rate_limited", "429 answers.", s.rate_limited)
        yield counter("batcher_retries", "Attempts after a row's first.", s.retries)
        yield counter(
            "batcher_server_errors", "5xx, timeouts, dropped connections.", s.server_errors
        )
        yield gauge("batcher_in_flight_requests", "Requests sent, not answered.", s.in_flight)
        yield gauge(
            "batcher_input_rows", "Rows of the input this run is responsible for.", s.total_rows
        )
        yield gauge("batcher_rows_done_before", "Rows finished by earlier runs.", s.done_before)
        yield gauge("batcher_rows_remaining", "Rows still to do.", s.remaining)
        yield gauge("batcher_elapsed_seconds", "Seconds since the run started.", s.elapsed())
        eta = s.eta_s()
        if eta is not None:
            yield gauge("batcher_eta_seconds", "Seconds to finish at the current pace.", eta)
        spend = spend_usd(s, self.prices)
        if spend is not None:
            yield counter("batcher_cost_usd", "USD for the tokens used so far.", spend)
        yield from self._per_model()
        if self.exit_code is not None:
            yield gauge("batcher_run_exit_code", "Exit code of the run.", self.exit_code)
        if self.ended_at is not None:
            yield gauge(
                "batcher_run_end_timestamp_seconds", "When the run ended (Unix).", self.ended_at
            )

    def _per_model(self) -> Iterator[Metric]:
        s, job = self.stats, self.job_name
        labels = ["batcher_job", "model"]
        families = {
            name: GaugeMetricFamily(name, doc, labels=labels)
            for name, doc in (
                ("batcher_limit_requests_per_second", "Configured RPM limit / 60."),
                ("batcher_limit_tokens_per_second", "Configured TPM limit / 60."),
                ("batcher_effective_requests_per_second", "The limiter's request pace now."),
                ("batcher_effective_tokens_per_second", "The limiter's token pace now."),
                ("batcher_admission_paused", "1 while a 429 pauses admission for the model."),
            )
        }
        for model, (rpm, tpm) in sorted(s.limits.items()):
            families["batcher_limit_requests_per_second"].add_metric([job, model], rpm / 60)
            families["batcher_limit_tokens_per_second"].add_metric([job, model], tpm / 60)
        for model, snap in sorted(s.effective.items()):
            families["batcher_effective_requests_per_second"].add_metric(
                [job, model], snap.effective_rpm / 60
            )
            families["batcher_effective_tokens_per_second"].add_metric(
                [job, model], snap.effective_tpm / 60
            )
            families["batcher_admission_paused"].add_metric(
                [job, model], 1.0 if snap.paused_until_s > 0 else 0.0
            )
        yield from families.values()


def _registry(collector: RunCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


class MetricsServer:
    """`/metrics` over HTTP (prometheus_client's threaded server) while a run goes.

        with MetricsServer(stats, port=9464, job_name="labels") as server:
            ...  # server.url is e.g. http://127.0.0.1:9464/metrics

    Port 0 takes a free port (tests). A port in use is a JobSpecError naming the key.
    """

    def __init__(
        self,
        stats: RunStats,
        *,
        port: int,
        host: str = "127.0.0.1",
        job_name: str = "batcher",
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        self.collector = RunCollector(stats, job_name=job_name, prices=prices)
        self.host, self.port = host, port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> None:
        try:
            server, thread = start_http_server(
                self.port, addr=self.host, registry=_registry(self.collector)
            )
        except OSError as exc:
            raise JobSpecError(
                f"metrics.prometheus_port: cannot listen on {self.host}:{self.port} "
                f"({exc.strerror or exc}); choose another port or stop what uses it"
            ) from None
        self._server, self._thread = server, thread
        self.port = server.server_address[1]
        log.info("metrics: Prometheus can scrape %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def write_textfile(
    path: Path,
    stats: RunStats,
    *,
    job_name: str = "batcher",
    prices: Mapping[str, Price] | None = None,
    exit_code: int | ExitCode | None = None,
    ended_at: float | None = None,
) -> None:
    """The run's metrics for node_exporter's textfile collector, written atomically (a temp
    file renamed over `path`, so the collector never reads half a file)."""
    collector = RunCollector(
        stats,
        job_name=job_name,
        prices=prices,
        exit_code=None if exit_code is None else int(exit_code),
        ended_at=time.time() if ended_at is None else ended_at,
    )
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), _registry(collector))
    except OSError as exc:
        raise StorageError(
            f"metrics.textfile: cannot write {path}: {exc.strerror or exc}"
        ) from None
