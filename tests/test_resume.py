"""Crash-safe resume (issue 3) end to end: `python -m batcher run` subprocesses, killed and
rerun against the bundled mock server over 127.0.0.1.

Kills are timed by polling the journal (`<output>.journal`) for finished rows, never by
sleeping, so they land early/mid/late whatever the machine's load. The server counts every
request and every row answered 200 twice (`duplicates`): that is what a crash made us pay again.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from helpers import env_with_key, read_output, review_rows, run_batcher, write_job, write_jsonl

# The job's own limiter must not be what paces these runs: the server is unlimited too.
BIG = {"rpm": 1_000_000, "tpm": 1_000_000_000}
BASE: dict[str, Any] = {
    "limits": {"gpt-4o-mini": BIG},
    "concurrency": 8,
    "retry": {"max_attempts": 3, "initial_wait_s": 0.05, "max_wait_s": 0.2},
}
SERVER: dict[str, Any] = {"rpm": None, "tpm": None, "latency_s": 0.04}
ROWS = 300
RESUME_HINT = "run the same command again to resume"


# ---- helpers ----------------------------------------------------------------------------------


class Running:
    """A `batcher` subprocess whose stdout/stderr go to files, so they can be read mid-run."""

    def __init__(self, tmp: Path, *args: str | Path, env: dict[str, str] | None = None) -> None:
        logs = tmp / "logs"
        logs.mkdir(exist_ok=True)
        n = len(list(logs.iterdir()))
        self.err_path = logs / f"{n}.err"
        with self.err_path.open("w") as err, (logs / f"{n}.out").open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batcher", *map(str, args)],
                env=env if env is not None else env_with_key(),
                stdout=out,
                stderr=err,
                text=True,
            )

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_until(self, cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
        """Poll `cond`; fail if the process ends first (the moment we wanted was missed)."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"batcher exited ({self.proc.returncode}) before {what}:\n{self.stderr}"
                )
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.stderr}")
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        assert self.proc.poll() is None, f"batcher already exited:\n{self.stderr}"
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    """Factory for `Running`; whatever is still alive at teardown is killed."""
    started: list[Running] = []

    def start(tmp: Path, *args: str | Path, env: dict[str, str] | None = None) -> Running:
        proc = Running(tmp, *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def output_of(tmp: Path) -> Path:
    return tmp / "out/result.parquet"


def journal_of(output: Path) -> Path:
    return output.with_name(output.name + ".journal")


def journal_lines(output: Path) -> list[bytes]:
    path = journal_of(output)
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def results_in_journal(output: Path) -> int:
    """Finished rows on disk (whole lines only; superseded records included)."""
    return sum(
        1 for line in journal_lines(output) if line.startswith(b'{"t":"r"') and line[-1:] == b"\n"
    )


def check_complete(output: Path, n: int, *, ok: int | None = None) -> dict[str, dict]:
    """The published output holds every id r0..r{n-1} exactly once; returns rows by id."""
    rows = read_output(output)
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n)), "every id exactly once"
    if ok is not None:
        assert sum(r["status"] == "ok" for r in rows) == ok
    return {r["id"]: r for r in rows}


def check_output_never_half_written(output: Path, n: int) -> None:
    """After a kill the output is absent, or complete: never a torn Parquet."""
    if output.exists():
        assert pq.read_metadata(output).num_rows == n


def new_job(tmp: Path, url: str, **overrides: Any) -> Path:
    return write_job(tmp, url, **{**BASE, **overrides})


def requests_since(srv: Any, before: dict[str, Any]) -> int:
    return srv.stats()["requests"] - before["requests"]


def settled_stats(srv: Any, timeout: float = 30) -> dict[str, Any]:
    """The server's counters once the requests of a killed client have been answered.

    The server still answers (and counts) what a dead process had in flight; counting the next
    run's requests from before that would blame it for them.
    """
    deadline = time.monotonic() + timeout
    while True:
        s = srv.stats()
        fivexx = sum(n for code, n in s["by_status"].items() if int(code) >= 500)
        if s["admitted"] == s["accepted"] + fivexx + s["dropped"]:
            return s
        assert time.monotonic() < deadline, f"the server never settled: {s}"
        time.sleep(0.01)


def kill_after(
    running: Callable[..., Running], srv: Any, tmp: Path, job: Path, rows_done: int
) -> tuple[int, int]:
    """SIGKILL a run once `rows_done` rows are journaled; (exit status, rows on disk)."""
    output = output_of(tmp)
    proc = running(tmp, "run", job, "--quiet")
    proc.wait_until(lambda: results_in_journal(output) >= rows_done, f"{rows_done} rows")
    proc.proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    settled_stats(srv)
    return rc, results_in_journal(output)


