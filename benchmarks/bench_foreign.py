"""Foreign load: one `batcher run` while invisible others use 40 % of the quota.

    python benchmarks/bench_foreign.py [--variants 10x,langdock,...] [--duration 60] [--quick]

The mock server runs with `--foreign-share 0.4`: every sliding window (60 s and 10 s) keeps 40 %
of its allowance for other users of the workspace, which no client can see; only 60 % is left.
One CLI run (`python -m batcher run job.yaml --log-format json`, local limiter) has the full
quota in its job file, as a user who does not know about the others would write it, and must
find the remaining 60 % from the server's answers alone (429s, x-ratelimit-* headers: the
adaptive multiplier of batcher.admission). Prompts of ~110-190 tokens + `max_tokens: 200`: tokens
bind.

Variants (each against a fresh server):
- 10x:      5,000 RPM / 600,000 TPM (10x Langdock's limits), latency 0.05-0.30 s;
- langdock: Langdock's real 500 RPM / 60,000 TPM;
- *-noheaders: the same, the server sending neither retry-after nor x-ratelimit-* headers:
  429s are the only signal (AIMD).

After the first answered row and `--warmup` seconds, the server's counters are read, again
`--duration` seconds later (the Langdock variants: 120 s unless --quick, ~200 answers); then
the run gets SIGINT (exit 130). Figures over that window: the share of requests answered 429
and accepted tokens per minute against the remaining 60 % of the TPM limit; the client's
multiplier (one JSON progress line per second) and 429s. The whole run's 429 share (the
adaptation from the full quota down included) is shown too.
Targets (issue 8): with headers, accepted >= 0.97 of the remaining quota and 429s <= 1 %;
without any header, >= 0.90 and <= 3 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from statistics import fmean
from typing import Any

from bench_shared import (
    COST_GUESS,
    LATENCY,
    MAX_TOKENS,
    START_TIMEOUT_S,
    WORDS,
    CliRun,
    wait_until,
    window,
)
from common import (
    MODEL,
    MockProcess,
    add_common_args,
    emit_json,
    job_dict,
    table,
    verdict,
    workdir,
    write_rows,
)

from batcher.admission.policy import DEFAULT_HEADROOM

FOREIGN_SHARE = 0.4


@dataclass(frozen=True)
class Variant:
    rpm: int
    tpm: int
    headers: bool = True  # retry-after and x-ratelimit-* on the server's answers
    # Issue 8: with headers >= 0.97 of the remaining quota and <= 1 % 429s; without any
    # header (only 429s teach the limiter) >= 0.90 and <= 3 %.
    target_use: float = 0.97
    target_429: float = 0.01
    # Measured seconds, if not --duration: at Langdock's limits ~100 requests a minute, where
    # one 429 is 1 % of a minute's answers (two minutes, as bench_quota.py's `langdock`).
    duration_s: float | None = None


VARIANTS = {
    "10x": Variant(5_000, 600_000),
    "langdock": Variant(500, 60_000, duration_s=120.0),
    "10x-noheaders": Variant(5_000, 600_000, False, 0.90, 0.03),
    "langdock-noheaders": Variant(500, 60_000, False, 0.90, 0.03, 120.0),
}


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def multiplier_trace(run: CliRun, start: float, end: float) -> list[float]:
    """The limiter's multiplier from the progress lines written between two wall-clock times."""
    out = []
    for rec in run.progress():
        if start <= _epoch(rec["ts"]) <= end:
            m = (rec.get("effective") or {}).get(MODEL, {}).get("multiplier")
            if m is not None:
                out.append(float(m))
    return out


