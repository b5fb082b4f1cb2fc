"""The input read once before anything is sent: everything wrong with it is found here.

Missing columns, bad rows (`on_bad_row: fail` stops at the first; a template whose every row
fails is a typo), duplicate ids (found through 8-byte hashes, named by a second pass), the
models the rows name (a `limits:` entry for another model is a typo), and, for `--sample N`,
which rows the sample takes: the N smallest stable hashes of the ids, the same every time.
"""

from __future__ import annotations

import difflib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batcher.errors import InputDataError
from batcher.idhashes import has_repeats, int64_view
from batcher.readers import InputReader
from batcher.requests import RequestBuilder
from batcher.sharding import stable_hash
from batcher.spec import Job
from batcher.summary import plural


@dataclass(frozen=True, slots=True)
class Scan:
    rows: int  # this run's rows: its shard, its sample
    models: frozenset[str]  # the models the rows' requests name
    sample_max: int | None  # --sample: the largest stable id hash the sample takes


def scan_input(
    job: Job,
    reader: InputReader,
    builder: RequestBuilder,
    *,
    selected: Callable[[str], bool],
    sample: int | None = None,
) -> Scan:
    """Read the whole input once; InputDataError for what must be fixed before sending."""
    known = reader.column_names()
    if known is not None:
        builder.check_columns(known)
    # JSONL has no schema: a kept column no row has is a typo (else an all-null column).
    keep = KeepSeen(job.keep_columns if known is None and job.keep_columns != "all" else ())
    hashes = array("q")  # 8 bytes per row: duplicate ids are found without keeping ids
    stable = array("q") if sample is not None else None
    total = failed = 0
    first_failure: InputDataError | None = None
    models: set[str] = set()
    for batch in reader.iter_batches(4096):
        for row in batch:
            if keep.missing:
                keep.see(row.data)
            if not selected(row.id):
                continue
            hashes.append(hash(row.id))
            if stable is not None:
                stable.append(stable_hash(row.id))
            total += 1
            if row.error is not None:
                continue
            try:
                models.add(builder.model_of(row))
            except InputDataError as exc:
                if job.on_bad_row == "fail":
                    raise InputDataError(
                        f"{exc} (set on_bad_row: skip to record such rows as errors)"
                    ) from None
                failed += 1
                first_failure = first_failure or exc
    keep.check(job)
    if total and failed == total and first_failure is not None:
        # Not a few bad rows: the template itself is wrong (a typo in a {column}).
        raise InputDataError(f"every row is unusable, e.g. {first_failure}")
    if total and has_repeats(int64_view(hashes)):
        _report_duplicates(job, reader, hashes, selected)
    del hashes
    sample_max = None
    if stable is not None and sample is not None:
        picked = sorted(stable)[:sample]
        sample_max = picked[-1] if picked else None
        total = len(picked)
    pa.default_memory_pool().release_unused()
    return Scan(total, frozenset(models), sample_max)


class KeepSeen:
    """Which `keep_columns` some row of a schemaless (JSONL) input has, and which none has.

    Costs a lookup or two per row only until every kept column was seen (usually row 1);
    the columns rows do have are gathered only while one is missing, for the message."""

    def __init__(self, keep: Iterable[str]) -> None:
        self.missing: list[str] = list(keep)
        self.columns: dict[str, None] = {}  # rows' columns, in first-seen order
        self.rows = 0  # rows seen while a column was missing

    def see(self, data: dict[str, Any]) -> None:
        self.rows += 1
        self.missing = [c for c in self.missing if c not in data]
        if self.missing:
            self.columns.update(dict.fromkeys(data))

    def check(self, job: Job) -> None:
        """InputDataError naming the first kept column no row has (an input without rows
        is said so elsewhere: nothing to compare the names with)."""
        if not self.missing or not self.rows:
            return
        name = self.missing[0]
        have = [c for c in self.columns if c != job.id_column]
        close = difflib.get_close_matches(name, have, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputDataError(
            f"{job.input}: keep_columns names {name!r}, which no row of the input has{hint}; "
            f"the rows' columns: {', '.join(have[:30]) or 'none'}"
            f"{', ...' if len(have) > 30 else ''}. Correct the name (nothing was sent)"
        )


def _report_duplicates(
    job: Job, reader: InputReader, hashes: array[int], selected: Callable[[str], bool]
) -> None:
    """Some hashes repeat: find the ids behind them (a second pass) and name them."""
    counts = pc.value_counts(int64_view(hashes))
    repeated = set(
        pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    )
    seen: dict[str, int] = {}
    for batch in reader.iter_batches(4096):
        for row in batch:
            if hash(row.id) in repeated and selected(row.id):
                seen[row.id] = seen.get(row.id, 0) + 1
    dups = [i for i, n in seen.items() if n > 1]
    if not dups:
        return  # 64-bit hash collision between different ids: no duplicate after all
    sample = ", ".join(repr(x) for x in dups[:5])
    where = f"id_column {job.id_column!r}" if job.id_column else "custom_id"
    raise InputDataError(
        f"{job.input}: duplicate ids in {where}: {plural(len(dups), 'id')} "
        f"{'appears' if len(dups) == 1 else 'appear'} more than once (e.g. {sample}); "
        "every row needs a unique id so its answer can be matched and resumed"
    )
