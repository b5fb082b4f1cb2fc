"""The run history: samples written from RunStats and read back; runs told apart.

Samples are taken by calling `sample()` directly on a fake clock: nothing waits for the
recorder's timer.
"""

from __future__ import annotations

import json
from pathlib import Path

from batcher.admission.contract import ModelSnapshot
from batcher.history import (
    LATENCY_SAMPLE,
    HistoryRecorder,
    LatencySample,
    history_path,
    read_history,
    spend_usd,
)
from batcher.stats import RunStats


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_stats(clock: Clock) -> RunStats:
    stats = RunStats(clock=clock, total_rows=100)
    stats.limits["gpt-4o-mini"] = (500, 60_000)
    return stats


def snapshot(paused: bool = False) -> ModelSnapshot:
    return ModelSnapshot(
        rpm=500,
        tpm=60_000,
        effective_rpm=450.0,
        effective_tpm=54_000.0,
        multiplier=0.9,
        share=1.0,
        paused_until_s=1.5 if paused else 0.0,
        backend="local",
    )


def answer(stats: RunStats, status: int, *, ok: bool | None = None, cost: int = 100) -> None:
    """What the engine does for one attempt: sent, then answered with `status`."""
    stats.record_sent(cost)
    stats.count_response(status)
    if status == 429:
        stats.rate_limited += 1
    if ok is True:
        stats.ok += 1
        stats.prompt_tokens += 80
        stats.completion_tokens += 20
        stats.spent_usd += (80 * 0.15 + 20 * 0.6) / 1e6
    elif ok is False:
        stats.error += 1


def test_history_path_sits_beside_the_journal(tmp_path: Path) -> None:
    assert history_path(tmp_path / "out.parquet") == tmp_path / "out.parquet.history.jsonl"


def test_samples_hold_the_interval_and_read_back(tmp_path: Path) -> None:
    clock, wall = Clock(), Clock(1_764_000_000.0)
    stats = make_stats(clock)
    path = history_path(tmp_path / "out.parquet")
    rec = HistoryRecorder(path, stats, "run-a", interval_s=5, wall_clock=wall)
    rec.open()

    for _ in range(3):
        answer(stats, 200, ok=True)
        rec.observe_latency(0.5)
    answer(stats, 429)
    stats.retries += 1
    answer(stats, 200, ok=True)
    rec.observe_latency(2.5)
    stats.effective["gpt-4o-mini"] = snapshot(paused=True)
    clock.t += 5
    wall.t += 5
    first = rec.sample()

    answer(stats, 500)
    answer(stats, 200, ok=False)
    clock.t += 5
    wall.t += 5
    second = rec.sample()
    rec.end_reason = "completed"
    clock.t += 1
    rec.close()

    assert first["requests"] == 5 and first["tokens"] == 500
    assert first["ok"] == 4 and first["error"] == 0
    assert first["responses"] == {"200": 4, "429": 1}
    assert first["rate_limited"] == 1 and first["retries"] == 1
    assert first["dt"] == 5.0
    lat = first["latency_s"]
    assert lat["n"] == 4 and lat["p50"] == 0.5 and lat["p99"] > 2.0
    model = first["models"]["gpt-4o-mini"]
    assert model == {
        "rpm": 500,
        "tpm": 60_000,
        "effective_rpm": 450.0,
        "effective_tpm": 54_000.0,
        "paused": True,
    }
    # 4 answers x (80 prompt + 20 completion) at gpt-4o-mini's built-in price
    assert first["spend_usd"] == round(4 * (80 * 0.15 + 20 * 0.60) / 1e6, 6)
    # Only the second interval's counts; no answers with a latency in it.
    assert second["requests"] == 2 and second["ok"] == 0 and second["error"] == 1
    assert second["responses"] == {"500": 1, "200": 1}
    assert second["latency_s"] is None

    history = read_history(path)
    assert [r.run_id for r in history.runs] == ["run-a"]
    run = history.runs[0]
    assert run.start["kind"] == "start" and run.start["rows_total"] == 100
    assert run.samples[:2] == [first, second]
    assert len(run.samples) == 3  # close() takes a last sample
    assert run.end is not None and run.end["reason"] == "completed"
    assert run.end["rows_ok"] == 4 and run.end["rows_error"] == 1
    # Compact: one short line per sample.
    assert max(len(line) for line in path.read_text().splitlines()) < 500


