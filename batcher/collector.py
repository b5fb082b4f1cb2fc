"""The cyclic garbage collector while a run is on.

A run allocates a few dicts and small objects per row, almost all freed at once by reference
counting. The collector still walks every object the process holds, each time enough young
objects have piled up: the imported modules, pyarrow's and pydantic's objects, the caller's
data (~100,000 objects before the first row). Measured on 20,000 rows answered from the
response store, those full collections took 145 of 1,180 ms of CPU; on 20,000 sent rows,
450 ms. So for the duration of a run:

- what existed before it is moved out of the collector's view (`gc.freeze`): it is not garbage
  the run makes, and walking it is the cost;
- young collections run every 10,000 net allocations instead of 700 (the run's objects that
  outlive a row are few: the limiter's log, the journal's pending lines).

Both are undone when the last concurrent run ends, so an embedding process (a notebook, the
Python API) gets its own collector back as it was; cycles among objects that existed before
the run and died during it are collected then. A process that froze objects itself (a server
before it forks) keeps them frozen: then the run only raises the threshold.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 10_000

_lock = threading.Lock()
_runs = 0
_saved: tuple[int, int, int] = gc.get_threshold()
_freezing = False  # this module froze the objects (and unfreezes them)
_command_froze = False  # the objects frozen were frozen by the `batcher` command (its imports)


def imports_frozen() -> None:
    """The `batcher` command froze what its imports made (`command.entry`): runs still freeze
    what was made since (the job, the engine, lazy imports), and unfreeze all at their end."""
    global _command_froze
    _command_froze = True


@contextmanager
def run_collector() -> Iterator[None]:
    """Wrap one run (nested or concurrent runs share the setting; the last one restores it)."""
    global _runs, _saved, _freezing
    with _lock:
        _runs += 1
        if _runs == 1:
            _saved = gc.get_threshold()
            # the process froze its own (not the command's imports): leave them be
            _freezing = _command_froze or not gc.get_freeze_count()
            if _freezing:
                gc.freeze()
            if _saved[0]:  # 0: the process turned automatic collection off; keep it off
                gc.set_threshold(max(_saved[0], YOUNG_THRESHOLD), *_saved[1:])
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0:
                if _freezing:
                    gc.unfreeze()
                gc.set_threshold(*_saved)
