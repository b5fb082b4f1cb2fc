"""Shared quota: several `batcher run` processes on one workspace quota kept in Redis.

    python benchmarks/bench_shared.py [--processes 4] [--duration 60] [--warmup 8] [--quick]

A real `redis-server` (a free loopback port, persistence off) and the mock server, at 10x
Langdock's limits (5,000 RPM / 600,000 TPM per model over sliding 60 s and 10 s windows,
0.05-0.30 s latency), each run in their own process. `--processes` CLI runs
(`python -m batcher run job.yaml --log-format json`), each with its own input, output and
journal and all with `limiter: {backend: redis, workspace: <one name>}` and the server's limits
in their job, send prompts of ~110-190 tokens with `max_tokens: 200` (~360 tokens charged per
request): tokens bind. Each has more rows than it can send in the time.

Once every process has rows answered, `--warmup` seconds pass, then the server's counters and
each journal's row count are read, again `--duration` seconds later; then every process gets
SIGINT (graceful stop, exit 130) and its JSON summary is read from its stdout.

Figures over the measured window: accepted tokens per minute against the TPM limit, the share
of requests answered 429, each process's share of the rows answered (fairness: the smallest
share over the largest), and Redis round trips per request sent (the limiter's own count, from
each summary's `effective`). Targets (issue 8): tokens >= 0.985 of the limit, 429s <= 0.1 %,
<= 1.2 Redis round trips per request.

The server is warmed first (`MockProcess.warm`): a cold mock loads its tokenizer on the first
request and charges the requests that arrive meanwhile late and bunched, which costs 429s ten
seconds later that no real server would give.

This file also holds the pieces `bench_foreign.py` uses: `RedisProcess`, `CliRun`, `window`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    API_KEY,
    KEY_ENV,
    MODEL,
    MockProcess,
    add_common_args,
    emit_json,
    job_dict,
    proc_cpu_s,
    table,
    verdict,
    workdir,
    write_job_yaml,
    write_rows,
)

RPM, TPM = 5_000, 600_000  # 10x Langdock's per-model limits
WORDS = (90, 170)  # words of review text per row: prompts of ~110-190 tokens
MAX_TOKENS = 200
COST_GUESS = 330  # tokens charged per request, on the low side: sizes the inputs generously
LATENCY = ("--latency", "0.05", "--jitter", "0.25")
TARGET_USE = 0.985
TARGET_429 = 0.001
TARGET_TRIPS = 1.2  # Redis round trips per request sent
START_TIMEOUT_S = 60.0


# -- Redis --------------------------------------------------------------------------------------


class RedisProcess:
    """`redis-server` on a free loopback port, persistence off; stopped with SIGTERM."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="batcher-bench-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        for _ in range(5):  # a free port can be taken between probing and binding
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            with open(Path(self._dir) / "redis.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", self._dir,
                     "--loglevel", "warning"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _redis_ping(self.port):
                    return self
                time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"redis-server did not start: see {self._dir}/redis.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cpu_s(self) -> float:
        assert self.proc is not None
        return proc_cpu_s(self.proc.pid)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# -- one `batcher run` --------------------------------------------------------------------------


class CliRun:
    """`python -m batcher run JOB --log-format json` in `directory`; its figures and its stop.

    stdout carries only the final JSON summary; stderr (log lines and one JSON progress line
    per `progress_interval_s`) goes to a file, never to a pipe nobody reads.
    """

    def __init__(self, directory: Path, job: dict[str, Any]) -> None:
        self.directory = directory
        self.job_path = write_job_yaml(directory / "job.yaml", job)
        self.journal = Path(job["output"]).with_name(Path(job["output"]).name + ".journal")
        self.stderr_path = directory / "stderr.log"
        self.proc: subprocess.Popen[str] | None = None
        self.summary: dict[str, Any] = {}
        self.cpu_at_end = 0.0

    @property
    def command(self) -> str:
        return f"python -m batcher run {self.job_path} --log-format json"

    def start(self) -> CliRun:
        env = {**os.environ, KEY_ENV: API_KEY}
        with self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "batcher",
                    "run",
                    str(self.job_path),
                    "--log-format",
                    "json",
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
            )
        return self

    def rows_ok(self) -> int:
        """Rows answered ok so far: the journal's row records (appended as rows finish)."""
        try:
            text = self.journal.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return 0
        ok = 0
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # being written
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            ok += isinstance(rec, dict) and rec.get("t") == "r" and rec.get("status") == "ok"
        return ok

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_s(self) -> float:
        assert self.proc is not None
        try:
            return proc_cpu_s(self.proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            return self.cpu_at_end

    def interrupt(self) -> None:
        if self.running():
            self.cpu_at_end = self.cpu_s()
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for the process; its exit code. The summary is parsed from stdout."""
        assert self.proc is not None
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("event") == "summary":
                    self.summary = rec
                    break
        return self.proc.returncode

    def stop(self) -> None:
        """Last-resort cleanup: a process still running after an error is killed."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.communicate()

    def progress(self) -> list[dict[str, Any]]:
        """The JSON progress lines written so far (one per progress_interval_s)."""
        lines = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == "progress":
                    lines.append(rec)
        return lines

    def stderr_tail(self, chars: int = 1500) -> str:
        return self.stderr_path.read_text(errors="replace")[-chars:]

    def limiter_row(self) -> dict[str, Any]:
        return (self.summary.get("effective") or {}).get(MODEL, {})


def wait_until(predicate: Any, timeout: float, what: str, runs: list[CliRun]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        dead = [r for r in runs if r.proc is not None and r.proc.poll() is not None]
        if dead:
            r = dead[0]
            raise RuntimeError(
                f"{r.command} ended early (exit {r.proc.returncode if r.proc else '?'}):\n"
                f"{r.stderr_tail()}"
            )
        time.sleep(0.1)


def window(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Rates between two snapshots of the server's counters (per minute, and the 429 share)."""
    seconds = b["uptime_s"] - a["uptime_s"]
    requests = b["requests"] - a["requests"]
    limited = b["rate_limited"] - a["rate_limited"]
    return {
        "seconds": seconds,
        "requests": requests,
        "rate_limited": limited,
        "share_429": limited / requests if requests else 0.0,
        "accepted_rpm": (b["accepted"] - a["accepted"]) / seconds * 60.0,
        "accepted_tpm": (b["accepted_tokens"] - a["accepted_tokens"]) / seconds * 60.0,
        "admitted_rpm": (b["admitted"] - a["admitted"]) / seconds * 60.0,
        "admitted_tpm": (b["admitted_tokens"] - a["admitted_tokens"]) / seconds * 60.0,
    }


def peak_10s_tokens(stats: dict[str, Any], start_s: float, end_s: float) -> int:
    """The most tokens admitted in any 10 consecutive 1 s buckets inside [start, end)."""
    series = {int(s): t for s, _, t in stats["admitted_series"] if start_s <= s < end_s}
    if not series:
        return 0
    lo, hi = min(series), max(series)
    sums = [sum(series.get(k, 0) for k in range(i, i + 10)) for i in range(lo, max(lo + 1, hi - 8))]
    return max(sums)


# -- the benchmark ------------------------------------------------------------------------------


def run(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    # A fresh response store (the default one lives under $XDG_CACHE_HOME and is shared by
    # every job): a run after another over the same rows would be answered from it.
    os.environ["XDG_CACHE_HOME"] = str(directory / "xdg" / "shared")
    workspace = f"bench-{uuid.uuid4().hex[:8]}"
    # Enough rows that no process runs dry, even one taking twice its fair share.
    span_s = args.warmup + args.duration + 20
    rows = int(TPM / COST_GUESS * span_s / 60 / args.processes * 2)
    with (
        RedisProcess() as redis,
        MockProcess("--rpm", str(RPM), "--tpm", str(TPM), *LATENCY) as srv,
    ):
        srv.warm()  # its first request loads the tokenizer: not to be measured
        runs: list[CliRun] = []
        for i in range(args.processes):
            d = directory / f"p{i}"
            d.mkdir(parents=True, exist_ok=True)
            write_rows(d / "input.jsonl", rows, WORDS, seed=100 + i)
            job = job_dict(
                d,
                srv.url,
                output="out.parquet",
                rpm=RPM,
                tpm=TPM,
                max_tokens=MAX_TOKENS,
                concurrency=args.concurrency,
                limiter={"backend": "redis", "url": redis.url, "workspace": workspace},
                progress_interval_s=1.0,
            )
            runs.append(CliRun(d, job))
        print(f"starting {args.processes} x: {runs[0].command}", file=sys.stderr)
        t_launch = time.monotonic()
        try:
            for r in runs:
                r.start()
            wait_until(
                lambda: all(r.rows_ok() > 0 for r in runs), START_TIMEOUT_S, "first rows", runs
            )
            t_all_up = time.monotonic() - t_launch
            print(f"all sending after {t_all_up:.1f} s; warm-up {args.warmup:g} s", file=sys.stderr)
            time.sleep(args.warmup)
            first, rows0 = srv.stats(), [r.rows_ok() for r in runs]
            cpu0 = [r.cpu_s() for r in runs] + [srv.cpu_s(), redis.cpu_s()]
            time.sleep(args.duration)
            last, rows1 = srv.stats(), [r.rows_ok() for r in runs]
            cpu1 = [r.cpu_s() for r in runs] + [srv.cpu_s(), redis.cpu_s()]
            ran_dry = [i for i, r in enumerate(runs) if not r.running()]
            for r in runs:
                r.interrupt()
            codes = [r.finish() for r in runs]
        finally:
            for r in runs:
                r.stop()
        final = srv.stats()

    steady = window(first, last)
    done = [b - a for a, b in zip(rows0, rows1, strict=True)]
    shares = [d / max(1, sum(done)) for d in done]
    sent = [r.summary.get("requests_sent", 0) for r in runs]
    trips = [r.limiter_row().get("redis_round_trips", 0) for r in runs]
    use = steady["accepted_tpm"] / TPM
    whole_429 = final["rate_limited"] / max(1, final["requests"])
    cpu = [(b - a) / steady["seconds"] for a, b in zip(cpu0, cpu1, strict=True)]
    peak = peak_10s_tokens(last, first["uptime_s"], last["uptime_s"])
    fairness = min(shares) / max(shares) if max(shares) > 0 else 0.0
    trips_per_request = sum(trips) / max(1, sum(sent))
    ok = (
        use >= TARGET_USE
        and steady["share_429"] <= TARGET_429
        and trips_per_request <= TARGET_TRIPS
        and not ran_dry
        and all(c == 130 for c in codes)
    )
    return {
        "benchmark": "shared",
        "command": runs[0].command,
        "processes": args.processes,
        "rpm_limit": RPM,
        "tpm_limit": TPM,
        "concurrency": args.concurrency,
        "rows_per_process": rows,
        "seconds_to_all_sending": t_all_up,
        "warmup_s": args.warmup,
        "steady": steady,
        "tpm_use": use,
        "rpm_use": steady["accepted_rpm"] / RPM,
        "peak_10s_tokens": peak,
        "peak_10s_use": peak / (TPM / 6),
        "whole_run": {
            "requests": final["requests"],
            "rate_limited": final["rate_limited"],
            "share_429": whole_429,
            "duplicates": final["duplicates"],
        },
        "per_process": [
            {
                "process": i,
                "rows_in_window": done[i],
                "share": shares[i],
                "requests_sent": sent[i],
                "rate_limited": r.summary.get("rate_limited_429"),
                "retries": r.summary.get("retries"),
                "redis_round_trips": trips[i],
                "round_trips_per_request": trips[i] / max(1, sent[i]),
                "multiplier_at_end": r.limiter_row().get("multiplier"),
                "exit_code": codes[i],
                "cpu_share": cpu[i],
            }
            for i, r in enumerate(runs)
        ],
        "fairness_min_over_max": fairness,
        "round_trips_per_request": trips_per_request,
        "cpu_share": {"clients": sum(cpu[: len(runs)]), "server": cpu[-2], "redis": cpu[-1]},
        "ran_dry": ran_dry,
        "pass": ok,
    }


def report(res: dict[str, Any]) -> None:
    s = res["steady"]
    print(
        f"\nshared quota: {res['processes']} x `{res['command']}` (concurrency "
        f"{res['concurrency']}, limiter backend redis, one workspace) against `batcher "
        f"serve-mock --rpm {RPM} --tpm {TPM} {' '.join(LATENCY)}` (windows 60 s and 10 s); "
        f"~{MAX_TOKENS} max_tokens + ~110-190 prompt tokens per request\n"
        f"all processes sending after {res['seconds_to_all_sending']:.1f} s; measured over "
        f"{s['seconds']:.1f} s after {res['warmup_s']:g} s more, then SIGINT to every process\n"
    )
    print(
        table(
            [
                "process",
                "rows (window)",
                "share",
                "sent",
                "429s",
                "Redis trips",
                "trips/req",
                "multiplier",
                "CPU",
                "exit",
            ],
            [
                [
                    p["process"],
                    p["rows_in_window"],
                    f"{p['share']:.1%}",
                    p["requests_sent"],
                    p["rate_limited"],
                    p["redis_round_trips"],
                    round(p["round_trips_per_request"], 3),
                    p["multiplier_at_end"],
                    f"{p['cpu_share']:.0%}",
                    p["exit_code"],
                ]
                for p in res["per_process"]
            ],
        )
    )
    w = res["whole_run"]
    cpu = res["cpu_share"]
    print(
        f"\naccepted over the window: {s['accepted_tpm']:,.0f} TPM = {res['tpm_use']:.4f} of "
        f"{TPM:,} (admitted {s['admitted_tpm'] / TPM:.4f}); {s['accepted_rpm']:,.0f} RPM = "
        f"{res['rpm_use']:.3f} of {RPM:,}\n"
        + (
            f"busiest 10 s of the window: {res['peak_10s_tokens']:,} tokens = "
            f"{res['peak_10s_use']:.3f} of the 10 s cap\n"
            if s["seconds"] >= 10
            else ""
        )
        + f"429s: {s['rate_limited']} of {s['requests']:,} requests in the window "
        f"({s['share_429']:.2%}); whole run {w['rate_limited']} of {w['requests']:,} "
        f"({w['share_429']:.2%}); duplicates {w['duplicates']}\n"
        f"fairness: smallest share / largest = {res['fairness_min_over_max']:.3f}\n"
        f"Redis round trips per request sent: {res['round_trips_per_request']:.3f}\n"
        f"CPU (of one core) over the window: clients {cpu['clients']:.0%}, server "
        f"{cpu['server']:.0%}, redis {cpu['redis']:.0%}"
    )
    if res["ran_dry"]:
        print(f"WARNING: processes {res['ran_dry']} ended before the window did (inputs too small)")
    print(
        f"\ntargets: accepted TPM >= {TARGET_USE} of the limit "
        f"[{verdict(res['tpm_use'] >= TARGET_USE)}], 429s <= {TARGET_429:.1%} of requests in "
        f"the window [{verdict(s['share_429'] <= TARGET_429)}], Redis round trips per request "
        f"<= {TARGET_TRIPS} [{verdict(res['round_trips_per_request'] <= TARGET_TRIPS)}]; overall "
        f"{verdict(res['pass'])}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=int, default=16, help="per process")
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = min(args.duration, 8.0), min(args.warmup, 3.0)
    with workdir(args.keep) as directory:
        res = run(directory, args)
    report(res)
    emit_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
