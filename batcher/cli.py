"""The command line: thin click commands; BatcherError -> message + exit code at the edge."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from functools import wraps
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import click

from batcher import __version__, eventloop
from batcher.errors import BatcherError, ExitCode
from batcher.logs import stderr_error, stderr_line
from batcher.progress import ProgressMode
from batcher.spec import Job, load_job

log = logging.getLogger("batcher")
F = TypeVar("F", bound=Callable[..., Any])


def _edge(func: F) -> F:
    """Turn our errors into a one-paragraph message and the documented exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BatcherError as exc:
            stderr_error(str(exc), exit_code=int(exc.exit_code))
            sys.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            stderr_line("interrupted", level="warning")
            sys.exit(int(ExitCode.INTERRUPTED))

    return wrapper  # type: ignore[return-value]


def _json_logs(argv: list[str]) -> bool:
    return any(a == "--log-format=json" for a in argv) or any(
        a == "--log-format" and b == "json" for a, b in itertools.pairwise(argv)
    )


class _Batcher(click.Group):
    """With --log-format json, click's own usage errors (an unknown flag, a missing argument)
    are JSON lines too: every line on stderr is JSON for the log collector."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = list(args) if args is not None else sys.argv[1:]
        if not kwargs.get("standalone_mode", True) or not _json_logs(argv):
            return super().main(args, *rest, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(argv, *rest, **kwargs)
        except click.ClickException as exc:
            from batcher.logs import setup_logging

            setup_logging("json")
            stderr_error(exc.format_message(), exit_code=exc.exit_code)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            stderr_error("aborted", exit_code=1)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Batcher, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batcher")
def main() -> None:
    """Rate-limit-aware batch runs through the Langdock chat-completions API.

    \b
    Exit codes of `batcher run`:
      0   every row answered
      2   bad job file, bad input, or the journal refuses (e.g. the job changed)
      3   the job finished but some rows are recorded as errors
      4   the job stopped: key rejected, disk full, shared limiter lost, ...
      5   another process is running this job
      6   max_cost_usd (--max-cost) reached: raise it and run again to go on
      130 / 143  interrupted by SIGINT / SIGTERM (run again to resume)
    """


def _shard_option(func: F) -> F:
    return click.option(
        "--shard",
        metavar="K/N",
        default=None,
        help="Process only the rows whose id hashes to shard K of N (1-based); "
        "writes its own output and journal. Combine with `batcher merge`.",
    )(func)


def _parse_shard(shard: str | None) -> tuple[int, int] | None:
    from batcher.sharding import parse_shard

    return parse_shard(shard) if shard else None


@contextlib.asynccontextmanager
async def _mock_endpoint(job: Job, enabled: bool) -> AsyncIterator[str | None]:
    """--mock: the bundled Langdock-compatible server, in-process, enforcing the job's limits."""
    if not enabled:
        yield None
        return
    from batcher.mock import MockConfig, MockServer

    limits = {m: (lim.rpm, lim.tpm) for m, lim in job.limits.items()}
    server = MockServer(
        MockConfig(model_limits=limits, latency_s=0.05, latency_jitter_s=0.1, models=None)
    )
    url = await server.start("127.0.0.1", 0)
    log.info("--mock: the bundled local server answers at %s", url)
    try:
        yield url
    finally:
        await server.stop()


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--restart", is_flag=True, help="Forget earlier progress and start over.")
@click.option("--retry-errors", is_flag=True, help="Send again only the rows recorded as errors.")
@_shard_option
@click.option("--quiet", "-q", is_flag=True, help="No progress display; warnings only.")
@click.option(
    "--progress",
    type=click.Choice(["auto", "live", "plain", "json"]),
    default="auto",
    help="Progress display: live on a terminal, plain log lines otherwise (auto).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="json: one JSON object per log line, progress line and summary (for machines).",
)
@click.option(
    "--mock",
    is_flag=True,
    help="Send to the bundled local server (no API key needed): for demos and dry runs.",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Ask the API afresh instead of reusing stored answers (new answers are still stored).",
)
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="USD",
    help="Stop admitting requests before the job's spending (all its runs) passes USD "
    "(overrides max_cost_usd; exit 6 when reached).",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Answer only N rows, the same ones each time (chosen by a hash of the id), into "
    "<output>.sample.parquet; the full run later takes their answers from the store.",
)
@_edge
def run(
    job_file: Path,
    restart: bool,
    retry_errors: bool,
    shard: str | None,
    quiet: bool,
    progress: str,
    log_format: str,
    mock: bool,
    no_cache: bool,
    max_cost: float | None,
    sample: int | None,
) -> None:
    """Run JOB_FILE: send every row, write the Parquet output. Run again to resume."""
    from batcher.engine import Engine, RunOptions
    from batcher.logs import setup_logging

    setup_logging(cast(Literal["text", "json"], log_format), quiet=quiet)
    job = load_job(job_file)
    mode = cast(ProgressMode, "quiet" if quiet else ("json" if log_format == "json" else progress))

    async def go() -> Any:
        async with _mock_endpoint(job, mock) as mock_url:
            options = RunOptions(
                restart=restart,
                retry_errors=retry_errors,
                shard=_parse_shard(shard),
                progress=mode,
                base_url=mock_url,
                api_key="mock-key" if mock else None,
                mock=mock,
                read_cache=not no_cache,
                max_cost_usd=max_cost,
                sample=sample,
            )
            return await Engine(job, options).run()

    outcome = eventloop.run(go())
    from batcher.summary import closing_message, outcome_record, render_outcome

    if log_format == "json":
        click.echo(json.dumps(outcome_record(outcome)))
        if outcome.error is not None:
            stderr_error(str(outcome.error))
        stderr_line(closing_message(outcome).splitlines()[-1])
    elif not quiet or outcome.exit_code != ExitCode.OK:
        click.echo(render_outcome(outcome), err=True)
    sys.exit(int(outcome.exit_code))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@_shard_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_edge