# ---- 1. SIGKILL at any point: nothing lost, at most `concurrency` paid twice ------------------


@pytest.mark.parametrize(
    "kill_at",
    [10, ROWS // 2, ROWS * 5 // 6, ROWS],
    ids=["early", "middle", "near-end", "all-journaled"],
)
def test_sigkill_then_resume(tmp_path: Path, mock_server, running, kill_at: int) -> None:
    srv = mock_server(**SERVER)
    write_jsonl(tmp_path / "input.jsonl", review_rows(ROWS))
    job = new_job(tmp_path, srv.url)
    output = output_of(tmp_path)

    rc, on_disk = kill_after(running, srv, tmp_path, job, kill_at)
    if kill_at < ROWS:
        assert rc == -signal.SIGKILL
        assert not output.exists(), "the output is published only when the job is complete"
    else:  # killed while (or after) publishing the Parquet
        assert rc in (-signal.SIGKILL, 0)
        check_output_never_half_written(output, ROWS)
    assert on_disk >= kill_at

    before = srv.stats()
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    check_complete(output, ROWS, ok=ROWS)
    # Exactly the rows not on disk were sent again; of those, only the ones in flight at the
    # kill, or answered and waiting for their group commit, had been answered before.
    assert requests_since(srv, before) == ROWS - on_disk
    assert srv.stats()["duplicates"] <= 2 * BASE["concurrency"]
    if on_disk:
        assert f"holds answers for {on_disk} rows" in res.stderr


def test_rerun_of_a_finished_job_sends_nothing(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**SERVER)
    write_jsonl(tmp_path / "input.jsonl", review_rows(20))
    job = new_job(tmp_path, srv.url)
    assert run_batcher("run", job).returncode == 0
    first = pq.read_table(output_of(tmp_path))
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert srv.stats()["requests"] == 20
    check_complete(output_of(tmp_path), 20, ok=20)
    assert pq.read_table(output_of(tmp_path)).equals(first)


# ---- 2. SIGINT / SIGTERM: graceful stop, resume hint, exit 130 / 143 ------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_gracefully_then_resumes(
    tmp_path: Path, mock_server, running, sig: int, code: int
) -> None:
    srv = mock_server(**SERVER)
    write_jsonl(tmp_path / "input.jsonl", review_rows(ROWS))
    job = new_job(tmp_path, srv.url)
    output = output_of(tmp_path)

    proc = running(tmp_path, "run", job, "--quiet")
    proc.wait_until(lambda: results_in_journal(output) >= ROWS // 3, "a third of the rows")
    proc.signal(sig)
    assert proc.wait() == code, proc.stderr
    err = proc.stderr
    assert "interrupted" in err and RESUME_HINT in err
    on_disk = results_in_journal(output)
    assert f"{on_disk} of {ROWS} rows are saved" in err
    assert 0 < on_disk < ROWS
    last = json.loads(journal_lines(output)[-1])
    assert last["t"] == "end" and last["complete"] is False
    assert not output.exists()
    # The grace period let every request in flight finish and be journaled.
    assert srv.stats()["accepted"] == on_disk

    before = srv.stats()
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    check_complete(output, ROWS, ok=ROWS)
    assert requests_since(srv, before) == ROWS - on_disk
    assert srv.stats()["duplicates"] == 0


def test_second_sigint_stops_at_once_keeping_what_was_saved(
    tmp_path: Path, mock_server, running
) -> None:
    # 16 quick rows, then rows the server holds for a minute: the second Ctrl-C must not wait.
    srv = mock_server(rpm=None, tpm=None, slow_marker_s=60.0)
    n_fast, n = 16, 24
    write_jsonl(
        tmp_path / "input.jsonl", review_rows(n, marker=dict.fromkeys(range(n_fast, n), "[[slow]]"))
    )
    job = new_job(tmp_path, srv.url, concurrency=4, grace_period_s=120)
    output = output_of(tmp_path)

    proc = running(tmp_path, "run", job, "--quiet")
    proc.wait_until(lambda: results_in_journal(output) >= n_fast, "the quick rows")
    # The first stop must find the slow rows in flight; were they not sent yet, nothing would be
    # in flight, the run would end by itself and the second Ctrl-C would come too late.
    proc.wait_until(lambda: srv.stats()["admitted"] >= n_fast + 4, "the slow rows in flight")
    proc.signal(signal.SIGINT)
    proc.wait_until(lambda: "stopping:" in proc.stderr, "the first stop to be acknowledged")
    proc.signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, proc.stderr  # well before the 60 s answers
    assert "stopping now" in proc.stderr and RESUME_HINT in proc.stderr
    assert results_in_journal(output) == n_fast
    assert all(json.loads(line) for line in journal_lines(output))  # no torn record

    # Resume against a server that answers the marked rows quickly (the server is not part of
    # the fingerprint): only the rows that never finished are sent.
    fast = mock_server(rpm=None, tpm=None, slow_marker_s=0.01)
    new_job(tmp_path, fast.url, concurrency=4, grace_period_s=120)
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    check_complete(output, n, ok=n)
    assert fast.stats()["requests"] == n - n_fast


@pytest.mark.parametrize(
    ("slow_s", "grace_s"), [(1.5, 30.0), (60.0, 0.5)], ids=["in-flight-finish", "grace-expires"]
)
def test_grace_period(tmp_path: Path, mock_server, running, slow_s: float, grace_s: float) -> None:
    # r0 (the probe, sent alone) is quick; the rest take `slow_s`.
    srv = mock_server(rpm=None, tpm=None, slow_marker_s=slow_s)
    write_jsonl(
        tmp_path / "input.jsonl", review_rows(12, marker=dict.fromkeys(range(1, 12), "[[slow]]"))
    )
    job = new_job(tmp_path, srv.url, concurrency=4, grace_period_s=grace_s)
    output = output_of(tmp_path)

    proc = running(tmp_path, "run", job, "--quiet")
    proc.wait_until(lambda: srv.stats()["admitted"] >= 5, "4 slow requests in flight")
    proc.signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, proc.stderr
    assert f"waiting up to {grace_s:g} s for 4 in flight" in proc.stderr
    assert RESUME_HINT in proc.stderr
    if grace_s > slow_s:  # the grace period covered the answers: all of them were saved
        assert results_in_journal(output) == srv.stats()["accepted"] == 5
    else:  # it ran out: the answers still pending are abandoned, the probe's row is kept
        assert results_in_journal(output) == 1
    assert srv.stats()["admitted"] == 5  # nothing new was sent after the signal


# ---- 3. fingerprint: edits that change requests are refused; pacing edits are not ------------


def test_request_edits_ask_again_only_what_changed_pacing_edits_nothing(
    tmp_path: Path, mock_server, running
) -> None:
    """Each journaled result carries its request's key: a rerun after an edit sends exactly
    the rows whose request changed; rows that left the input leave the output."""
    srv = mock_server(**SERVER)
    rows = review_rows(ROWS)
    write_jsonl(tmp_path / "input.jsonl", rows)
    job = new_job(tmp_path, srv.url)
    output = output_of(tmp_path)
    kill_after(running, srv, tmp_path, job, 40)

    # One row's text edited, one row gone, one new row: the rest of the stopped run plus 2.
    edited = [*rows[:-2], {"id": "r298", "text": "edited"}, {"id": "new", "text": "a new row"}]
    write_jsonl(tmp_path / "input.jsonl", edited)
    answered = {json.loads(line)["id"] for line in journal_lines(output) if b'"t":"r"' in line}
    unanswered_kept = sum(1 for r in rows[:-2] if r["id"] not in answered)
    before = srv.stats()
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert requests_since(srv, before) == unanswered_kept + 2  # + the edited and the new row
    order = [r["id"] for r in edited]

    def check_in_input_order() -> None:
        out = read_output(output)
        assert [r["id"] for r in out] == order  # the input's rows, in its order, once each
        assert {r["status"] for r in out} == {"ok"}

    check_in_input_order()

    # Pacing only: limits, concurrency, retry, grace period: nothing is asked again.
    new_job(
        tmp_path,
        srv.url,
        concurrency=3,
        limits={"gpt-4o-mini": {"rpm": 900_000, "tpm": 900_000_000}},
        retry={"max_attempts": 2, "initial_wait_s": 0.01, "max_wait_s": 0.1},
        grace_period_s=5,
    )
    before = srv.stats()
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert requests_since(srv, before) == 0
    check_in_input_order()

    # A params edit changes every request: every row is asked again, once.
    new_job(tmp_path, srv.url, params={"max_tokens": 9, "temperature": 0})
    before = srv.stats()
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert requests_since(srv, before) == ROWS
    check_in_input_order()

    # --restart forgets the journal, and the response store answers every row: nothing sent;
    # --restart --no-cache pays for every row again.
    before = srv.stats()
    res = run_batcher("run", job, "--restart")
    assert res.returncode == 0, res.stderr
    assert requests_since(srv, before) == 0
    assert "answered from the cache" in res.stderr
    before = srv.stats()
    res = run_batcher("run", job, "--restart", "--no-cache")
    assert res.returncode == 0, res.stderr
    assert requests_since(srv, before) == ROWS
    check_in_input_order()
    assert sum(line.startswith(b'{"t": "h"') for line in journal_lines(output)) == 1
    assert results_in_journal(output) == ROWS


# ---- 4. --retry-errors re-sends only the error rows ----------------------------------------


def test_retry_errors_resends_only_error_rows(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**SERVER)
    # r17 fails once with a 500 (max_attempts 1: recorded as an error), then would succeed;
    # r5 and r33 are refused (400) every time.
    marker = {5: "[[fail-400]]", 17: "[[fail-500-once]]", 33: "[[fail-400]]"}
    write_jsonl(tmp_path / "input.jsonl", review_rows(60, marker=marker))
    job = new_job(tmp_path, srv.url, retry={"max_attempts": 1})
    output = output_of(tmp_path)

    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    assert "--retry-errors" in res.stderr
    rows = check_complete(output, 60, ok=57)
    assert {i for i, r in rows.items() if r["status"] == "error"} == {"r5", "r17", "r33"}

    before = srv.stats()
    res = run_batcher("run", job, "--retry-errors")
    assert res.returncode == 3, res.stderr
    after = srv.stats()
    assert requests_since(srv, before) == 3  # the error rows, and nothing else
    assert after["by_status"]["400"] - before["by_status"]["400"] == 2
    assert after["duplicates"] == 0  # no ok row was paid again
    rows = check_complete(output, 60, ok=58)
    assert rows["r17"]["status"] == "ok" and rows["r17"]["error"] is None
    assert rows["r5"]["status"] == rows["r33"]["status"] == "error"

    # Nothing left to retry but the permanent refusals; a plain rerun sends nothing.
    before = srv.stats()
    assert run_batcher("run", job).returncode == 3
    assert requests_since(srv, before) == 0


def test_retry_errors_with_persistent_row_errors_finishes(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**SERVER)
    marker = dict.fromkeys((3, 9, 14, 20), "[[fail-400]]")
    write_jsonl(tmp_path / "input.jsonl", review_rows(30, marker=marker))
    job = new_job(tmp_path, srv.url)
    assert run_batcher("run", job).returncode == 3
    before = srv.stats()
    res = run_batcher("run", job, "--retry-errors")
    # The rows were refused again: the job is finished with row errors, like the first run.
    assert res.returncode == 3, res.stderr
    assert requests_since(srv, before) == 4
    check_complete(output_of(tmp_path), 30, ok=26)


# ---- 5. the lock: a second run of the same job refuses ---------------------------------------


def test_second_process_on_same_job_is_refused(tmp_path: Path, mock_server, running) -> None:
    srv = mock_server(rpm=None, tpm=None, slow_marker_s=60.0)
    write_jsonl(
        tmp_path / "input.jsonl", review_rows(8, marker=dict.fromkeys(range(8), "[[slow]]"))
    )
    job = new_job(tmp_path, srv.url)
    output = output_of(tmp_path)
    lock = output.with_name(output.name + ".lock")

    first = running(tmp_path, "run", job, "--quiet")
    first.wait_until(
        lambda: any(line.startswith(b'{"t": "run"') for line in journal_lines(output)),
        "the first run to open its journal",
    )
    journal_before = journal_of(output).read_bytes()
    lock_before = lock.read_text()
    assert lock_before == f"pid {first.proc.pid}\n"

    res = run_batcher("run", job)
    assert res.returncode == 5, res.stderr
    assert "already running" in res.stderr and f"pid {first.proc.pid}" in res.stderr
    assert journal_of(output).read_bytes() == journal_before
    assert lock.read_text() == lock_before
    assert first.proc.poll() is None

    status = run_batcher("status", job)
    assert status.returncode == 0, status.stderr
    assert f"running now: pid {first.proc.pid}" in status.stdout
    assert srv.stats()["requests"] == 0  # the slow answers of the first run are still pending

    # The lock is the kernel's: once its holder dies, the job can run again.
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    fast = mock_server(rpm=None, tpm=None, slow_marker_s=0.01)
    new_job(tmp_path, fast.url)
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    check_complete(output, 8, ok=8)


# ---- 6. a torn journal tail is recovered ---------------------------------------------------


def test_torn_journal_tail_recovers(tmp_path: Path, mock_server, running) -> None:
    srv = mock_server(**SERVER)
    write_jsonl(tmp_path / "input.jsonl", review_rows(ROWS))
    job = new_job(tmp_path, srv.url)
    output = output_of(tmp_path)
    _, on_disk = kill_after(running, srv, tmp_path, job, ROWS // 2)
    with journal_of(output).open("ab") as fh:
        fh.write(b'{"t": "r", "id": "r299", "status": "ok", "content": "posi')  # no newline

    before = srv.stats()
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert "journal" in res.stderr and "cut off" in res.stderr
    check_complete(output, ROWS, ok=ROWS)
    assert requests_since(srv, before) == ROWS - on_disk
    for line in journal_lines(output):  # the torn bytes were cut, not built upon
        assert line.endswith(b"\n") and json.loads(line)
    assert srv.stats()["duplicates"] <= 2 * BASE["concurrency"]  # in flight, or not yet committed


# ---- 7. status reads the journal and sends nothing -------------------------------------------


def test_status_of_partial_and_finished_job(tmp_path: Path, mock_server, running) -> None:
    srv = mock_server(**SERVER)
    marker = {2: "[[fail-400]]", 7: "[[fail-400]]"}
    write_jsonl(tmp_path / "input.jsonl", review_rows(ROWS, marker=marker))
    job = new_job(tmp_path, srv.url)

    res = run_batcher("status", job)
    assert res.returncode == 0, res.stderr
    assert f"not started ({ROWS} rows to send)" in res.stdout

    _, on_disk = kill_after(running, srv, tmp_path, job, ROWS // 2)
    sent = srv.stats()["requests"]
    res = run_batcher("status", job)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert f"{on_disk}/{ROWS} done" in text
    assert f"ok={on_disk - 2} error=2 remaining={ROWS - on_disk}" in text
    assert "tokens:" in text and "last run:" in text
    assert "partial" in text and "resume" in text
    assert "not written yet" in text

    res = run_batcher("status", job, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["rows_total"] == ROWS
    assert report["rows_done"] == on_disk
    assert (report["rows_ok"], report["rows_error"]) == (on_disk - 2, 2)
    assert report["rows_remaining"] == ROWS - on_disk
    assert report["prompt_tokens"] > 0 and report["completion_tokens"] > 0
    assert report["last_run"] and report["runs"] == 1
    assert report["finished"] is False and report["running_now"] is None
    assert srv.stats()["requests"] == sent  # status sent nothing

    assert run_batcher("run", job).returncode == 3
    sent = srv.stats()["requests"]
    res = run_batcher("status", job)
    assert res.returncode == 0, res.stderr
    assert "finished" in res.stdout and "--retry-errors" in res.stdout
    report = json.loads(run_batcher("status", job, "--json").stdout)
    assert report["finished"] is True and report["rows_remaining"] == 0
    assert (report["rows_done"], report["rows_error"], report["runs"]) == (ROWS, 2, 2)
    assert report["output_exists"] is True
    assert srv.stats()["requests"] == sent


# ---- 8. disk full while journaling ------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 KiB tmpfs (needs root and mount rights; skipped where they are missing)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill_tiny_disk(tmp_path: Path, srv: Any, tiny_disk: Path) -> tuple[Path, Path]:
    write_jsonl(tmp_path / "input.jsonl", review_rows(ROWS))
    output = tiny_disk / "result.parquet"
    return new_job(tmp_path, srv.url, output=str(output)), output


def test_disk_full_stops_with_exit_4_and_says_what_to_do(
    tmp_path: Path, mock_server, tiny_disk: Path
) -> None:
    srv = mock_server(**SERVER)
    job, output = _fill_tiny_disk(tmp_path, srv, tiny_disk)
    res = run_batcher("run", job)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 4, res.stderr
    assert "free disk space" in res.stderr and RESUME_HINT in res.stderr
    assert 0 < results_in_journal(output) < ROWS
    assert not output.exists()


def test_disk_full_loses_nothing_and_resumes_once_space_is_freed(
    tmp_path: Path, mock_server, tiny_disk: Path
) -> None:
    srv = mock_server(**SERVER)
    job, output = _fill_tiny_disk(tmp_path, srv, tiny_disk)
    res = run_batcher("run", job)
    assert res.returncode != 0, res.stderr
    on_disk = results_in_journal(output)
    assert 0 < on_disk < ROWS
    assert not output.exists()
    answered = settled_stats(srv)["accepted"]

    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_disk)], check=True)
    before = srv.stats()
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    check_complete(output, ROWS, ok=ROWS)
    # Rows answered but not journaled when the disk filled (at most `concurrency` in flight
    # and `concurrency` waiting for their commit) are in the response store (another disk):
    # nothing is paid twice.
    assert answered - on_disk <= 2 * BASE["concurrency"]
    assert requests_since(srv, before) == ROWS - answered
    assert srv.stats()["duplicates"] == 0
