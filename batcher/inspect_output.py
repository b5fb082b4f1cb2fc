"""`batcher inspect`: what came out of a job, what failed and why, and what it cost.

Reads a finished Parquet output, or, for a job still running or stopped, its journal
(`<output>.journal`). Both are streamed in batches of rows, so an output of millions of rows
is summed up without being loaded whole. A journal can hold a row twice (`--retry-errors`
appends a fresh result after an error); the last record of an id is the one that counts,
as in the output the job will write.

Error messages are grouped after their numbers and ids are blanked, so a thousand
"retry after 6 seconds" / "retry after 7 seconds" rows show as one line with sample ids.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher.errors import InputDataError
from batcher.journal import SkippedLines, journal_latest_mask, journal_path, read_results
from batcher.pricing import PRICES_AS_OF, cost_of, format_usd, price_for
from batcher.progress import format_duration
from batcher.records import STATUS_ERROR, STATUS_OK
from batcher.schema import RESULT_SCHEMA
from batcher.spec import Price

BATCH_ROWS = 16_384
TOP_ERRORS = 10
SAMPLE_IDS = 3
MAX_ERROR_GROUPS = 10_000  # beyond this many kinds, further kinds count as one "other"
MAX_LABEL_VALUES = 50  # a parsed field with more distinct values is not a label: no tally
OTHER_ERRORS = "(other errors)"
NONE = "(none)"

# Every result column but the answer text and tool calls, which a summary never needs (and
# which may be large); counts widened to int64 for the sums.
_SCHEMA = pa.schema(
    [
        pa.field(f.name, pa.int64() if pa.types.is_integer(f.type) else f.type)
        for f in RESULT_SCHEMA
        if f.name not in ("content", "tool_calls")
    ]
)
_COLUMNS = tuple(_SCHEMA.names)
REUSED = ["cache", "dedupe"]  # sources of answers that cost nothing this time

_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_ID_IN_PARENS = re.compile(r"\(id [^)]*\)")
# A word starting with a letter, with dashes or dots inside: a model name (gpt-4o-mini,
# gpt-4o-mini-2024-07-18, gemini-1.5-pro) or an id (chatcmpl-AbC123, req_9f8e7d).
_NAME = re.compile(r"(?<![\w.-])[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)+")
_SEGMENT = re.compile(r"[-_.]")
# chatcmpl-AbC123, req_9f8e7d, 0x1f2e, long hex: any other token mixing letters and digits
_TOKEN_ID = re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{8,}\b")
# 6, 30.5s, file.jsonl:17; not "(429)" (the status tells errors apart) nor "S0"
_NUMBER = re.compile(r"(?<![\w(.])\d+(?:\.\d+)?(?![\d.])")
_KEPT = "\x00"  # stands in for a model name while numbers are blanked


def _is_id(word: str) -> bool:
    """An id has a random-looking part: 6+ characters mixing letters and digits (model names'
    parts are short, or only letters, or only digits: 4o, mini, 2024)."""
    return any(
        len(part) >= 6 and any(c.isdigit() for c in part) and any(c.isalpha() for c in part)
        for part in _SEGMENT.split(word)
    )


def normalise_error(message: str) -> str:
    """The message with numbers and ids blanked, so alike errors group together; model names
    are kept (a limit of gpt-4o-mini is not one of gpt-4o)."""
    text = message.strip().splitlines()[0] if message.strip() else "(empty message)"
    text = _UUID.sub("<id>", text)  # whole ids before the digits inside them
    text = _ID_IN_PARENS.sub("(id <id>)", text)
    kept: list[str] = []

    def name(m: re.Match[str]) -> str:
        word = m.group(0)
        if _is_id(word):
            return "<id>"
        if "-" in word and any(c.isdigit() for c in word):
            kept.append(word)
            return _KEPT
        return word

    text = _NAME.sub(name, text)
    text = _TOKEN_ID.sub("<id>", text)
    text = _NUMBER.sub("<n>", text)
    if kept:
        names = iter(kept)
        text = re.sub(_KEPT, lambda _: next(names), text)
    return text[:300]


@dataclass
class _ErrorGroup:
    count: int = 0
    sample_ids: list[str] = field(default_factory=list)
    example: str = ""


@dataclass
class _Totals:
    """Running sums over batches of result rows."""

    rows: int = 0
    status: Counter[str] = field(default_factory=Counter)
    finish_reason: Counter[str] = field(default_factory=Counter)
    attempts: Counter[int] = field(default_factory=Counter)
    models: dict[str, dict[str, int]] = field(default_factory=dict)
    latencies: list[pa.Array] = field(default_factory=list)
    errors: dict[str, _ErrorGroup] = field(default_factory=dict)
    error_rows: int = 0
    parsed_rows: int = 0
    parsed_values: dict[str, Counter[str]] | None = None  # field -> value tally (labels)
    parsed_fields: list[str] = field(default_factory=list)
    source: Counter[str] = field(default_factory=Counter)  # api | cache | dedupe
    paid_usd: float = 0.0  # the rows' own cost_usd: what was paid for them
    reused: dict[str, list[int]] = field(default_factory=dict)  # model -> tokens not paid again

    def add(self, table: pa.Table, parsed: list[Any] | None) -> None:
        self.rows += table.num_rows
        _tally(self.status, table["status"])
        _tally(self.source, table["source"])
        self.paid_usd += pc.sum(table["cost_usd"]).as_py() or 0.0
        reused = table.filter(pc.is_in(table["source"], value_set=pa.array(REUSED)))
        if reused.num_rows:
            sums = reused.group_by("model", use_threads=False).aggregate(
                [("prompt_tokens", "sum"), ("completion_tokens", "sum")]
            )
            for g in sums.to_pylist():
                tokens = self.reused.setdefault(g["model"] or NONE, [0, 0])
                tokens[0] += g["prompt_tokens_sum"] or 0
                tokens[1] += g["completion_tokens_sum"] or 0
        _tally(self.finish_reason, table["finish_reason"])
        for item in pc.value_counts(table["attempts"]).to_pylist():
            if item["values"] is not None:  # unknown (a Batch output keeps no attempts)
                self.attempts[item["values"]] += item["counts"]
        grouped = table.group_by("model", use_threads=False).aggregate(
            [
                ("id", "count"),
                ("prompt_tokens", "sum"),
                ("completion_tokens", "sum"),
                ("total_tokens", "sum"),
            ]
        )
        for g in grouped.to_pylist():
            m = self.models.setdefault(
                g["model"] or NONE,
                {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            )
            m["rows"] += g["id_count"]
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                m[key] += g[f"{key}_sum"] or 0
        lat = pc.drop_null(table["latency_s"])
        if len(lat):
            self.latencies.append(lat.combine_chunks() if isinstance(lat, pa.ChunkedArray) else lat)
        failed = table.filter(pc.is_valid(table["error"])).select(["id", "error"])
        for rid, msg in zip(failed["id"].to_pylist(), failed["error"].to_pylist(), strict=True):
            self._add_error(rid, msg)
        if parsed is not None:
            self._add_parsed(parsed)

    def _add_error(self, row_id: str | None, message: str) -> None:
        self.error_rows += 1
        key = normalise_error(message)
        group = self.errors.get(key)
        if group is None:
            if len(self.errors) >= MAX_ERROR_GROUPS:
                key = OTHER_ERRORS
                group = self.errors.setdefault(key, _ErrorGroup(example=message[:300]))
            else:
                group = self.errors[key] = _ErrorGroup(example=message[:300])
        group.count += 1
        if len(group.sample_ids) < SAMPLE_IDS and row_id is not None:
            group.sample_ids.append(row_id)

    def _add_parsed(self, parsed: list[Any]) -> None:
        for value in parsed:
            if not isinstance(value, Mapping):
                continue
            self.parsed_rows += 1
            if self.parsed_values is None:
                self.parsed_fields = list(value)
                self.parsed_values = {name: Counter() for name in value}
            for name in list(self.parsed_values):
                v = value.get(name)
                if isinstance(v, (dict, list, float)):
                    del self.parsed_values[name]  # not a label: structures, measurements
                    continue
                tally = self.parsed_values[name]
                if v is None:
                    key = NONE
                elif isinstance(v, bool):
                    key = "true" if v else "false"
                else:
                    key = str(v)[:80]
                tally[key] += 1
                if len(tally) > MAX_LABEL_VALUES:
                    del self.parsed_values[name]


def _tally(counter: Counter[str], column: pa.ChunkedArray | pa.Array) -> None:
    for item in pc.value_counts(column).to_pylist():
        counter[NONE if item["values"] is None else item["values"]] += item["counts"]


def _parquet_batches(path: Path) -> Iterator[tuple[pa.Table, list[Any] | None]]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputDataError(f"{path}: not a readable Parquet file: {exc}") from None
    names = set(pf.schema_arrow.names)
    missing = [c for c in ("id", "status") if c not in names]
    if missing:
        raise InputDataError(
            f"{path}: no {', '.join(missing)} column; is this an output written by batcher?"
        )
    columns = [c for c in _COLUMNS if c in names] + (["parsed"] if "parsed" in names else [])
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        parsed = batch.column("parsed").to_pylist() if "parsed" in names else None
        arrays = [
            batch.column(c).cast(t.type) if c in names else pa.nulls(batch.num_rows, t.type)
            for c, t in zip(_COLUMNS, _SCHEMA, strict=True)
        ]
        yield pa.Table.from_arrays(arrays, schema=_SCHEMA), parsed


def _cell(value: Any, typ: pa.DataType) -> Any:
    """A journal value in its column's type, or None: a damaged record must not stop the
    summary (the writer turns such records into error rows)."""
    if value is None:
        return None
    if pa.types.is_string(typ):
        return value if isinstance(value, str) else None
    if pa.types.is_integer(typ):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pydict(
        {f.name: [_cell(r.get(f.name), f.type) for r in records] for f in _SCHEMA}, schema=_SCHEMA
    )


def _journal_batches(
    path: Path, mask: bytearray | None, skipped: SkippedLines
) -> Iterator[tuple[pa.Table, list[Any] | None]]:
    batch: list[dict[str, Any]] = []
    for i, rec in enumerate(read_results(path, skipped)):
        if mask is not None and not mask[i]:
            continue
        batch.append(rec)
        if len(batch) >= BATCH_ROWS:
            yield _records_table(batch), [r.get("parsed") for r in batch]
            batch = []
    if batch:
        yield _records_table(batch), [r.get("parsed") for r in batch]


def _batch_cells(line: Any) -> dict[str, Any] | None:
    """One line of OpenAI's Batch output as result cells, or None if it is not one.

    The file keeps what the API answered (model, finish_reason, usage, the error), not how it
    went: latency, attempts, answer source and cost_usd stay empty."""
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    if "response" not in line and "error" not in line:
        return None
    response, error = line.get("response"), line.get("error")
    cells: dict[str, Any] = {"id": line["custom_id"]}
    body = response.get("body") if isinstance(response, dict) else None
    if error is None and isinstance(response, dict) and response.get("status_code") == 200:
        cells["status"] = STATUS_OK
    else:
        cells["status"] = STATUS_ERROR
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) and isinstance(body, dict):
            err = body.get("error")
            message = err.get("message") if isinstance(err, dict) else None
        cells["error"] = message if isinstance(message, str) else "(no message in the line)"
    if isinstance(body, dict):
        cells["model"] = body.get("model")
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            cells["finish_reason"] = choices[0].get("finish_reason")
        usage = body.get("usage")
        if isinstance(usage, dict):
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
                cells[name] = usage.get(name)
    return cells


def _batch_output_batches(
    path: Path, skipped: SkippedLines
) -> Iterator[tuple[pa.Table, list[Any] | None]]:
    """A Batch output JSONL, streamed; lines that are not Batch output lines are counted into
    `skipped` (they are not rows of the output)."""
    batch: list[dict[str, Any]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                cells = _batch_cells(json.loads(raw))
            except ValueError:
                skipped.add(lineno, "not JSON")
                continue
            if cells is None:
                skipped.add(lineno, "not a Batch output line")
                continue
            batch.append(cells)
            if len(batch) >= BATCH_ROWS:
                yield _records_table(batch), None
                batch = []
    if batch:
        yield _records_table(batch), None


def _first_line(path: Path) -> bytes:
    """The first non-blank line (of the first MB), or b"" ; b"PAR1" for a Parquet file."""
    try:
        with path.open("rb") as fh:
            if fh.read(4) == b"PAR1":
                return b"PAR1"
            fh.seek(0)
            while fh.tell() < 1 << 20:
                raw = fh.readline(1 << 20)
                if not raw or raw.strip():
                    return raw.strip()
    except OSError as exc:
        raise InputDataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return b""


def output_kind(path: Path) -> str:
    """ "parquet" or "batch" (OpenAI's Batch output JSONL) for an existing output file, sniffed
    from its content (an `output_format: batch` job writes JSONL under any name)."""
    first = _first_line(path)
    if first == b"PAR1":
        return "parquet"
    if not first and path.suffix != ".parquet":
        return "batch"  # an empty Batch output: a job of no rows (Parquet is never empty)
    line: Any = None
    with contextlib.suppress(ValueError):
        line = json.loads(first)
    if _batch_cells(line) is not None:
        return "batch"
    hint = ""
    if isinstance(line, dict) and "custom_id" in line and "body" in line:
        hint = " (it looks like Batch-API input: lines with a request body, not answers)"
    raise InputDataError(
        f"{path}: neither a Parquet output nor a Batch-API output JSONL{hint}; give an output "
        "written by batcher, its journal (<output>.journal), or the job file"
    )


def journal_finished(path: Path) -> bool:
    """Does the journal end with an `end` record saying its run completed? (The last record of
    the file: a later run that started and stopped leaves its own records after it.)"""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 65_536))
            tail = fh.read()
    except OSError:
        return False
    for raw in reversed(tail.split(b"\n")):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            return False  # a torn or damaged last line: no end record after it
        return isinstance(rec, dict) and rec.get("t") == "end" and rec.get("complete") is True
    return False


def _resolve(path: Path) -> tuple[Path, str]:
    """(file to read, "parquet" | "batch" | "journal") for an output, a journal or a job file."""
    if path.suffix in (".yaml", ".yml"):
        from batcher.spec import load_job  # only here: inspecting outputs needs no job

        path = load_job(path).output
    if path.name.endswith(".journal"):
        if not path.exists():
            raise InputDataError(f"{path}: no such journal")
        return path, "journal"
    if path.exists():
        return path, output_kind(path)
    journal = journal_path(path)
    if journal.exists():
        return journal, "journal"  # the job has not written its output yet
    raise InputDataError(
        f"{path}: no output there, and no journal {journal.name} beside it; give the output "
        "path from the job file (or the job file itself)"
    )


def inspect_path(path: Path, prices: Mapping[str, Price] | None = None) -> dict[str, Any]:
    """Summarise an output (Parquet), a job's journal, or the output of a job file.

    `prices` are the job file's price overrides; a job file passed as `path` brings its own.
    """
    path = Path(path)
    if prices is None and path.suffix in (".yaml", ".yml"):
        from batcher.spec import load_job

        prices = load_job(path).prices
    source_path, source = _resolve(path)
    totals = _Totals()
    superseded = 0
    skipped = SkippedLines()
    try:
        if source == "parquet":
            batches = _parquet_batches(source_path)
        elif source == "batch":
            batches = _batch_output_batches(source_path, skipped)
        else:
            mask, superseded = journal_latest_mask(source_path)
            batches = _journal_batches(source_path, mask, skipped)
        for table, parsed in batches:
            totals.add(table, parsed)
    except OSError as exc:
        raise InputDataError(f"{source_path}: cannot read: {exc.strerror or exc}") from None
    report = _report(totals, prices or {})
    report = {"path": str(source_path), "source": source, **report}
    if source == "journal":
        report["finished"] = journal_finished(source_path)
    if source == "batch" and journal_path(source_path).exists():
        report["journal"] = str(journal_path(source_path))
    if source != "parquet":
        report["superseded_records"] = superseded
        report["skipped_lines"] = {
            "count": skipped.count,
            "lines": skipped.lines,
            "reasons": skipped.reasons,
        }
    return report


def _report(t: _Totals, prices: Mapping[str, Price]) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    cost_total = 0.0
    all_priced = True
    for name, m in sorted(t.models.items()):
        price, source = price_for(name, prices) if name != NONE else (None, "unknown")
        cost = None
        if price is not None:
            cost = (
                m["prompt_tokens"] * price.input_per_1m
                + m["completion_tokens"] * price.output_per_1m
            ) / 1e6
            cost_total += cost
        elif m["prompt_tokens"] or m["completion_tokens"]:
            all_priced = False  # tokens we cannot price: the total is a lower bound
        models[name] = {**m, "cost_usd": cost, "price_source": source}

    latency: dict[str, Any] = {"rows": 0}
    if t.latencies:
        values = pa.chunked_array(t.latencies, pa.float64())
        p50, p90, p99 = pc.quantile(values, q=[0.5, 0.9, 0.99]).to_pylist()
        latency = {
            "rows": len(values),
            "p50": round(p50, 3),
            "p90": round(p90, 3),
            "p99": round(p99, 3),
            "max": round(pc.max(values).as_py(), 3),
            "mean": round(pc.mean(values).as_py(), 3),
        }

    saved = 0.0
    for name, (prompt, completion) in t.reused.items():
        price = price_for(name, prices)[0] if name != NONE else None
        saved += 0.0 if price is None else cost_of(price, prompt, completion)

    top = sorted(t.errors.items(), key=lambda kv: -kv[1].count)[:TOP_ERRORS]
    report: dict[str, Any] = {
        "rows": t.rows,
        "status": dict(t.status.most_common()),
        "answer_source": dict(t.source.most_common()),
        "paid_usd": round(t.paid_usd, 6),
        "saved_usd": round(saved, 6),
        "finish_reason": dict(t.finish_reason.most_common()),
        "tokens": {
            "prompt": sum(m["prompt_tokens"] for m in t.models.values()),
            "completion": sum(m["completion_tokens"] for m in t.models.values()),
            "total": sum(m["total_tokens"] for m in t.models.values()),
        },
        "cost_usd": round(cost_total, 6) if all_priced else None,
        "cost_usd_priced_models": round(cost_total, 6),
        "prices_as_of": PRICES_AS_OF,
        "models": models,
        "latency_s": latency,
        "attempts": {str(k): v for k, v in sorted(t.attempts.items())},
        "retried_rows": sum(v for k, v in t.attempts.items() if k > 1),
        "errors": {
            "rows": t.error_rows,
            "kinds": len(t.errors),
            "top": [
                {
                    "message": g.example,  # a real one; `kind` is what the group shares
                    "kind": key,
                    "count": g.count,
                    "sample_ids": g.sample_ids,
                    "example": g.example,
                }
                for key, g in top
            ],
        },
    }
    if t.parsed_values is not None:
        report["parsed"] = {
            "rows": t.parsed_rows,
            "fields": t.parsed_fields,
            "values": {
                name: dict(tally.most_common())
                for name, tally in t.parsed_values.items()
                # every value different (free text on a small file): not a label
                if len(tally) < t.parsed_rows or t.parsed_rows <= 1
            },
        }
    return report


def _counts(counts: Mapping[str, int]) -> str:
    return " · ".join(f"{k} {v:,}" for k, v in counts.items()) or "-"


def _seconds(value: float) -> str:
    return f"{value:.2f}s" if value < 60 else format_duration(value)


def _what(report: Mapping[str, Any]) -> str:
    if report["source"] == "parquet":
        return "Parquet output"
    if report["source"] == "batch":
        return "Batch-API output JSONL"
    return "journal of a finished job" if report.get("finished") else "journal of an unfinished job"


def render_inspection(report: dict[str, Any]) -> str:
    """The report for people; `--json` prints the dict instead."""
    lines = [f"{report['path']}: {report['rows']:,} rows ({_what(report)})"]
    if report.get("superseded_records"):
        lines.append(
            f"  ({report['superseded_records']:,} earlier results replaced by a retry are left out)"
        )
    if report.get("skipped_lines", {}).get("count"):
        skipped = SkippedLines(**report["skipped_lines"])
        lines.append(
            f"  warning: {skipped.count:,} unreadable "
            + ("journal " if report["source"] == "journal" else "")
            + ("line" if skipped.count == 1 else "lines")
            + f" skipped: {skipped.describe()}; results on them are not counted here"
            + (", and the next run sends their rows again" if report["source"] == "journal" else "")
        )
    if report["source"] == "batch":
        journal = report.get("journal")
        where = f"`batcher inspect {shlex.quote(str(journal))}`" if journal else "its journal"
        lines.append(
            "  (a Batch output holds no latency, attempts, answer source or paid cost; "
            f"{where} has them)"
        )
    tok = report["tokens"]
    lines += [
        f"status:        {_counts(report['status'])}",
        f"finish_reason: {_counts(report['finish_reason'])}",
        f"tokens:        {tok['prompt']:,} prompt + {tok['completion']:,} completion "
        f"= {tok['total']:,}",
    ]
    priced = [
        f"{name} {format_usd(m['cost_usd'])} ({m['price_source']})"
        for name, m in report["models"].items()
        if m["prompt_tokens"] or m["completion_tokens"]
    ]
    total = report["cost_usd"]
    cost = (
        format_usd(total)
        if total is not None
        else (
            f"at least {format_usd(report['cost_usd_priced_models'])} (some models have no price; "
            "add them under prices: in the job file)"
        )
    )
    lines.append(f"cost:          {cost}" + (f"  [{'; '.join(priced)}]" if priced else ""))
    sources = report.get("answer_source", {})
    reused = sources.get("cache", 0) + sources.get("dedupe", 0)
    if reused:
        lines.append(
            f"reused:        {sources.get('cache', 0):,} rows answered from the cache, "
            f"{sources.get('dedupe', 0):,} shared an identical request; paid "
            f"{format_usd(report['paid_usd'])}, saving {format_usd(report['saved_usd'])}"
        )
    lat = report["latency_s"]
    if lat["rows"]:
        lines.append(
            f"latency:       p50 {lat['p50']:.2f}s · p90 {lat['p90']:.2f}s · "
            f"p99 {lat['p99']:.2f}s · max {_seconds(lat['max'])}"
        )
    attempts = " · ".join(f"{k}: {v:,}" for k, v in report["attempts"].items())
    if attempts or report["source"] != "batch":
        lines.append(
            f"attempts:      {attempts or '-'}  ({report['retried_rows']:,} rows needed a retry)"
        )
    errors = report["errors"]
    if errors["rows"]:
        lines.append(
            f"errors:        {errors['rows']:,} rows, {errors['kinds']:,} "
            + ("kind" if errors["kinds"] == 1 else "kinds")
        )
        for e in errors["top"]:
            lines.append(f"  {e['count']:>9,}  {e['message'].strip().splitlines()[0][:300]}")
            if e["sample_ids"]:
                lines.append(f"             e.g. ids {', '.join(e['sample_ids'])}")
        shown = sum(e["count"] for e in errors["top"])
        if shown < errors["rows"]:
            lines.append(f"  {errors['rows'] - shown:>9,}  (other kinds; see --json)")
    parsed = report.get("parsed")
    if parsed:
        lines.append(
            f"parsed:        {parsed['rows']:,} rows with fields {', '.join(parsed['fields'])}"
        )
        for name, tally in parsed["values"].items():
            lines.append(f"  {name}: {_counts(tally)}")
    return "\n".join(lines)
