"""Prometheus metrics: `/metrics` scraped over HTTP on 127.0.0.1, and the textfile."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import pytest
from helpers import API_KEY, review_rows, write_job, write_jsonl
from prometheus_client.parser import text_string_to_metric_families

from batcher.admission.contract import ModelSnapshot
from batcher.errors import JobSpecError
from batcher.metrics import MetricsServer, write_textfile
from batcher.spec import load_job
from batcher.stats import RunStats
from batcher.summary import outcome_record

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    values: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def value(samples: Samples, name: str, job: str = "labels", **labels: str) -> float:
    key = (name, tuple(sorted({"batcher_job": job, **labels}.items())))
    return samples[key]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def busy_stats() -> RunStats:
    t = [100.0]
    stats = RunStats(clock=lambda: t[0], total_rows=50)
    stats.limits["gpt-4o-mini"] = (600, 60_000)
    stats.effective["gpt-4o-mini"] = ModelSnapshot(
        rpm=600,
        tpm=60_000,
        effective_rpm=540.0,
        effective_tpm=54_000.0,
        multiplier=0.9,
        share=1.0,
        paused_until_s=2.0,
        backend="local",
    )
    for status in (200, 200, 200, 429, 503, 200):
        stats.record_sent(120)
        stats.count_response(status)
    stats.ok, stats.error, stats.retries, stats.rate_limited = 4, 1, 2, 1
    stats.server_errors, stats.in_flight = 1, 3
    stats.prompt_tokens, stats.completion_tokens = 400, 100
    stats.spent_usd = (400 * 0.15 + 100 * 0.6) / 1e6
    t[0] += 10.0
    return stats


def test_metrics_endpoint_reads_the_stats_at_scrape_time() -> None:
    stats = busy_stats()
    with MetricsServer(stats, port=0, host="127.0.0.1", job_name="labels") as server:
        assert server.url.startswith("http://127.0.0.1:")
        first = parse(scrape(server.url))
        stats.ok += 10  # the engine counts on; the next scrape sees it
        stats.count_response(200)
        second = parse(scrape(server.url))

    assert value(first, "batcher_rows_total", status="ok") == 4
    assert value(first, "batcher_rows_total", status="error") == 1
    assert value(second, "batcher_rows_total", status="ok") == 14
    assert value(first, "batcher_requests_total", status="200") == 4
    assert value(second, "batcher_requests_total", status="200") == 5
    assert value(first, "batcher_requests_total", status="429") == 1
    assert value(first, "batcher_requests_total", status="503") == 1
    assert value(first, "batcher_requests_sent_total") == 6
    assert value(first, "batcher_tokens_total", kind="admitted") == 720
    assert value(first, "batcher_tokens_total", kind="prompt") == 400
    assert value(first, "batcher_tokens_total", kind="completion") == 100
    assert value(first, "batcher_rate_limited_total") == 1
    assert value(first, "batcher_retries_total") == 2
    assert value(first, "batcher_in_flight_requests") == 3
    assert value(first, "batcher_input_rows") == 50
    assert value(first, "batcher_rows_remaining") == 45
    assert value(first, "batcher_elapsed_seconds") == 10.0
    assert value(first, "batcher_eta_seconds") == pytest.approx(45 / (5 / 10))
    assert value(first, "batcher_cost_usd_total") == pytest.approx((400 * 0.15 + 100 * 0.6) / 1e6)
    m = {"model": "gpt-4o-mini"}
    assert value(first, "batcher_limit_requests_per_second", **m) == 10.0
    assert value(first, "batcher_limit_tokens_per_second", **m) == 1000.0
    assert value(first, "batcher_effective_requests_per_second", **m) == 9.0
    assert value(first, "batcher_effective_tokens_per_second", **m) == 900.0
    assert value(first, "batcher_admission_paused", **m) == 1.0


def test_port_in_use_names_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(JobSpecError, match=r"metrics\.prometheus_port"):
            MetricsServer(RunStats(), port=port).start()


def test_textfile_is_valid_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "textfile" / "labels.prom"
    write_textfile(path, busy_stats(), job_name="labels", exit_code=3, ended_at=1_764_000_000.0)
    text = path.read_text()
    samples = parse(text)
    assert value(samples, "batcher_rows_total", status="ok") == 4
    assert value(samples, "batcher_run_exit_code") == 3
    assert value(samples, "batcher_run_end_timestamp_seconds") == 1_764_000_000.0
    assert "# TYPE batcher_rows_total counter" in text or "# TYPE batcher_rows counter" in text
    assert [p.name for p in path.parent.iterdir()] == ["labels.prom"]  # no temp file left


async def test_scraped_during_a_real_run_and_matching_its_summary(
    tmp_path: Path, mock_server
) -> None:
    """A real run (engine in this process, real HTTP to the bundled server): `/metrics`
    scraped while it goes parses; at its end the counters equal the run's summary."""
    from batcher.engine import Engine, RunOptions

    srv = mock_server(
        rpm=None,
        tpm=None,
        latency_s=0.02,
        rate_limit_storm_requests=(4, 6),
        storm_retry_after_s=0.05,
    )
    rows = review_rows(40, marker={3: "[[fail-400]]"})
    write_jsonl(tmp_path / "input.jsonl", rows)
    limits = {"gpt-4o-mini": {"rpm": 60_000, "tpm": 10_000_000}}
    job = load_job(write_job(tmp_path, srv.url, concurrency=4, limits=limits))
    engine = Engine(job, RunOptions(progress="quiet", api_key=API_KEY))
    with MetricsServer(engine.stats, port=0, job_name="labels") as server:
        run = asyncio.create_task(engine.run())
        while engine.stats.done < 10 and not run.done():  # a count, not a time
            await asyncio.sleep(0.01)
        during = parse(await asyncio.to_thread(scrape, server.url))
        outcome = await run
        after = parse(await asyncio.to_thread(scrape, server.url))

    assert value(during, "batcher_rows_total", status="ok") >= 9
    assert value(during, "batcher_input_rows") == 40
    summary = outcome_record(outcome)
    assert summary["exit_code"] == 3  # row r3 is an error row
    assert value(after, "batcher_rows_total", status="ok") == summary["rows_ok"] == 39
    assert value(after, "batcher_rows_total", status="error") == summary["rows_error"] == 1
    assert value(after, "batcher_requests_sent_total") == summary["requests_sent"]
    assert value(after, "batcher_rate_limited_total") == summary["rate_limited_429"] == 3
    assert value(after, "batcher_retries_total") == summary["retries"]
    assert value(after, "batcher_tokens_total", kind="admitted") == summary["admitted_tokens"]
    assert value(after, "batcher_tokens_total", kind="prompt") == summary["prompt_tokens"]
    assert value(after, "batcher_in_flight_requests") == 0
    assert value(after, "batcher_rows_remaining") == 0
    by_status = {
        dict(labels)["status"]: v
        for (name, labels), v in after.items()
        if name == "batcher_requests_total"
    }
    # the engine counts responses by status (RunStats.count_response)
    assert sum(by_status.values()) == summary["requests_sent"]
    assert by_status.get("429") == 3
