"""The loop batcher runs on when it owns one (batcher/eventloop.py): uvloop, or asyncio's on
request, and a limiter that never admits before its slot on either."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import env_with_key, read_output, review_rows, run_batcher, write_job, write_jsonl

from batcher import eventloop
from batcher.admission.local_backend import LocalLimiter, loop_clock
from batcher.admission.policy import us
from batcher.errors import JobSpecError

uvloop = pytest.importorskip("uvloop")  # not on Windows

FAST = {"rpm": None, "tpm": None}

# The command's process, reporting at its end which loop ran the job.
PROBE = (
    "import asyncio, atexit, sys\n"
    "import batcher.eventloop as e\n"
    "made = []\n"
    "factory = e.loop_factory\n"
    "def spy():\n"
    "    f = factory()\n"
    "    made.append(f.__module__)\n"
    "    return f\n"
    "e.loop_factory = spy\n"
    "atexit.register(lambda: print('loop:', made))\n"
    "from batcher.command import entry\n"
    "sys.argv[0] = 'batcher'\n"
    "entry()\n"
)


@pytest.mark.parametrize(("choice", "module"), [("", "uvloop"), ("asyncio", "asyncio.events")])
def test_the_command_runs_on_uvloop_unless_asked_for_asyncio(
    tmp_path: Path, mock_server, choice: str, module: str
) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(40))
    job = write_job(tmp_path, srv.url, concurrency=8)
    env = {**env_with_key(), eventloop.ENV: choice}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, "run", str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert f"loop: [{module!r}]" in res.stdout
    rows = read_output(tmp_path / "out/result.parquet")
    assert len(rows) == 40 and {r["status"] for r in rows} == {"ok"}


def test_an_unknown_loop_is_a_config_error(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "input.jsonl", review_rows(3))
    job = write_job(tmp_path, srv.url)
    res = run_batcher("run", job, env={**env_with_key(), eventloop.ENV: "tokio"})
    assert res.returncode == 2, res.stderr
    assert "$BATCHER_EVENT_LOOP must be uvloop or asyncio, got 'tokio'" in res.stderr
    assert srv.stats()["requests"] == 0


def test_loop_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv(eventloop.ENV, " AsyncIO ")
    assert eventloop.loop_factory() is asyncio.new_event_loop
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    assert eventloop.loop_factory() is uvloop.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed (Windows)
    with pytest.raises(JobSpecError, match="uvloop is not installed"):
        eventloop.loop_factory()
    monkeypatch.delenv(eventloop.ENV)
    assert eventloop.loop_factory() is asyncio.new_event_loop


def test_on_uvloop_the_limiter_never_admits_before_its_slot() -> None:
    """uvloop's `loop.time()` counts whole milliseconds and its timers fire up to one early:
    the schedule reads the monotonic clock there, and a wait ends at the slot, not before.
    100 requests a second: every admission is at or after its slot (whatever the machine's
    load: early is the only failure), and none is admitted without waiting for it."""

    async def admissions() -> list[tuple[int, int]]:
        loop = asyncio.get_running_loop()
        assert loop_clock(loop) is time.monotonic
        limiter = LocalLimiter(
            lambda model: (6_000, 10**9), headroom=1.0, window_margin=0.0, tolerance_s=0.0
        )
        seen = []
        for _ in range(40):
            adm = await limiter.acquire("m", 1)
            seen.append((adm.at_us, us(time.monotonic())))
        return seen

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        seen = runner.run(admissions())
    assert all(now >= at for at, now in seen), [(at, now) for at, now in seen if now < at]
    assert [at for at, _ in seen] == sorted({at for at, _ in seen})  # a slot each


def test_on_asyncio_the_limiter_keeps_the_loops_clock() -> None:
    """asyncio's loop reads the monotonic clock itself, and tests run it on virtual time."""

    async def same() -> bool:
        loop = asyncio.get_running_loop()
        return loop_clock(loop) == loop.time

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        assert runner.run(same())


def test_a_wrong_loop_raises_to_a_caller_inside_a_running_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`batcher.run` in a notebook (a running loop) runs in a thread of its own: a wrong
    $BATCHER_EVENT_LOOP is the caller's error, not a dead thread the caller waits on."""
    import batcher

    monkeypatch.setenv(eventloop.ENV, "tokio")

    async def cell() -> None:
        with pytest.raises(JobSpecError, match="BATCHER_EVENT_LOOP"):
            batcher.run({"model": "m"})

    done: list[BaseException | None] = []

    def notebook() -> None:  # a thread: a regression hangs it, not the test
        try:
            asyncio.run(cell())
        except BaseException as exc:
            done.append(exc)
        else:
            done.append(None)

    thread = threading.Thread(target=notebook, daemon=True)
    thread.start()
    thread.join(60)
    assert done == [None], "batcher.run hung or failed otherwise"


def test_an_injected_clock_is_not_waited_for_on_uvloop() -> None:
    """A clock of the caller's (tests, embedders) paces as before: slept once per slot."""

    async def three() -> int:
        limiter = LocalLimiter(lambda model: (6_000, 10**9), clock=lambda: 100.0, headroom=1.0)
        for _ in range(3):
            await asyncio.wait_for(limiter.acquire("m", 1), 5)
        return 3

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(three()) == 3
