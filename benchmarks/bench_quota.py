"""Quota use: how close `batcher run` gets to the server's limits without being refused.

    python benchmarks/bench_quota.py [--duration 60] [--warmup 5] [--variants tpm,rpm,...] [--quick]

The mock server runs at 10x Langdock's limits (5,000 RPM / 600,000 TPM per model, enforced over
sliding 60 s and 10 s windows) in its own process, with 0.05-0.30 s latency per answer. The
engine runs in-process (on the command's event loop, batcher/eventloop.py) with concurrency 64
and the same limits in its job file, on more rows
than it can send in the time; after `--warmup` seconds of sending, the server's counters are
read, again `--duration` seconds later, and the run is then stopped gracefully (as by Ctrl-C).

Variants (each against a fresh server):
- tpm:            prompts of ~110-190 tokens + max_tokens 200: tokens bind;
- rpm:            prompts of ~25 tokens + max_tokens 5: requests bind;
- *-noheaders:    the same, the server sending neither retry-after nor x-ratelimit-* headers
                  (Langdock may not pass them through);
- langdock:       Langdock's own limits (500 RPM / 60,000 TPM), prompts of 20-400 words +
                  max_tokens 200, two minutes measured: one request is up to 6 % of a 10 s
                  window, so the window caps bind far more often than at 10x.
- faults:         as tpm, the server answering 5 % of admitted requests with a 5xx and
                  dropping 2 % of connections (both charged, as Azure may). The input holds
                  about as many rows as fit the warm-up and the measured window; the run goes
                  on to the end, and its output must hold every row exactly once, status ok.

Each server answers one request (then forgets it) before the run, so the run's first request
pays no one-time server costs (--cold skips that; see the README for what a slow first
admission did).

Figures come from the server's counters over the measured window: admitted requests and tokens
per minute against the limits, and the share of requests answered 429 (also over the whole run).
Targets (issue 8): at 10x, >= 0.985 of the binding limit with <= 0.1 % 429s; at Langdock's
limits, >= 0.97 with <= 0.5 %; with faults >= 0.95 (charged tokens, failed attempts included:
the server counts them) with <= 0.5 %, every row ok once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from common import (
    API_KEY,
    MODEL,
    MockProcess,
    add_common_args,
    emit_json,
    make_job,
    quiet_logs,
    table,
    verdict,
    workdir,
    write_rows,
)

from batcher import eventloop
from batcher.engine import Engine, RunOptions
from batcher.tokens import encoding_for_model

RPM, TPM = 5_000, 600_000  # 10x Langdock's per-model limits


@dataclass(frozen=True)
class Variant:
    words: tuple[int, int]  # words of review text per row (about one token each)
    max_tokens: int
    headers: bool  # retry-after and x-ratelimit-* on the server's answers
    rpm: int = RPM
    tpm: int = TPM
    duration_s: float | None = None  # measured seconds, if not --duration
    target_use: float = 0.985
    target_429: float = 0.001
    error_rate: float = 0.0  # the server's share of 5xx answers (charged)
    drop_rate: float = 0.0  # ... of dropped connections (charged)

    @property
    def completes(self) -> bool:
        """Run to the end and check the output (the fault variants), instead of stopping."""
        return bool(self.error_rate or self.drop_rate)


VARIANTS = {
    "tpm": Variant((90, 170), 200, True),
    "rpm": Variant((3, 8), 5, True),
    "tpm-noheaders": Variant((90, 170), 200, False),
    "rpm-noheaders": Variant((3, 8), 5, False),
    "langdock": Variant((20, 400), 200, True, 500, 60_000, 120.0, 0.97, 0.005),
    "faults": Variant(
        (90, 170), 200, True, target_use=0.95, target_429=0.005, error_rate=0.05, drop_rate=0.02
    ),
}
# Tokens of the job's messages around the review text (system, template, chat overhead).
TEMPLATE_TOKENS = 28


def window(a: dict[str, Any], b: dict[str, Any], variant: Variant) -> dict[str, float]:
    """Rates between two snapshots of the server's counters."""
    minutes = (b["uptime_s"] - a["uptime_s"]) / 60.0
    requests = b["requests"] - a["requests"]
    limited = b["rate_limited"] - a["rate_limited"]
    rpm = (b["admitted"] - a["admitted"]) / minutes
    tpm = (b["admitted_tokens"] - a["admitted_tokens"]) / minutes
    return {
        "seconds": minutes * 60.0,
        "rpm": rpm,
        "tpm": tpm,
        "rpm_use": rpm / variant.rpm,
        "tpm_use": tpm / variant.tpm,
        "requests": requests,
        "rate_limited": limited,
        "share_429": limited / requests if requests else 0.0,
    }