def status(job_file: Path, shard: str | None, as_json: bool) -> None:
    """State of a (partial) job without sending anything."""
    from batcher.status import job_status, render_status

    report = job_status(load_job(job_file), _parse_shard(shard))
    click.echo(json.dumps(report, indent=2) if as_json else render_status(report))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@_edge
def estimate(job_file: Path, as_json: bool) -> None:
    """Tokens, cost and duration of a job at its limits; sends nothing."""
    from batcher.estimate import estimate_job, render_estimate

    report = estimate_job(load_job(job_file))
    click.echo(json.dumps(report, indent=2) if as_json else render_estimate(report))


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_edge
def inspect(path: Path, as_json: bool) -> None:
    """Summarise an output Parquet, a journal, or a job file's (partial) results."""
    from batcher.inspect_output import inspect_path, render_inspection

    report = inspect_path(path)  # a job file brings its prices: and finds output or journal
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render_inspection(report))


@main.command()
@click.argument("job_or_output", type=click.Path(path_type=Path))
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML page (opens offline) instead of printing text.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report's data as JSON.")
@_edge
def report(job_or_output: Path, html_path: Path | None, as_json: bool) -> None:
    """A job's run: throughput against the limits, throttling, latency, errors, cost, labels."""
    from batcher.report import build_report, render_text, write_html

    data = build_report(job_or_output)  # a job file, its output, journal or run history
    if html_path is not None:
        click.echo(f"wrote {write_html(data, html_path)}")
    else:
        click.echo(json.dumps(data, indent=2, default=str) if as_json else render_text(data))


@main.command()
@click.argument("name", default="job")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@_edge
def init(name: str, force: bool) -> None:
    """Write a commented example job file (and a sample input) to start from."""
    from batcher.init_job import write_example

    path = write_example(Path(name), force=force)
    click.echo(f"wrote {path}; try it with: batcher run {path} --mock")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--shards",
    "n",
    type=click.IntRange(min=1),
    required=True,
    help="How many shards the job was split into (N of --shard K/N).",
)
@_edge
def merge(job_file: Path, n: int) -> None:
    """Combine the shard outputs of JOB_FILE into its output; every id exactly once."""
    from batcher.merge import merge_shards

    job = load_job(job_file)
    rows, errors = merge_shards(job, n)
    click.echo(f"merged {n} shards: {rows} rows ({errors} errors) -> {job.output}")


