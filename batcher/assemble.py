"""The output assembled from the input and the journal: one row per input row, in input order.

The journal holds results in completion order, possibly several per id (a rerun re-asks a
changed row, `--retry-errors` re-asks an error), and possibly ids that have since left the
input. The output holds exactly the current input's rows, each with its latest result:

    journal pass   (hash(id), byte offset) of every result record, latest first   16 B/record
    index          the pairs sorted by hash (a binary search finds an id's latest record)
    write          input order: the input read again batch by batch, each row's record read
                   at its offset (kept columns taken from the input, typed as the input has
                   them); completion order: the rows' offsets (8 B/row) sorted, records read
                   in journal order (kept columns from them)

So memory stays two arrays of 8-byte numbers however large the job (an external join by
row position; the alternative, Arrow's sort over spilled row groups, would hold the results
themselves). Ids are compared by 64-bit hash: a collision between an input id and another id
of the journal (odds ~n*m/2^64, 5e-8 at a million rows each) would be caught by the record's
id check and reported; nothing is ever written under the wrong id.
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from json.decoder import scanstring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batcher import fastjson
from batcher.errors import BatcherError
from batcher.idhashes import int64_view
from batcher.journal import _json_default as json_default
from batcher.journal import _record
from batcher.readers import Row

CHUNK_ROWS = 2048  # records per chunk handed to the writer (batcher.writer.CHUNK_ROWS)
IdBatches = Callable[[], Iterable[list[Row]]]  # the input's rows in order, read afresh per call


_PLAIN = (str, int, float, bool, type(None))


def as_json_value(value: Any) -> Any:
    """A kept value as the journal would hold it (dates as ISO text, bytes as base64, ...),
    so an output reads the same whichever way its kept columns came."""
    if isinstance(value, _PLAIN):
        return value
    return json.loads(json.dumps(value, default=json_default))


# How the journal begins every result line: now, and in journals of earlier versions.
_RESULT_PREFIXES = (b'{"t":"r","id":"', b'{"t": "r", "id": "')
_META_PREFIXES = (b'{"t":"', b'{"t": "')


def _leading_string(raw: bytes, start: int) -> str | None:
    """The JSON string that begins at `start` (just past its opening quote), or None if the
    line is damaged, as the strict JSON string parser reads it. An id without escapes in an
    ASCII line ends at the next quote: decoded alone, not the whole line."""
    end = raw.find(b'"', start)
    # Only in an ASCII line: other bytes anywhere may not be UTF-8 (a damaged line, found below)
    if end >= 0 and raw.isascii() and raw.find(b"\\", start, end) < 0:
        text = raw[start:end].decode("ascii")
        if text.isprintable():  # else a control character, which JSON must escape: below
            return text
    try:
        return str(scanstring(raw.decode(), start)[0])
    except ValueError:  # UnicodeDecodeError included
        return None


def journal_index(journal: Path) -> tuple[array[int], array[int]]:
    """(id hashes, byte offsets) of the journal's result records, the latest record first.

    Only each line's id is decoded (the whole record is read when it is written out): a
    million records parsed into dicts left ~100 MB of the allocator's pages behind."""
    hashes, offsets = array("q"), array("q")
    offset = 0
    with journal.open("rb") as fh:
        for raw in fh:
            row_id = None
            prefix = next((p for p in _RESULT_PREFIXES if raw.startswith(p)), None)
            if prefix is not None and raw.endswith(b"\n"):
                # (A damaged line is never the latest of its id: the run that read the journal
                # skipped it and asked that row again, appending a newer record.)
                row_id = _leading_string(raw, len(prefix))
            elif not raw.startswith(_META_PREFIXES):  # another layout: parse it whole
                rec = _record(raw)
                if isinstance(rec, dict) and rec.get("t") == "r":
                    row_id = rec["id"]
            if row_id is not None:
                hashes.append(hash(row_id))
                offsets.append(offset)
            offset += len(raw)
    hashes.reverse()
    offsets.reverse()
    return hashes, offsets


def _int64s(values: pa.Array) -> memoryview:
    """An int64 Arrow array (no nulls) as a sequence of ints, read in place (no copy; the
    memoryview keeps the Arrow buffer alive)."""
    data = values.buffers()[1]
    if data is None or not len(values):
        return memoryview(array("q"))
    return memoryview(data).cast("q")[values.offset : values.offset + len(values)]


