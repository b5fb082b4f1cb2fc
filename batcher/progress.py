"""What a run shows while it runs, and the summary it prints at the end.

`Progress` reads the engine's live `RunStats` and shows it one of four ways:

    live   a rich display on the terminal, redrawn a few times a second; log lines are
           printed above it (logs.route_to_console), never through it
    plain  one log-style line every `interval_s`, for files and CI logs:
           12:03:04 INFO    progress: 1200/5000 rows (24.0%) ok=1190 error=10 rpm=498/500 ...
    json   the same figures as one JSON object per line ({"event": "progress", ...})
    quiet  nothing
    auto   live on a terminal or in a Jupyter notebook, else plain

Every read of the stats happens on the event loop's thread (rich's own refresh thread is
off), so the counters are never read halfway through an update.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TextIO

from batcher.logs import format_text, iso_ts, route_to_console
from batcher.stats import RunStats

if TYPE_CHECKING:  # rich is imported when a live display is drawn: ~50 ms a quiet run skips
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

ProgressMode = Literal["auto", "live", "plain", "json", "quiet"]
SummaryFormat = Literal["text", "json"]
MODES: tuple[str, ...] = ("auto", "live", "plain", "json", "quiet")


def format_duration(seconds: float | None) -> str:
    """7m36s, 2h05m, 45s; "?" when not known yet."""
    if seconds is None:
        return "?"
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _limit_totals(stats: RunStats) -> tuple[int | None, int | None, int | None, int | None]:
    """(rpm, tpm) configured and (rpm, tpm) effective, summed over models.

    The rate meter counts all models together, so the limits it is compared with are the
    sums. Effective is None unless adaptive slow-down has lowered some model's limit. The
    engine fills `stats.effective` from the limiter's snapshot (`ModelSnapshot` per model);
    a `multiplier` below 1 is a slow-down (headroom alone is not worth showing).
    """
    if not stats.limits:
        return None, None, None, None
    rpm = sum(r for r, _ in stats.limits.values())
    tpm = sum(t for _, t in stats.limits.values())
    eff_rpm = eff_tpm = 0.0
    lowered = False
    for model, (r, t) in stats.limits.items():
        snap = stats.effective.get(model)
        if snap is None:
            eff_rpm += r
            eff_tpm += t
            continue
        lowered = lowered or snap.slowed
        eff_rpm += min(r, snap.effective_rpm)
        eff_tpm += min(t, snap.effective_tpm)
    if not lowered:
        return rpm, tpm, None, None
    return rpm, tpm, round(eff_rpm), round(eff_tpm)


def _paused_s(stats: RunStats) -> float:
    """Longest pause the limiter imposes now (after a 429 storm), 0 when sending."""
    return max((snap.paused_until_s for snap in stats.effective.values()), default=0.0)


def _rows(stats: RunStats) -> tuple[int, int, float | None]:
    """(rows done including resumed ones, total rows, percent)."""
    done = stats.done_before + stats.done
    total = stats.total_rows
    pct = 100.0 * done / total if total > 0 else None
    return done, total, pct


def plain_line(stats: RunStats) -> str:
    """`progress: 1200/5000 rows (24.0%) ok=1190 error=10 rpm=498/500 tpm=59100/60000 ...`"""
    done, total, pct = _rows(stats)
    cur_rpm, cur_tpm = stats.current_rates()
    rpm, tpm, eff_rpm, eff_tpm = _limit_totals(stats)
    parts = [f"progress: {done}/{total} rows" + (f" ({pct:.1f}%)" if pct is not None else "")]
    if stats.done_before:
        parts.append(f"resumed={stats.done_before}")
    parts += [f"ok={stats.ok}", f"error={stats.error}"]
    parts.append(f"rpm={cur_rpm:.0f}" + (f"/{rpm}" if rpm is not None else ""))
    parts.append(f"tpm={cur_tpm:.0f}" + (f"/{tpm}" if tpm is not None else ""))
    if eff_rpm is not None:
        parts.append(f"effective={eff_rpm}rpm/{eff_tpm}tpm")
    parts += [
        f"retries={stats.retries}",
        f"429s={stats.rate_limited}",
        f"in_flight={stats.in_flight}",
        f"eta={format_duration(stats.eta_s())}",
    ]
    if (paused := _paused_s(stats)) > 0:
        parts.append(f"paused={format_duration(paused)}")
    return " ".join(parts)


def json_line(stats: RunStats, event: str = "progress") -> str:
    """One JSON object: a log-collector line (ts/level/msg) that carries every counter."""
    obj: dict[str, Any] = {"ts": iso_ts(), "level": "info", "event": event}
    obj["msg"] = plain_line(stats) if event == "progress" else event
    obj.update(stats.as_dict())
    return json.dumps(obj, ensure_ascii=False, default=str)


def live_renderable(stats: RunStats) -> Table:
    """The live display: a bar, then rows, rates against limits, and trouble."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    done, total, pct = _rows(stats)
    cur_rpm, cur_tpm = stats.current_rates()
    rpm, tpm, eff_rpm, eff_tpm = _limit_totals(stats)

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = f"{done:,}/{total:,}" + (f" ({pct:.1f}%)" if pct is not None else "")
    if stats.done_before:
        rows += f"  [dim]{stats.done_before:,} resumed[/dim]"
    rows += f"  [green]ok {stats.ok:,}[/green]"
    rows += f"  [red]error {stats.error:,}[/red]" if stats.error else "  error 0"
    grid.add_row("", ProgressBar(total=max(total, 1), completed=min(done, total), width=60))
    grid.add_row("rows", rows)

    def against(value: float, limit: int | None, eff: int | None) -> str:
        text = f"{value:,.0f}" + (f" / {limit:,}" if limit is not None else "")
        if eff is not None:
            text += f" [yellow](effective {eff:,})[/yellow]"
        return text

    grid.add_row(
        "rate",
        f"rpm {against(cur_rpm, rpm, eff_rpm)}    tpm {against(cur_tpm, tpm, eff_tpm)}",
    )
    trouble = "yellow" if stats.rate_limited or stats.server_errors else "default"
    grid.add_row(
        "sending",
        f"in flight {stats.in_flight}  retries {stats.retries}  "
        f"[{trouble}]429s {stats.rate_limited}  failed {stats.server_errors}[/{trouble}]"
        + (
            f"  [yellow]paused {format_duration(paused)} (rate limited)[/yellow]"
            if (paused := _paused_s(stats)) > 0
            else ""
        ),
    )
    grid.add_row(
        "time",
        f"elapsed {format_duration(stats.elapsed())}  eta {format_duration(stats.eta_s())}",
    )
    return grid


