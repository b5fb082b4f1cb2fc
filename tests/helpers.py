"""Helpers for tests that drive the real `batcher` CLI.

`run_batcher` invokes the CLI in this process (click's CliRunner: the same command, options,
exit codes and output, without paying ~1.5 s of interpreter, pyarrow and tokenizer start-up per
run); `run_batcher_process` and `start_batcher` start a real `python -m batcher` process, for
the end-to-end tests and for everything that signals or kills it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml
from aiohttp import web

API_KEY = "test-key-7f3a9c"  # what the tests export; must never show up in any output


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def review_rows(n: int, *, marker: dict[int, str] | None = None) -> list[dict[str, Any]]:
    marker = marker or {}
    return [
        {"id": f"r{i}", "text": f"review number {i} is fine {marker.get(i, '')}".strip()}
        for i in range(n)
    ]


def write_job(tmp: Path, base_url: str, **overrides: Any) -> Path:
    """A job file in `tmp` sending `input.jsonl` to `base_url`; overrides replace keys."""
    job: dict[str, Any] = {
        "input": "input.jsonl",
        "output": "out/result.parquet",
        "id_column": "id",
        "model": "gpt-4o-mini",
        "endpoint": {"base_url": base_url, "api_key_env": "TEST_LANGDOCK_KEY"},
        "messages": [
            {"role": "system", "content": "You label reviews."},
            {"role": "user", "content": "Review: {text}"},
        ],
        "params": {"max_tokens": 8, "temperature": 0},
        "concurrency": 8,
        "retry": {"max_attempts": 6, "initial_wait_s": 0.05, "max_wait_s": 0.5},
        "progress_interval_s": 0.5,
    }
    for key, value in overrides.items():
        if value is None:
            job.pop(key, None)
        else:
            job[key] = value
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def env_with_key(key: str | None = API_KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TEST_LANGDOCK_KEY"}
    if key is not None:
        env["TEST_LANGDOCK_KEY"] = key
    return env


def run_batcher(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`batcher ARGS` in-process; the result looks like a finished subprocess."""
    del timeout  # in-process runs end by themselves (every test server ends its slow answers)
    from click.testing import CliRunner

    from batcher.cli import main

    wanted = env if env is not None else env_with_key()
    # CliRunner only overrides variables: unset (None) what `wanted` leaves out.
    overrides: dict[str, str | None] = {k: None for k in os.environ if k not in wanted}
    overrides.update(wanted)
    result = CliRunner().invoke(main, [str(a) for a in args], env=overrides)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(
        ["batcher", *map(str, args)], result.exit_code, result.stdout, stderr
    )


def run_batcher_process(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m batcher ARGS` as a real process: for the end-to-end tests."""
    return subprocess.run(
        [sys.executable, "-m", "batcher", *map(str, args)],
        env=env if env is not None else env_with_key(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_batcher(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batcher", *map(str, args)],
        env=env if env is not None else env_with_key(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_output(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve a test double's `app` on a free port of 127.0.0.1: (its runner, the port)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    return runner, int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
