"""The event loop batcher runs on when it owns one (the command, the synchronous `batcher.run`):
uvloop where it is installed, else asyncio's own.

uvloop is a dependency on Linux and macOS (it has no Windows build). It runs the loop, its
timers and the sockets aiohttp writes to in C: a `batcher run` process executes ~5 % fewer
instructions a row on it (benchmarks/README.md, "Engine overhead"). Nothing in batcher
depends on which loop runs it:

- on uvloop the limiter reads `time.monotonic()`, not `loop.time()`, which counts whole
  milliseconds there (MagicStack/uvloop#359) while a request window's margin is 5 ms
  (`admission.local_backend.loop_clock`; asyncio's `loop.time()` is that monotonic clock);
- uvloop's timers fire up to a millisecond early, so a wait for a slot sleeps again until
  the slot has come (both limiter backends).

`BATCHER_EVENT_LOOP=asyncio` chooses asyncio's loop (should uvloop misbehave somewhere);
`arun` runs on the caller's loop, whichever it is.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from batcher.errors import JobSpecError

T = TypeVar("T")

ENV = "BATCHER_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop factory, or asyncio's when uvloop is absent or not wanted."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in ("", "uvloop", "asyncio"):
        raise JobSpecError(f"${ENV} must be uvloop or asyncio, got {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:  # Windows, or an install without it
            if choice == "uvloop":
                raise JobSpecError(
                    f"${ENV}=uvloop, but uvloop is not installed: pip install uvloop"
                ) from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on `loop_factory()`'s loop (the same SIGINT handling: asyncio.Runner)."""
    try:
        factory = loop_factory()
    except BaseException:
        main.close()  # never run: no "was never awaited" warning beside the message
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