async def measure(
    server: MockProcess,
    directory: Path,
    name: str,
    variant: Variant,
    args: argparse.Namespace,
    rows: int,
) -> dict[str, Any]:
    job = make_job(
        directory,
        server.url,
        output=f"out-{name}.parquet",
        rpm=variant.rpm,
        tpm=variant.tpm,
        max_tokens=variant.max_tokens,
        concurrency=args.concurrency,
    )
    engine = Engine(job, RunOptions(base_url=server.url, api_key=API_KEY, progress="quiet"))
    run = asyncio.create_task(engine.run())
    while engine.stats.requests_sent == 0 and not run.done():
        await asyncio.sleep(0.02)
    await asyncio.sleep(args.warmup)
    first = await asyncio.to_thread(server.stats)
    duration = args.duration
    if variant.duration_s is not None and not args.quick:
        duration = variant.duration_s
    await asyncio.sleep(duration)
    last = await asyncio.to_thread(server.stats)
    saturated = not run.done()  # still had rows to send when the window ended
    if not variant.completes:
        stop_gracefully(engine)
    outcome = await run
    final = await asyncio.to_thread(server.stats)
    stats = outcome.stats
    steady = window(first, last, variant)
    binding = "tpm" if steady["tpm_use"] >= steady["rpm_use"] else "rpm"
    use = steady[f"{binding}_use"]
    whole_429 = final["rate_limited"] / final["requests"] if final["requests"] else 0.0
    snap = engine.limiter.snapshot().get(MODEL)
    rows_check = check_rows(directory / f"out-{name}.parquet", rows) if variant.completes else {}
    rows_ok = not rows_check or (rows_check["ok_once"] == rows and saturated)
    return {
        "variant": name,
        "headers": variant.headers,
        "max_tokens": variant.max_tokens,
        "avg_cost": stats.admitted_tokens / max(stats.requests_sent, 1),
        "binding": binding,
        "use": use,
        "steady": steady,
        "whole_run": {
            "requests": final["requests"],
            "rate_limited": final["rate_limited"],
            "share_429": whole_429,
            "sending_s": final["uptime_s"] - (final["first_accepted_s"] or 0.0),
        },
        "client": {
            "requests_sent": stats.requests_sent,
            "rate_limited": stats.rate_limited,
            "retries": stats.retries,
            "rows_done": stats.done,
            "multiplier_at_end": None if snap is None else snap.multiplier,
            "refunded": None if snap is None else snap.refunded,
            "exit_code": int(outcome.exit_code),
        },
        "faults": {
            "by_status": final.get("by_status", {}),
            "dropped": final.get("dropped", 0),
            "accepted_tpm_use": (last["accepted_tokens"] - first["accepted_tokens"])
            / (steady["seconds"] / 60)
            / variant.tpm,
            "saturated": saturated,
            **rows_check,
        }
        if variant.completes
        else None,
        "limits": {"rpm": variant.rpm, "tpm": variant.tpm},
        "targets": {"use": variant.target_use, "share_429": variant.target_429},
        "pass": use >= variant.target_use
        and steady["share_429"] <= variant.target_429
        and whole_429 <= variant.target_429
        and rows_ok,
    }


def stop_gracefully(engine: Engine) -> None:
    """As Ctrl-C would: nothing new is sent, what is in flight finishes."""
    engine.request_stop(signal.SIGINT)


def check_rows(path: Path, rows: int) -> dict[str, Any]:
    """The output of a run to the end: one row per input id, each ok."""
    table = pq.read_table(path, columns=["id", "status"]).to_pydict()
    ids = Counter(table["id"])
    ok = Counter(i for i, st in zip(table["id"], table["status"], strict=True) if st == "ok")
    return {
        "rows": rows,
        "output_rows": len(table["id"]),
        "ok_once": sum(1 for i in range(rows) if ok[f"r{i}"] == 1 and ids[f"r{i}"] == 1),
        "statuses": dict(Counter(table["status"])),
    }


