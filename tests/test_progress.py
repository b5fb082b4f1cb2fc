import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from rich.console import Console

from batcher.admission import ModelSnapshot
from batcher.logs import LOGGER_NAME, BatcherHandler, setup_logging
from batcher.progress import Progress, format_duration, plain_line, render_summary
from batcher.stats import RunStats


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def snapshot(rpm: float, tpm: float, multiplier: float, paused_s: float = 0.0) -> ModelSnapshot:
    """One model's entry as the limiter's snapshot() gives it (engine -> stats.effective)."""
    return ModelSnapshot(
        rpm=500,
        tpm=60_000,
        effective_rpm=rpm,
        effective_tpm=tpm,
        multiplier=multiplier,
        share=1.0,
        paused_until_s=paused_s,
        backend="local",
        decreases_429=1 if multiplier < 1 else 0,
    )


def busy_stats(clock: FakeClock) -> RunStats:
    """A minute into a run: 1200 of 5000 rows, 498 requests and 59,100 tokens this minute."""
    stats = RunStats(total_rows=5000, clock=clock, limits={"gpt-4o": (500, 60_000)})
    clock.now += 60.0
    for _ in range(497):
        stats.record_sent(118)
    stats.record_sent(59_100 - 497 * 118)
    stats.ok, stats.error = 1190, 10
    stats.retries, stats.rate_limited, stats.in_flight = 3, 1, 12
    stats.prompt_tokens, stats.completion_tokens = 40_000, 9_000
    return stats


@pytest.fixture
def batcher_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger(LOGGER_NAME)
    yield logger
    for h in [h for h in logger.handlers if isinstance(h, BatcherHandler)]:
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


async def wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition; generous timeout so a busy machine does not fail the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_format_duration() -> None:
    assert format_duration(None) == "?"
    assert format_duration(45.2) == "45s"
    assert format_duration(456) == "7m36s"
    assert format_duration(2 * 3600 + 5 * 60 + 9) == "2h05m"
    assert format_duration(3 * 86400 + 7200) == "3d02h"


def test_plain_line_figures() -> None:
    stats = busy_stats(FakeClock())
    assert plain_line(stats) == (
        "progress: 1200/5000 rows (24.0%) ok=1190 error=10 rpm=498/500 tpm=59100/60000 "
        "retries=3 429s=1 in_flight=12 eta=3m10s"
    )


def test_plain_line_counts_resumed_rows_and_effective_limits() -> None:
    stats = busy_stats(FakeClock())
    stats.done_before = 800
    stats.effective = {"gpt-4o": snapshot(492.5, 59_100, 1.0)}  # headroom only: not shown
    line = plain_line(stats)
    assert line.startswith("progress: 2000/5000 rows (40.0%) resumed=800 ok=1190 error=10 ")
    assert "effective" not in line
    stats.effective = {"gpt-4o": snapshot(400, 48_000, 0.81, paused_s=5)}
    line = plain_line(stats)
    assert "effective=400rpm/48000tpm" in line
    assert line.endswith(" paused=5s")


