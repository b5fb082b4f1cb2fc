"""The Python API: a dataset in, the same rows with answers out, on the CLI's own engine.

    import batcher
    labeled = batcher.run("job.yaml", data=df)            # pandas in, pandas out
    labeled = await batcher.arun({"model": "gpt-4o-mini", "messages": [...]}, data=table)

`job` is a job file or a dict with a job file's keys (with `data` given, `input` is left out);
`data` is a path, a `pyarrow.Table`, or a pandas or polars DataFrame; the answer is the same
kind (a path gives a `pyarrow.Table`): the input rows in input order with the result columns
added. Row errors are rows (`status`, `error`); a run that stops (key rejected, outage,
interrupted) raises its typed `BatcherError`, whose `partial` holds the rows answered so far.

The journal, resume, limiter (Redis too), cache and budget are the CLI's: a frame's rows are
written to a Parquet file in the state directory under a name derived from the job and the
data, so calling `run` again with the same job and data resumes where an interrupted call
stopped (a notebook cell interrupted and run again sends only what is missing).

`run` works in a plain script (it runs its own event loop) and inside a running loop, e.g.
Jupyter (it runs the engine on a thread of its own; interrupting the cell stops the run
gracefully and keeps every answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batcher import eventloop
from batcher.engine import Engine, RunOptions
from batcher.errors import BatcherError, ExitCode, InputDataError, JobSpecError
from batcher.outcome import RunOutcome, StopReason
from batcher.paths import cache_home
from batcher.progress import MODES, ProgressMode
from batcher.schema import RESULT_FIELDS, RESULT_SCHEMA, coerce_result_fields
from batcher.spec import Job, job_from_mapping, load_job
from batcher.summary import saved_rows

DataKind = Literal["arrow", "pandas", "polars", "path"]
# Result columns an input column may not share a name with (the id column is the exception).
RESULT_COLUMNS: tuple[str, ...] = (*[f for f in RESULT_FIELDS if f != "id"], "parsed")
_OWN_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar("batcher_own_loop", default=False)


class RunInterrupted(BatcherError):
    """The run was interrupted (Ctrl-C, a cancelled cell); run again to resume."""

    exit_code = ExitCode.INTERRUPTED


def state_dir() -> Path:
    """Where the API keeps the inputs and journals of jobs that name no output."""
    return cache_home() / "runs"


# A run's state in `state_dir()` (a frame's copy, its journal, its output) is kept this long
# after its last use. Within it, calling again resumes; after it, a run starts afresh (with the
# response store on, as by default, the rows it answered come from the store and are not paid
# again; the spending its journal kept for `max_cost_usd` goes with it), and a notebook that
# labels a new frame every day does not keep a copy of each one forever.
RUNS_KEPT_S = 30 * 24 * 3600.0


def prune_runs(folder: Path, older_than_s: float = RUNS_KEPT_S, *, now: float | None = None) -> int:
    """Remove every file of the runs in `folder` unused for `older_than_s` (a run's files share
    the name before the first dot; the newest of them dates the run). Returns how many runs
    went. Best effort: a run whose journal a process holds is left alone, and so is a file
    another process removes first."""
    now = time.time() if now is None else now
    runs: dict[str, list[str]] = {}
    newest: dict[str, float] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        # ".X.parquet.tmp-123" (an atomic write's temporary) belongs to run X too
        run = entry.name.lstrip(".").split(".", 1)[0]
        runs.setdefault(run, []).append(entry.path)
        newest[run] = max(newest.get(run, mtime), mtime)
    cutoff = now - older_than_s
    return sum(_remove_run(files, cutoff) for run, files in runs.items() if newest[run] < cutoff)


def _remove_run(files: list[str], cutoff: float) -> bool:
    """Remove one run's files, unless a process holds its journal (the job lock) or a file was
    used since `cutoff`: checked again under the lock, a run may have begun meanwhile."""
    held: list[int] = []
    try:
        for path in files:
            if not path.endswith(".journal"):
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a run holds it
                return False
        removed = False
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime >= cutoff:
                    return False
        for path in sorted(files, key=lambda p: p.endswith(".journal")):  # the journal last
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed = True
        return removed
    finally:
        for fd in held:
            os.close(fd)


def _runs_folder() -> Path:
    """`state_dir()`, created, with its runs unused for RUNS_KEPT_S removed first."""
    folder = state_dir()
    prune_runs(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---- data in ----------------------------------------------------------------------------------


def _as_table(data: Any) -> tuple[pa.Table, DataKind]:
    if isinstance(data, pa.Table):
        return data, "arrow"
    module = type(data).__module__.split(".")[0]
    if module == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False), "pandas"
    if module == "polars":
        return data.to_arrow(), "polars"
    raise InputDataError(
        f"data must be a path, a pyarrow.Table, or a pandas or polars DataFrame, not "
        f"{type(data).__name__}"
    )


def _from_table(table: pa.Table, kind: DataKind, index: Any = None) -> Any:
    """`table` as the input's kind; a pandas answer gets the input's index (its rows are the
    input's rows, in order), so `df["label"] = out["content"]` aligns on a filtered frame."""
    if kind == "pandas":
        try:
            frame = table.to_pandas()
        except ImportError:  # pragma: no cover - pandas gave us the input
            raise InputDataError("pandas is needed to return a DataFrame") from None
        if index is not None and len(index) == len(frame):
            frame.index = index
        return frame
    if kind == "polars":
        import polars as pl

        return pl.from_arrow(table)
    return table


def _table_digest(table: pa.Table) -> str:
    """A fingerprint of the data's content: the same frame again names the same state files."""
    digest = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(memoryview(sink.getvalue()))
    return digest.hexdigest()[:16]


def _check_columns(columns: list[str], id_column: str | None) -> None:
    for name in columns:
        if name in RESULT_COLUMNS and name != id_column:
            raise InputDataError(
                f"the input column {name!r} has the name of the result column {name!r}; "
                "rename the input column (nothing was sent)"
            )


def _job_mapping(job: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Path, str]:
    """(the job's keys, the folder its relative paths start from, its name for messages)."""
    if isinstance(job, Mapping):
        return dict(job), Path.cwd(), "job"
    path = Path(job)
    loaded = load_job(path)  # validates the file as the CLI would
    raw = loaded.model_dump(exclude={"job_dir"}, exclude_unset=True)
    return raw, path.resolve().parent, str(path)


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---- the run ----------------------------------------------------------------------------------


async def arun(
    job: str | Path | Mapping[str, Any],
    data: Any = None,
    *,
    restart: bool = False,
    retry_errors: bool = False,
    progress: ProgressMode = "auto",
    mock: bool = False,
    **overrides: Any,
) -> Any:
    """Run `job` over `data` (see the module docstring); returns the answered rows.

    `overrides` replace job keys (e.g. `concurrency=4`, `output="labels.parquet"`).
    `mock=True` sends to the bundled local server (no API key needed).
    """
    if progress not in MODES:
        raise JobSpecError(f"progress must be one of {', '.join(MODES)}, not {progress!r}")
    raw, base, source = _job_mapping(job)
    raw.update(overrides)
    shape = {k: v for k, v in raw.items() if k not in ("input", "output")}
    # Off the caller's loop (a notebook's): converting, hashing and copying a frame take time.
    kind, table, index = await asyncio.to_thread(_stage_data, raw, shape, data)
    if "input" not in raw:
        raise JobSpecError(f"{source}: give the rows: data=... or input: in the job")
    spec = job_from_mapping(raw, base, source=source)
    # Messages name the rows by the file the run reads: for a frame, our copy of it.
    copy = _DataName(spec.input, kind, index) if table is not None else None
    if spec.output_format != "parquet":
        raise JobSpecError(
            f"{source}: the Python API returns the rows as a table; output_format: "
            f"{spec.output_format} is for the command line (leave it out here)"
        )

    async with _endpoint(spec, mock) as (base_url, api_key):
        options = RunOptions(
            restart=restart,
            retry_errors=retry_errors,
            progress=progress,
            base_url=base_url,
            api_key=api_key,
            mock=mock,
            # Signal handlers only in a loop `run` owns, never in Jupyter's or a caller's.
            handle_signals=_OWN_LOOP.get()
            and threading.current_thread() is threading.main_thread(),
        )
        # Built off the loop: opening the input (keep_columns: all reads a whole JSONL for
        # its keys) must not freeze the caller's loop (a notebook's).
        try:
            engine = await asyncio.to_thread(Engine, spec, options)
            outcome = await engine.run()
        except BatcherError as exc:
            if copy is not None:
                copy.rename(exc)
            raise
    return await asyncio.to_thread(_answer, outcome, table, kind, spec, index, copy)


def _stage_data(
    raw: dict[str, Any], shape: Mapping[str, Any], data: Any
) -> tuple[DataKind, pa.Table | None, Any]:
    """`data` as the job's input: a path as it is; a table or frame copied once to the state
    directory under a name of the job's shape and the data's digest (the same frame again:
    the same file, so the run resumes). Returns (its kind, the table, a pandas index)."""
    if isinstance(data, (str, os.PathLike)):
        raw["input"] = str(data)
    if data is None or isinstance(data, (str, os.PathLike)):
        if "input" in raw and "output" not in raw:
            name = f"{_digest(shape)}-{_digest(raw['input'])}.parquet"
            raw["output"] = str(_runs_folder() / name)
        return "path", None, None
    table, kind = _as_table(data)
    index = data.index if kind == "pandas" else None  # given back with the answer
    _check_columns(table.column_names, raw.get("id_column"))
    name = f"{_digest(shape)}-{_table_digest(table)}"
    folder = _runs_folder()
    path = folder / f"{name}.input.parquet"
    try:
        os.utime(path)  # in use again: kept another RUNS_KEPT_S
    except FileNotFoundError:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the copy is used as it is
        pass
    raw["input"] = str(path)
    raw.setdefault("output", str(folder / f"{name}.parquet"))
    return kind, table, index


@contextlib.asynccontextmanager
async def _endpoint(job: Job, mock: bool) -> AsyncIterator[tuple[str | None, str | None]]:
    if not mock:
        yield None, None
        return
    from batcher.mock import MockConfig, MockServer

    limits = {m: (lim.rpm, lim.tpm) for m, lim in job.limits.items()}
    server = MockServer(MockConfig(model_limits=limits, latency_s=0.02, models=None))
    url = await server.start("127.0.0.1", 0)
    try:
        yield url, "mock-key"
    finally:
        await server.stop()


class _DataName:
    """Puts "the DataFrame passed as data" (row N, its index label) in an error's message
    where it names the API's internal copy of the frame (`…/batcher/runs/<hash>.input.parquet`),
    which the caller never saw."""

    def __init__(self, copy: Path, kind: DataKind, index: Any) -> None:
        paths = sorted({re.escape(str(copy)), re.escape(str(copy.resolve()))}, key=len)[::-1]
        # "<path>:3 (id …)" (a row's request) and "<path> row 3" (a row's id) name row 3.
        self._pattern = re.compile(rf"(?:{'|'.join(paths)})(?::(\d+)| row (\d+))?")
        self._what = (
            "the table passed as data" if kind == "arrow" else "the DataFrame passed as data"
        )
        self._index = index

    def _replace(self, match: re.Match[str]) -> str:
        number = match.group(1) or match.group(2)
        if number is None:
            return self._what
        row = int(number)
        label = ""
        if self._index is not None and 1 <= row <= len(self._index):
            value = self._index[row - 1]  # numpy scalars' repr is np.int64(5): str() it
            label = f", index {value!r}" if isinstance(value, str) else f", index {value}"
        return f"{self._what} (row {row}, counting from 1{label})"

    def rename(self, error: BaseException) -> None:
        if error.args and isinstance(error.args[0], str):
            error.args = (self._pattern.sub(self._replace, error.args[0]), *error.args[1:])


def _answer(
    outcome: RunOutcome,
    table: pa.Table | None,
    kind: DataKind,
    job: Job,
    index: Any = None,
    copy: _DataName | None = None,
) -> Any:
    result = _result_table(outcome, table, job)
    if outcome.reason is StopReason.COMPLETED:
        return _from_table(result, kind, index)
    error: BatcherError = outcome.error or RunInterrupted(
        f"interrupted; {saved_rows(outcome)}. Run the same call again to resume."
    )
    if copy is not None:
        copy.rename(error)
    error.partial = _from_table(result, kind, index)  # type: ignore[attr-defined]
    error.outcome = outcome  # type: ignore[attr-defined]
    raise error


def _result_table(outcome: RunOutcome, table: pa.Table | None, job: Job) -> pa.Table:
    """The input rows in input order with the result columns (partial: from the journal)."""
    if outcome.output.exists() and outcome.completed:
        results = pq.read_table(outcome.output)
    else:
        from batcher.journal import read_results

        # The latest record of an id first: index_in takes the first match.
        records = [coerce_result_fields(rec) for rec in read_results(outcome.journal)][::-1]
        results = pa.Table.from_pylist(records, schema=RESULT_SCHEMA)
    if table is None:
        return results
    if job.id_column is None:
        ids = pa.array([str(i) for i in range(table.num_rows)], pa.string())
    else:  # as the reader makes ids (str() of each value): a cast formats some types apart
        values = table.column(job.id_column).to_pylist()
        ids = pa.array([None if v is None else str(v) for v in values], pa.string())
    # Each input row's result by id, in input order (a left join that keeps order and nested
    # types, which Arrow's hash join does not).
    index = pc.index_in(ids, value_set=results.column("id").cast(pa.string()))
    aligned = results.take(index)
    for name in aligned.column_names:
        if name != "id" and name not in table.column_names:
            table = table.append_column(name, aligned.column(name))
    return table


def run(
    job: str | Path | Mapping[str, Any],
    data: Any = None,
    **kwargs: Any,
) -> Any:
    """`arun` for code without an event loop, and for Jupyter's running one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return eventloop.run(_owned(job, data, kwargs))
    return _run_in_thread(job, data, kwargs)


async def _owned(job: Any, data: Any, kwargs: dict[str, Any]) -> Any:
    _OWN_LOOP.set(True)
    return await arun(job, data, **kwargs)


def _run_in_thread(job: Any, data: Any, kwargs: dict[str, Any]) -> Any:
    """Inside a running loop (Jupyter): the engine gets a thread and a loop of its own."""
    box: dict[str, Any] = {}
    started = threading.Event()
    new_loop = eventloop.loop_factory()  # here: a wrong $BATCHER_EVENT_LOOP raises to the caller

    def target() -> None:
        loop = new_loop()
        box["loop"] = loop
        started.set()
        try:
            box["task"] = loop.create_task(arun(job, data, **kwargs))
            box["value"] = loop.run_until_complete(box["task"])
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="batcher-run", daemon=True)
    thread.start()
    started.wait()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        # The cell was interrupted: cancel the run; the journal keeps every answer.
        loop = box["loop"]
        with contextlib.suppress(RuntimeError, KeyError):
            loop.call_soon_threadsafe(box["task"].cancel)
        thread.join()
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]
