"""Input files -> rows, streamed: JSONL line by line, Parquet by record batches.

Three shapes are read: plain JSONL (one object per line), Parquet, and OpenAI Batch-API input
(JSONL lines `{"custom_id", "method", "url", "body"}`). Nothing here holds the whole file,
except a small one on request (`hold`: the run reads its input three times). An empty input
(no lines, a header-only Parquet file) simply yields no rows; the engine says so.

Ids are strings or integers (or the row's position, without an id column). Floats are refused:
1.0 reads back as "1.0" in one tool and "1" in another, and the answer could not be matched.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from batcher import fastjson
from batcher.errors import InputDataError, JobSpecError
from batcher.sharding import shard_of
from batcher.spec import OUTPUT_COLUMNS, Job
from batcher.storage import fetch_input

Format = Literal["jsonl", "parquet", "batch"]
# What a held row takes in memory beyond its text: the Row, its dict, the str headers of its
# values (tracemalloc: ~400 bytes for a row of an id and a short text, JSONL or Parquet).
HELD_ROW_BYTES = 400
BATCH_URL = "/v1/chat/completions"


@dataclass(slots=True)  # not frozen: built per row (see records.Request)
class Row:
    """One input row. `line` is the 1-based line (JSONL) or row number (Parquet) for messages."""

    id: str
    line: int
    data: dict[str, Any]
    error: str | None = None  # set for a bad row skipped under on_bad_row: skip


def local_input(job: Job) -> Path:
    """The input as a local file: an s3:// gs:// hf:// input is first copied into the state
    dir (downloaded only when the object changed; batcher/storage.py), then read like a file."""
    if job.input_url is not None:
        fetch_input(job.input_url, job.input)
    return job.input


def detect_format(job: Job) -> Format:
    if job.input_format != "auto":
        return job.input_format
    suffix = job.input.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    # A JSONL file is Batch-API input when its first object has custom_id and body.
    try:
        with job.input.open("rb") as fh:
            for raw in fh:
                if raw.strip():
                    first = json.loads(raw)
                    if isinstance(first, dict) and "custom_id" in first and "body" in first:
                        return "batch"
                    break
    except FileNotFoundError:
        raise InputDataError(f"{job.input}: input file not found") from None
    except ValueError:
        pass  # the row reader reports the bad line with its number
    return "jsonl"


def input_digest(path: Path) -> str:
    """Identity of the input for the journal fingerprint: size + sha256 of the content."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise InputDataError(f"{path}: cannot read input: {exc.strerror}") from None
    return f"{path.stat().st_size}:{h.hexdigest()}"


