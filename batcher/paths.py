"""Where batcher keeps its own files: under the XDG cache home."""

from __future__ import annotations

import os
from pathlib import Path

from batcher.errors import StorageError


def cache_home() -> Path:
    """$XDG_CACHE_HOME/batcher (~/.cache/batcher when it is unset or relative, as the XDG spec
    says). StorageError when there is neither (a container's user without $HOME or a passwd
    entry): the response store and the vocabulary's copy then go without; the Python API's run
    state cannot."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "batcher"
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # "Could not determine home directory."
        raise StorageError(
            "batcher keeps its files under $XDG_CACHE_HOME or ~/.cache, and this process has "
            "neither (no $HOME, no home directory for its user): set XDG_CACHE_HOME to an "
            "absolute path"
        ) from None
    return home / ".cache" / "batcher"
