"""Engine overhead: `batcher run` beside a bare aiohttp loop, and what the journal's fsync costs.

    python benchmarks/bench_overhead.py [--rows 20000] [--rounds 3] [--concurrency 64] [--quick]
                                        [--no-processes]

One mock server with no limits and no latency runs in its own process. Against it, in one run
and in rotating order each round:

- bare:          one ClientSession, asyncio.gather over a semaphore, the same bodies (read from
                 the same JSONL and rendered from the same template), answers parsed as JSON;
- batcher:       `Engine(job).run()` in-process with the journal fsynced (the default), on the
                 command's event loop (batcher/eventloop.py: uvloop where installed; the bare
                 loop runs on asyncio's, as a hand-written script does);
- batcher-nosync: the same with `RunOptions(fsync=False)`.

Each batcher run gets a fresh response store (its own XDG_CACHE_HOME): every row is a miss, as
in a first run, with the store on as a job that sets nothing has it. Then, as whole processes
(start-up, imports and the tokenizer's vocabulary included), per round: `bare_client.py` (the
same loop, importing only aiohttp) and `python -m batcher run job.json --quiet`; their CPU
seconds (user + system, `os.wait4`) per row are compared, after a warm-up pair that compiles
batcher's bytecode as an installed package has it (PYTHONDONTWRITEBYTECODE is dropped for the
children) and leaves the parsed vocabulary in the cache home, as any machine has it after its
first run (that pair's ratio is printed, not counted). Each process run has a new response
store: every row is a miss.

The job's limits are far beyond what the machine can send (rpm 10,000,000), so only the
engine's own work is measured. Rows/s is end to end (batcher includes its input scan and the
Parquet output); "send rows/s" is batcher's sending phase alone. Client CPU per row and the
server's CPU share tell whether the client or the server bound the run; the ratio of CPU per
row is the throughput ratio of a quiet machine and moves less with others' load (the load
average is printed: above ~1 before the run, the wall-clock figures are suspect).
Targets: batcher >= 0.8 of bare; the journal's fsync costs < 15 % of throughput; as processes,
batcher's CPU per row <= 1.4x the bare client's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bare_client
from common import (
    API_KEY,
    KEY_ENV,
    MODEL,
    MockProcess,
    add_common_args,
    emit_json,
    job_dict,
    make_job,
    quiet_logs,
    table,
    verdict,
    workdir,
    write_job_yaml,
    write_rows,
)

from batcher import eventloop
from batcher.engine import Engine, RunOptions
from batcher.errors import ExitCode
from batcher.tokens import encoding_for_model

MODES = ("bare", "batcher", "batcher-nosync")
PROCESSES = ("bare-process", "batcher-process")
TARGET_RATIO = 0.8
TARGET_FSYNC_COST = 0.15
TARGET_PROCESS_CPU = 1.4  # batcher's CPU per row over the bare client's, whole processes
BARE_CLIENT = Path(__file__).with_name("bare_client.py")


async def bare_loop(url: str, input_path: Path, job: Any, concurrency: int) -> int:
    """The hand-written script of bare_client.py, in this process: the same template filled
    from each row, sent over one session with a semaphore."""
    spec = {
        "input": str(input_path),
        "model": MODEL,
        "params": job.params,
        "messages": [m.model_dump() for m in job.messages],
    }
    return await bare_client.send_all(url, API_KEY, bare_client.bodies(spec), concurrency)


def run_bare(url: str, directory: Path, job: Any, concurrency: int) -> dict[str, float]:
    start, cpu = time.perf_counter(), time.process_time()
    ok = asyncio.run(bare_loop(url, directory / "input.jsonl", job, concurrency))
    wall = time.perf_counter() - start
    return {"ok": ok, "wall_s": wall, "cpu_s": time.process_time() - cpu, "send_s": wall}


def fresh_store(directory: Path, name: str) -> None:
    """A new, empty response store for the next run (the default store lives under
    $XDG_CACHE_HOME): a run after another over the same rows would otherwise be all hits."""
    os.environ["XDG_CACHE_HOME"] = str(directory / "xdg" / name)


def run_batcher(
    url: str,
    directory: Path,
    output: str,
    concurrency: int,
    fsync: bool,
    *,
    restart: bool = False,
    **job_extra: Any,
) -> dict:
    job = make_job(directory, url, output=output, concurrency=concurrency, **job_extra)
    options = RunOptions(
        base_url=url, api_key=API_KEY, progress="quiet", fsync=fsync, restart=restart
    )

    async def go() -> Any:
        return await Engine(job, options).run()

    start, cpu = time.perf_counter(), time.process_time()
    outcome = eventloop.run(go())  # the command's loop (batcher/eventloop.py)
    wall = time.perf_counter() - start
    if outcome.exit_code != ExitCode.OK:
        raise SystemExit(f"batcher run failed ({outcome.exit_code}): {outcome.error}")
    stats = outcome.stats
    first = stats.first_sent or stats.started  # 0.0: nothing was sent (all from the store)
    send_s = (stats.finished or stats.clock()) - first
    return {
        "ok": stats.ok,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu,
        "send_s": send_s,
        "sent": stats.requests_sent,
        "cache_hits": stats.cache_hits,
    }


def run_process(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """A child process to its end: wall seconds and its CPU seconds (user + system)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads it meanwhile
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{argv[1:3]} failed ({proc.returncode}): {err.read()[-2000:]!r}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def run_processes(url: str, directory: Path, concurrency: int, rnd: int) -> dict[str, dict]:
    """The bare client and `batcher run` as whole processes over the same rows."""
    # A new response store each round (every row a miss, as the rows of a new night are); the
    # cache home is kept, so from the warm-up round on it holds the parsed vocabulary, as on
    # any machine after its first run.
    store = directory / "stores" / f"p{rnd}.sqlite3"
    job = job_dict(
        directory,
        url,
        output=f"proc-{rnd}.parquet",
        concurrency=concurrency,
        cache={"path": str(store)},
    )
    job_file = write_job_yaml(directory / f"proc-{rnd}.json", job)
    env = {**os.environ, KEY_ENV: API_KEY, "XDG_CACHE_HOME": str(directory / "xdg" / "processes")}
    # An installed package has its bytecode compiled (pip compiles at install). With
    # PYTHONDONTWRITEBYTECODE set (as on our CI machines) an editable checkout would compile
    # batcher's ~60 modules from source in every process: ~0.25 s of CPU no user pays. The
    # warm-up round (rnd < 0) writes the bytecode and is not measured.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    runs = {
        "bare-process": lambda: run_process(
            [sys.executable, str(BARE_CLIENT), str(job_file), url, API_KEY, str(concurrency)],
            env,
        ),
        "batcher-process": lambda: run_process(
            [sys.executable, "-m", "batcher", "run", str(job_file), "--quiet"], env
        ),
    }
    order = PROCESSES if rnd % 2 == 0 else PROCESSES[::-1]
    return {name: runs[name]() for name in order}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="each mode runs once per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--no-processes", action="store_true", help="skip the whole-process CPU comparison"
    )
    add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.rounds = min(args.rows, 3_000), 1
    quiet_logs(args.verbose)
    encoding_for_model(MODEL)  # load the vocabulary before anything is timed

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    procs: dict[str, list[dict[str, float]]] = {m: [] for m in PROCESSES}
    with workdir(args.keep) as directory, MockProcess("--unlimited") as server:
        write_rows(directory / "input.jsonl", 200, (4, 12), seed=1)
        fresh_store(directory, "warmup")
        run_batcher(server.url, directory, "warmup.parquet", args.concurrency, True)  # imports
        run_bare(server.url, directory, make_job(directory, server.url), args.concurrency)
        write_rows(directory / "input.jsonl", args.rows, (4, 12))
        job = make_job(directory, server.url)
        cold: dict[str, dict] = {}
        if not args.no_processes:  # bytecode, page cache, the parsed vocabulary
            cold = run_processes(server.url, directory, args.concurrency, -1)
        for rnd in range(args.rounds):
            order = MODES[rnd % 3 :] + MODES[: rnd % 3]  # rotate: no mode always goes first
            for mode in order:
                server.reset()
                server_cpu = server.cpu_s()
                if mode == "bare":
                    res = run_bare(server.url, directory, job, args.concurrency)
                else:
                    fresh_store(directory, f"{mode}-{rnd}")
                    res = run_batcher(
                        server.url,
                        directory,
                        f"out-{mode}-{rnd}.parquet",
                        args.concurrency,
                        fsync=mode == "batcher",
                    )
                res["server_cpu_s"] = server.cpu_s() - server_cpu
                if res["ok"] != args.rows:
                    raise SystemExit(f"{mode}: {res['ok']} of {args.rows} rows answered")
                runs[mode].append(res)
                print(
                    f"round {rnd + 1} {mode:<15} {args.rows / res['wall_s']:8,.0f} rows/s",
                    file=sys.stderr,
                )
            if args.no_processes:
                continue
            for name, res in run_processes(server.url, directory, args.concurrency, rnd).items():
                procs[name].append(res)
                print(
                    f"round {rnd + 1} {name:<15} {1000 * res['cpu_s'] / args.rows:8.3f} CPU ms/row",
                    file=sys.stderr,
                )

    summary: dict[str, dict[str, Any]] = {}
    for mode, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        summary[mode] = {
            "rows_per_s": args.rows / wall,
            "send_rows_per_s": args.rows / statistics.median(r["send_s"] for r in results),
            "wall_s": wall,
            "client_cpu_ms_per_row": 1000
            * statistics.median(r["cpu_s"] for r in results)
            / args.rows,
            "server_cpu_share": statistics.median(r["server_cpu_s"] / r["wall_s"] for r in results),
            "all_rows_per_s": [round(args.rows / r["wall_s"], 1) for r in results],
        }
    load_after = os.getloadavg()[0]
    bare, durable, nosync = (summary[m]["rows_per_s"] for m in MODES)
    # Both loops are bound by the client's CPU when the server has a core to itself: the ratio
    # of CPU per row is what the throughput ratio is on a quiet machine, and others' load on
    # the shared cores moves it much less than the wall-clock ratio.
    cpu_ratio = (
        summary["bare"]["client_cpu_ms_per_row"] / summary["batcher"]["client_cpu_ms_per_row"]
    )
    ratio, ratio_nosync = durable / bare, nosync / bare
    fsync_cost = 1 - durable / nosync
    send_ratio = summary["batcher"]["send_rows_per_s"] / summary["bare"]["send_rows_per_s"]
    proc_summary = {
        name: {
            "cpu_ms_per_row": 1000 * statistics.median(r["cpu_s"] for r in results) / args.rows,
            "wall_s": statistics.median(r["wall_s"] for r in results),
            "all_cpu_s": [round(r["cpu_s"], 3) for r in results],
        }
        for name, results in procs.items()
        if results
    }
    # Per round, not of the medians: a busy moment hits both processes of one round alike.
    proc_ratios = [
        b["cpu_s"] / a["cpu_s"]
        for a, b in zip(procs["bare-process"], procs["batcher-process"], strict=True)
    ]
    proc_ratio = statistics.median(proc_ratios) if proc_ratios else None
    cold_ratio = cold["batcher-process"]["cpu_s"] / cold["bare-process"]["cpu_s"] if cold else None

    print(
        f"\nengine overhead: {args.rows:,} rows, concurrency {args.concurrency}, unlimited "
        f"zero-latency mock server in its own process; median of {args.rounds} round(s); "
        f"load average {load_before:.2f} before, {load_after:.2f} after\n"
    )
    print(
        table(
            ["mode", "rows/s", "send rows/s", "wall s", "client CPU ms/row", "server CPU share"],
            [
                [
                    m,
                    s["rows_per_s"],
                    s["send_rows_per_s"],
                    s["wall_s"],
                    s["client_cpu_ms_per_row"],
                    s["server_cpu_share"],
                ]
                for m, s in summary.items()
            ],
        )
    )
    print()
    print(
        f"batcher / bare:        {ratio:.3f}  (target >= {TARGET_RATIO})  "
        f"{verdict(ratio >= TARGET_RATIO)}"
    )
    print(f"batcher-nosync / bare: {ratio_nosync:.3f}")
    print(f"CPU per row, bare / batcher: {cpu_ratio:.3f}  (less sensitive to others' load)")
    print(f"send phase only:       {send_ratio:.3f}  (batcher / bare, without scan and output)")
    print(
        f"fsync cost:            {fsync_cost:.1%} of throughput  (target < "
        f"{TARGET_FSYNC_COST:.0%})  {verdict(fsync_cost < TARGET_FSYNC_COST)}"
    )
    if proc_ratio is not None:
        print("\nwhole processes (start-up, imports and the tokenizer's vocabulary included):\n")
        print(
            table(
                ["process", "CPU ms/row", "wall s", "CPU s per round"],
                [
                    [n, s["cpu_ms_per_row"], s["wall_s"], " ".join(map(str, s["all_cpu_s"]))]
                    for n, s in proc_summary.items()
                ],
            )
        )
        print(
            f"\nCPU per row, batcher process / bare client: {proc_ratio:.3f}  (median of the "
            f"rounds' ratios; target <= {TARGET_PROCESS_CPU})  "
            f"{verdict(proc_ratio <= TARGET_PROCESS_CPU)}"
        )
        print(
            f"the warm-up round (a machine's first run: bytecode compiled, vocabulary parsed): "
            f"{cold_ratio:.3f}"
        )
    passed = ratio >= TARGET_RATIO and fsync_cost < TARGET_FSYNC_COST
    if proc_ratio is not None:
        passed = passed and proc_ratio <= TARGET_PROCESS_CPU
    emit_json(
        args.json,
        {
            "benchmark": "overhead",
            "rows": args.rows,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "modes": summary,
            "batcher_over_bare": ratio,
            "nosync_over_bare": ratio_nosync,
            "send_phase_ratio": send_ratio,
            "cpu_ratio": cpu_ratio,
            "load_average": [load_before, load_after],
            "fsync_cost": fsync_cost,
            "processes": proc_summary,
            "process_cpu_ratio": proc_ratio,
            "process_cpu_ratios": proc_ratios,
            "first_run_process_cpu_ratio": cold_ratio,
            "pass": passed,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
