"""The `batcher` command's process (the console script and `python -m batcher`): what it keeps
out of itself, then the CLI.

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

import gc
import sys
from typing import Any


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
    main()