def test_resumed_runs_append_and_are_told_apart(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet.history.jsonl"
    for run_id in ("first", "second"):
        stats = make_stats(Clock())
        rec = HistoryRecorder(path, stats, run_id)
        rec.open()
        answer(stats, 200, ok=True)
        rec.sample()
        rec.close()
    history = read_history(path)
    assert [r.run_id for r in history.runs] == ["first", "second"]
    assert all(len(r.samples) == 2 and r.end is not None for r in history.runs)

    # --restart: the old history belongs to the old job.
    rec = HistoryRecorder(path, make_stats(Clock()), "third", restart=True)
    rec.open()
    rec.close()
    assert [r.run_id for r in read_history(path).runs] == ["third"]


def test_rows_done_before_in_the_start_and_end_lines(tmp_path: Path) -> None:
    """The start line is written before the input is read (stats.done_before still 0): it
    takes the journal's count from the caller; the end line takes the run's exact count."""
    path = tmp_path / "out.parquet.history.jsonl"
    stats = make_stats(Clock())
    rec = HistoryRecorder(path, stats, "resumed", rows_done_before=60)
    rec.open()
    stats.done_before = 58  # two of the journal's rows changed their request: asked again
    rec.close()
    (run,) = read_history(path).runs
    assert run.start["rows_done_before"] == 60
    assert run.end is not None and run.end["rows_done_before"] == 58


def test_crash_leaves_a_readable_history(tmp_path: Path) -> None:
    """No end line and a torn last line: the run is still there, the torn line skipped."""
    path = tmp_path / "h.jsonl"
    stats = make_stats(Clock())
    rec = HistoryRecorder(path, stats, "crashed")
    rec.open()
    answer(stats, 200, ok=True)
    rec.sample()
    assert rec._file is not None
    rec._file.write('{"kind":"sample","run":"crash')  # killed mid-write
    rec._file.flush()
    history = read_history(path)
    assert len(history.runs) == 1 and history.runs[0].end is None
    assert len(history.runs[0].samples) == 1
    assert history.skipped_lines == 1
    assert read_history(tmp_path / "absent.jsonl").runs == []


async def test_context_manager_flushes_on_exit_whatever_ends_the_run(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    stats = make_stats(Clock())
    try:
        async with HistoryRecorder(path, stats, "stopped", interval_s=3600) as rec:
            answer(stats, 200, ok=True)
            raise KeyboardInterrupt  # a stop: the end line is written all the same
    except KeyboardInterrupt:
        pass
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["start", "sample", "end"]
    assert lines[1]["ok"] == 1
    assert rec.samples == 1


def test_latency_sample_is_bounded() -> None:
    sample = LatencySample()
    for i in range(LATENCY_SAMPLE * 10):
        sample.add(i / 1000)
    assert len(sample.values) == LATENCY_SAMPLE
    p = sample.percentiles()
    assert p is not None and p["n"] == LATENCY_SAMPLE * 10
    # A uniform sample of 0..20.48 s: the median lands near 10.24 s.
    assert 9.0 < p["p50"] < 11.5
    assert LatencySample().percentiles() is None


def test_spend_is_the_engines_booking() -> None:
    stats = make_stats(Clock())
    assert spend_usd(stats) == 0.0
    stats.spent_usd = 0.42  # the engine prices each answer's usage once, as the budget does
    assert spend_usd(stats) == 0.42