def run_variant(directory: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    # A fresh response store (the default one lives under $XDG_CACHE_HOME and is shared by
    # every job): a run after another over the same rows would be answered from it.
    os.environ["XDG_CACHE_HOME"] = str(directory / "xdg" / name)
    v = VARIANTS[name]
    duration = v.duration_s if v.duration_s is not None and not args.quick else args.duration
    remaining_tpm = v.tpm * (1 - FOREIGN_SHARE)
    rows = int(remaining_tpm / COST_GUESS * (args.warmup + duration + 20) / 60 * 2)
    d = directory / name
    d.mkdir(parents=True, exist_ok=True)
    write_rows(d / "input.jsonl", rows, WORDS, seed=7)
    flags = ["--rpm", str(v.rpm), "--tpm", str(v.tpm), "--foreign-share", str(FOREIGN_SHARE)]
    if not v.headers:
        flags += ["--no-retry-after", "--no-ratelimit-headers"]
    with MockProcess(*flags, *LATENCY) as srv:
        srv.warm()
        job = job_dict(
            d,
            srv.url,
            output="out.parquet",
            rpm=v.rpm,
            tpm=v.tpm,
            max_tokens=MAX_TOKENS,
            concurrency=args.concurrency,
            progress_interval_s=1.0,
        )
        run = CliRun(d, job)
        print(f"{name}: {run.command}", file=sys.stderr)
        try:
            run.start()
            wait_until(lambda: run.rows_ok() > 0, START_TIMEOUT_S, "the first row", [run])
            time.sleep(args.warmup)
            first, t_first = srv.stats(), time.time()
            time.sleep(duration / 2)
            mid = srv.stats()
            time.sleep(duration / 2)
            last, t_last = srv.stats(), time.time()
            ran_dry = not run.running()
            run.interrupt()
            code = run.finish()
        finally:
            run.stop()
        final = srv.stats()

    steady = window(first, last)
    use = steady["accepted_tpm"] / remaining_tpm
    # The second half alone: how well it holds once adapted, without the descent from the full
    # quota (whose overshoot the first half pays back with pauses).
    settled = window(mid, last)
    trace = multiplier_trace(run, t_first, t_last)
    summary = run.summary
    whole_429 = final["rate_limited"] / max(1, final["requests"])
    ok = use >= v.target_use and steady["share_429"] <= v.target_429 and not ran_dry and code == 130
    return {
        "variant": name,
        "duration_s": duration,
        "command": run.command,
        "server": f"batcher serve-mock {' '.join(flags + list(LATENCY))}",
        "rpm_limit": v.rpm,
        "tpm_limit": v.tpm,
        "remaining_tpm": remaining_tpm,
        "steady": steady,
        "use": use,
        "rpm_use_of_remaining": steady["accepted_rpm"] / (v.rpm * (1 - FOREIGN_SHARE)),
        "settled": settled,
        "settled_use": settled["accepted_tpm"] / remaining_tpm,
        "whole_run": {
            "requests": final["requests"],
            "rate_limited": final["rate_limited"],
            "share_429": whole_429,
        },
        "client": {
            "requests_sent": summary.get("requests_sent"),
            "rate_limited": summary.get("rate_limited_429"),
            "retries": summary.get("retries"),
            "rows_ok": summary.get("rows_ok"),
            "multiplier_at_end": run.limiter_row().get("multiplier", float("nan")),
            "multiplier_window": {
                "min": min(trace, default=None),
                "mean": fmean(trace) if trace else None,
                "max": max(trace, default=None),
                "samples": len(trace),
            },
            # What the multiplier should settle at: the remaining share over the headroom.
            "multiplier_ideal": (1 - FOREIGN_SHARE) / DEFAULT_HEADROOM,
            "exit_code": code,
        },
        "ran_dry": ran_dry,
        "pass": ok,
    }


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nforeign load: {FOREIGN_SHARE:.0%} of every limit used by invisible others; one "
        f"`batcher run` (local limiter, the full quota in its job, concurrency "
        f"{args.concurrency}); ~{MAX_TOKENS} max_tokens + ~110-190 prompt tokens per request; "
        f"measured over {args.duration:g} s (Langdock's limits: 120 s unless --quick) after the "
        f"first answered row + {args.warmup:g} s, "
        "then SIGINT"
    )
    for r in results:
        print(f"  {r['variant']}: server `{r['server']}`, run `{r['command']}`")
    print()
    print(
        table(
            [
                "variant",
                "TPM",
                "of remaining",
                "RPM",
                "429 share",
                "429 whole run",
                "multiplier min/mean/max",
                "ideal",
                "",
            ],
            [
                [
                    r["variant"],
                    r["steady"]["accepted_tpm"],
                    r["use"],
                    r["steady"]["accepted_rpm"],
                    f"{r['steady']['share_429']:.2%} ({r['steady']['rate_limited']}/"
                    f"{r['steady']['requests']})",
                    f"{r['whole_run']['share_429']:.2%} ({r['whole_run']['rate_limited']}/"
                    f"{r['whole_run']['requests']})",
                    "/".join(
                        "-" if x is None else f"{x:.3f}"
                        for x in (
                            r["client"]["multiplier_window"]["min"],
                            r["client"]["multiplier_window"]["mean"],
                            r["client"]["multiplier_window"]["max"],
                        )
                    ),
                    round(r["client"]["multiplier_ideal"], 3),
                    verdict(r["pass"]),
                ]
                for r in results
            ],
        )
    )
    for r in results:
        c = r["client"]
        print(
            f"  {r['variant']}: remaining quota {r['remaining_tpm']:,.0f} TPM; client sent "
            f"{c['requests_sent']:,} requests, saw {c['rate_limited']} 429s, {c['retries']} "
            f"retries; multiplier at end {c['multiplier_at_end']:.3f}; exit {c['exit_code']}\n"
            f"  {' ' * len(r['variant'])}  second half of the window alone: "
            f"{r['settled_use']:.3f} of the remaining quota, 429s "
            f"{r['settled']['share_429']:.2%} ({r['settled']['rate_limited']}/"
            f"{r['settled']['requests']})"
            + ("; WARNING: the input ran out before the window ended" if r["ran_dry"] else "")
        )
    print(
        f"\ntargets (of the remaining {1 - FOREIGN_SHARE:.0%} of the quota, in the window): with "
        "headers accepted TPM >= 0.97 and 429s <= 1 %; without any header >= 0.90 and <= 3 %"
    )
    if args.quick:
        print(
            "(--quick: the window covers mostly the descent from the full quota, whose 429s and "
            "pauses the targets are not meant for; it checks that the script works)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=int, default=32)
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = min(args.duration, 12.0), min(args.warmup, 3.0)
        if args.variants == ",".join(VARIANTS):
            args.variants = "10x"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    results = []
    with workdir(args.keep) as directory:
        for name in names:
            res = run_variant(directory, name, args)
            results.append(res)
            print(
                f"{name}: {res['use']:.3f} of the remaining quota, 429s "
                f"{res['steady']['share_429']:.2%}",
                file=sys.stderr,
            )
    report(results, args)
    emit_json(
        args.json,
        {
            "benchmark": "foreign",
            "foreign_share": FOREIGN_SHARE,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "variants": results,
            "pass": all(r["pass"] for r in results),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
