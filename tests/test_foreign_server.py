"""`batcher run` against a Langdock/Azure stand-in that is not our bundled mock.

The double (tests/langdock_double.py) is written from langdock-api.md alone and varies what that
document leaves open: fixed or sliding windows of 1 s / 10 s / 60 s, its own token estimate,
429 bodies of three gateways with or without headers, failed requests that count, strict
parameter checks, HTML 5xx answers. Each test drives the real CLI over real HTTP.

Bounds on the 429 fraction (429 answers / all requests) used below, and why:
- the server's limits equal the job's (batcher aims at 99 % of them): at most 5 %, and the
  goal is none. Every such 429 is a request batcher's own accounting
  should not have let through, and each costs an AIMD decrease that slows the next ~15 s.
- others take half the quota, or the server's estimate is twice batcher's: at most 20 %.
  Some 429s are the only way to learn the real limit: a few per AIMD step, not a retry burst
  per second while the server's window drains (what batcher did before e9da380).
- the server's estimate is 4x batcher's (no max_tokens: 16,384 charged, 4,096 assumed): at
  most 30 %, all rows ok. AIMD (x0.85, at most once per 2 s) needs ~9 steps to reach 0.25, so
  a short run is mostly convergence (measured 9 %; 25-29 % at half this test's rate).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import API_KEY, env_with_key, read_output, review_rows, run_batcher, write_job
from helpers import write_jsonl as _write_jsonl
from langdock_double import DoubleConfig, DoubleStats, ThreadedDouble

MODEL = "gpt-4o-mini"


@dataclass
class Run:
    code: int
    stderr: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    stats: DoubleStats

    @property
    def fraction_429(self) -> float:
        return self.stats.rate_limited_fraction


@pytest.fixture
def double() -> Iterator[Callable[..., ThreadedDouble]]:
    started: list[ThreadedDouble] = []

    def start(**config: Any) -> ThreadedDouble:
        srv = ThreadedDouble(DoubleConfig(**config)).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def run_job(
    tmp: Path,
    srv: ThreadedDouble,
    n: int,
    *,
    base_url: str | None = None,
    env: dict[str, str] | None = None,
    rows: list[dict[str, Any]] | None = None,
    log_format: str = "json",
    **job: Any,
) -> Run:
    _write_jsonl(tmp / "input.jsonl", rows if rows is not None else review_rows(n))
    path = write_job(tmp, base_url or srv.url(), **job)
    res = run_batcher("run", path, "--log-format", log_format, env=env, timeout=80)
    out = tmp / "out/result.parquet"
    summary: dict[str, Any] = {}
    for line in reversed(res.stdout.strip().splitlines() if log_format == "json" else []):
        record = json.loads(line)
        if record.get("event") == "summary":
            summary = record
            break
    return Run(
        res.returncode, res.stderr, read_output(out) if out.exists() else [], summary, srv.stats
    )


def assert_every_id_once(run: Run, n: int) -> None:
    counts = Counter(r["id"] for r in run.rows)
    assert set(counts) == {f"r{i}" for i in range(n)}, run.stderr[-2000:]
    assert max(counts.values()) == 1


def assert_all_ok(run: Run, n: int) -> None:
    assert run.code == 0, run.stderr[-2000:]
    assert_every_id_once(run, n)
    errors = [r["error"] for r in run.rows if r["status"] != "ok"]
    assert not errors, errors[:3]
    assert run.stats.duplicates == 0  # no row paid for twice
    assert run.stats.accepted[MODEL] == n


def limits(rpm: int, tpm: int) -> dict[str, dict[str, int]]:
    return {MODEL: {"rpm": rpm, "tpm": tpm}}


# ---- 429s of every shape: retried to completion, counted right ----

SHAPES = [
    ("azure", {}),
    ("azure", {"retry_after": True}),
    ("openai", {"retry_after_ms": True, "ratelimit_headers": True}),
    ("anthropic", {}),
]


@pytest.mark.parametrize(("shape", "headers"), SHAPES, ids=lambda x: str(x) if x else "none")
def test_every_429_shape_ends_with_all_rows_ok(
    tmp_path: Path, double: Callable[..., ThreadedDouble], shape: str, headers: dict[str, bool]
) -> None:
    # Another user's burst: requests 2 to 4 are refused, whatever batcher knows.
    srv = double(
        limits={MODEL: (1200, 1_000_000)},
        refuse_requests=frozenset(range(2, 5)),
        body_shape=shape,
        **headers,
    )
    # 8 rows, three refusals: each shape's 429 is read, paced and retried to the end. (Five in
    # a row made the limiter pace at a twentieth of the limits for 30 s: 22 s a shape without
    # headers, for the share bound that tests/test_limiter.py checks on a fake clock.)
    run = run_job(tmp_path, srv, 8, limits=limits(1200, 1_000_000))
    assert_all_ok(run, 8)
    assert run.stats.rate_limited >= 3  # the shape was really exercised
    assert run.summary["rate_limited_429"] == run.stats.rate_limited
    first = run.rows[0]
    assert first["model"] == "gpt-4o-mini-2024-07-18"  # the server's dated name, kept
    assert first["prompt_tokens"] > 0 and first["total_tokens"] > first["prompt_tokens"]


def test_other_users_load_costs_few_429s(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    """Half the quota is used by others, no headers: AIMD must find it without a storm."""
    srv = double(limits={MODEL: (2400, 1_000_000)}, capacity=0.5)
    run = run_job(tmp_path, srv, 60, limits=limits(2400, 1_000_000))
    assert_all_ok(run, 60)
    assert run.fraction_429 <= 0.20, dict(run.stats.by_status)  # measured: 0.03-0.08


# ---- the server's limits equal the job's, no headers at all ----


def test_fixed_windows_without_headers_few_429s(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    srv = double(
        limits={MODEL: (1200, 1_000_000)},
        window_kind="fixed",
        request_windows_s=(1.0, 10.0, 60.0),
        token_windows_s=(10.0, 60.0),
        count_failed=True,
    )
    run = run_job(tmp_path, srv, 50, limits=limits(1200, 1_000_000))
    assert_all_ok(run, 50)
    assert run.fraction_429 <= 0.05, dict(run.stats.by_status)  # measured: 1 of 51


def test_one_second_window_at_the_exact_limit_sees_no_burst(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    """The first admissions are paced and every 1 s window is capped (was a strict xfail: the
    pacing owed a fresh schedule its whole 1 s tolerance, a second's budget at once, and the
    429 it cost cut the rate for the rest of the run)."""
    srv = double(
        limits={MODEL: (600, 1_000_000)},
        window_kind="sliding",
        request_windows_s=(1.0, 10.0, 60.0),
        count_failed=False,
    )
    run = run_job(tmp_path, srv, 30, limits=limits(600, 1_000_000))
    assert_all_ok(run, 30)
    events = [(round(t - run.stats.events[0][0], 3), s) for t, s in run.stats.events]
    # No burst: no second of arrivals holds more than the limit's 10 plus one early arrival.
    times = [t for t, _ in events]
    assert max(sum(1 for u in times if t - 1.0 < u <= t) for t in times) <= 11, str(events)
    # Paced at 99 % of the exact limit, 11 requests span 1.01 s: a request that reaches the
    # server 10 ms late (a new connection at the start, a loaded machine) can still make one
    # 429, which only pauses (a lone 429 is no reason to slow down).
    assert run.stats.rate_limited <= 1, str(events)
    assert run.summary["effective"][MODEL]["multiplier"] == 1.0


def test_ratelimit_headers_of_a_one_second_window_do_not_throttle(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    """x-ratelimit-* that describe the server's 1 s window (the doc leaves their window open);
    nobody else uses the quota, so batcher should keep (nearly) the full rate. (Was a strict
    xfail: the 1 s remaining was read against our 10 s usage while the run ramped up.)"""
    srv = double(
        limits={MODEL: (1200, 1_000_000)},
        window_kind="sliding",
        request_windows_s=(1.0, 10.0, 60.0),
        ratelimit_headers=True,
        ratelimit_window_s=1.0,
    )
    run = run_job(tmp_path, srv, 20, limits=limits(1200, 1_000_000))
    assert_all_ok(run, 20)
    effective = run.summary["effective"][MODEL]
    assert effective["multiplier"] >= 0.8, effective
    assert effective["share_reductions"] == 0 or effective["share"] >= 0.8, effective


# ---- the server's token estimate is larger than batcher's ----


def test_server_counting_twice_our_tokens(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    """The server's estimate is 2x batcher's tiktoken count, over 1/10/60 s token windows."""
    srv = double(
        limits={MODEL: (100_000, 96_000)},
        window_kind="sliding",
        token_windows_s=(1.0, 10.0, 60.0),
        token_factor=2.0,
    )
    run = run_job(tmp_path, srv, 80, limits=limits(100_000, 96_000))
    assert_all_ok(run, 80)
    assert run.stats.rate_limited > 0  # the mismatch was really felt
    assert run.fraction_429 <= 0.20, dict(run.stats.by_status)  # measured: 0.02-0.09


def test_server_default_max_tokens_larger_than_ours(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    """No max_tokens: the server charges 16,384, batcher assumes 4,096 (4x). Before e9da380
    this lost rows: every post-pause burst spent an attempt of each queued row."""
    srv = double(
        limits={MODEL: (100_000, 9_600_000)},
        window_kind="sliding",
        token_windows_s=(1.0, 10.0, 60.0),
        default_max_tokens=16_384,
    )
    run = run_job(tmp_path, srv, 30, limits=limits(100_000, 9_600_000), params={"temperature": 0})
    assert_all_ok(run, 30)
    assert run.fraction_429 <= 0.30, dict(run.stats.by_status)  # measured: 0.09


# ---- the edges: key, URL, o-series, faults ----


def test_bad_key_stops_after_one_request(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    srv = double(api_key="the-right-key")
    run = run_job(
        tmp_path, srv, 200, concurrency=32, env=env_with_key("wrong-key-4711"), log_format="text"
    )
    assert run.code == 4, run.stderr[-2000:]
    assert run.stats.requests == 1
    assert "API key" in run.stderr and "TEST_LANGDOCK_KEY" in run.stderr
    assert "wrong-key-4711" not in run.stderr


def test_bad_key_reason_is_reported_in_json_mode(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    srv = double(api_key="the-right-key")
    run = run_job(tmp_path, srv, 20, env=env_with_key("wrong-key-4711"))
    assert run.code == 4 and run.stats.requests == 1
    assert "API key" in run.stderr + json.dumps(run.summary)


def test_dedicated_deployment_base_url(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    srv = double(prefixes=("/api/public",), api_key=API_KEY)
    run = run_job(tmp_path, srv, 20, base_url=srv.url("eu", prefix="/api/public"))
    assert_all_ok(run, 20)
    assert set(run.stats.paths) == {"/api/public/openai/eu/v1/chat/completions"}


def test_o_series_jobs_pass_a_strict_server(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    srv = double()
    run = run_job(
        tmp_path,
        srv,
        10,
        model="o3-mini",
        params={"max_tokens": 20, "temperature": 1},
        messages=[{"role": "user", "content": "Review: {text}"}],
    )
    assert run.code == 0, run.stderr[-2000:]
    assert_every_id_once(run, 10)
    assert {r["model"] for r in run.rows} == {"o3-mini-2025-01-31"}
    assert run.stats.by_status == Counter({200: 10})


def test_o_series_in_batch_api_file(tmp_path: Path, double: Callable[..., ThreadedDouble]) -> None:
    srv = double()
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "o3-mini" if i % 2 else "gpt-4o",
                "messages": [{"role": "user", "content": f"Say hi {i}"}],
                "max_tokens": 16,
            },
        }
        for i in range(12)
    ]
    run = run_job(
        tmp_path,
        srv,
        12,
        rows=lines,
        input_format="batch",
        messages=None,
        id_column=None,
        model=None,
        params={},
    )
    assert run.code == 0, run.stderr[-2000:]
    assert_every_id_once(run, 12)
    assert run.stats.by_status == Counter({200: 12})


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("gpt-4o", {"n": 2}),
        ("gpt-4o", {"service_tier": "default"}),
        ("gpt-4o", {"parallel_tool_calls": False}),
        ("gpt-4o", {"stream_options": {"include_usage": True}}),
        ("o3-mini", {"temperature": 0.5}),
    ],
)
def test_batch_body_the_server_would_refuse_is_caught_before_sending(
    tmp_path: Path, double: Callable[..., ThreadedDouble], model: str, extra: dict[str, Any]
) -> None:
    srv = double()
    lines = [
        {
            "custom_id": f"r{i}",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"hi {i}"}],
                "max_completion_tokens": 8,
                **(extra if i == 1 else {}),
            },
        }
        for i in range(3)
    ]
    run = run_job(
        tmp_path,
        srv,
        3,
        rows=lines,
        input_format="batch",
        messages=None,
        id_column=None,
        model=None,
        params={},
        log_format="text",
    )
    assert run.code == 2, run.stderr[-2000:]
    assert next(iter(extra)) in run.stderr
    assert run.stats.requests == 0


def test_html_5xx_and_slow_answers_are_retried(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    srv = double(error_rate=0.2, slow_s=1.0, seed=7)
    rows = review_rows(30, marker={4: "[[slow]]", 9: "[[slow]]", 20: "[[slow]]"})
    run = run_job(
        tmp_path,
        srv,
        30,
        rows=rows,
        limits=limits(6000, 1_000_000),
        retry={"max_attempts": 12, "max_wait_s": 0.2},
    )
    assert_all_ok(run, 30)
    assert run.stats.by_status[500] + run.stats.by_status[503] > 0
    assert run.summary["server_errors"] == run.stats.by_status[500] + run.stats.by_status[503]


def test_server_outage_is_not_reported_as_a_wrong_setup(
    tmp_path: Path, double: Callable[..., ThreadedDouble]
) -> None:
    """Every answer a 503 or 500 with an HTML page: stop (or record errors), but never blame
    the job file, and never print the page source."""
    srv = double(error_rate=1.0, seed=1)
    run = run_job(
        tmp_path, srv, 20, retry={"max_attempts": 2, "max_wait_s": 0.1}, log_format="text"
    )
    assert run.code in (3, 4), run.stderr[-2000:]
    assert "base_url" not in run.stderr
    assert "<html>" not in run.stderr
