"""Results -> Parquet, streamed in row groups, published atomically (temp file, fsync, rename).

The journal is the source of truth; the output is derived from it when a run finishes, so a
reader never sees a half-written output and a crash never loses a finished row.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.errors import BatcherError, InputDataError
from batcher.journal import fsync_dir, journal_latest_mask, read_results, storage_error
from batcher.records import STATUS_OK
from batcher.schema import RESULT_FIELDS, RESULT_SCHEMA, as_text, coerce_result_fields, is_count

# Rows per conversion from Python records to Arrow: 2,048 keeps the allocator's high-water
# mark (and the peak RSS of writing a million rows) ~30 MB lower than 8,192.
CHUNK_ROWS = 2048
# Rows per output row group: the converted chunks are gathered (as Arrow data, ~0.2 KB a row)
# into groups of this size. The writer keeps ~28 KB of metadata per row group until it closes
# the file and copies it into the footer then: 2,048-row groups cost +25 MB at a million rows,
# 16,384-row groups +16 MB (larger ones hold more Arrow data than they save).
ROW_GROUP_ROWS = 16384


def _libc_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # glibc only (not musl)
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _libc_malloc_trim()


RELEASE_FROM_BYTES = 64 << 20  # a journal this large (~150,000 rows) gives memory back first


def release_memory() -> None:
    """Give what the allocators hold free back to the system before the write's peak.

    A run leaves freed pages behind in glibc's per-thread arenas and in Arrow's pool (the
    write runs in a worker thread: it does not reuse the main thread's free pages); the write
    then adds its own on top of them."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _chunks(records: Iterable[dict[str, Any]], size: int = CHUNK_ROWS) -> Iterator[list[dict]]:
    chunk: list[dict[str, Any]] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError)


def _to_table(
    records: list[dict[str, Any]], keep_names: list[str], text_cols: set[str], schema: pa.Schema
) -> pa.Table:
    """Journal records -> a table of `schema`. Never fails on what a journal holds: a row that
    will not convert is written as an error row saying why (its answer text kept), not a
    failed job.

    The whole batch is tried first, column by column (a third of the time of from_pylist over
    flattened rows, which a run answered from the store spent a tenth of its CPU on), so a
    well-formed journal pays nothing for this.
    """
    columns = _columns(records, keep_names, text_cols, schema)
    try:
        return pa.Table.from_arrays(
            [pa.array(values, type=schema.field(name).type) for name, values in columns.items()],
            schema=schema,
        )
    except _ARROW_ERRORS:
        by_row = zip(*columns.values(), strict=True)
        rows = [dict(zip(columns, values, strict=True)) for values in by_row]
        return pa.Table.from_pylist([_writable(r, schema) for r in rows], schema=schema)


def _columns(
    records: list[dict[str, Any]], keep_names: list[str], text_cols: set[str], schema: pa.Schema
) -> dict[str, list[Any]]:
    """The values of each of the schema's columns, in its order: the result's fields, the kept
    columns (from each record's `keep`; text columns as text), `parsed`."""
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for name in RESULT_FIELDS:
        columns[name] = [r.get(name) for r in records]
    if keep_names:
        keeps = [k if isinstance(k := r.get("keep"), dict) else {} for r in records]
        for name in keep_names:
            if name in text_cols:
                columns[name] = [as_text(k.get(name)) for k in keeps]
            else:
                columns[name] = [k.get(name) for k in keeps]
    if "parsed" in columns:
        columns["parsed"] = [r.get("parsed") for r in records]
    return columns


def _fits(value: Any, typ: pa.DataType) -> bool:
    try:
        pa.array([value], typ)
    except _ARROW_ERRORS:
        return False
    return True


