"""Results -> Parquet, streamed in row groups, published atomically (temp file, fsync, rename).

The journal is the source of truth; the output is derived from it when a run finishes, so a
reader never sees a half-written output and a crash never loses a finished row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.errors import InputDataError
from batcher.journal import fsync_dir, read_results, storage_error
from batcher.records import RESULT_FIELDS

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("content", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("attempts", pa.int32()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)
assert tuple(RESULT_SCHEMA.names) == RESULT_FIELDS
CHUNK_ROWS = 8192


def _chunks(records: Iterable[dict[str, Any]], size: int = CHUNK_ROWS) -> Iterator[list[dict]]:
    chunk: list[dict[str, Any]] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _flatten(rec: dict[str, Any], keep_names: list[str]) -> dict[str, Any]:
    out = {name: rec.get(name) for name in RESULT_FIELDS}
    keep = rec.get("keep") or {}
    for name in keep_names:
        out[name] = keep.get(name)
    if "parsed" in rec:
        out["parsed"] = rec["parsed"]
    return out


def output_schema(
    keep_names: list[str],
    keep_types: pa.Schema | None,
    parsed_type: pa.DataType | None,
    sample: Iterable[dict[str, Any]] = (),
) -> pa.Schema:
    """Result columns, then kept input columns (typed from the input when known), then parsed."""
    fields = list(RESULT_SCHEMA)
    inferred: pa.Schema | None = None
    if keep_names and (keep_types is None):
        schemas = []
        for chunk in _chunks(sample):
            rows = [{n: (r.get("keep") or {}).get(n) for n in keep_names} for r in chunk]
            schemas.append(pa.Table.from_pylist(rows).schema)
        if schemas:
            inferred = pa.unify_schemas(schemas, promote_options="permissive")
    for name in keep_names:
        if name in RESULT_SCHEMA.names:
            raise InputDataError(
                f"keep_columns: {name!r} clashes with a result column; rename it in the input"
            )
        src = keep_types if keep_types is not None else inferred
        typ = src.field(name).type if src is not None and name in src.names else pa.string()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(typ) else typ))
    if parsed_type is not None:
        fields.append(pa.field("parsed", parsed_type))
    return pa.schema(fields)


def _latest_seqs(journal: Path) -> pa.Array:
    """Position (in result order) of the last record of each id: earlier ones are superseded."""
    ids = pa.array((rec["id"] for rec in read_results(journal)), pa.string())
    table = pa.table({"id": ids, "seq": pa.array(range(len(ids)), pa.int64())})
    return table.group_by("id", use_threads=False).aggregate([("seq", "max")]).column("seq_max")


def write_parquet_atomic(
    output: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch | pa.Table]
) -> tuple[int, int]:
    """Write batches to `output` via a temp file + fsync + rename.

    Returns (rows written, rows whose status is error).
    """
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    rows = errors = 0
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in batches:
                table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
                writer.write_table(table.cast(schema))
                rows += table.num_rows
                errors += pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0
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
    return rows, errors


def write_output_from_journal(
    journal: Path,
    output: Path,
    *,
    keep_names: list[str],
    keep_types: pa.Schema | None = None,
    parsed_type: pa.DataType | None = None,
) -> tuple[int, int]:
    """Publish the journal's latest result per id as the Parquet output: (rows, error rows)."""
    latest = _latest_seqs(journal)
    schema = output_schema(
        keep_names, keep_types, parsed_type, read_results(journal) if keep_names else ()
    )

    def batches() -> Iterator[pa.Table]:
        seq = 0
        for chunk in _chunks(read_results(journal)):
            table = pa.Table.from_pylist([_flatten(r, keep_names) for r in chunk], schema=schema)
            seqs = pa.array(range(seq, seq + len(chunk)), pa.int64())
            seq += len(chunk)
            yield table.filter(pc.is_in(seqs, value_set=latest))

    return write_parquet_atomic(output, schema, batches())


def merge_outputs(inputs: list[Path], output: Path) -> tuple[int, int]:
    """Combine shard outputs into one Parquet, checking that every id appears exactly once."""
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

    def batches() -> Iterator[pa.RecordBatch]:
        for f in files:
            yield from f.iter_batches(batch_size=CHUNK_ROWS)

    return write_parquet_atomic(output, schema, batches())
