"""Shared pieces of the benchmarks: the mock server in its own process, inputs, jobs, output.

The server always runs as a separate process (`python -m batcher serve-mock`): it must not share
the client's event loop, nor its GIL, or it would distort what we time. Its counters come back
over HTTP from `/_mock/stats`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from batcher.spec import Job

API_KEY = "bench-key"  # the mock accepts any non-empty key
KEY_ENV = "BATCHER_BENCH_KEY"
MODEL = "gpt-4o-mini"

_TEXT = (
    "the battery lasts all day but the screen scratches easily and support never answered "
    "my emails about the warranty replacement I ordered in March shipping was fast though "
    "sturdy flimsy loud quiet bright dim cheap pricey great awful fine okay would buy again "
    "not recommend returned refund colour size fits perfectly broke after two weeks"
)
WORDS = tuple(_TEXT.split())


# -- the server ---------------------------------------------------------------------------------


class MockProcess:
    """`batcher serve-mock ARGS` on a free port, in its own process; stopped with SIGINT.

    `--unmarked`: the benchmarks measure batcher against a real API, whose answers are stored
    and resumed (the bundled server's signed demo answers are neither)."""

    def __init__(self, *args: str) -> None:
        self.args = ["--port", "0", "--unmarked", *args]
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""  # OpenAI-SDK base URL: {root}/openai/eu/v1
        self.root = ""
        # Kept open for the server's lifetime: its stderr, shown if it fails to start.
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115

    def start(self) -> MockProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batcher", "serve-mock", *self.args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.stop()
            self._stderr.seek(0)
            raise RuntimeError(f"serve-mock did not start: {self._stderr.read()[-2000:]}")
        self.url = line
        self.root = line.split("/openai/", 1)[0]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/_mock/stats", timeout=30) as resp:
            return json.load(resp)

    def reset(self, *, quota: bool = False) -> None:
        url = f"{self.root}/_mock/reset" + ("?quota=1" if quota else "")
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=30):
            pass

    def warm(self, model: str = MODEL) -> None:
        """Answer one request, then forget it (counters and quota windows).

        The first answer pays one-time costs; before ce58b95 the mock loaded its vocabulary
        then, admitting the run's first request ~0.4 s late (more than the limiter's window
        margin), which alone cost a 429 one window later (see the README).
        """
        body = {"model": model, "messages": [{"role": "user", "content": "warm"}], "max_tokens": 1}
        request = urllib.request.Request(
            f"{self.url}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60):
            pass
        self.reset(quota=True)

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (user + system)."""
        assert self.proc is not None
        return proc_cpu_s(self.proc.pid)

    def __enter__(self) -> MockProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, so no server is left over."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    return ticks / os.sysconf("SC_CLK_TCK")


# -- inputs and jobs ----------------------------------------------------------------------------


def write_rows(path: Path, rows: int, words: tuple[int, int], *, seed: int = 42) -> int:
    """JSONL rows {"id": "r<i>", "text": ...} of a random word count in `words`; bytes written."""
    rng = random.Random(seed)
    lo, hi = words
    size = 0
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            text = " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))
            line = json.dumps({"id": f"r{i}", "text": text}) + "\n"
            size += len(line)
            fh.write(line)
    return size


def job_dict(
    directory: Path,
    base_url: str,
    *,
    output: str = "out.parquet",
    rpm: int = 10_000_000,
    tpm: int = 10_000_000_000,
    concurrency: int = 64,
    max_tokens: int = 32,
    **extra: Any,
) -> dict[str, Any]:
    """A job sending `input.jsonl` to `base_url`; limits default to far beyond any server."""
    return {
        "input": str(directory / "input.jsonl"),
        "output": str(directory / output),
        "id_column": "id",
        "model": MODEL,
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV},
        "messages": [
            {"role": "system", "content": "You label product reviews."},
            {"role": "user", "content": "Review: {text}\nAnswer positive, negative or neutral."},
        ],
        "params": {"max_tokens": max_tokens, "temperature": 0},
        "limits": {MODEL: {"rpm": rpm, "tpm": tpm}},
        "concurrency": concurrency,
        **extra,
    }


def make_job(directory: Path, base_url: str, **kwargs: Any) -> Job:
    return Job.model_validate({**job_dict(directory, base_url, **kwargs), "job_dir": directory})


def write_job_yaml(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(json.dumps(job, indent=2))  # JSON is YAML
    return path


def quiet_logs(verbose: bool) -> None:
    """The engine logs a warning on graceful stop; benchmarks print their own figures."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if not verbose:
        logging.getLogger("batcher").setLevel(logging.ERROR)


@contextmanager
def workdir(keep: str | None) -> Iterator[Path]:
    """A temporary directory, or `keep` (created, left in place) for inspecting files."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="batcher-bench-") as tmp:
        yield Path(tmp)


# -- output -------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run (< 20 s)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep its files")
    parser.add_argument("--verbose", action="store_true", help="show batcher's log lines")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def emit_json(enabled: bool, report: dict[str, Any]) -> None:
    if enabled:
        print(json.dumps(report, default=str))


def now() -> float:
    return time.monotonic()