def _in_notebook() -> bool:
    """rich's own test, asked only when IPython is loaded (else it cannot be a notebook)."""
    if "IPython" not in sys.modules:
        return False
    from rich.console import Console

    return Console().is_jupyter


class Progress:
    """Shows `stats` while the run goes on; `async with Progress(...)` or start()/stop()."""

    def __init__(
        self,
        stats: RunStats,
        *,
        mode: ProgressMode = "auto",
        interval_s: float = 10.0,
        stream: TextIO | None = None,
        console: Console | None = None,
        refresh_per_second: float = 4.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
        if interval_s <= 0:
            raise ValueError("progress interval must be > 0 seconds")
        self.stats = stats
        self.stream: TextIO = stream if stream is not None else sys.stderr
        if mode == "auto":
            if console is None and stream is None and _in_notebook():
                # A notebook (batcher.run in Jupyter): rich draws the live display as the
                # cell's own output, a progress bar that updates in place.
                from rich.console import Console

                console, mode = Console(), "live"
            else:
                is_tty = console.is_terminal if console is not None else _isatty(self.stream)
                mode = "live" if is_tty else "plain"
        self.mode: ProgressMode = mode
        self.interval_s = interval_s
        self.refresh_s = 1.0 / refresh_per_second
        self.console = console
        self._task: asyncio.Task[None] | None = None
        self._live: Live | None = None
        self._routing: contextlib.ExitStack | None = None

    async def __aenter__(self) -> Progress:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start(self) -> None:
        """Begin showing; needs a running event loop."""
        if self._task is not None or self.mode == "quiet":
            return
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            if self.console is None:
                # Asked for live explicitly: draw even if the stream does not look like a tty.
                self.console = Console(file=self.stream, force_terminal=True)
            self._live = Live(
                live_renderable(self.stats),
                console=self.console,
                auto_refresh=False,  # we refresh from the loop: stats are read on one thread
                redirect_stdout=False,  # stdout may carry data; leave it alone
                redirect_stderr=True,  # stray stderr writes go above the display
            )
            self._routing = contextlib.ExitStack()
            self._live.start(refresh=True)
            self._routing.enter_context(route_to_console(self.console))
            self._task = asyncio.get_running_loop().create_task(self._refresh_live())
        else:
            self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        """Stop showing; the live display is left with its final state on screen."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our caller is being cancelled too: do not swallow that
        if self._live is not None:
            self._live.update(live_renderable(self.stats), refresh=True)
            if self._routing is not None:
                self._routing.close()
                self._routing = None
            self._live.stop()
            self._live = None

    def emit(self) -> None:
        """Write one plain or json progress line now."""
        if self.mode == "plain":
            line = format_text("info", plain_line(self.stats))
        elif self.mode == "json":
            line = json_line(self.stats)
        else:
            return
        self.stream.write(line + "\n")
        self.stream.flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.emit()

    async def _refresh_live(self) -> None:
        assert self._live is not None
        while True:
            await asyncio.sleep(self.refresh_s)
            self._live.update(live_renderable(self.stats), refresh=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


SLOWDOWN_WORTH_SAYING = 0.98  # multiplier below which the summary says the pace was lowered


def _only_limits(stats: RunStats) -> tuple[int | None, int | None]:
    """The limits when one model has them all (a figure without a model name); else none."""
    return next(iter(stats.limits.values())) if len(stats.limits) == 1 else (None, None)


def render_summary(stats: RunStats, *, fmt: SummaryFormat = "text") -> str:
    """The end-of-run report: outcome, tokens, trouble, time, achieved rates vs limits."""
    if fmt == "json":
        return json_line(stats, event="summary")
    if fmt != "text":
        raise ValueError(f"summary format must be 'text' or 'json', not {fmt!r}")
    done, total, _ = _rows(stats)
    lines = [
        f"rows:     {stats.ok:,} ok, {stats.error:,} error"
        + (f", {stats.done_before:,} done by earlier runs" if stats.done_before else "")
        + f" ({done:,} of {total:,} done"
        + (f", {stats.remaining:,} left)" if stats.remaining else ")"),
        f"tokens:   {stats.prompt_tokens:,} prompt + {stats.completion_tokens:,} completion "
        f"= {stats.prompt_tokens + stats.completion_tokens:,} "
        f"({stats.admitted_tokens:,} charged at admission)",
        f"requests: {stats.requests_sent:,} sent, {stats.retries:,} retries, "
        f"{stats.rate_limited:,} rate-limited (429), "
        f"{stats.server_errors:,} failed (5xx, timeout, dropped or unreadable)",
        f"time:     {format_duration(stats.elapsed())}",
    ]

    def against(value: float, limit: int | None) -> str:
        if limit is None:
            return f"{value:,.0f}"
        return f"{value:,.0f} of {limit:,} ({100.0 * value / limit:.0f}%)"

    elapsed = stats.elapsed()
    # Each model has its own limits: its rate is shown against them, never against a sum.
    by_model = stats.model_rates() or {"": stats.average_rates()}
    sent = stats.sent_by_model or {"": [stats.requests_sent, stats.admitted_tokens]}
    for model in sorted(by_model):
        r, t = stats.limits.get(model) or _only_limits(stats)
        name = f"{model}: " if model else ""
        if elapsed >= 60.0:
            m_rpm, m_tpm = by_model[model]
            lines.append(
                f"rate:     {name}{against(m_rpm, r)} rpm, {against(m_tpm, t)} tpm (run average)"
            )
        else:
            # Scaling a few seconds up to a minute would compare a burst the limits allow with
            # a per-minute figure; say what was sent instead.
            limits = f" (limits: {r:,} rpm, {t:,} tpm)" if r is not None and t else ""
            lines.append(
                f"rate:     {name}{sent[model][0]:,} requests and {sent[model][1]:,} admission "
                f"tokens in {format_duration(elapsed)}, under a minute{limits}"
            )
    # Said only when the limiter did slow down, and why (429s, headers): never for headroom.
    for model, snap in sorted(stats.effective.items()):
        # (a pace within 2 % of the limits is the share estimate's noise, not a slow-down)
        reasons = snap.slowdown_reasons() if snap.multiplier < SLOWDOWN_WORTH_SAYING else []
        if reasons:
            lines.append(
                f"          {model}: adaptive slow-down ({'; '.join(reasons)}) ended at "
                f"{snap.effective_rpm:,.0f} rpm, {snap.effective_tpm:,.0f} tpm"
            )
    return "\n".join(lines)