async def test_plain_lines_appear_at_the_interval() -> None:
    stats = busy_stats(FakeClock())
    out = io.StringIO()
    async with Progress(stats, mode="plain", interval_s=0.05, stream=out):
        await wait_for(lambda: out.getvalue().count("\n") >= 3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3
    for line in lines:
        assert re.fullmatch(r"\d\d:\d\d:\d\d INFO +progress: 1200/5000 rows .* eta=3m10s", line)


async def test_no_line_before_the_first_interval_and_none_after_stop() -> None:
    out = io.StringIO()
    progress = Progress(busy_stats(FakeClock()), mode="plain", interval_s=3600, stream=out)
    progress.start()
    await asyncio.sleep(0.05)
    await progress.stop()
    assert out.getvalue() == ""


async def test_json_lines_parse() -> None:
    stats = busy_stats(FakeClock())
    out = io.StringIO()
    async with Progress(stats, mode="json", interval_s=0.05, stream=out):
        await wait_for(lambda: out.getvalue().count("\n") >= 2)
    for line in out.getvalue().splitlines():
        obj = json.loads(line)
        assert obj["event"] == "progress"
        assert obj["level"] == "info"
        assert obj["rows_ok"] == 1190
        assert obj["current_rpm"] == 498
        assert obj["limits"] == {"gpt-4o": {"rpm": 500, "tpm": 60_000}}
        assert set(stats.as_dict()) <= set(obj)


async def test_quiet_writes_nothing() -> None:
    out = io.StringIO()
    async with Progress(busy_stats(FakeClock()), mode="quiet", interval_s=0.01, stream=out):
        await asyncio.sleep(0.05)
    assert out.getvalue() == ""


def test_auto_is_plain_off_a_terminal() -> None:
    stats = RunStats()
    assert Progress(stats, mode="auto", stream=io.StringIO()).mode == "plain"
    tty = Console(file=io.StringIO(), force_terminal=True)
    assert Progress(stats, mode="auto", console=tty).mode == "live"
    with pytest.raises(ValueError, match="progress mode"):
        Progress(stats, mode="fancy")  # type: ignore[arg-type]


async def test_live_renders_and_logs_go_above_it(batcher_logger: logging.Logger) -> None:
    setup_logging("text")
    stats = busy_stats(FakeClock())
    stats.effective = {"gpt-4o": snapshot(400, 48_000, 0.81, paused_s=3)}
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    async with Progress(stats, mode="live", console=console, refresh_per_second=50):
        batcher_logger.info("a log line while live")
        stats.ok += 100
        await wait_for(lambda: "1,300/5,000" in buf.getvalue())
    text = buf.getvalue()
    assert "a log line while live" in text
    assert "ok 1,290" in text
    assert "rpm 498 / 500" in text
    assert "effective 400" in text
    assert "paused 3s" in text
    assert "eta" in text
    # After the display stopped, the handler writes to stderr again, not to the console.
    assert all(h.console is None for h in batcher_logger.handlers if isinstance(h, BatcherHandler))


def test_summary_text() -> None:
    clock = FakeClock()
    stats = busy_stats(clock)
    stats.server_errors = 2
    stats.finished = clock.now
    text = render_summary(stats, fmt="text")
    assert "1,190 ok, 10 error" in text
    assert "40,000 prompt + 9,000 completion = 49,000" in text
    assert "59,100 charged at admission" in text
    assert "3 retries, 1 rate-limited (429), 2 failed (5xx, timeout, dropped or unreadable)" in (
        text
    )
    assert "time:     1m00s" in text
    assert "498 of 500 (100%) rpm, 59,100 of 60,000 (98%) tpm" in text
    assert "slow-down" not in text
    stats.effective = {"gpt-4o": snapshot(250, 30_000, 0.5)}
    assert "ended at 250 rpm, 30,000 tpm" in render_summary(stats, fmt="text")


def test_summary_json() -> None:
    obj = json.loads(render_summary(busy_stats(FakeClock()), fmt="json"))
    assert obj["event"] == "summary"
    assert obj["rows_ok"] == 1190
    assert obj["avg_rpm"] == 498


def test_text_log_lines(batcher_logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("text", stream=out)
    batcher_logger.info("resumed %d rows", 1200, extra={"rows": 1200})
    batcher_logger.debug("not shown")
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO    resumed 1200 rows\n", out.getvalue())


def test_json_log_lines_carry_extras(batcher_logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("json", stream=out)
    batcher_logger.warning("row failed", extra={"row_id": "r7", "level": "not overriding"})
    obj = json.loads(out.getvalue())
    assert obj["level"] == "warning"
    assert obj["msg"] == "row failed"
    assert obj["row_id"] == "r7"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"])


def test_quiet_logging_keeps_warnings(batcher_logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("text", quiet=True, stream=out)
    setup_logging("text", quiet=True, stream=out)  # again: replaces, does not double lines
    batcher_logger.info("chatty")
    batcher_logger.error("broken")
    assert out.getvalue().count("\n") == 1
    assert "ERROR   broken" in out.getvalue()


def test_summary_of_a_run_shorter_than_a_minute() -> None:
    clock = FakeClock()
    stats = RunStats(total_rows=20, clock=clock, limits={"gpt-4o-mini": (500, 60_000)})
    clock.now += 2.0
    for _ in range(20):
        stats.record_sent(85)
    stats.ok = 20
    stats.finished = clock.now
    text = render_summary(stats, fmt="text")
    # Not "600 rpm of 500": a burst of 20 in 2 s is within a minute's allowance.
    assert "20 requests and 1,700 admission tokens in 2s, under a minute" in text
    assert "(limits: 500 rpm, 60,000 tpm)" in text


def test_summary_shows_each_models_rate_against_its_own_limits_and_no_phantom_slowdown() -> None:
    """Two models with their own limits: two rate lines, never one summed figure; a clean
    run (no 429, no headers) says nothing about slowing down."""
    clock = FakeClock()
    stats = RunStats(clock=clock)
    stats.limits = {"gpt-4o": (500, 60_000), "gpt-4o-mini": (300, 30_000)}
    for _ in range(10):
        clock.now += 6.0
        stats.record_sent(1000, "gpt-4o")
        stats.record_sent(500, "gpt-4o-mini")
    stats.ok = 20
    stats.finished = clock.now
    text = render_summary(stats, fmt="text")
    assert "gpt-4o: " in text and "of 500 (" in text and "of 60,000 (" in text
    assert "gpt-4o-mini: " in text and "of 300 (" in text and "of 30,000 (" in text
    assert "1,000 rpm" not in text and "800" not in text
    assert "slow-down" not in text


def test_the_closing_message_quotes_a_path_for_the_shell(tmp_path) -> None:
    """The `batcher inspect ...` it suggests is pasted into a shell: a path with a space must
    stay one argument (found by review)."""
    from batcher.errors import ExitCode
    from batcher.outcome import RunOutcome, StopReason
    from batcher.stats import RunStats
    from batcher.summary import closing_message

    out = tmp_path / "my results" / "out.parquet"
    outcome = RunOutcome(
        ExitCode.ROW_ERRORS,
        StopReason.COMPLETED,
        RunStats(),
        out,
        out,
        rows_written=3,
        error_rows=1,
    )
    assert f"`batcher inspect '{out}'` groups them" in closing_message(outcome)
