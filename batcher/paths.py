"""Where batcher keeps its own files: under the XDG cache home."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$XDG_CACHE_HOME/batcher (~/.cache/batcher when it is unset or relative, as the XDG spec
    says)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "batcher"