@main.command("serve-mock")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--rpm", default=500, show_default=True, type=int, help="Per-model RPM limit.")
@click.option("--tpm", default=60000, show_default=True, type=int, help="Per-model TPM limit.")
@click.option("--unlimited", is_flag=True, help="No rate limits at all.")
@click.option("--latency", default=0.0, show_default=True, type=float, help="Seconds per answer.")
@click.option("--jitter", default=0.0, show_default=True, type=float, help="Extra random latency.")
@click.option("--error-rate", default=0.0, show_default=True, type=float, help="Share of 5xx.")
@click.option(
    "--drop-rate", default=0.0, show_default=True, type=float, help="Share of dropped connections."
)
@click.option(
    "--foreign-share",
    default=0.0,
    show_default=True,
    type=float,
    help="Share of each limit used by invisible other users.",
)
@click.option("--no-retry-after", is_flag=True, help="Send 429s without retry-after headers.")
@click.option("--no-ratelimit-headers", is_flag=True, help="Send no x-ratelimit-* headers.")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="Accept only this key (repeatable); default: any non-empty key.",
)
@click.option(
    "--unmarked",
    is_flag=True,
    help="Pass for a real API: answers lack the x-batcher-mock header, so batcher stores and "
    "resumes them as real answers (benchmarks, tests of the store). Never point a real job's "
    "output at runs made this way.",
)
def serve_mock(
    host: str,
    port: int,
    rpm: int,
    tpm: int,
    unlimited: bool,
    latency: float,
    jitter: float,
    error_rate: float,
    drop_rate: float,
    foreign_share: float,
    no_retry_after: bool,
    no_ratelimit_headers: bool,
    api_keys: tuple[str, ...],
    unmarked: bool,
) -> None:
    """Run the bundled Langdock-compatible server (prints its base URL).

    Its answers are signed as demo answers: batcher keeps them out of your response store and
    a run against the real API asks for them again."""
    from batcher.mock import MockConfig, main_serve

    try:
        config = MockConfig(
            api_keys=frozenset(api_keys) or None,
            rpm=None if unlimited else rpm,
            tpm=None if unlimited else tpm,
            latency_s=latency,
            latency_jitter_s=jitter,
            error_rate_5xx=error_rate,
            drop_rate=drop_rate,
            foreign_share=foreign_share,
            retry_after_headers=not no_retry_after,
            ratelimit_headers=not no_ratelimit_headers,
            marked=not unmarked,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    main_serve(config, host, port)


# -- the response store ---------------------------------------------------------------------------


def _parsed_by(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: parse's ValueError becomes a usage error naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _duration(text: str) -> float:
    from batcher.cache import parse_duration

    return parse_duration(text)


def _size(text: str) -> int:
    from batcher.cache import parse_size

    return parse_size(text)


def _store_options(func: F) -> F:
    func = click.option(
        "--mock", is_flag=True, help="The bundled server's own store (answers of --mock runs)."
    )(func)
    return click.option(
        "--path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The store file (default: $XDG_CACHE_HOME/batcher/responses.sqlite3).",
    )(func)


def _store_path(path: Path | None, mock: bool) -> Path:
    from batcher.cache import default_store_path

    return path if path is not None else default_store_path(mock)


def _no_store(path: Path, mock: bool) -> str:
    """Said instead of figures when the store file is absent: a typo in --path looks like an
    empty store otherwise (and nothing is created by looking)."""
    from batcher.cache import default_store_path

    default = default_store_path(mock)
    where = "nothing has been stored yet" if path == default else f"the default is {default}"
    return f"no response store at {path} ({where}; check --path)"


@main.group()
def cache() -> None:
    """The response store: answers kept by request and shared by every job, so reruns pay once."""


@cache.command("stats")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_edge
def cache_stats(path: Path | None, mock: bool, as_json: bool) -> None:
    """Entries, size on disk and hits of the response store."""
    from batcher.cache import render_stats, stats_record, store_stats

    store = _store_path(path, mock)
    stats = store_stats(store)
    if as_json:
        click.echo(json.dumps({**stats_record(stats), "exists": store.exists()}))
    else:
        click.echo(render_stats(stats) if store.exists() else _no_store(store, mock))


@cache.command("prune")
@click.option(
    "--older-than",
    metavar="AGE",
    callback=_parsed_by(_duration),
    help="Remove entries not used for AGE: 30d, 12h, 90m, 45s, 2w.",
)
@click.option(
    "--max-size",
    metavar="SIZE",
    callback=_parsed_by(_size),
    help="Then remove the least recently used until the store fits: 2GB, 500MB, 1.5GiB.",
)
@_store_options
@_edge
def cache_prune(
    older_than: float | None, max_size: int | None, path: Path | None, mock: bool
) -> None:
    """Remove old or least recently used answers from the response store."""
    from batcher.cache import human_bytes, prune_store

    if older_than is None and max_size is None:
        raise click.UsageError("say what to remove: --older-than AGE and/or --max-size SIZE")
    store = _store_path(path, mock)
    if not store.exists():
        click.echo(f"{_no_store(store, mock)}: nothing to remove")
        return
    removed, stats = prune_store(store, older_than, max_size)
    floor = ""
    if max_size is not None and stats.size_bytes > max_size:
        floor = (
            f"; it cannot shrink to {human_bytes(max_size)}: the store's tables and indexes "
            f"take {human_bytes(stats.size_bytes)} with {stats.entries:,} "
            + ("entry" if stats.entries == 1 else "entries")
            + " (delete the file to drop it whole)"
        )
    click.echo(
        f"removed {removed:,} entries; {stats.entries:,} left, "
        f"{human_bytes(stats.size_bytes)} on disk ({stats.path}){floor}"
    )
