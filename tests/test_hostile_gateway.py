"""Issue 11 end to end: the real CLI against a gateway that misbehaves (tests/hostile_gateway.py).

Every test keys its gateway's behaviour to request counts, never to time, and asserts the exit
code, the message, the rows written or journaled, and the requests the gateway received.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    API_KEY,
    env_with_key,
    read_output,
    review_rows,
    run_batcher,
    write_job,
    write_jsonl,
)
from hostile_gateway import (
    DEEPLY_NESTED,
    MALFORMED_SHAPES,
    Behaviour,
    HostileGateway,
    Phase,
    completion,
    cut,
    deployment_gone,
    drop,
    firewall,
    malformed,
    ok,
    rate_limited,
    raw_200,
    rejected,
    server_error,
    stall,
    stall_body,
    truncated,
)

from batcher.journal import journal_path
from batcher.spec import LimiterConfig

OUT = Path("out/result.parquet")
# Fast retries; no response store (a stored answer would be a request the gateway never sees).
BASE: dict[str, Any] = {
    "concurrency": 4,
    "retry": {"max_attempts": 6, "initial_wait_s": 0.05, "max_wait_s": 0.2},
    "cache": {"enabled": False},
    "limits": {"gpt-4o-mini": {"rpm": 100_000, "tpm": 100_000_000}},  # the gateway has none
}
PAUSE_CAP_KEY = "max_pause_s"  # limiter.max_pause_s: the cap on a pause the server asks for
PAUSE_CAP_EXPOSED = PAUSE_CAP_KEY in LimiterConfig.model_fields


@pytest.fixture
def gateway() -> Iterator[Callable[..., HostileGateway]]:
    started: list[HostileGateway] = []

    def start(script: list[Phase], **kw: Any) -> HostileGateway:
        gw = HostileGateway(script, **kw).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def job_file(tmp: Path, gw: HostileGateway, **overrides: Any) -> Path:
    return write_job(tmp, gw.url, **{**BASE, **overrides})


def journal(tmp: Path) -> dict[str, dict[str, Any]]:
    """The last result journaled for each row id."""
    path = journal_path(tmp / OUT)
    rows: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("t") == "r":
            rows[rec["id"]] = rec
    return rows


def row_of(body: Any) -> str:
    """The row a request was for (review_rows' text: "review number N ...")."""
    text = body["messages"][-1]["content"]
    return "r" + text.split("review number ")[1].split()[0]


def sends_per_row(gw: HostileGateway) -> Counter[str]:
    return Counter(row_of(r.body) for r in gw.received)


def no_traceback(res: Any) -> None:
    assert "Traceback" not in res.stderr + res.stdout, res.stderr


def run_bounded(*args: str | Path, limit_s: float = 30.0) -> Any:
    """`run_batcher` that stops the run (SIGINT: the engine's graceful stop) instead of
    hanging when a pause is not capped; the test then fails on its exit code."""
    watchdog = threading.Timer(limit_s, os.kill, (os.getpid(), signal.SIGINT))
    watchdog.start()
    try:
        res = run_batcher(*args)
    finally:
        watchdog.cancel()
    assert res.returncode != 130, f"the run did not end within {limit_s:g} s: {res.stderr}"
    return res


# ---- 1. pauses the server asks for are capped ----------------------------------------------

HOURS = {
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "5h",
    "x-ratelimit-remaining-tokens": "0",
    "x-ratelimit-reset-tokens": "3h20m0s",
}
PAUSE_HEADERS: dict[str, dict[str, str]] = {
    "retry-after-100000": {"retry-after": "100000"},
    "retry-after-inf": {"retry-after": "inf"},
    "retry-after-nan": {"retry-after": "nan"},
    "retry-after-negative": {"retry-after": "-1"},
    "retry-after-ms-huge": {"retry-after-ms": "1e15", "retry-after": "1e12"},
    "retry-after-ms-inf": {"retry-after-ms": "inf"},
    "reset-hours": HOURS,
}
TEST_CAP_S = 0.5


def cap_pauses(monkeypatch: pytest.MonkeyPatch, cap_s: float = TEST_CAP_S) -> None:
    """The run's limiter caps every pause at TEST_CAP_S instead of the default 60 s (the
    Policy knob the job file's limiter.max_pause_s would set), so a test can tell a capped
    pause from an uncapped one in seconds."""
    import batcher.engine
    from batcher.admission import LocalLimiter

    def limiter(job: Any) -> LocalLimiter:
        def limits(model: str) -> tuple[int, int]:
            return job.limit_for(model).rpm, job.limit_for(model).tpm

        return LocalLimiter(limits, adaptive=job.limiter.adaptive, max_pause_s=cap_s)

    monkeypatch.setattr(batcher.engine, "make_limiter", limiter)


def pause_script(headers: dict[str, str], where: str) -> list[Phase]:
    if where == "first":
        return [(1, rate_limited(headers)), (None, ok())]
    if where == "mid":
        return [(5, ok()), (1, rate_limited(headers)), (None, ok())]
    return [(3, ok()), (1, ok(headers=headers)), (None, ok())]  # a 200 near the limit


def _pause_cases() -> Iterator[Any]:
    for name, headers in PAUSE_HEADERS.items():
        for where in ("first", "mid"):
            yield pytest.param(headers, where, id=f"{name}-{where}")
    yield pytest.param(HOURS, "ok-answer", id="reset-hours-on-200")


@pytest.mark.parametrize(("headers", "where"), list(_pause_cases()))
def test_huge_or_absurd_pauses_are_capped(
    tmp_path: Path,
    gateway: Callable[..., HostileGateway],
    monkeypatch: pytest.MonkeyPatch,
    headers: dict[str, str],
    where: str,
) -> None:
    cap_pauses(monkeypatch)
    gw = gateway(pause_script(headers, where))
    write_jsonl(tmp_path / "input.jsonl", review_rows(10))
    start = time.monotonic()
    res = run_bounded("run", job_file(tmp_path, gw))
    took = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    no_traceback(res)
    rows = read_output(tmp_path / OUT)
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    assert gw.ok_sent == 10
    assert gw.requests == 10 + (where != "ok-answer")  # the refused one was sent again
    assert took < 10, f"a pause was not capped: the run took {took:.1f} s"


@pytest.mark.xfail(
    not PAUSE_CAP_EXPOSED,
    reason=f"limiter.{PAUSE_CAP_KEY} is not a job-file key yet (issue 11: 'default 60 s, a "
    "setting'); the cap is only Policy.max_pause_s",
    strict=False,
)
def test_pause_cap_is_a_job_setting(tmp_path: Path, gateway: Callable[..., HostileGateway]) -> None:
    gw = gateway(pause_script({"retry-after": "100000"}, "mid"))
    write_jsonl(tmp_path / "input.jsonl", review_rows(10))
    job = job_file(tmp_path, gw, limiter={PAUSE_CAP_KEY: TEST_CAP_S})
    start = time.monotonic()
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert gw.requests == 11
    assert time.monotonic() - start < 5


# ---- 2. an outage trips the circuit breaker; a plain rerun finishes ------------------------

OUTAGES: dict[str, Behaviour] = {
    "429-forever": rate_limited(),
    "500-everything": server_error(500),
    "stall": stall(),
    "truncated-200": truncated(),
    "dropped": drop(),
    "cut-200": cut(),
}
CAUSE = {  # how the stop message names each outage's failures
    "429-forever": "x 429",
    "500-everything": "x 5xx",
    "stall": "x timeout",
    "truncated-200": "x truncated",
    "dropped": "x connection",
    "cut-200": "x truncated",
}


@pytest.mark.parametrize(
    ("kind", "breaker"),
    [
        *[(kind, {"failures": 4, "window_s": 60}) for kind in OUTAGES],
        ("500-everything", None),  # the defaults (10 failures, 60 s) at concurrency 4
    ],
    ids=[*OUTAGES, "500-everything-default-breaker"],
)
def test_outage_trips_the_breaker_and_a_rerun_finishes(
    tmp_path: Path,
    gateway: Callable[..., HostileGateway],
    kind: str,
    breaker: dict[str, Any] | None,
) -> None:
    good, max_attempts = 6, 6 if breaker else 8
    gw = gateway([(good, ok()), (None, OUTAGES[kind])])
    write_jsonl(tmp_path / "input.jsonl", review_rows(40))
    job = job_file(
        tmp_path,
        gw,
        endpoint={"base_url": gw.url, "api_key_env": "TEST_LANGDOCK_KEY", "timeout_s": 1},
        retry={**BASE["retry"], "max_attempts": max_attempts},
        circuit_breaker=breaker,
        grace_period_s=5,
    )
    start = time.monotonic()
    res = run_batcher("run", job)
    first = time.monotonic() - start
    assert res.returncode == 4, res.stderr
    no_traceback(res)
    assert "outage" in res.stderr and CAUSE[kind] in res.stderr
    assert "Once the service answers again, run the same command again to resume" in res.stderr
    journaled = journal(tmp_path)
    assert [r for r in journaled.values() if r["status"] != "ok"] == []  # no outage errors
    assert len(journaled) == gw.ok_sent == good
    failed = gw.requests - good
    assert failed >= (breaker or {"failures": 10})["failures"]
    assert max(sends_per_row(gw).values()) < max_attempts  # no row used up its attempts
    assert not (tmp_path / OUT).exists()

    gw.switch([(None, ok())])  # the gateway is back
    start = time.monotonic()
    res = run_batcher("run", job)
    rerun = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    rows = read_output(tmp_path / OUT)
    assert len(rows) == 40 and all(r["status"] == "ok" and r["attempts"] == 1 for r in rows)
    assert gw.ok_sent == 40  # every row paid once
    print(f"\n{kind}: outage run {first:.2f} s ({failed} failed requests), rerun {rerun:.2f} s")
    assert first < 15, f"the breaker took {first:.1f} s to trip"


def test_a_flapping_outage_trips_the_breaker(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    flapping: list[Phase] = [(1, server_error(502)), (1, drop())] * 100
    gw = gateway([(4, ok()), *flapping])
    write_jsonl(tmp_path / "input.jsonl", review_rows(12))
    job = job_file(tmp_path, gw, circuit_breaker={"failures": 4, "window_s": 60})
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr  # an outage mixes kinds: one family trips it
    assert "outage" in res.stderr
    assert [r for r in journal(tmp_path).values() if r["status"] != "ok"] == []
    assert max(sends_per_row(gw).values()) < 6
    gw.switch([(None, ok())])
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert gw.ok_sent == 12


def test_an_overload_of_429s_and_503s_trips_the_breaker(
    tmp_path: Path, gateway: Callable[..., HostileGateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    cap_pauses(monkeypatch, 0.05)  # the 429s' pauses are not what this is about
    overloaded: list[Phase] = [(1, rate_limited()), (1, server_error(503))] * 100
    gw = gateway([(4, ok()), *overloaded])
    write_jsonl(tmp_path / "input.jsonl", review_rows(8))
    job = job_file(
        tmp_path,
        gw,
        retry={**BASE["retry"], "max_attempts": 4},
        circuit_breaker={"failures": 4, "window_s": 60},
    )
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr
    assert [r for r in journal(tmp_path).values() if r["status"] != "ok"] == []
    assert max(sends_per_row(gw).values()) < 4


@pytest.mark.parametrize("kind", ["429-forever", "stall", "truncated-200"])
def test_outage_at_concurrency_64_with_the_default_breaker(
    tmp_path: Path, gateway: Callable[..., HostileGateway], kind: str
) -> None:
    gw = gateway([(10, ok()), (None, OUTAGES[kind])])
    write_jsonl(tmp_path / "input.jsonl", review_rows(300))
    job = job_file(
        tmp_path,
        gw,
        concurrency=64,
        endpoint={"base_url": gw.url, "api_key_env": "TEST_LANGDOCK_KEY", "timeout_s": 1},
        retry=None,  # the defaults: 8 attempts
        grace_period_s=5,
    )
    start = time.monotonic()
    res = run_batcher("run", job)
    took = time.monotonic() - start
    assert res.returncode == 4, res.stderr
    assert "outage" in res.stderr
    assert [r for r in journal(tmp_path).values() if r["status"] != "ok"] == []
    assert max(sends_per_row(gw).values()) < 8
    print(f"\n{kind} at c=64: outage run {took:.2f} s ({gw.requests - 10} failed requests)")


def test_outage_from_the_first_request(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(None, server_error(503))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(20))
    job = job_file(tmp_path, gw, concurrency=16)
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr
    no_traceback(res)
    assert "did not answer the first request" in res.stderr
    assert gw.requests == 3  # the probe's attempts, nothing else
    assert journal(tmp_path) == {}
    gw.switch([(None, ok())])
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert gw.ok_sent == 20


def test_truncated_answers_are_retried_and_counted_as_spent(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(3, ok()), (2, truncated()), (None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(10))
    res = run_batcher("run", job_file(tmp_path, gw, concurrency=1), "--log-format", "json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["truncated_answers"] == 2
    assert gw.requests == 12
    rows = {r["id"]: r for r in read_output(tmp_path / OUT)}
    assert rows["r3"]["attempts"] == 3 and rows["r3"]["status"] == "ok"


def test_a_200_cut_mid_body_is_counted_as_spent(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(3, ok()), (1, cut()), (None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(6))
    res = run_batcher("run", job_file(tmp_path, gw, concurrency=1), "--log-format", "json")
    assert res.returncode == 0, res.stderr
    assert gw.requests == 7
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["truncated_answers"] == 1


def test_an_answer_past_max_answer_mb_is_an_error_row_counted_as_spent(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """A 2 MB answer, and a 20 KB gzip body that inflates to 5 MB, with max_answer_mb 1: each
    row is an error saying so, not retried (it would be as large again), and paid for; the
    others are answered. Nothing past the cap is held in memory (found by review: a 300 MB
    body was read whole, four in flight took ~690 MB)."""
    big = json.dumps(completion("x" * 2_000_000)).encode()
    bomb = gzip.compress(json.dumps(completion("0" * 5_000_000)).encode())
    assert len(bomb) < 50_000
    gw = gateway(
        [
            (1, ok()),
            (1, raw_200(big, "big")),
            (1, Behaviour("bomb", body=bomb, headers={"content-encoding": "gzip"})),
            (None, ok()),
        ]
    )
    write_jsonl(tmp_path / "input.jsonl", review_rows(4))
    endpoint = {"base_url": gw.url, "api_key_env": "TEST_LANGDOCK_KEY", "max_answer_mb": 1}
    job = job_file(tmp_path, gw, concurrency=1, endpoint=endpoint)
    res = run_batcher("run", job, "--log-format", "json")
    assert res.returncode == 3, res.stderr
    no_traceback(res)
    assert gw.requests == 4
    rows = {r["id"]: r for r in read_output(tmp_path / OUT)}
    assert [rows[i]["status"] for i in ("r0", "r1", "r2", "r3")] == ["ok", "error", "error", "ok"]
    for row in ("r1", "r2"):
        assert (
            "larger than endpoint.max_answer_mb (1 MB): not kept (it was paid for)"
            in (rows[row]["error"])
        )
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    answered = rows["r0"]["cost_usd"] + rows["r3"]["cost_usd"]
    assert summary["spent_usd"] > answered * 1.5  # the two large answers are booked too


def test_a_web_page_for_an_answer_is_a_wrong_base_url_at_the_first_request(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """base_url pointing at a login page or a website: a 200 with HTML. At the first request
    it was 'the service seems down, run again later' (exit 4, found by review); it is the
    setup (exit 2), said with the page's title. Later in a run, a gateway's hiccup: retried."""
    page = b"<!DOCTYPE html><html><head><title>Sign in | Example SSO</title></head></html>"
    gw = gateway([(None, raw_200(page, "login page"))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(5))
    job = job_file(tmp_path, gw)
    res = run_batcher("run", job)
    assert res.returncode == 2, res.stderr
    no_traceback(res)
    assert "answered with a web page" in res.stderr and "'Sign in | Example SSO'" in res.stderr
    assert "endpoint.base_url" in res.stderr
    assert gw.requests == 1  # not retried: a web page is the setup (and bills nothing)
    gw.switch([(2, ok()), (1, raw_200(page, "login page")), (None, ok())])
    res = run_batcher("run", job_file(tmp_path, gw, concurrency=1))
    assert res.returncode == 0, res.stderr
    assert {r["status"] for r in read_output(tmp_path / OUT)} == {"ok"}


def test_a_200_whose_body_stalls_is_counted_as_spent(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(3, ok()), (1, stall_body()), (None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(6))
    endpoint = {"base_url": gw.url, "api_key_env": "TEST_LANGDOCK_KEY", "timeout_s": 1}
    job = job_file(tmp_path, gw, concurrency=1, endpoint=endpoint)
    res = run_batcher("run", job, "--log-format", "json")
    assert res.returncode == 0, res.stderr
    assert gw.requests == 7
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["truncated_answers"] == 1


def test_one_stalled_answer_is_retried(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(5, ok()), (1, stall()), (None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(20))
    endpoint = {"base_url": gw.url, "api_key_env": "TEST_LANGDOCK_KEY", "timeout_s": 1}
    res = run_batcher("run", job_file(tmp_path, gw, endpoint=endpoint))
    assert res.returncode == 0, res.stderr
    assert gw.requests == 21 and gw.ok_sent == 20
    assert sum(r["attempts"] for r in read_output(tmp_path / OUT)) == 21


def test_truncated_answers_stay_within_the_retry_budget(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(1, ok()), (None, truncated())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(4))
    job = job_file(
        tmp_path,
        gw,
        concurrency=1,
        retry={**BASE["retry"], "max_attempts": 2},
        circuit_breaker={"failures": 100, "window_s": 60},
    )
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    assert gw.requests == 1 + 3 * 2  # each paid-for unreadable answer retried once, no more
    rows = {r["id"]: r for r in read_output(tmp_path / OUT)}
    for rid in ("r1", "r2", "r3"):
        assert rows[rid]["status"] == "error" and "gave up after 2 attempts" in rows[rid]["error"]


def test_an_unreadable_answer_is_shown_as_text(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(1, ok()), (None, truncated())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    job = job_file(
        tmp_path,
        gw,
        concurrency=1,
        retry={**BASE["retry"], "max_attempts": 1},
        circuit_breaker={"failures": 100, "window_s": 60},
    )
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    error = {r["id"]: r for r in read_output(tmp_path / OUT)}["r1"]["error"]
    assert '{"id": "chatcmpl-' in error and "b'" not in error and "\\'" not in error


# ---- 3. a rejected key mid-run: what is in flight finishes and is journaled ----------------


@pytest.mark.parametrize(("status", "concurrency"), [(401, 8), (403, 8), (401, 32)])
def test_key_rejected_mid_run_keeps_answers_in_flight(
    tmp_path: Path, gateway: Callable[..., HostileGateway], status: int, concurrency: int
) -> None:
    # After the probe, requests go in waves of `concurrency` (latency >> send jitter): the
    # first rejected request is the last of a wave, the rest of it on its way to good answers.
    good = 2 * concurrency
    gw = gateway([(good, ok(latency_s=0.3)), (None, rejected(status))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(10 * concurrency))
    job = job_file(tmp_path, gw, concurrency=concurrency)
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr
    no_traceback(res)
    assert f"rejected the API key ({status})" in res.stderr
    assert "TEST_LANGDOCK_KEY" in res.stderr
    journaled = journal(tmp_path)
    assert gw.ok_sent == good
    assert sum(r["status"] == "ok" for r in journaled.values()) == gw.ok_sent  # none lost
    assert [r for r in journaled.values() if r["status"] != "ok"] == []
    assert gw.requests - gw.ok_sent <= concurrency  # at most one wave of rejected requests
    # (How many good answers were still on their way when the first 401 came depends on the
    # machine's scheduling: not asserted; that none of them is lost is.)


def test_a_firewall_blocking_one_prompt_makes_an_error_row_not_a_rejected_key(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """A WAF answers one prompt 403 (a Cloudflare page), every other prompt is answered: that
    row is an error row saying so, the job goes on, and a rerun does not send it again. The
    same when the blocked row is the first request, which goes alone."""
    for blocked in (5, 0):
        run_dir = tmp_path / f"blocked-{blocked}"
        run_dir.mkdir()
        gw = gateway([(None, ok())], by_prompt={"BLOCKME": firewall()})
        write_jsonl(run_dir / "input.jsonl", review_rows(12, marker={blocked: "BLOCKME"}))
        job = job_file(run_dir, gw, concurrency=2)
        res = run_batcher("run", job)
        assert res.returncode == 3, res.stderr
        no_traceback(res)
        assert "rejected the API key" not in res.stderr
        assert gw.requests == 12  # the blocked row once: a 403 is not retried
        rows = {r["id"]: r for r in read_output(run_dir / OUT)}
        assert len(rows) == 12
        bad = rows.pop(f"r{blocked}")
        assert bad["status"] == "error"
        assert "refused this row (403: Attention Required! | Cloudflare)" in bad["error"]
        assert {r["status"] for r in rows.values()} == {"ok"}
        res = run_batcher("run", job)
        assert res.returncode == 3, res.stderr
        assert gw.requests == 12  # the error row stays an error row: nothing is sent
    # --retry-errors sends only the blocked row. This job's key has worked (its journal holds
    # answers), so the refusal is the row's again.
    res = run_batcher("run", job, "--retry-errors")
    assert res.returncode == 3, res.stderr
    assert gw.requests == 13
    assert (
        "refused this row (403" in {r["id"]: r for r in read_output(run_dir / OUT)}["r0"]["error"]
    )


def test_adjacent_prompts_blocked_by_a_firewall_are_error_rows_in_one_run(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """Two blocked prompts next to each other, sent together (the gateway refuses them once
    both came): two 403s in a row, but neither request was sent after the other's refusal
    came back, so nothing shows the refusals went on. Error rows, exit 3, in the first run
    (the job stopped as 'key rejected' on every run, found by review)."""
    blocked = dataclasses.replace(firewall(), together=2)
    gw = gateway([(None, ok(latency_s=0.05))], by_prompt={"BLOCKME": blocked})
    write_jsonl(tmp_path / "input.jsonl", review_rows(20, marker={10: "BLOCKME", 11: "BLOCKME"}))
    res = run_batcher("run", job_file(tmp_path, gw, concurrency=4))
    assert res.returncode == 3, res.stderr
    no_traceback(res)
    rows = {r["id"]: r["status"] for r in read_output(tmp_path / OUT)}
    assert [i for i, status in rows.items() if status == "error"] == ["r10", "r11"]
    assert gw.requests == 20


def test_refusals_for_a_model_others_outlive_do_not_slow_the_run(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """A Batch-API input whose two rows name a model that is not deployed: 404s that no
    answer of that model ever clears. The key works (the other model answers), so the run
    goes on at its concurrency, not one request at a time to its end; the two rows are error
    rows when it ends."""
    gw = gateway([(None, ok(latency_s=0.01))], by_prompt={'"model":"gpt-4o"': deployment_gone()})
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o" if i in (5, 6) else "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"review number {i} is fine"}],
                "max_tokens": 8,
            },
        }
        for i in range(700)  # two read batches (512 rows each at most): rows 512-699 come after
    ]
    write_jsonl(tmp_path / "batch.jsonl", lines)
    job = job_file(
        tmp_path, gw, input="batch.jsonl", messages=None, model=None, id_column=None, concurrency=4
    )
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    rows = {r["id"]: r["status"] for r in read_output(tmp_path / OUT)}
    assert [i for i, status in rows.items() if status == "error"] == ["r5", "r6"]
    assert len(rows) == 700 and gw.requests == 700
    refused = max(r.n for r in gw.received if r.behaviour == "404")
    later = gw.received[refused + 8 :]  # once the refusals came back
    assert len(later) >= 20 and max(r.in_flight for r in later) >= 1, "one at a time to the end"


@pytest.mark.parametrize("concurrency", [2, 8])
def test_blocked_prompts_at_the_end_of_the_input_are_error_rows(
    tmp_path: Path, gateway: Callable[..., HostileGateway], concurrency: int
) -> None:
    """The last rows blocked: their 403s come back with nothing sent after them, the rows
    before still in flight (answered, but sent before the refusals came back: they prove
    nothing either way). Not the key: the rows are held to the run's end, then error rows,
    exit 3. Every rerun stopped as 'key rejected' when the streak counted refusals of requests
    sent together (found by review)."""
    blocked = dataclasses.replace(firewall(), together=2)
    gw = gateway([(None, ok(latency_s=0.3))], by_prompt={"BLOCKME": blocked})
    write_jsonl(tmp_path / "input.jsonl", review_rows(12, marker={10: "BLOCKME", 11: "BLOCKME"}))
    job = job_file(tmp_path, gw, concurrency=concurrency)
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    assert "rejected the API key" not in res.stderr
    rows = {r["id"]: r["status"] for r in read_output(tmp_path / OUT)}
    assert [i for i, status in rows.items() if status == "error"] == ["r10", "r11"]
    assert len(rows) == 12 and gw.requests == 12
    assert run_batcher("run", job).returncode == 3  # a rerun sends nothing
    assert gw.requests == 12


def test_a_refused_repair_keeps_the_rows_answer_and_no_streak(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """A structured answer's repair request refused 403 (the firewall dislikes the answer it
    quotes) left an entry in the refusal streak for the rest of the run: one later blocked
    prompt then stopped the job as a rejected key (found by review)."""
    valid = json.dumps(completion('{"label": "ok"}')).encode()
    params = {
        "max_tokens": 8,
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "x",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {"label": {"type": "string"}},
                    "required": ["label"],
                    "additionalProperties": False,
                },
            },
        },
    }
    gw = gateway(
        [(1, raw_200(valid, "valid")), (1, ok()), (None, raw_200(valid, "valid"))],
        by_prompt={"label: fine": firewall(), "BLOCKME": firewall()},
    )
    write_jsonl(tmp_path / "input.jsonl", review_rows(40, marker={30: "BLOCKME"}))
    res = run_batcher("run", job_file(tmp_path, gw, concurrency=1, params=params))
    assert res.returncode == 3, res.stderr
    rows = {r["id"]: r for r in read_output(tmp_path / OUT)}
    assert [i for i, r in rows.items() if r["status"] == "error"] == ["r1", "r30"]
    assert "refused this row (403" in rows["r30"]["error"]


def test_a_job_whose_only_requests_are_refused_403_says_it_cannot_tell(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """One row, refused 403, and nothing ever answered: the key or a firewall? Stopped as a
    rejected key that says so; the row is not recorded, a rerun sends it."""
    gw = gateway([(None, firewall())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(1))
    job = job_file(tmp_path, gw)
    for sent in (1, 2):
        res = run_batcher("run", job)
        assert res.returncode == 4, res.stderr
        no_traceback(res)
        assert "rejected the API key (403)" in res.stderr
        assert "Nothing was answered in this run: the refused rows ('r0') are not recorded" in (
            res.stderr
        )
        assert gw.requests == sent
        assert journal(tmp_path) == {}


def test_a_403_for_two_rows_in_a_row_is_the_key(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """Without any answer, two different rows refused with 403 stop the job as a rejected key
    after two requests; neither is recorded as an error row."""
    gw = gateway([(None, rejected(403))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(40))
    res = run_batcher("run", job_file(tmp_path, gw, concurrency=8))
    assert res.returncode == 4, res.stderr
    no_traceback(res)
    assert "rejected the API key (403)" in res.stderr
    assert "2 different rows refused in a row" in res.stderr
    assert gw.requests == 2  # the first requests go one at a time
    assert journal(tmp_path) == {}


def test_a_deployment_deleted_mid_run_stops_the_job_and_a_rerun_finishes_it(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """After answers, 404 DeploymentNotFound for every request: the job stops after a few
    refusals (not one request per remaining row), records none of them as an error, and once
    the deployment is back a plain rerun sends exactly the rows not yet answered."""
    concurrency = 4
    gw = gateway([(6, ok()), (None, deployment_gone())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(300))
    job = job_file(tmp_path, gw, concurrency=concurrency)
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr
    no_traceback(res)
    assert "3 different rows in a row were refused with 404" in res.stderr
    assert "DeploymentNotFound" in res.stderr
    assert gw.requests - gw.ok_sent <= concurrency + 3  # the wave in flight, then the stop
    journaled = journal(tmp_path)
    assert {r["status"] for r in journaled.values()} == {"ok"}
    assert len(journaled) == gw.ok_sent == 6
    gw.switch([(None, ok())])
    before = gw.requests
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert gw.requests - before == 300 - 6
    assert {r["status"] for r in read_output(tmp_path / OUT)} == {"ok"}


def test_an_answer_to_a_request_sent_before_a_refusal_came_back_clears_nothing(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """r3 reaches the gateway before r4 but is answered (404: the deployment went) after r4's
    200: r4 was sent after r3, yet before r3's refusal came back, so its answer says nothing
    of r3. r3 stays unrecorded, like the refusals after it, and a rerun sends it. (Judged by
    the order of sending, r3 became an error row a rerun skips. The 0.5 s only makes that
    order likely: with r3's 404 back first, r3 is held either way, and the test still holds.)"""
    gone = dataclasses.replace(deployment_gone(), latency_s=0.5)
    gw = gateway([(5, ok()), (None, deployment_gone())], by_prompt={"SLOW404": gone})
    write_jsonl(tmp_path / "input.jsonl", review_rows(60, marker={3: "SLOW404"}))
    job = job_file(tmp_path, gw, concurrency=4)
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr
    assert "3 different rows in a row were refused with 404" in res.stderr
    journaled = journal(tmp_path)
    assert {r["status"] for r in journaled.values()} == {"ok"}
    # The first five to arrive are answered (r3 among them or not: connections race)
    assert "r3" not in journaled and len(journaled) == gw.ok_sent
    gw.switch([(None, ok())])
    gw.by_prompt.clear()
    before = gw.requests
    assert run_batcher("run", job).returncode == 0
    assert gw.requests - before == 60 - len(journaled)
    assert {r["status"] for r in read_output(tmp_path / OUT)} == {"ok"}


# ---- 4. malformed 200s: an error row with the raw body, never a poisoned journal -----------

FIXABLE = {"content_list", "content_lone_surrogate", "usage_missing"}  # normalised: ok rows
EITHER = {"usage_nulls", "usage_beyond_int64"}  # may be read as unknown counts, or refused


@pytest.mark.parametrize(
    "shape",
    [s for s in MALFORMED_SHAPES],
)
def test_malformed_answer_is_an_error_row_and_reruns_cleanly(
    tmp_path: Path, gateway: Callable[..., HostileGateway], shape: str
) -> None:
    gw = gateway([(1, ok()), (1, malformed(shape)), (None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(4))
    job = job_file(tmp_path, gw, concurrency=1)  # one at a time: row r1 gets the bad answer
    res = run_batcher("run", job)
    no_traceback(res)
    assert gw.requests == 4  # a 200 is paid: never retried
    rows = {r["id"]: r for r in read_output(tmp_path / OUT)}
    assert len(rows) == 4
    bad = rows["r1"]
    for command in ("status", "inspect"):  # both read the journal this answer went into
        shown = run_batcher(command, job)
        assert shown.returncode == 0, shown.stderr
        no_traceback(shown)
    if shape in FIXABLE or (shape in EITHER and bad["status"] == "ok"):
        assert res.returncode == 0, res.stderr
        assert bad["status"] == "ok" and isinstance(bad["content"], str)
        if shape == "content_list":
            assert bad["content"] == "label: fine"
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert bad[key] is None or 0 <= bad[key] < 2**63
        return
    assert res.returncode == 3, res.stderr
    assert bad["status"] == "error"
    assert "raw answer" in bad["error"] and "chat.completion" in bad["error"]
    assert len(bad["error"]) < 1_500  # the padded body is cut
    assert [rows[i]["status"] for i in ("r0", "r2", "r3")] == ["ok"] * 3

    res = run_batcher("run", job, "--retry-errors")
    no_traceback(res)
    assert res.returncode == 0, res.stderr
    assert gw.requests == 5  # only the error row again
    rows = {r["id"]: r for r in read_output(tmp_path / OUT)}
    assert all(r["status"] == "ok" for r in rows.values())


def test_a_200_json_cannot_parse_is_retried_not_a_crash(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(1, ok()), (1, raw_200(DEEPLY_NESTED, "deeply-nested")), (None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(4))
    job = job_file(tmp_path, gw, concurrency=1)
    res = run_batcher("run", job, "--log-format", "json")
    no_traceback(res)
    assert res.returncode == 0, res.stderr
    assert gw.requests == 5  # read like a truncated body: paid, retried within the budget
    assert json.loads(res.stdout.strip().splitlines()[-1])["truncated_answers"] == 1
    assert all(r["status"] == "ok" for r in read_output(tmp_path / OUT))


# ---- 5. rows over the context window are errors without a request --------------------------


def test_rows_over_the_context_window_cost_no_request(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(None, ok())], context_chars=400_000)
    huge = "word " * 135_000  # ~135k tokens: over gpt-4o-mini's 128k window
    rows = review_rows(5)
    rows[0]["text"] = rows[1]["text"] = huge
    write_jsonl(tmp_path / "input.jsonl", rows)
    job = job_file(tmp_path, gw)
    est = run_batcher("estimate", job, "--json")
    assert est.returncode == 0, est.stderr
    report = json.loads(est.stdout)
    assert report["over_context_count"] == 2
    assert {r["id"] for r in report["over_context"]} == {"r0", "r1"}

    res = run_batcher("run", job)
    no_traceback(res)
    assert res.returncode == 3, res.stderr
    assert gw.requests == 3 and gw.behaviours() == ["ok"] * 3
    assert "review number 2" in json.dumps(gw.received[0].body)  # the probe is a row that fits
    out = {r["id"]: r for r in read_output(tmp_path / OUT)}
    for rid in ("r0", "r1"):
        assert out[rid]["status"] == "error" and "context window" in out[rid]["error"]
        assert out[rid]["attempts"] in (0, None)
    assert "check endpoint" not in res.stderr  # the setup is not blamed


def test_server_context_length_at_the_head_is_not_blamed_on_the_setup(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(None, ok())], context_chars=3_000)
    rows = review_rows(8)
    for row in rows[:3]:
        row["text"] += " word" * 1_000  # fits our count, not the gateway's window
    write_jsonl(tmp_path / "input.jsonl", rows)
    res = run_batcher("run", job_file(tmp_path, gw))
    no_traceback(res)
    assert res.returncode == 3, res.stderr
    assert "check endpoint" not in res.stderr
    out = {r["id"]: r for r in read_output(tmp_path / OUT)}
    assert [out[f"r{i}"]["status"] for i in range(3)] == ["error"] * 3
    assert "context length" in out["r0"]["error"]
    assert gw.behaviours().count("context_length") == 3  # a 400 is final: never retried


# ---- 6. empty input ------------------------------------------------------------------------


def _empty_input(tmp: Path, fmt: str) -> str:
    if fmt == "jsonl":
        (tmp / "input.jsonl").write_text("")
        return "input.jsonl"
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    pq.write_table(schema.empty_table(), tmp / "input.parquet")
    return "input.parquet"


@pytest.mark.parametrize(
    ("fmt", "log_format"), [("jsonl", "text"), ("parquet", "text"), ("jsonl", "json")]
)
def test_empty_input_says_so(
    tmp_path: Path, gateway: Callable[..., HostileGateway], fmt: str, log_format: str
) -> None:
    gw = gateway([(None, ok())])
    job = job_file(tmp_path, gw, input=_empty_input(tmp_path, fmt), limits=None)
    res = run_batcher("run", job, "--log-format", log_format)
    no_traceback(res)
    assert res.returncode == 0, res.stderr
    assert "no rows" in res.stderr
    assert gw.requests == 0
    if log_format == "json":
        for line in res.stderr.splitlines():
            json.loads(line)


def test_empty_input_with_limits_for_the_job_model(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(None, ok())])
    job = job_file(tmp_path, gw, input=_empty_input(tmp_path, "jsonl"))  # BASE sets limits
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert "no rows" in res.stderr


# ---- 7. a key with a newline; JSON logs ----------------------------------------------------


@pytest.mark.parametrize(
    ("log_format", "sep", "words"),
    [
        ("text", "\n", "line break"),
        ("json", "\n", "line break"),
        ("text", "\r\n", "line break"),
        ("text", "\x1b", "control character"),
    ],
)
def test_key_with_a_newline_is_refused_unprinted(
    tmp_path: Path,
    gateway: Callable[..., HostileGateway],
    log_format: str,
    sep: str,
    words: str,
) -> None:
    gw = gateway([(None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    job = job_file(tmp_path, gw)
    res = run_batcher(
        "run", job, "--log-format", log_format, env=env_with_key(f"sk-first-half{sep}second-half")
    )
    no_traceback(res)
    assert res.returncode == 2, res.stderr
    assert words in res.stderr and "TEST_LANGDOCK_KEY" in res.stderr
    assert "first-half" not in res.stderr + res.stdout
    assert "second-half" not in res.stderr + res.stdout
    assert gw.requests == 0
    if log_format == "json":
        for line in res.stderr.splitlines():
            json.loads(line)


def test_json_logs_on_a_good_run(tmp_path: Path, gateway: Callable[..., HostileGateway]) -> None:
    gw = gateway([(3, ok()), (1, server_error(500)), (None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(6))
    res = run_batcher("run", write_job(tmp_path, gw.url, **BASE), "--log-format", "json")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip()
    for line in res.stderr.splitlines():
        json.loads(line)


def test_json_logs_on_an_outage_and_a_rejected_key(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    gw = gateway([(4, ok()), (None, server_error(500))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(30))
    job = job_file(tmp_path, gw, circuit_breaker={"failures": 4, "window_s": 60})
    res = run_batcher("run", job, "--log-format", "json")
    assert res.returncode == 4, res.stderr
    lines = [json.loads(line) for line in res.stderr.splitlines()]
    assert any("outage" in json.dumps(line) for line in lines)
    json.loads(res.stdout)
    gw.switch([(None, rejected(401))])
    res = run_batcher("run", job, "--log-format", "json")
    assert res.returncode == 4, res.stderr
    for line in res.stderr.splitlines():
        json.loads(line)


def test_a_401_echoing_the_key_is_masked_in_every_message_and_file(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """Some gateways quote the key they refused; the error the user reads, the logs and the
    journal say *** instead (answers are left whole: see test_a_short_key_leaves_...)."""
    body = json.dumps({"error": {"message": f"invalid key {API_KEY}", "code": "401"}}).encode()
    gw = gateway([(None, Behaviour("401-echo", status=401, body=body))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    res = run_batcher("run", job_file(tmp_path, gw), "--log-format", "json")
    assert res.returncode == 4, res.stderr
    assert "invalid key ***" in res.stderr
    assert API_KEY not in res.stdout + res.stderr
    for path in (tmp_path / "out").iterdir():
        assert API_KEY.encode() not in path.read_bytes(), path


def run_with_own_store(tmp_path: Path, job: Path) -> Any:
    """`batcher run` with its response store under tmp_path/xdg (searched for the key after)."""
    return run_batcher("run", job, env={**env_with_key(), "XDG_CACHE_HOME": str(tmp_path / "xdg")})


def assert_key_in_no_file(tmp_path: Path) -> None:
    """Neither the output's files nor the response store hold the key."""
    for path in [*(tmp_path / "out").iterdir(), *(tmp_path / "xdg").rglob("*")]:
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


def test_an_answer_echoing_a_long_key_is_masked_in_the_output_and_the_store(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """A long key is a secret wherever it shows up, an answer included (a short one such as
    "none" is left alone: test_run's test_a_short_key_leaves_the_answers_whole)."""
    body = json.dumps(completion(f"label: fine, key {API_KEY}")).encode()
    gw = gateway([(None, Behaviour("echo", body=body))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    res = run_with_own_store(tmp_path, job_file(tmp_path, gw))
    assert res.returncode == 0, res.stderr
    assert [r["content"] for r in read_output(tmp_path / OUT)] == ["label: fine, key ***"] * 3
    assert_key_in_no_file(tmp_path)


def test_a_key_echoed_json_escaped_is_masked_too(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """A gateway that writes "\\u0073\\u006b..." for the key: the raw bytes do not show it,
    the decoded answer and error did (found by review), in the output, the store and stderr."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in API_KEY)
    answer = json.dumps(completion("label: fine, key KEY")).replace("KEY", escaped).encode()
    error = json.dumps({"error": {"message": "bad request for KEY", "code": "x"}})
    gw = gateway(
        [
            (2, Behaviour("echo", body=answer)),
            (1, Behaviour("400-echo", status=400, body=error.replace("KEY", escaped).encode())),
            (None, Behaviour("echo", body=answer)),
        ]
    )
    write_jsonl(tmp_path / "input.jsonl", review_rows(4))
    res = run_with_own_store(tmp_path, job_file(tmp_path, gw, concurrency=1))
    assert res.returncode == 3, res.stderr
    rows = {r["id"]: r for r in read_output(tmp_path / OUT)}
    assert rows["r0"]["content"] == "label: fine, key ***"
    assert "bad request for ***" in rows["r2"]["error"]
    assert API_KEY not in res.stderr + res.stdout
    assert_key_in_no_file(tmp_path)


def test_an_unreadable_answer_quoting_a_partly_escaped_key_is_masked(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """The row's error quotes an unreadable 2xx: it quoted the raw bytes, where a key with
    one character escaped passed the masking (found by review)."""
    escaped = f"\\u{ord(API_KEY[0]):04x}{API_KEY[1:]}"
    body = ('{"status": "accepted", "echo": "Bearer ' + escaped + '"}').encode()
    gw = gateway([(1, ok()), (None, Behaviour("echo", body=body))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(2))
    res = run_batcher("run", job_file(tmp_path, gw, concurrency=1, retry={"max_attempts": 1}))
    assert res.returncode == 3, res.stderr
    error = {r["id"]: r for r in read_output(tmp_path / OUT)}["r1"]["error"]
    assert "Bearer ***" in error and API_KEY[1:] not in error


def test_an_error_body_past_the_cap_is_still_retried(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """The cap is on answers: a 503 page larger than it is read up to it and retried like
    any 503, not made the row's final error (found by review)."""
    page = b"<html><title>503</title>" + b"x" * 3000 + b"</html>"
    gw = gateway([(1, ok()), (1, Behaviour("503big", status=503, body=page)), (None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    endpoint = {"base_url": gw.url, "api_key_env": "TEST_LANGDOCK_KEY", "max_answer_mb": 0.002}
    res = run_batcher("run", job_file(tmp_path, gw, concurrency=1, endpoint=endpoint))
    assert res.returncode == 0, res.stderr
    assert gw.behaviours() == ["ok", "503big", "ok", "ok"]


def test_an_answer_with_long_or_many_headers_is_read(
    tmp_path: Path, gateway: Callable[..., HostileGateway]
) -> None:
    """aiohttp's defaults (8 KB a header line, 128 headers) read such a billed 200 as a
    connection failure: retried, never counted as spent (found by review)."""
    many = {f"x-trace-{i}": "1" for i in range(200)}
    gw = gateway([(2, ok(headers={"x-big": "a" * 20_000})), (None, ok(headers=many))])
    write_jsonl(tmp_path / "input.jsonl", review_rows(4))
    res = run_batcher("run", job_file(tmp_path, gw))
    assert res.returncode == 0, res.stderr
    assert [r["status"] for r in read_output(tmp_path / OUT)] == ["ok"] * 4
    assert gw.ok_sent == 4  # one request a row: nothing retried


@pytest.mark.parametrize(("status", "answered"), [(302, 0), (307, 0), (307, 3)])
def test_a_redirect_is_never_followed_and_stops_the_job(
    tmp_path: Path, gateway: Callable[..., HostileGateway], status: int, answered: int
) -> None:
    """Followed, a 302 turned the POST into a GET without the prompt (its 200 was stored as
    every row's answer, and served to other jobs from the store) and a 307 sent the prompts to
    whoever the header named (found by review). At the first request: exit 2; later: exit 4,
    the rows answered before it kept, nothing from the redirect recorded."""
    moved = Behaviour(
        str(status),
        status=status,
        body=b"<html><body>Moved</body></html>",
        headers={"location": "http://127.0.0.1:9/v1/chat/completions"},
    )
    gw = gateway([(answered or None, ok()), (None, moved)] if answered else [(None, moved)])
    write_jsonl(tmp_path / "input.jsonl", review_rows(8))
    res = run_batcher("run", job_file(tmp_path, gw))
    assert res.returncode == (4 if answered else 2), res.stderr
    assert f"redirected the request ({status})" in res.stderr
    assert "Set endpoint.base_url" in res.stderr
    journal = (tmp_path / "out" / "result.parquet.journal").read_text()
    assert journal.count('"status":"ok"') == answered
    assert journal.count('"status":"error"') == 0


def test_json_logs_on_a_bad_flag(tmp_path: Path, gateway: Callable[..., HostileGateway]) -> None:
    gw = gateway([(None, ok())])
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    job = job_file(tmp_path, gw)
    res = run_batcher("run", job, "--log-format", "json", "--no-such-flag")
    assert res.returncode == 2
    assert "no-such-flag" in res.stderr
    for line in res.stderr.splitlines():
        json.loads(line)
