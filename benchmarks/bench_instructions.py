"""Engine overhead in instructions: the whole `batcher run` process beside the bare client,
counted by valgrind (callgrind), so that a change's effect is a number, not a noisy timing.

    python benchmarks/bench_instructions.py [--small 1000] [--large 5000] [--rows 20000]
                                            [--tree DIR ...]

`bench_overhead.py` times whole processes; on a shared machine one round's CPU seconds move by
5-10 %, as much as a change being measured. Instructions executed (all threads) do not move:
the same run counts the same within ~0.1 %. Each process runs twice, over `--small` and over
`--large` rows of the same input against the unlimited mock server; the difference gives the
instructions per row, the rest is the fixed cost (interpreter, imports, the tokenizer's
vocabulary, opening and closing the run). The ratio at `--rows` rows is what
`bench_overhead.py`'s process comparison (target <= 1.4x) would see if instructions were time:
a guide, not the target. Instructions weigh native code alike whatever it does per cycle
(hashing with CPU extensions, which valgrind emulates, counts high), so compare like with like.

`--tree DIR` (repeatable) measures batcher from another checkout too (a `git worktree` of the
commit before a change), for an A/B of two commits in one run. Needs valgrind; ~5 minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
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
    workdir,
    write_job_yaml,
    write_rows,
)

BARE_CLIENT = Path(__file__).resolve().with_name("bare_client.py")
CHECKOUT = Path(__file__).resolve().parent.parent


def instructions(argv: list[str], env: dict[str, str], cwd: Path, out: Path) -> int:
    """Instructions the process (all its threads) executed, by callgrind."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    found = re.findall(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{argv[1:3]} failed under valgrind: {proc.stderr[-2000:]}")
    return int(found[-1])


def measure(
    url: str, directory: Path, who: str, tree: Path | None, rows: int, *, count: bool = True
) -> int:
    """One process over the first `rows` rows: the bare client (tree None) or batcher."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{who}-{rows}")  # a file name
    input_path = directory / f"input-{rows}.jsonl"
    job = job_dict(directory, url, output=f"{name}.parquet", cache={"path": str(directory / name)})
    job["input"] = str(input_path)
    job_file = write_job_yaml(directory / f"{name}.json", job)
    env = {**os.environ, KEY_ENV: API_KEY, "XDG_CACHE_HOME": str(directory / "xdg")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # compiled bytecode, as an installed package has
    if tree is None:
        argv = [sys.executable, str(BARE_CLIENT), str(job_file), url, API_KEY, "64"]
    else:
        env["PYTHONPATH"] = str(tree)
        argv = [sys.executable, "-m", "batcher", "run", str(job_file), "--quiet"]
    # Run from the work directory: `python -m` puts the current directory first on sys.path,
    # and a checkout there would be measured whatever PYTHONPATH says.
    if not count:
        subprocess.run(argv, env=env, cwd=directory, stdout=subprocess.DEVNULL, check=True)
        return 0
    return instructions(argv, env, directory, directory / f"{name}.callgrind")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=20_000, help="the ratio is projected here")
    parser.add_argument("--tree", action="append", type=Path, default=[], help="another checkout")
    add_common_args(parser)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt install valgrind); nothing measured")
        return 2
    small, large = (200, 600) if args.quick else (args.small, args.large)
    subjects: dict[str, Path | None] = {"bare": None, "batcher": CHECKOUT}
    subjects.update({f"batcher@{t}": t.resolve() for t in args.tree})
    report: dict[str, Any] = {"small": small, "large": large, "rows": args.rows}
    with workdir(args.keep) as directory, MockProcess("--unlimited") as server:
        directory = directory.resolve()  # the processes run in it
        write_rows(directory / f"input-{large}.jsonl", large, (4, 12), seed=3)
        lines = (directory / f"input-{large}.jsonl").read_text().splitlines(keepends=True)
        (directory / f"input-{small}.jsonl").write_text("".join(lines[:small]))
        # A first batcher run parses the vocabulary into the cache home (as any machine's
        # first run does) and compiles the bytecode; neither is counted.
        for checkout in {t for t in subjects.values() if t is not None}:
            measure(server.url, directory, "warm-up", checkout, small, count=False)
        for who, tree in subjects.items():
            counts = {n: measure(server.url, directory, who, tree, n) for n in (small, large)}
            per_row = (counts[large] - counts[small]) / (large - small)
            report[who] = {"per_row": per_row, "fixed": counts[small] - small * per_row}
    bare = report["bare"]
    rows = []
    for who in subjects:
        r = report[who]
        total = r["fixed"] + args.rows * r["per_row"]
        r["ratio"] = total / (bare["fixed"] + args.rows * bare["per_row"])
        rows.append(
            (
                who,
                f"{r['per_row'] / 1e3:,.1f}",
                f"{r['per_row'] / bare['per_row']:.3f}",
                f"{r['fixed'] / 1e9:.3f}",
                f"{r['ratio']:.3f}",
            )
        )
    print(
        f"instructions (callgrind, all threads), per row from {small:,} and {large:,} rows; "
        f"ratio projected at {args.rows:,} rows"
    )
    print(table(("process", "k per row", "x bare", "fixed G", "ratio"), rows))
    emit_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
