"""Peak memory of the final output write alone, on a made-up journal: minutes, not 17.

    python benchmarks/bench_write.py [--rows 1000000] [--order input|completion]
        [--format parquet|batch] [--no-tokenizer] [--keep DIR]

`bench_memory.py` measures a whole `batcher run`; its peak is the output write at the end (the
join of the input's order with the journal's latest answers, then Parquet). This builds the
input (as bench_memory does) and a journal as the bundled server's answers would leave it
(records in completion order: the input order shuffled within windows of 64, the concurrency),
once per DIR (with --keep DIR; else in a temporary directory), then runs only the write in a
fresh process: imports, the o200k vocabulary (as a run holds it), an `Engine` and its input
scan (Arrow's kernels, the allocators' pages), then `write_output_ordered` /
`write_batch_output_ordered` in a worker thread (the engine runs it with `asyncio.to_thread`).
Prints the RSS after imports, vocabulary and scan, the peak RSS (VmHWM: the write's, the scan's
being lower), Arrow's pool high-water mark and the write's time. It leaves out the sending
phase's own memory (client, limiter, store): add the write's rise to bench_memory's RSS while
sending. Identical runs differ by up to ~12 MB (which glibc arena the worker thread gets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import add_common_args, emit_json, workdir, write_rows

WINDOW = 64  # the run's concurrency: how far completion order strays from input order


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_journal(input_path: Path, journal: Path, seed: int = 7) -> int:
    """Result records for every input row, in a plausible completion order; rows written."""
    rng = random.Random(seed)
    head = {"t": "h", "version": 1, "fingerprint": "0" * 64, "created": "2026-11-29T00:00:00"}
    run = {"t": "run", "started": "2026-11-29T00:00:00", "pid": 1, "retry_errors": False}
    rows = 0
    with input_path.open("rb") as fin, journal.open("w", encoding="utf-8") as out:
        out.write(json.dumps(head) + "\n" + json.dumps(run) + "\n")
        window: list[dict[str, Any]] = []

        def flush() -> None:
            rng.shuffle(window)
            for row in window:
                rid = row["id"]
                rec = {
                    "t": "r",
                    "id": rid,
                    "status": "ok",
                    "content": "label: negative\nYou said: Review: "
                    + " ".join(row["text"].split()[:8]),
                    "finish_reason": "stop",
                    "prompt_tokens": 46,
                    "completion_tokens": 17,
                    "total_tokens": 63,
                    "attempts": 1,
                    "latency_s": round(rng.uniform(0.002, 0.02), 4),
                    "error": None,
                    "model": "gpt-4o-mini-2024-07-18",
                    "source": "api",
                    "cost_usd": 1.71e-05,
                    "key": hashlib.blake2b(rid.encode(), digest_size=32).hexdigest(),
                }
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            window.clear()

        for raw in fin:
            window.append(json.loads(raw))
            rows += 1
            if len(window) >= WINDOW:
                flush()
        flush()
        end = {"t": "end", "finished": "2026-11-29T00:00:00", "complete": True, "ok": rows}
        out.write(json.dumps(end) + "\n")
    return rows


def measure(directory: Path, order: str, fmt: str, tokenizer: bool) -> dict[str, Any]:
    """In this (fresh) process: the write alone, as the end of a run does it."""
    import pyarrow as pa

    import batcher.cli  # noqa: F401  (everything a run imports)
    from batcher.engine import Engine, RunOptions
    from batcher.spec import Job
    from batcher.writer import write_batch_output_ordered, write_output_ordered

    res: dict[str, Any] = {"rss_imports_mb": status_mb("VmRSS")}
    enc = None
    if tokenizer:
        from batcher.tokens import get_encoding

        enc = get_encoding("o200k_base")
        res["rss_tokenizer_mb"] = status_mb("VmRSS")
    job = Job.model_validate(
        {
            "input": str(directory / "input.jsonl"),
            "output": str(directory / "out.parquet"),
            "id_column": "id",
            "model": "gpt-4o-mini",
            "endpoint": {"base_url": "http://127.0.0.1:9/v1"},
            "messages": [{"role": "user", "content": "{text}"}],
            "job_dir": directory,
        }
    )
    # The run's input scan first (its Arrow kernels, the allocator's pages), as before a write.
    engine = Engine(job, RunOptions(api_key="sk-unused", handle_signals=False))
    scanner = threading.Thread(target=engine.scan)
    scanner.start()
    scanner.join()
    res["rss_before_write_mb"] = status_mb("VmRSS")
    res["hwm_before_write_mb"] = status_mb("VmHWM")

    def batches() -> Any:
        return engine.reader.iter_batches(4096)

    journal = directory / "input.journal"
    out = directory / ("out.jsonl" if fmt == "batch" else "out.parquet")
    counts: list[tuple[int, int]] = []

    def write() -> None:
        if fmt == "batch":
            counts.append(write_batch_output_ordered(journal, out, batches, order=order))
        else:
            counts.append(write_output_ordered(journal, out, batches, order=order, keep_names=[]))

    t0 = time.perf_counter()
    worker = threading.Thread(target=write)  # the engine writes in asyncio.to_thread
    worker.start()
    worker.join()
    res["write_s"] = time.perf_counter() - t0
    res["rows"], res["error_rows"] = counts[0]
    res["peak_rss_mb"] = status_mb("VmHWM")
    res["rss_after_mb"] = status_mb("VmRSS")
    res["arrow_pool_max_mb"] = pa.default_memory_pool().max_memory() / 2**20
    res["arrow_pool_backend"] = pa.default_memory_pool().backend_name
    res["output_mb"] = out.stat().st_size / 1e6
    del enc
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--order", choices=("input", "completion"), default="input")
    parser.add_argument("--format", choices=("parquet", "batch"), default="parquet")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the o200k vocabulary")
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.rows = 20_000
    if args.child:
        res = measure(Path(args.child), args.order, args.format, not args.no_tokenizer)
        print(json.dumps(res))
        return 0

    with workdir(args.keep) as directory:
        data = directory / f"rows-{args.rows}"
        data.mkdir(exist_ok=True)
        journal = data / "input.journal"
        if not journal.exists():
            t0 = time.perf_counter()
            write_rows(data / "input.jsonl", args.rows, (14, 20))
            tmp = journal.with_suffix(".tmp")
            make_journal(data / "input.jsonl", tmp)
            tmp.rename(journal)
            print(f"made input and journal in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cmd = [sys.executable, __file__, "--child", str(data), "--order", args.order]
        cmd += ["--format", args.format] + (["--no-tokenizer"] if args.no_tokenizer else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"{res['rows']:,} rows, {args.order} order, {args.format}: imports "
        f"{res['rss_imports_mb']:.0f} MB"
        + (f", + vocabulary {res['rss_tokenizer_mb']:.0f} MB" if "rss_tokenizer_mb" in res else "")
        + f", after the scan {res['rss_before_write_mb']:.0f} MB"
        + f"; write peak {res['peak_rss_mb']:.0f} MB (RSS after {res['rss_after_mb']:.0f}), "
        f"Arrow pool max {res['arrow_pool_max_mb']:.1f} MB ({res['arrow_pool_backend']}), "
        f"{res['write_s']:.1f} s"
    )
    emit_json(args.json, {"benchmark": "write", **vars(args), **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