def run_variant(directory: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    # A fresh response store (the default one lives under $XDG_CACHE_HOME and is shared by
    # every job): a run after another over the same rows would be answered from it.
    os.environ["XDG_CACHE_HOME"] = str(directory / "xdg" / name)
    variant = VARIANTS[name]
    # Enough rows for the whole run at the request limit, never running dry.
    duration = variant.duration_s or args.duration
    rows = int(variant.rpm * (args.warmup + duration + 10) / 60 * 1.2)
    if variant.completes:
        # About what the token limit admits until a few seconds after the window (failed
        # attempts, charged too, take their share), so the run ends by itself soon after.
        cost = sum(variant.words) / 2 + TEMPLATE_TOKENS + variant.max_tokens
        failed = variant.error_rate + variant.drop_rate
        rows = int(variant.tpm * (args.warmup + duration + 3) / 60 / cost * (1 - failed))
    write_rows(directory / "input.jsonl", rows, variant.words, seed=len(name))
    flags = ["--rpm", str(variant.rpm), "--tpm", str(variant.tpm)]
    flags += ["--latency", "0.05", "--jitter", "0.25"]
    if not variant.headers:
        flags += ["--no-retry-after", "--no-ratelimit-headers"]
    if variant.error_rate:
        flags += ["--error-rate", str(variant.error_rate)]
    if variant.drop_rate:
        flags += ["--drop-rate", str(variant.drop_rate)]
    with MockProcess(*flags) as server:
        if not args.cold:
            server.warm()
        return eventloop.run(measure(server, directory, name, variant, args, rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--cold",
        action="store_true",
        help="do not warm the server with one request first",
    )
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = min(args.duration, 5.0), min(args.warmup, 1.0)
        if args.variants == ",".join(VARIANTS):
            args.variants = "tpm,rpm"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    quiet_logs(args.verbose)
    encoding_for_model(MODEL)

    results = []
    with workdir(args.keep) as directory:
        for name in names:
            start = time.perf_counter()
            res = run_variant(directory, name, args)
            results.append(res)
            print(
                f"{name}: {res['binding']} use {res['use']:.4f}, 429s "
                f"{res['steady']['share_429']:.2%} ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
            )

    print(
        f"\nquota use: mock server at {RPM:,} RPM / {TPM:,} TPM, langdock at 500 / 60,000 "
        "(windows 60 s and 10 s), "
        f"latency 0.05-0.30 s, {'cold' if args.cold else 'warmed'} server, concurrency "
        f"{args.concurrency}; measured over "
        f"{args.duration:g} s (langdock: 120 s unless --quick) after {args.warmup:g} s of "
        "sending\n"
    )
    print(
        table(
            [
                "variant",
                "cost/req",
                "RPM",
                "RPM/limit",
                "TPM",
                "TPM/limit",
                "429 share",
                "429 whole run",
                "binding",
                "",
            ],
            [
                [
                    r["variant"],
                    round(r["avg_cost"], 1),
                    r["steady"]["rpm"],
                    r["steady"]["rpm_use"],
                    r["steady"]["tpm"],
                    r["steady"]["tpm_use"],
                    f"{r['steady']['share_429']:.2%}",
                    f"{r['whole_run']['share_429']:.2%}",
                    r["binding"],
                    verdict(r["pass"]),
                ]
                for r in results
            ],
        )
    )
    print(
        "\ntargets: binding limit use >= 0.985 at 10x (0.97 langdock, 0.95 faults), 429s "
        "<= 0.1 % of requests (0.5 % langdock and faults), both over the window and the "
        "whole run; faults: every row ok exactly once"
    )
    for r in results:
        c = r["client"]
        print(
            f"  {r['variant']}: client sent {c['requests_sent']:,} requests, saw "
            f"{c['rate_limited']} 429s, {c['retries']} retries; limiter multiplier at end "
            f"{c['multiplier_at_end']}, {c['refunded']} failed admissions given back"
        )
        f = r["faults"]
        if f:
            print(
                f"    server answers {f['by_status']}, {f['dropped']} dropped; answered-ok "
                f"tokens {f['accepted_tpm_use']:.3f} of the TPM; output {f['output_rows']:,} "
                f"rows for {f['rows']:,} ids, {f['ok_once']:,} ok exactly once "
                f"{f['statuses']}; still sending at the window's end: {f['saturated']}"
            )
    emit_json(
        args.json,
        {
            "benchmark": "quota",
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "variants": results,
            "pass": all(r["pass"] for r in results),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