class JournalIndex:
    """Where each id's latest journal record is: the records' (hash, offset) pairs sorted by
    hash, the latest first among equal hashes, searched by bisection per input row.

    16 bytes a journal record once built, 32 while sorting (each column is freed once
    reordered); nothing per input row, so the input is joined batch by batch. (Arrow's
    index_in built a hash table over every id; the former join also kept an offset per input
    row and copies of both columns: the 1M-row write's peak.)"""

    def __init__(self, journal: Path) -> None:
        hashes, offsets = journal_index(journal)  # latest first
        view = int64_view(hashes)
        order = pc.sort_indices(view)  # stable (Arrow's documented sort): latest still first
        self._hash_array = pc.take(view, order)
        del view, hashes
        self._offset_array = pc.take(int64_view(offsets), order)
        del offsets, order
        self._hashes = _int64s(self._hash_array)
        self._offsets = _int64s(self._offset_array)

    def __len__(self) -> int:
        return len(self._hashes)

    def latest(self, row_id: str) -> int | None:
        """The byte offset of the id's latest record (None: the journal has none). A hash
        collision gives another id's record: `RecordReader.at` checks the id it reads."""
        key = hash(row_id)
        i = bisect_left(self._hashes, key)
        if i < len(self._hashes) and self._hashes[i] == key:
            return int(self._offsets[i])
        return None


class RecordReader:
    """Reads result records at byte offsets of the journal (one open file, seek + readline)."""

    def __init__(self, journal: Path) -> None:
        self._fh = journal.open("rb")

    def at(self, offset: int, expected_id: str | None = None) -> dict[str, Any]:
        self._fh.seek(offset)
        rec: dict[str, Any] = fastjson.loads(self._fh.readline())
        if expected_id is not None and rec.get("id") != expected_id:
            raise BatcherError(
                f"internal error: two ids share a 64-bit hash ({expected_id!r} and "
                f"{rec.get('id')!r}); nothing was published and the journal is intact. Run "
                "the same command again (the hash seed changes per run)."
            )
        rec.pop("t", None)
        return rec

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def records_in_input_order(
    journal: Path,
    batches: IdBatches,
    keep_names: list[str],
    index: JournalIndex | None = None,
    chunk: int | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Chunks of result records in input order, their `keep` taken from the input rows.

    Input rows without a result (a stopped run) are left out. `index`: the journal's, when the
    caller already has it."""
    if index is None:
        index = JournalIndex(journal)
    chunk = chunk or CHUNK_ROWS
    out: list[dict[str, Any]] = []
    with RecordReader(journal) as reader:
        for batch in batches():
            for row in batch:
                offset = index.latest(row.id)
                if offset is None:
                    continue
                rec = reader.at(offset, row.id)
                if keep_names:
                    rec["keep"] = {c: as_json_value(row.data.get(c)) for c in keep_names}
                out.append(rec)
                if len(out) >= chunk:
                    yield out
                    out = []
    if out:
        yield out


def offsets_in_completion_order(
    batches: IdBatches, index: JournalIndex, keep_names: list[str] | None = None
) -> tuple[pa.Array, pa.ChunkedArray | None]:
    """The offsets of the current input rows' latest records, sorted: journal order; and,
    with `keep_names`, those rows' kept values from the input (JSON, one per offset): a row
    whose kept column changed since its answer keeps its request, and the journal's copy."""
    found = array("q")
    kept: list[pa.Array] = []  # per batch: compact, however many rows
    for batch in batches():
        values: list[bytes] = []
        for row in batch:
            offset = index.latest(row.id)
            if offset is not None:
                found.append(offset)
                if keep_names:
                    values.append(
                        fastjson.dumps({c: as_json_value(row.data.get(c)) for c in keep_names})
                    )
        if values:
            kept.append(pa.array(values, pa.binary()))
    view = int64_view(found)
    order = pc.sort_indices(view)
    if not keep_names:
        return pc.take(view, order), None
    return pc.take(view, order), pc.take(pa.chunked_array(kept, pa.binary()), order)


def records_in_completion_order(
    journal: Path,
    batches: IdBatches,
    index: JournalIndex | None = None,
    chunk: int | None = None,
    keep_names: list[str] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Chunks of the current input's latest result records, in the order they were answered
    (with `keep_names`, their kept columns taken from the input, as in input order)."""
    if index is None:
        index = JournalIndex(journal)
    sorted_offsets, kept = offsets_in_completion_order(batches, index, keep_names)
    offsets = _int64s(sorted_offsets)
    chunk = chunk or CHUNK_ROWS
    with RecordReader(journal) as reader:
        for i in range(0, len(offsets), chunk):
            records = [reader.at(off) for off in offsets[i : i + chunk].tolist()]
            if kept is not None:
                for rec, keep in zip(records, kept[i : i + chunk].to_pylist(), strict=True):
                    rec["keep"] = fastjson.loads(keep)
            yield records
