"""How fast `batcher estimate` counts a big job: 1,000,000 rows of about 100 tokens.

    python benchmarks/bench_estimate.py [--rows N] [--threads 2]

Writes a JSONL input and a job file into a temporary directory, runs `estimate_job` on it
and prints rows, tokens, seconds and tokens/second. Target: well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from batcher.estimate import estimate_job
from batcher.spec import load_job

_TEXT = (
    "the battery lasts all day but the screen scratches easily and support never answered "
    "my emails about the warranty replacement I ordered in March shipping was fast though "
    "sturdy flimsy loud quiet bright dim cheap pricey great awful fine okay would buy again "
    "not recommend returned refund colour size fits perfectly broke after two weeks"
)
WORDS = tuple(_TEXT.split())


def write_input(path: Path, rows: int, words_per_row: int = 76) -> None:
    """Rows of ~100 prompt tokens once the template and chat overhead are added."""
    rng = random.Random(42)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            text = " ".join(rng.choices(WORDS, k=words_per_row))
            fh.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")


def write_job(directory: Path) -> Path:
    job = directory / "job.yaml"
    job.write_text(
        "input: input.jsonl\n"
        "output: out.parquet\n"
        "id_column: id\n"
        "model: gpt-4o-mini\n"
        "messages:\n"
        "  - {role: system, content: 'Label the review: positive, negative or neutral.'}\n"
        "  - {role: user, content: '{text}'}\n"
        "params: {max_tokens: 5, temperature: 0}\n",
        encoding="utf-8",
    )
    return job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batcher-bench-") as tmp:
        directory = Path(tmp)
        t0 = time.perf_counter()
        write_input(directory / "input.jsonl", args.rows)
        size_mb = (directory / "input.jsonl").stat().st_size / 1e6
        print(
            f"generated {args.rows:,} rows ({size_mb:,.0f} MB) in {time.perf_counter() - t0:.1f}s"
        )
        job = load_job(write_job(directory))
        t0 = time.perf_counter()
        report = estimate_job(job, num_threads=args.threads)
        seconds = time.perf_counter() - t0
    tokens = report["prompt_tokens"]
    print(f"rows:          {report['rows']:,}")
    print(f"prompt tokens: {tokens:,} (avg {tokens / max(report['rows'], 1):.1f} per row)")
    print(f"seconds:       {seconds:.2f}")
    print(f"tokens/second: {tokens / seconds:,.0f}")
    print(f"rows/second:   {report['rows'] / seconds:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
