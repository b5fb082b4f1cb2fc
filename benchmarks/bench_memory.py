"""Peak memory of `batcher run` on big JSONL inputs: it must stay small and not grow with them.

    python benchmarks/bench_memory.py [--rows 250000,1000000] [--concurrency 64] [--quick]

Generates a JSONL input (~100 bytes of review text per row) for the largest row count (smaller
counts use its first lines), starts `batcher serve-mock --unlimited` (no limits, no latency) in
its own process, and runs `python -m batcher run job.yaml --quiet` as a subprocess once per row
count, smallest first. The job's limits are far above what the machine can send.

Peak RSS is the kernel's figure for that one child (`os.wait4` -> ru_maxrss); /proc/PID/status
is polled meanwhile for the RSS over time. Target: peak < 300 MB, about the same for every size.
The full run (1,000,000 rows) takes several minutes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    API_KEY,
    KEY_ENV,
    MockProcess,
    add_common_args,
    emit_json,
    job_dict,
    table,
    verdict,
    workdir,
    write_job_yaml,
    write_rows,
)

TARGET_MB = 300
# "Does not grow": the largest input's peak within this share of the smallest's.
FLAT_SHARE = 0.2
POLL_S = 0.25


def proc_status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_cli(job: Path, timeout_s: float) -> dict[str, Any]:
    """`batcher run` as a child: exit code, wall time, exact peak RSS and an RSS timeline."""
    # A response store of its own beside the job: the user's would answer the rows (and grow
    # by a million entries); the store's own memory is part of what is measured.
    env = {**os.environ, KEY_ENV: API_KEY, "XDG_CACHE_HOME": str(job.parent / "xdg-cache")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "run", str(job), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    samples: list[tuple[float, int]] = []  # (seconds since start, VmRSS kB)
    hwm = 0
    status = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = proc_status_kb(proc.pid, "VmRSS")
        hwm = max(hwm, proc_status_kb(proc.pid, "VmHWM") or 0)
        if rss is not None:
            samples.append((time.perf_counter() - start, rss))
        if time.perf_counter() - start > timeout_s:
            proc.kill()
        time.sleep(POLL_S)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    return {
        "exit_code": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # kB on Linux
        "polled_hwm_mb": hwm / 1024,
        "rss_timeline": [(round(t, 2), round(kb / 1024, 1)) for t, kb in samples],
        "stderr_tail": stderr[-1500:],
    }


def rss_at(timeline: list[tuple[float, float]], share: float, wall: float) -> float | None:
    """RSS at the sample nearest to `share` of the run's wall time."""
    if not timeline:
        return None
    target = share * wall
    return min(timeline, key=lambda s: abs(s[0] - target))[1]


def head(src: Path, dst: Path, lines: int) -> None:
    with src.open("rb") as fin, dst.open("wb") as fout:
        fout.writelines(itertools.islice(fin, lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", default="250000,1000000", help="comma-separated row counts (one run each)"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.rows = "5000,20000"
    counts = sorted({int(n.replace("_", "")) for n in args.rows.split(",") if n.strip()})

    results: list[dict[str, Any]] = []
    with workdir(args.keep) as directory:
        t0 = time.perf_counter()
        full = directory / "input-all.jsonl"
        size = write_rows(full, counts[-1], (14, 20))
        print(
            f"generated {counts[-1]:,} rows ({size / 1e6:,.0f} MB, {size / counts[-1]:.0f} "
            f"bytes/row) in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        with MockProcess("--unlimited") as server:
            for n in counts:
                run_dir = directory / f"rows-{n}"
                run_dir.mkdir(exist_ok=True)
                head(full, run_dir / "input.jsonl", n)
                job = write_job_yaml(
                    run_dir / "job.yaml",
                    job_dict(run_dir, server.url, concurrency=args.concurrency),
                )
                server.reset()  # the server remembers answered bodies; not ours to measure
                res = run_cli(job, args.timeout)
                res.update(
                    rows=n,
                    input_mb=(run_dir / "input.jsonl").stat().st_size / 1e6,
                    rows_per_s=n / res["wall_s"],
                )
                results.append(res)
                print(
                    f"{n:,} rows: exit {res['exit_code']}, peak {res['peak_rss_mb']:.0f} MB, "
                    f"{res['wall_s']:.0f} s",
                    file=sys.stderr,
                )
                if res["exit_code"] != 0:
                    print(res["stderr_tail"], file=sys.stderr)
                for p in run_dir.iterdir():  # the next run needs the disk, not these
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    smallest, largest = results[0], results[-1]
    growth = largest["peak_rss_mb"] - smallest["peak_rss_mb"]
    flat = growth <= FLAT_SHARE * smallest["peak_rss_mb"]
    under = all(r["peak_rss_mb"] < TARGET_MB for r in results)
    ok = all(r["exit_code"] == 0 for r in results)

    print(
        f"\nmemory: `batcher run --quiet` (subprocess) on generated JSONL, unlimited zero-latency "
        f"mock server in its own process, concurrency {args.concurrency}\n"
    )
    print(
        table(
            [
                "rows",
                "input MB",
                "wall s",
                "rows/s",
                "peak RSS MB",
                "RSS@25%",
                "RSS@50%",
                "RSS@75%",
                "exit",
            ],
            [
                [
                    r["rows"],
                    r["input_mb"],
                    r["wall_s"],
                    r["rows_per_s"],
                    r["peak_rss_mb"],
                    rss_at(r["rss_timeline"], 0.25, r["wall_s"]),
                    rss_at(r["rss_timeline"], 0.5, r["wall_s"]),
                    rss_at(r["rss_timeline"], 0.75, r["wall_s"]),
                    r["exit_code"],
                ]
                for r in results
            ],
        )
    )
    print(
        f"\npeak < {TARGET_MB} MB for every size: {verdict(under and ok)}\n"
        f"growth from {smallest['rows']:,} to {largest['rows']:,} rows: {growth:+.1f} MB "
        f"({growth * 2**20 / max(largest['rows'] - smallest['rows'], 1):+.1f} bytes per extra "
        f"row); flat (within {FLAT_SHARE:.0%}): {verdict(flat)}"
    )
    emit_json(
        args.json,
        {
            "benchmark": "memory",
            "concurrency": args.concurrency,
            "runs": results,
            "growth_mb": growth,
            "pass": under and flat and ok,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