def _writable(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """The row as it is if it converts; else an error row with every value that fits."""
    try:
        pa.Table.from_pylist([row], schema=schema)
        return row
    except _ARROW_ERRORS as exc:
        why = str(exc).splitlines()[0][:200]
    out = coerce_result_fields(row)
    bad = [name for name in RESULT_FIELDS if out[name] != row.get(name)]
    for name in schema.names[len(RESULT_FIELDS) :]:  # kept columns, parsed
        value = row.get(name)
        if _fits(value, schema.field(name).type):
            out[name] = value
        else:
            out[name] = None
            bad.append(name)
    previous = f"; before that: {row['error']}" if isinstance(row.get("error"), str) else ""
    out["status"] = "error"
    out["error"] = (
        f"the journal's record does not fit the output ({', '.join(bad) or 'a value'}: {why}); "
        f"run with --retry-errors to ask again{previous}"
    )
    return out


def _json_native(typ: pa.DataType) -> bool:
    """Types whose values survive the journal's JSON unchanged (others are kept as text)."""
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return _json_native(typ.value_type)
    if pa.types.is_struct(typ):
        return all(_json_native(typ.field(i).type) for i in range(typ.num_fields))
    return (
        pa.types.is_integer(typ)
        or pa.types.is_floating(typ)
        or pa.types.is_boolean(typ)
        or pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
    )


def _infer_keep_type(name: str, sample: Iterable[dict[str, Any]]) -> pa.DataType:
    """One type for a JSONL column across all rows; mixed or odd values make it text."""
    found: pa.DataType | None = None
    for chunk in _chunks(sample):
        values = [(r.get("keep") or {}).get(name) for r in chunk]
        kinds = {type(v) for v in values if v is not None}
        if not kinds:
            continue
        try:
            # Text, the usual kept column, is typed without building an Arrow array (each
            # left the allocator's pages behind: +40 MB over 250,000 rows).
            typ = pa.string() if kinds == {str} else pa.array(values).type
            found = (
                typ
                if found is None
                else pa.unify_schemas(
                    [pa.schema([("v", found)]), pa.schema([("v", typ)])],
                    promote_options="permissive",
                )
                .field("v")
                .type
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return pa.string()
    if found is None or pa.types.is_null(found):
        return pa.string()
    return found


def output_schema(
    keep_names: list[str],
    keep_types: pa.Schema | None,
    parsed_type: pa.DataType | None,
    sample: Callable[[], Iterable[dict[str, Any]]] = lambda: (),
) -> pa.Schema:
    """Result columns, then kept input columns, then `parsed`.

    Kept columns take the Parquet input's type when JSON carries it unchanged (numbers,
    strings, booleans, lists and structs of those); timestamps, dates, decimals and binary are
    kept as text (ISO form). JSONL columns are typed from their values.
    """
    fields = list(RESULT_SCHEMA)
    for name in keep_names:
        if name in RESULT_SCHEMA.names:
            raise InputDataError(
                f"keep_columns: {name!r} clashes with a result column; rename it in the input"
            )
        if keep_types is not None and name in keep_types.names:
            typ = keep_types.field(name).type
            typ = typ if _json_native(typ) else pa.string()
        else:
            typ = _infer_keep_type(name, sample())
        fields.append(pa.field(name, typ))
    if parsed_type is not None:
        fields.append(pa.field("parsed", parsed_type))
    return pa.schema(fields)


def _latest_mask(journal: Path) -> bytearray | None:
    """1 for each record (in journal order) that is its id's last; None if none is superseded.

    The rule lives in `journal.latest_mask` (also used by the run's resume and `inspect`).
    """
    return journal_latest_mask(journal)[0]


@contextlib.contextmanager
def _published(output: Path) -> Iterator[Path]:
    """A temp file beside `output` for the caller to write; when the block ends without an
    error it is fsynced and renamed over `output` (a reader sees the old file or the new one,
    never half of one), otherwise removed. OSError becomes the StorageError saying what to do.
    """
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, output)
        fsync_dir(output.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(output, exc, "write the output") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_rows(output: Path, rows: int, expected_rows: int | None) -> None:
    """Refuse to publish an output whose row count is not the input's (a bug of ours)."""
    if expected_rows is not None and rows != expected_rows:
        raise BatcherError(
            f"internal error: {output.name} would hold {rows} rows but the input has "
            f"{expected_rows}; nothing was published and the journal is intact. Please "
            "report this."
        )


def write_parquet_atomic(
    output: Path,
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    expected_rows: int | None = None,
) -> tuple[int, int]:
    """Write batches to `output` via a temp file + fsync + rename.

    Returns (rows written, rows whose status is error). With `expected_rows`, a different
    count is an error raised before anything is published.
    """
    rows = errors = 0
    with _published(output) as tmp:
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                group: list[pa.Table] = []
                pending = 0
                for batch in batches:
                    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
                    group.append(table.cast(schema))
                    pending += table.num_rows
                    rows += table.num_rows
                    errors += pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0
                    if pending >= ROW_GROUP_ROWS:
                        writer.write_table(pa.concat_tables(group), row_group_size=pending)
                        group, pending = [], 0
                if group:
                    writer.write_table(pa.concat_tables(group), row_group_size=pending)
                del group
        except pa.ArrowException as exc:
            if isinstance(exc, OSError):  # (ArrowIOError) a disk problem, not the data's
                raise
            raise InputDataError(
                f"cannot write {output}: {exc}. A kept column with values of mixed types? "
                "Remove it from keep_columns; the journal is intact, run again to retry."
            ) from None
        _check_rows(output, rows, expected_rows)
    return rows, errors


def write_output_from_journal(
    journal: Path,
    output: Path,
    *,
    keep_names: list[str],
    keep_types: pa.Schema | None = None,
    parsed_type: pa.DataType | None = None,
    expected_rows: int | None = None,
) -> tuple[int, int]:
    """Publish the journal's latest result per id as the Parquet output: (rows, error rows)."""
    latest = _latest_mask(journal)
    schema = output_schema(keep_names, keep_types, parsed_type, lambda: read_results(journal))
    text_cols = {n for n in keep_names if pa.types.is_string(schema.field(n).type)}

    def batches() -> Iterator[pa.Table]:
        seq = 0
        for chunk in _chunks(read_results(journal)):
            table = _to_table(chunk, keep_names, text_cols, schema)
            if latest is not None:  # --retry-errors left superseded records: drop them
                keep = pa.array(latest[seq : seq + len(chunk)], pa.uint8())
                table = table.filter(pc.equal(keep, 1))
            seq += len(chunk)
            yield table

    return write_parquet_atomic(output, schema, batches(), expected_rows=expected_rows)


def merge_outputs(
    inputs: list[Path], output: Path, *, expected_rows: int | None = None
) -> tuple[int, int]:
    """Combine shard outputs into one Parquet, checking that every id appears exactly once
    (and, with `expected_rows`, that none is missing) before anything is published."""
    if not inputs:
        raise InputDataError("merge: no shard outputs given")
    files = []
    for path in inputs:
        try:
            files.append(pq.ParquetFile(path))
        except (OSError, pa.ArrowException) as exc:
            raise InputDataError(f"merge: {path}: not a readable Parquet output: {exc}") from None
    schema = pa.unify_schemas([f.schema_arrow for f in files], promote_options="permissive")
    ids = pa.chunked_array(
        [f.read(columns=["id"]).column("id").combine_chunks() for f in files], pa.string()
    )
    counts = pc.value_counts(ids)
    dup_mask = pc.greater(counts.field("counts"), 1)
    dups = pc.filter(counts.field("values"), dup_mask)
    if len(dups):
        sample = ", ".join(map(str, dups[:5].to_pylist()))
        raise InputDataError(
            f"merge: {len(dups)} ids appear in more than one shard output (e.g. {sample}); "
            "were the shards run with different --shard N or different inputs?"
        )
    if expected_rows is not None and len(ids) != expected_rows:
        raise InputDataError(
            f"merge: the shards hold {len(ids)} rows but the input has {expected_rows}; were "
            "all shards run to completion with the same --shard K/N?"
        )

    def batches() -> Iterator[pa.RecordBatch]:
        for f in files:
            yield from f.iter_batches(batch_size=CHUNK_ROWS)

    return write_parquet_atomic(output, schema, batches())


def write_output_ordered(
    journal: Path,
    output: Path,
    batches: Callable[[], Iterable[list[Any]]],
    *,
    order: str = "input",
    keep_names: list[str],
    keep_types: pa.Schema | None = None,
    parsed_type: pa.DataType | None = None,
    expected_rows: int | None = None,
) -> tuple[int, int]:
    """Publish one row per current input row, each with its latest result (batcher/assemble.py):
    in input order (kept columns from the input) or in completion order. (rows, error rows)"""
    from batcher.assemble import (
        JournalIndex,
        records_in_completion_order,
        records_in_input_order,
    )

    # Only a large run's peak matters (its freed pages are many); below that the two full
    # collections and trims cost ~15 ms of CPU for nothing.
    large = journal.stat().st_size >= RELEASE_FROM_BYTES
    if large:
        release_memory()
    index = JournalIndex(journal)
    if large:
        release_memory()

    def sample() -> Iterator[dict[str, Any]]:  # JSONL kept columns are typed from the input
        if order != "input":
            return (
                rec
                for chunk in records_in_completion_order(journal, batches, index, None, keep_names)
                for rec in chunk
            )
        return ({"keep": {c: r.data.get(c) for c in keep_names}} for b in batches() for r in b)

    schema = output_schema(keep_names, keep_types, parsed_type, sample)
    text_cols = {n for n in keep_names if pa.types.is_string(schema.field(n).type)}

    def tables() -> Iterator[pa.Table]:
        if order == "input":
            chunks = records_in_input_order(journal, batches, keep_names, index)
        else:
            chunks = records_in_completion_order(journal, batches, index, None, keep_names)
        for chunk in chunks:
            yield _to_table(chunk, keep_names, text_cols, schema)

    return write_parquet_atomic(output, schema, tables(), expected_rows=expected_rows)


# ---- OpenAI Batch-API output (output_format: batch) ----


def _ref(kind: str, row_id: str) -> str:
    # Stable per row, so writing the output again gives the same lines.
    return f"{kind}_{hashlib.blake2b(row_id.encode(), digest_size=12).hexdigest()}"


def batch_output_line(rec: dict[str, Any], *, created: int) -> dict[str, Any]:
    """One journal record as a line of OpenAI's Batch output file (pure).

    The journal keeps the answer's fields, not its raw body, so the chat.completion is rebuilt
    from them (content, tool_calls, finish_reason, usage, model). What it cannot keep:
    `request_id` and the completion's `id` are made from the row id, `created` is when the
    output was written. A failed row carries `response: null` and `error: {code, message}`:
    `invalid_input` for a row refused before sending, `request_failed` for one that was sent.
    """
    row_id = str(rec.get("id"))
    line: dict[str, Any] = {"id": _ref("batch_req", row_id), "custom_id": row_id}
    if rec.get("status") != STATUS_OK:
        code = "request_failed" if is_count(rec.get("attempts")) and rec["attempts"] else None
        message = rec.get("error")
        line["response"] = None
        line["error"] = {
            "code": code or "invalid_input",
            "message": message if isinstance(message, str) else "failed (no message recorded)",
        }
        return line
    message = {"role": "assistant", "content": rec.get("content"), "refusal": None}
    calls = rec.get("tool_calls")
    if isinstance(calls, list) and calls:
        message["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": call.get("name"), "arguments": call.get("arguments")},
            }
            for call in calls
            if isinstance(call, dict)
        ]
    body = {
        "id": _ref("chatcmpl", row_id),
        "object": "chat.completion",
        "created": created,
        "model": rec.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": rec.get("finish_reason"),
            }
        ],
        "usage": {
            name: rec.get(name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    line["response"] = {"status_code": 200, "request_id": _ref("req", row_id), "body": body}
    line["error"] = None
    return line


def write_batch_output(
    output: Path,
    records: Iterable[dict[str, Any]],
    *,
    expected_rows: int | None = None,
    created: int | None = None,
) -> tuple[int, int]:
    """Write records as OpenAI Batch output JSONL via a temp file + fsync + rename (streamed:
    one line at a time). Returns (rows written, error rows); with `expected_rows`, a different
    count is an error raised before anything is published."""
    created = int(time.time()) if created is None else created
    rows = errors = 0
    with _published(output) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            line = batch_output_line(rec, created=created)
            fh.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
            rows += 1
            errors += line["error"] is not None
        _check_rows(output, rows, expected_rows)
    return rows, errors


def write_batch_output_ordered(
    journal: Path,
    output: Path,
    batches: Callable[[], Iterable[list[Any]]],
    *,
    order: str = "input",
    expected_rows: int | None = None,
) -> tuple[int, int]:
    """One Batch output line per current input row, with its latest result (the rule of
    batcher/assemble.py, as for Parquet), in input order or in completion order: (rows, error
    rows). OpenAI's own file is in no particular order; readers match lines on custom_id."""
    from batcher.assemble import records_in_completion_order, records_in_input_order

    if order == "input":
        chunks = records_in_input_order(journal, batches, [])
    else:
        chunks = records_in_completion_order(journal, batches)
    records = (rec for chunk in chunks for rec in chunk)
    return write_batch_output(output, records, expected_rows=expected_rows)
