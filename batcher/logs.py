"""Logging for the "batcher" logger: text lines for people, JSON lines for log collectors.

    text:  12:03:04 INFO    resumed 1200 rows from the journal
    json:  {"ts": "2025-01-02T12:03:04.123Z", "level": "info", "msg": "...", **extra}

`extra=` fields of a log call go into the JSON object (text lines stay short). While a live
progress display owns the terminal, `route_to_console` sends the lines through its rich
Console, which prints them above the live region instead of through it.

With `--log-format json` every line on stderr must be JSON, so `setup_logging` also takes the
lines that do not come from our logger: Python `warnings` (captured into logging), records of
other libraries' loggers (asyncio's "Task exception was never retrieved", aiohttp's "Unclosed
client session"), and an uncaught exception's traceback (`sys.excepthook`). Lines the CLI
writes itself go through `stderr_line` / `stderr_error`, which follow the same format.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from rich.console import Console

LOGGER_NAME = "batcher"

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def format_text(level: str, msg: str, ts: float | None = None) -> str:
    """One text log line: `HH:MM:SS LEVEL   message` (local time: a person reads it)."""
    clock = time.strftime("%H:%M:%S", time.localtime(time.time() if ts is None else ts))
    return f"{clock} {level.upper():<7} {msg}"


def iso_ts(ts: float | None = None) -> str:
    """UTC timestamp with milliseconds, the form log collectors parse without help."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = format_text(record.levelname, record.getMessage(), record.created)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": iso_ts(record.created),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        for key, value in record_extra(record).items():
            obj.setdefault(key, value)  # an extra never hides ts/level/msg
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class BatcherHandler(logging.Handler):
    """Writes to stderr as it is at emit time, or through a rich Console while one is live."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream  # None: sys.stderr, looked up per line (test runners swap it)
        self.console: Console | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.console is not None:
                # markup/highlight off: a row's text must not be read as rich markup.
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
                return
            stream = self.stream or sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_format: Literal["text", "json"] = "text"  # the format of the last setup_logging


def setup_logging(
    fmt: Literal["text", "json"] = "text", quiet: bool = False, stream: TextIO | None = None
) -> None:
    """Configure the "batcher" logger; calling again replaces the earlier setup.

    quiet: warnings and errors only. stream: where lines go (default: stderr). Warnings of
    Python's `warnings` module and other libraries' log records (WARNING and up) are written
    by the same handler, in the same format; so is an uncaught exception in JSON mode.
    """
    global _format
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    _format = fmt
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, BatcherHandler)]:
        logger.removeHandler(old)
    handler = BatcherHandler(stream)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False  # the root logger would print every line a second time

    # Everything else that logs: asyncio, aiohttp, and `warnings` (via the py.warnings logger).
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, BatcherHandler)]:
        root.removeHandler(old)
    others = BatcherHandler(stream)
    others.setFormatter(formatter)
    others.setLevel(logging.WARNING)
    root.addHandler(others)
    logging.captureWarnings(True)

    if fmt == "json":
        sys.excepthook = _json_excepthook
    elif sys.excepthook is _json_excepthook:
        sys.excepthook = sys.__excepthook__


def _json_excepthook(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """An uncaught exception (a bug: exit 1) as one JSON line, traceback in "exc"."""
    logging.getLogger(LOGGER_NAME).critical(
        "internal error: %s: %s (please report this)", kind.__name__, exc, exc_info=(kind, exc, tb)
    )


def log_format() -> Literal["text", "json"]:
    """The format set by the last `setup_logging` ("text" before any)."""
    return _format


def stderr_line(msg: str, *, level: str = "info", **extra: Any) -> None:
    """A line the CLI writes to stderr itself: as it is in text mode, a JSON object in JSON
    mode (`{"ts", "level", "msg", **extra}`), so stderr stays one format."""
    if _format == "json":
        obj: dict[str, Any] = {"ts": iso_ts(), "level": level, "msg": msg}
        for key, value in extra.items():
            obj.setdefault(key, value)
        line = json.dumps(obj, ensure_ascii=False, default=str)
    else:
        line = msg
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def stderr_error(msg: str, **extra: Any) -> None:
    """`error: <msg>` in text mode; {"level": "error", "msg": msg} in JSON mode."""
    stderr_line(msg if _format == "json" else f"error: {msg}", level="error", **extra)


@contextlib.contextmanager
def route_to_console(console: Console) -> Iterator[None]:
    """While inside, the batcher log lines are printed by `console` (above a rich Live)."""
    handlers = [h for h in logging.getLogger(LOGGER_NAME).handlers if isinstance(h, BatcherHandler)]
    previous = [h.console for h in handlers]
    for h in handlers:
        h.console = console
    try:
        yield
    finally:
        for h, old in zip(handlers, previous, strict=True):
            h.console = old
