"""The response store on the engine-overhead benchmark: what misses cost, how fast hits go.

    python benchmarks/bench_store.py [--rows 20000] [--rounds 3] [--concurrency 64] [--quick]

One unlimited, zero-latency mock server in its own process (as in bench_overhead.py); the engine
runs in-process (`Engine(job, RunOptions(...)).run()`, journal fsynced) over the same short rows.
Per round:

- store-off: the job sets `cache: {enabled: false}`: every row is sent, nothing is stored;
- misses:    a fresh, empty store (its own XDG_CACHE_HOME): every row is sent and stored;
- hits:      the same job again with `RunOptions(restart=True)` (`--restart`) over the store the
             misses run filled: every row is answered from it, no request is sent.

store-off and misses alternate which goes first. Rows/s is end to end (input scan, journal,
Parquet output included). Targets: misses cost < 10 % of throughput (`1 - misses / store-off`);
a run answered entirely from the store does >= 20,000 rows/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

from bench_overhead import fresh_store, run_batcher
from common import (
    MODEL,
    MockProcess,
    add_common_args,
    emit_json,
    quiet_logs,
    table,
    verdict,
    workdir,
    write_rows,
)

from batcher.tokens import encoding_for_model

MODES = ("store-off", "misses", "hits")
TARGET_MISS_COST = 0.10
TARGET_HITS_PER_S = 20_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds = min(args.rows, 3_000), 1
    quiet_logs(args.verbose)
    encoding_for_model(MODEL)  # the vocabulary loads before anything is timed

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with workdir(args.keep) as directory, MockProcess("--unlimited") as server:
        write_rows(directory / "input.jsonl", 200, (4, 12), seed=1)
        fresh_store(directory, "warmup")
        run_batcher(server.url, directory, "warmup.parquet", args.concurrency, True)  # imports
        write_rows(directory / "input.jsonl", args.rows, (4, 12))
        for rnd in range(args.rounds):
            first = ("store-off", "misses") if rnd % 2 == 0 else ("misses", "store-off")
            for mode in (*first, "hits"):
                server.reset()
                if mode == "store-off":
                    res = run_batcher(
                        server.url,
                        directory,
                        f"off-{rnd}.parquet",
                        args.concurrency,
                        True,
                        cache={"enabled": False},
                    )
                elif mode == "misses":
                    fresh_store(directory, f"store-{rnd}")
                    res = run_batcher(
                        server.url, directory, f"store-{rnd}.parquet", args.concurrency, True
                    )
                else:  # the misses run's job and store again, from scratch: all hits
                    res = run_batcher(
                        server.url,
                        directory,
                        f"store-{rnd}.parquet",
                        args.concurrency,
                        True,
                        restart=True,
                    )
                    if res["sent"] or res["cache_hits"] != args.rows:
                        raise SystemExit(
                            f"hits: {res['sent']} requests sent, {res['cache_hits']} of "
                            f"{args.rows} rows from the store"
                        )
                if res["ok"] != args.rows:
                    raise SystemExit(f"{mode}: {res['ok']} of {args.rows} rows answered")
                runs[mode].append(res)
                print(
                    f"round {rnd + 1} {mode:<10} {args.rows / res['wall_s']:8,.0f} rows/s",
                    file=sys.stderr,
                )
    load_after = os.getloadavg()[0]

    summary = {
        mode: {
            "rows_per_s": args.rows / statistics.median(r["wall_s"] for r in results),
            "cpu_ms_per_row": 1000 * statistics.median(r["cpu_s"] for r in results) / args.rows,
            "requests": statistics.median(r["sent"] for r in results),
            "all_rows_per_s": [round(args.rows / r["wall_s"], 1) for r in results],
        }
        for mode, results in runs.items()
    }
    # Per round: a busy moment on the shared cores hits both runs of one round alike.
    miss_costs = [
        1 - off["wall_s"] / miss["wall_s"]
        for off, miss in zip(runs["store-off"], runs["misses"], strict=True)
    ]
    miss_cost = statistics.median(miss_costs)
    hits = summary["hits"]["rows_per_s"]

    print(
        f"\nresponse store: {args.rows:,} rows, concurrency {args.concurrency}, unlimited "
        f"zero-latency mock server in its own process; median of {args.rounds} round(s); "
        f"load average {load_before:.2f} before, {load_after:.2f} after\n"
    )
    print(
        table(
            ["run", "rows/s", "CPU ms/row", "requests", "rows/s per round"],
            [
                [
                    m,
                    s["rows_per_s"],
                    s["cpu_ms_per_row"],
                    int(s["requests"]),
                    " ".join(f"{x:,.0f}" for x in s["all_rows_per_s"]),
                ]
                for m, s in summary.items()
            ],
        )
    )
    print()
    print(
        f"misses cost:  {miss_cost:.1%} of throughput (median of the rounds; target < "
        f"{TARGET_MISS_COST:.0%})  {verdict(miss_cost < TARGET_MISS_COST)}"
    )
    print(
        f"all hits:     {hits:,.0f} rows/s (target >= {TARGET_HITS_PER_S:,})  "
        f"{verdict(hits >= TARGET_HITS_PER_S)}"
    )
    emit_json(
        args.json,
        {
            "benchmark": "store",
            "rows": args.rows,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "runs": summary,
            "miss_cost": miss_cost,
            "miss_costs": miss_costs,
            "hits_rows_per_s": hits,
            "load_average": [load_before, load_after],
            "pass": miss_cost < TARGET_MISS_COST and hits >= TARGET_HITS_PER_S,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
