"""The `batcher` command's process (the console script and `python -m batcher`): what it keeps
out of itself, then the CLI, then its end without the interpreter's teardown (`_leave`).

pyarrow imports two large libraries a command does not need, when they are installed: numpy
at its own import, to accept arrays (~0.15 s of CPU and ~10 MB at every start; pyarrow works
without it since 18.0), and pandas the first time it converts Python objects, only to ask
whether they are pandas objects (~0.25 s and 30-40 MB). A command never hands pyarrow an array
or a DataFrame (those go through the Python API, `batcher.run`, which keeps both). So pyarrow
is imported here with numpy refused, and decides for the process that there is none; numpy is
allowed again afterwards (the HTML report's matplotlib needs it), pandas stays refused. For
the rest of the process pyarrow treats numpy as absent even once matplotlib has loaded it:
code here must hand pyarrow Python objects, never numpy arrays or scalars (`to_pylist`, not
`to_numpy`). Tests that call `batcher.cli.main` in their own process keep both.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from typing import Any, NoReturn


class _KeepOut:
    """A `sys.meta_path` finder that refuses `names` (and their submodules)."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        top = name.partition(".")[0]
        if top in self.names:
            raise ModuleNotFoundError(
                f"the batcher command does not load {top}; pass DataFrames to the Python API "
                "(batcher.run)",
                name=name,
            )
        return None


def entry() -> None:
    """The `batcher` command."""
    # The imports made ~130 collections (~40 ms of CPU) of objects that live as long as the
    # process: none during them, and frozen after, the run's collections skip them too.
    gc.disable()
    try:
        if "pandas" not in sys.modules:
            sys.meta_path.insert(0, _KeepOut("pandas"))
        if "pyarrow" not in sys.modules and "numpy" not in sys.modules:
            numpy = _KeepOut("numpy")
            sys.meta_path.insert(0, numpy)
            try:  # pyarrow and its compute module look for numpy once, as they load
                import pyarrow
                import pyarrow.compute  # noqa: F401
            finally:
                sys.meta_path.remove(numpy)
        from batcher.cli import main
        from batcher.collector import imports_frozen

        gc.freeze()
        imports_frozen()
    finally:
        gc.enable()
    try:
        main()
    except SystemExit as done:
        _leave(done.code)
    _leave(0)


def _leave(code: object) -> NoReturn:
    """End the process once the command is done, without the interpreter's teardown.

    The teardown frees every object of every module one by one and collects the lot (the
    tokenizer's 200,000-entry vocabulary, pyarrow's and pydantic's objects): ~0.25 G
    instructions, 0.1 s of CPU at every run's end, for memory the kernel takes back at once.
    What the teardown does that matters still happens: the atexit functions run (logging's
    flush, pyarrow's finalizers) and the streams are flushed. Every file a command writes is
    closed before it returns. A thread other than daemons still alive (none is, in a command
    that ended normally) is not cut short: the interpreter's own exit waits for it as usual.
    """
    if isinstance(code, int):
        status = code
    elif code is None:
        status = 0
    else:  # sys.exit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        status = 1
    me = threading.current_thread()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not me):
        raise SystemExit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):  # None: started with that descriptor closed
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to say
                stream.flush()
    os._exit(status)
