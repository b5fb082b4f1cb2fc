"""How fast the response store stores and serves answers: 20,000 entries by default.

    python benchmarks/bench_cache.py [--rows 20000] [--batch 512] [--rounds 3] [--quick] [--json]

Per round, in a fresh store in a temporary directory: the request keys of `--rows` chat bodies
(`cache_key`, which every row pays), `put_many` in batches of `--batch` (what the engine does per
journal group commit), `get_many` of every key in batches of `--batch` (a run answered entirely
from the store), the same from a second store object (a new process: nothing in SQLite's page
cache of this connection), and `stats()` + `close()` (which write the hit counts). The median
round is reported. Target: `get_many` >= 20,000 rows/s, with room to spare, so a run answered
from the store is bounded by the engine, not by the store.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batcher.cache import CacheEntry, CacheKey, ResponseStore, cache_key

TARGET_HITS_PER_S = 20_000


def request_body(i: int) -> dict[str, Any]:
    """A short labeling request like bench_overhead's (a system prompt and ~100 tokens)."""
    return {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Label the review: positive, negative or neutral."},
            {"role": "user", "content": f"review {i}: " + "the battery lasts all day " * 15},
        ],
        "max_tokens": 5,
        "temperature": 0,
    }


def answer_body(i: int) -> dict[str, Any]:
    """A chat.completion as the API sends it (about 450 bytes of JSON)."""
    return {
        "id": f"chatcmpl-{i:012d}abcdefABCDEF",
        "object": "chat.completion",
        "created": 1_732_000_000 + i,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_0ba0d124f1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "positive", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 118,
            "completion_tokens": 1,
            "total_tokens": 119,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def one_round(directory: Path, rows: int, batch: int) -> dict[str, float]:
    path = directory / "responses.sqlite3"
    bodies = [request_body(i) for i in range(rows)]
    answers = [answer_body(i) for i in range(rows)]

    t0 = time.perf_counter()
    keys: list[CacheKey] = [cache_key(b) for b in bodies]
    t_key = time.perf_counter() - t0

    store = ResponseStore.open(path)
    assert store.enabled, store.disabled_reason
    t0 = time.perf_counter()
    for start in range(0, rows, batch):
        stored = store.put_many(
            CacheEntry(k, a, "gpt-4o-mini-2024-07-18", 118, 1)
            for k, a in zip(
                keys[start : start + batch], answers[start : start + batch], strict=True
            )
        )
        assert stored == min(batch, rows - start)
    t_put = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), time.process_time()
    hits = 0
    for start in range(0, rows, batch):
        hits += len(store.get_many(keys[start : start + batch]))
    t_get, c_get = time.perf_counter() - t0, time.process_time() - c0
    assert hits == rows, f"{hits} hits of {rows}"
    store.close()

    other = ResponseStore.open(path)  # as a second process would
    t0 = time.perf_counter()
    hits = 0
    for start in range(0, rows, batch):
        hits += len(other.get_many(keys[start : start + batch]))
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = other.stats()
    other.close()
    t_close = time.perf_counter() - t0
    assert hits == rows and stats.hits == 2 * rows, (hits, stats)

    return {
        "key_rows_per_s": rows / t_key,
        "put_rows_per_s": rows / t_put,
        "get_rows_per_s": rows / t_get,
        "get_rows_per_cpu_s": rows / c_get,  # what the store costs when the cores are shared
        "get_new_store_rows_per_s": rows / t_cold,
        "hit_flush_s": t_close,
        "bytes_per_entry": stats.size_bytes / rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 rows, one round")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args()
    rows, rounds = (2_000, 1) if args.quick else (args.rows, args.rounds)

    results = []
    for n in range(rounds):
        with tempfile.TemporaryDirectory(prefix="batcher-bench-cache-") as tmp:
            results.append(one_round(Path(tmp), rows, args.batch))
        print(f"round {n + 1}/{rounds} done", file=sys.stderr)
    median = {k: statistics.median(r[k] for r in results) for k in results[0]}

    print(f"response store, {rows:,} entries, batches of {args.batch}, median of {rounds}")
    print(f"  cache_key:              {median['key_rows_per_s']:>10,.0f} rows/s")
    print(f"  put_many:               {median['put_rows_per_s']:>10,.0f} rows/s")
    print(f"  get_many (all hits):    {median['get_rows_per_s']:>10,.0f} rows/s")
    print(f"  get_many per CPU second:{median['get_rows_per_cpu_s']:>10,.0f} rows/s")
    print(f"  get_many, new store:    {median['get_new_store_rows_per_s']:>10,.0f} rows/s")
    print(f"  hit counts written in:  {median['hit_flush_s']:>10.3f} s")
    print(f"  on disk:                {median['bytes_per_entry']:>10,.0f} bytes/entry")
    # What a run answered from the store pays per row in the store: the key and the look-up.
    served = 1 / (1 / median["key_rows_per_s"] + 1 / median["get_new_store_rows_per_s"])
    ok = served >= TARGET_HITS_PER_S
    print(
        f"{'PASS' if ok else 'FAIL'}: key + get_many {served:,.0f} rows/s "
        f"(target >= {TARGET_HITS_PER_S:,})"
    )
    if args.json:
        print(
            json.dumps({"rows": rows, "batch": args.batch, **median, "served_rows_per_s": served})
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
