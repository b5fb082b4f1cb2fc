"""Stable row -> shard assignment for `--shard K/N`, and the per-shard output names."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from batcher.errors import JobSpecError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' with shards numbered 1..N."""
    m = _SHARD.match(text)
    if not m:
        raise JobSpecError(f"--shard {text!r}: write it as K/N, e.g. --shard 1/4")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise JobSpecError(f"--shard {text}: shards are numbered 1..N, e.g. 1/4 .. 4/4")
    return k, n


def stable_hash(row_id: str) -> int:
    """A signed 64-bit hash of an id, the same on every machine and Python run (no hash
    seed): shards, and the rows `--sample N` takes (the N smallest)."""
    digest = hashlib.blake2b(row_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def shard_of(row_id: str, n: int) -> int:
    """1-based shard of an id: the same on every machine and Python run (no hash seed)."""
    digest = hashlib.blake2b(row_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n + 1


def shard_output(output: Path, k: int, n: int) -> Path:
    """out/labels.parquet -> out/labels.shard-2-of-4.parquet"""
    return output.with_name(f"{output.stem}.shard-{k}-of-{n}{output.suffix}")


def shard_outputs(output: Path, n: int) -> list[Path]:
    return [shard_output(output, k, n) for k in range(1, n + 1)]


def shards_beside(output: Path) -> int | None:
    """N of the `--shard K/N` runs whose journals sit beside `output` (the N of the journal
    written last, if the job was sharded more than one way), or None."""
    from batcher.journal import journal_path  # lazily: the journal's users import sharding

    tail = journal_path(output).name[len(output.name) :]  # ".journal"
    name = re.compile(
        re.escape(output.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(output.suffix + tail)
    )
    found: dict[int, float] = {}
    try:
        candidates = list(output.parent.glob(f"{output.stem}.shard-*{tail}"))
        for path in candidates:
            m = name.fullmatch(path.name)
            if m and 1 <= int(m[1]) <= int(m[2]):
                n = int(m[2])
                found[n] = max(found.get(n, 0.0), path.stat().st_mtime)
    except OSError:
        return None
    return max(found, key=lambda n: found[n]) if found else None