class InputReader:
    """Streams the job's input as batches of rows; ids per the job's id rules."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.path = local_input(job)
        if not self.path.exists():
            raise InputDataError(f"{self.path}: input file not found")
        if self.path.is_dir():
            raise InputDataError(
                f"{self.path}: input is a directory; give one JSONL, Parquet or Batch-API file"
            )
        self.format: Format = detect_format(job)
        self._columns: list[str] | None = None  # Parquet: read only these (None = all)
        self._hold_bytes = 0  # rows taking up to this much memory are kept after one reading
        self._held: list[Row] | None = None
        self._read_bytes = 0  # text bytes read so far in this reading (JSONL lines, Arrow data)
        if self.format == "parquet":
            try:
                self._pq = pq.ParquetFile(self.path)
            except Exception as exc:  # pyarrow raises several types for a bad file
                raise InputDataError(f"{self.path}: not a readable Parquet file: {exc}") from None
            names = set(self._pq.schema_arrow.names)
            if job.id_column and job.id_column not in names:
                raise InputDataError(
                    f"{self.path}: id_column {job.id_column!r} is not a column of the input "
                    f"(columns: {', '.join(sorted(names))})"
                )

    def column_names(self) -> list[str] | None:
        """Columns known up front (Parquet schema); None for JSONL, where rows vary."""
        if self.format == "parquet":
            return list(self._pq.schema_arrow.names)
        return None

    def select(self, columns: set[str]) -> None:
        """Parquet: read only these columns (wide inputs: embeddings, images, ...)."""
        if self.format == "parquet":
            self._columns = [c for c in self._pq.schema_arrow.names if c in columns]
        self._held = None  # read with other columns

    def hold(self, max_bytes: int) -> None:
        """Keep the rows in memory after the first complete reading when they take at most
        `max_bytes` (the engine reads the input to scan, to send and to order the output: the
        two later readings were a sixth of a run answered from the store). The memory is
        estimated as they are read: their text (JSONL lines, Arrow's decoded data) plus
        HELD_ROW_BYTES a row; past the budget, nothing is kept and each reading reads afresh.
        Rows are values: nobody changes one after reading it."""
        self._hold_bytes = max_bytes

    def arrow_schema(self) -> pa.Schema:
        """The Parquet input's schema (kept columns keep their types in the output)."""
        return self._pq.schema_arrow

    def iter_batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        held = self._held
        if held is not None:
            for start in range(0, len(held), batch_size):
                yield held[start : start + batch_size]
            return
        keeping: list[Row] | None = [] if self._hold_bytes else None
        self._read_bytes = 0
        rows = self._iter_parquet(batch_size) if self.format == "parquet" else self._iter_jsonl()
        batch: list[Row] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= batch_size:
                keeping = self._keep(keeping, batch)
                yield batch
                batch = []
        if batch:
            keeping = self._keep(keeping, batch)
            yield batch
        if keeping is not None:  # read to the end: complete
            self._held = keeping

    def _keep(self, keeping: list[Row] | None, batch: list[Row]) -> list[Row] | None:
        """`keeping` with `batch` added, or None once the whole input is projected to take more
        than the budget (from the rows read so far, at every batch from the first: a big input
        is given up before it has piled up rows that would then be freed, not returned to the
        system)."""
        if keeping is None:
            return None
        keeping.extend(batch)
        text_per_row = self._read_bytes / len(keeping)
        if self.format == "parquet":
            total_rows = float(self._pq.metadata.num_rows)
        else:
            total_rows = self.path.stat().st_size / max(text_per_row, 1.0)
        projected = max(total_rows, len(keeping)) * (text_per_row + HELD_ROW_BYTES)
        return None if projected > self._hold_bytes else keeping

    def _bad(self, line: int, position: int, msg: str, row_id: str | None = None) -> Row:
        """A bad row: fail the job, or record it as an error row (on_bad_row: skip).

        The error row keeps the row's own id when it could be read; otherwise it gets a
        made-up id that no real id can equal (`made_up_id`)."""
        where = f"{self.path}:{line}" if self.format != "parquet" else f"{self.path} row {line}"
        if self.job.on_bad_row == "fail":
            raise InputDataError(f"{where}: {msg} (set on_bad_row: skip to record such rows)")
        if row_id is None:
            row_id = made_up_id(line) if self.format == "batch" or self.job.id_column else None
        return Row(
            id=row_id if row_id is not None else str(position),
            line=line,
            data={},
            error=f"{where}: {msg}",
        )

    def _row_id(self, obj: dict[str, Any], position: int) -> tuple[str | None, str]:
        """(the row's id, or None and why it has none)."""
        if self.format == "batch":
            cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid:
                return None, "missing or invalid custom_id (a non-empty string)"
            return _own_id(cid, "custom_id")
        if self.job.id_column is None:
            return str(position), ""
        name = f"id column {self.job.id_column!r}"
        value = obj.get(self.job.id_column)
        if value is None:
            if self.job.id_column in obj:
                return None, f"{name} is null"
            columns = ", ".join(sorted(map(str, obj))[:20]) or "none"
            return None, f"{name} is missing (the row's columns: {columns}; check id_column)"
        if isinstance(value, float):
            # 3.0 would become "3.0" here and "3" elsewhere: the answer could not be matched.
            return None, (
                f"{name} holds the number {value!r}; ids must be strings or integers (a "
                "decimal id does not read back the same everywhere). Store the ids as text "
                "or whole numbers"
            )
        if isinstance(value, bytes):  # a Parquet binary column: its text, not "b'a'"
            try:
                value = value.decode()
            except UnicodeDecodeError:
                return None, f"{name} holds bytes that are not UTF-8 text; ids must be text"
        if isinstance(value, (bool, dict, list)):
            return (
                None,
                f"{name} holds {type(value).__name__} {value!r}; ids must be strings or integers",
            )
        if isinstance(value, str) and not value:
            return None, f"{name} is empty"
        return _own_id(str(value), name)

    def _iter_jsonl(self) -> Iterator[Row]:
        position = 0
        with self.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                self._read_bytes += len(raw)
                if not raw.strip():
                    continue
                pos = position
                position += 1
                try:
                    obj = fastjson.loads(raw)
                except ValueError as exc:
                    yield self._bad(lineno, pos, f"not valid JSON ({exc})")
                    continue
                if not isinstance(obj, dict):
                    yield self._bad(lineno, pos, "each line must be a JSON object")
                    continue
                row_id, why = self._row_id(obj, pos)
                if row_id is None:
                    yield self._bad(lineno, pos, why)
                    continue
                if self.format == "batch":
                    problem = _batch_line_problem(obj)
                    if problem:
                        yield self._bad(lineno, pos, problem, row_id=row_id)
                        continue
                yield Row(id=row_id, line=lineno, data=obj)

    def _iter_parquet(self, batch_size: int) -> Iterator[Row]:
        position = 0
        for record_batch in self._pq.iter_batches(batch_size=batch_size, columns=self._columns):
            self._read_bytes += record_batch.nbytes
            for obj in record_batch.to_pylist():
                pos = position
                position += 1
                row_id, why = self._row_id(obj, pos)
                if row_id is None:
                    yield self._bad(pos + 1, pos, why)
                    continue
                yield Row(id=row_id, line=pos + 1, data=obj)


_MADE_UP_ID = re.compile(r"<line \d+>")


def made_up_id(line: int) -> str:
    """The id of an unreadable line skipped under on_bad_row: skip. Real ids of this form are
    refused (`_own_id`), so it cannot clash with one."""
    return f"<line {line}>"


def _own_id(value: str, name: str) -> tuple[str | None, str]:
    if _MADE_UP_ID.fullmatch(value):
        return None, (
            f"{name} {value!r} has the form batcher gives to unreadable lines; rename that id"
        )
    return value, ""


def _batch_line_problem(obj: dict[str, Any]) -> str | None:
    if not isinstance(obj.get("body"), dict):
        return "Batch-API line has no body object"
    method = obj.get("method", "POST")
    url = obj.get("url", BATCH_URL)
    if method != "POST" or url != BATCH_URL:
        return f"Batch-API line asks for {method} {url}; batcher sends only POST {BATCH_URL}"
    return None


def resolve_keep(job: Job, reader: InputReader) -> Job:
    """`keep_columns: all` as the input's columns (every key JSONL rows use, in first-seen
    order, found by reading the input once), the id column aside. A column named like a
    result column is refused before anything is sent, naming both."""
    if job.keep_columns != "all":
        return job
    if reader.format == "batch":
        raise JobSpecError(
            "keep_columns: all copies input columns; a Batch-API input has none beside its "
            "request (custom_id is the output's id). Leave keep_columns out"
        )
    names = reader.column_names()
    if names is None:
        seen: dict[str, None] = {}
        for batch in reader.iter_batches(4096):
            for row in batch:
                seen.update(dict.fromkeys(row.data))
        names = list(seen)
    keep = [n for n in names if n != job.id_column]
    clash = [n for n in keep if n in OUTPUT_COLUMNS]
    if clash:
        raise JobSpecError(
            f"keep_columns: all would copy the input column {clash[0]!r}, which has the name "
            f"of the result column {clash[0]!r}; rename it in the input or list the columns "
            "to keep"
        )
    return job.model_copy(update={"keep_columns": keep})


def open_input(job: Job) -> InputReader:
    return InputReader(job)


def count_rows(job: Job, shard: tuple[int, int] | None = None) -> int:
    """Rows of the input (of one shard), without building requests."""
    reader = open_input(job)
    reader.select({job.id_column} if job.id_column else set())
    total = 0
    for batch in reader.iter_batches(8192):
        total += sum(1 for r in batch if shard is None or shard_of(r.id, shard[1]) == shard[0])
    return total
