"""The job file: typed, strict, validated. `load_job(path)` is the only way in.

Every key is documented in the README ("Job file reference"); unknown keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
import typing
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from batcher.errors import JobSpecError
from batcher.models import (
    DEFAULT_ASSUMED_MAX_TOKENS,
    DEFAULT_RPM,
    DEFAULT_TPM,
    O_SERIES_REFUSED_PARAMS,
    SUPPORTED_MODELS,
    UNSUPPORTED_PARAMS,
    is_o_series,
)
from batcher.records import RESULT_FIELDS
from batcher.storage import check_url, is_url, state_path

LANGDOCK_HOST = "https://api.langdock.com"
# The chat message roles OpenAI's API accepts ("usr" is a 400 for every row).
MESSAGE_ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool", "function")
# OpenAI's documented ranges of the numeric chat parameters (inclusive).
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
}
MAX_STOP_SEQUENCES = 4
_CHECKED_PARAMS = frozenset((*PARAM_RANGES, "seed", "stop"))
# Columns batcher writes itself; a kept input column must not take one of these names.
OUTPUT_COLUMNS: tuple[str, ...] = (*RESULT_FIELDS, "parsed")


_NUMBERS = (int, float, int | None, float | None)


def _is_section(annotation: Any) -> bool:
    """A mapping or a model, None not allowed: `key:` left empty means its defaults."""
    origin = typing.get_origin(annotation) or annotation
    return origin is dict or (isinstance(origin, type) and issubclass(origin, BaseModel))


class _Strict(BaseModel):
    # inf/nan are refused: `timeout_s: .inf` would wait forever, and nan compares false.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _as_written(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None or not (value is None or isinstance(value, bool)):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        # Pydantic reads true as 1: `rpm: yes` (YAML's true) became 1 request a minute.
        if isinstance(value, bool) and annotation in _NUMBERS:
            raise ValueError(
                "should be a number, not true or false (YAML reads yes/no/on/off as those)"
            )
        # A section left empty (`params:` with its lines commented out, as `batcher init`'s
        # template invites) is the section's defaults, as an empty scalar is the default.
        if value is None and _is_section(annotation):
            return {}
        return value


class Endpoint(_Strict):
    region: Literal["eu", "us", "global", "ch"] = "eu"
    base_url: str | None = None  # overrides region; the POST goes to {base_url}/chat/completions
    api_key_env: str = "LANGDOCK_API_KEY"
    timeout_s: float = Field(default=600.0, gt=0)  # per attempt; reasoning models can take minutes
    connect_timeout_s: float = Field(default=30.0, gt=0)
    # An answer (decompressed) past this is not kept: memory stays bounded by concurrency x it.
    max_answer_mb: float = Field(default=64.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return url
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError as exc:
            raise ValueError(f"base_url is not a usable URL: {exc}") from None
        if "@" in parts.netloc:  # user:password@host: logged with the URL, sent to every hop
            raise ValueError(
                f"base_url must not carry credentials (user:password@{parts.hostname}); put the "
                "API key in the environment variable endpoint.api_key_env names"
            )
        if parts.scheme not in ("http", "https"):
            raise ValueError(
                f"base_url {url!r} must start with https:// (or http:// for a local server)"
            )
        return url

    @property
    def url(self) -> str:
        base = self.base_url or f"{LANGDOCK_HOST}/openai/{self.region}/v1"
        return base.rstrip("/")


class Limit(_Strict):
    rpm: int = Field(default=DEFAULT_RPM, gt=0)
    tpm: int = Field(default=DEFAULT_TPM, gt=0)


class Retry(_Strict):
    max_attempts: int = Field(default=8, ge=1)
    initial_wait_s: float = Field(default=1.0, ge=0)
    max_wait_s: float = Field(default=60.0, ge=0)


class CircuitBreakerConfig(_Strict):
    """Stop the run when the last `failures` attempts across rows all failed the same way
    (see batcher/breaker.py for why these defaults trip before a row uses up its attempts)."""

    failures: int = Field(default=10, ge=2)
    window_s: float = Field(default=60.0, gt=0)


class LimiterConfig(_Strict):
    backend: Literal["local", "redis"] = "local"
    url: str = "redis://127.0.0.1:6379/0"
    workspace: str = "default"
    # Redis lost mid-run: stop, or go on with a local limiter at `local_share` of the quota.
    on_limiter_failure: Literal["stop", "local"] = "stop"
    local_share: float = Field(default=0.5, gt=0, le=1)
    # Fraction of each limit we aim for; the rest absorbs estimate error and clock jitter.
    headroom: float = Field(default=0.99, gt=0, le=1)
    # The longest pause a server may ask for (retry-after, x-ratelimit-reset-*): a per-minute
    # quota never needs more than the minute; "retry-after: 100000" must not stall the night.
    max_pause_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    adaptive: bool = True  # slow down on 429s we did not expect (someone else uses the quota)


class Price(_Strict):
    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)


class Message(_Strict):
    role: str
    content: str
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        problem = role_problem(role)
        if problem:
            raise ValueError(problem)
        return role


class Images(_Strict):
    """How admission counts image parts (batcher/tokens.py, batcher/images.py)."""

    # gpt-4o-mini: "billing" charges 2,833 + 5,667 a tile (what its usage reports; safe),
    # "context" the 85 + 170 the model sees (faster if Azure's limiter charges that).
    count_as: Literal["billing", "context"] = "billing"
    # Remote URLs: read each image's header once for its size instead of charging the worst case.
    fetch_sizes: bool = False
    fetch_timeout_s: float = Field(default=5.0, gt=0)


class MetricsConfig(_Strict):
    """Prometheus: `/metrics` while the run goes, a textfile at its end (batcher/metrics.py)."""

    prometheus_port: int | None = Field(default=None, ge=0, le=65535)
    host: str = "127.0.0.1"  # another interface exposes the metrics beyond this machine
    textfile: Path | None = None  # node_exporter's textfile collector; relative: to the job file


class NotifyConfig(_Strict):
    webhook: str | None = None  # POSTed one JSON summary when a run finishes or stops
    timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("webhook")
    @classmethod
    def _http_webhook(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http(s):// URL")
        return url


class ReportConfig(_Strict):
    html: Path | None = None  # write `batcher report --html` here after each run


class StructuredConfig(_Strict):
    """Self-repair of structured answers (params.response_format json_schema)."""

    # An answer that does not parse or validate is asked again this often, with the
    # validator's message as a follow-up turn.
    max_repairs: int = Field(default=2, ge=0, le=10)
    # An answer cut off (finish_reason: length) is asked again with twice the max_tokens, up
    # to this.
    max_tokens_ceiling: int = Field(default=4096, ge=1)


class CacheConfig(_Strict):
    """The response store (batcher/cache.py): answers kept by request, shared by every job."""

    enabled: bool = True
    path: Path | None = None  # relative to the job file; default $XDG_CACHE_HOME/batcher/


class Job(_Strict):
    input: Path
    output: Path
    cache: CacheConfig = CacheConfig()
    structured: StructuredConfig = StructuredConfig()
    metrics: MetricsConfig = MetricsConfig()
    notify: NotifyConfig = NotifyConfig()
    report: ReportConfig = ReportConfig()
    images: Images = Images()
    input_format: Literal["auto", "jsonl", "parquet", "batch"] = "auto"
    id_column: str | None = None
    model: str | None = None
    endpoint: Endpoint = Endpoint()
    messages: list[Message] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Limit] = Field(default_factory=dict)
    concurrency: int = Field(default=64, ge=1, le=4096)
    # Input columns copied into the output; "all": every input column (readers.resolve_keep).
    keep_columns: list[str] | Literal["all"] = Field(default_factory=list)
    # input: the output's rows in the input's order (joined by id); completion: as answered.
    output_order: Literal["input", "completion"] = "input"
    # Identical requests in one run share one request and one answer; None: only when the
    # request is deterministic (temperature 0).
    dedupe: bool | None = None
    # A hard cap on the whole job's spending, across its runs (batcher/budget.py).
    max_cost_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    on_bad_row: Literal["fail", "skip"] = "fail"
    allow_any_model: bool = False
    assumed_max_tokens: int = Field(default=DEFAULT_ASSUMED_MAX_TOKENS, gt=0)
    retry: Retry = Retry()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    limiter: LimiterConfig = LimiterConfig()
    grace_period_s: float = Field(default=30.0, ge=0)
    progress_interval_s: float = Field(default=10.0, gt=0)
    prices: dict[str, Price] = Field(default_factory=dict)
    # Where the job file lives; relative paths were resolved against it.
    job_dir: Path = Field(default=Path("."), exclude=True)
    # parquet, or OpenAI's Batch-API output JSONL (batcher/writer.py, write_batch_output).
    output_format: Literal["parquet", "batch"] = "parquet"
    # Local home of the journal, lock and local copies when input/output are URLs
    # (batcher/storage.py); relative to the job file, default its `.batcher/` folder.
    state_dir: Path | None = None
    # Set by job_from_mapping only (not job-file keys): see the input_url property.
    _input_url: str | None = PrivateAttr(default=None)
    _output_url: str | None = PrivateAttr(default=None)

    @field_validator("input", "output", mode="before")
    @classmethod
    def _plain_path(cls, value: Any) -> Any:
        if isinstance(value, str) and (not value.strip() or "\x00" in value):
            raise ValueError("must be a file path or URL (not empty, no NUL character)")
        return value

    @field_validator("params")
    @classmethod
    def _no_unsupported_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, where="params")
        return params

    @field_validator("keep_columns")
    @classmethod
    def _keep_columns(cls, names: list[str] | Literal["all"]) -> list[str] | Literal["all"]:
        if names == "all":
            return names
        clash = [n for n in names if n in OUTPUT_COLUMNS]
        if clash:
            raise ValueError(
                f"{', '.join(map(repr, clash))} would overwrite batcher's own output "
                f"column{'s' if len(clash) > 1 else ''} ({', '.join(OUTPUT_COLUMNS)}); rename "
                "that column in the input, or leave it out"
            )
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed twice")
        return names

    @model_validator(mode="after")
    def _model_rules(self) -> Job:
        if self.model is not None:
            check_model(self.model, self.allow_any_model, where="model")
            check_o_series_params(self.model, self.params, where="params")
        if "messages" in self.params or "model" in self.params:
            raise ValueError("params must not hold 'messages' or 'model': use the top-level keys")
        if self.model is not None and not self.may_name_other_models:
            self.check_limit_models({self.model}, as_error=ValueError)
        return self

    @property
    def input_url(self) -> str | None:
        """The s3:// gs:// hf:// URL `input:` named; `input` is then its local copy in
        state_dir, which the run reads (batcher/storage.py)."""
        return self._input_url

    @property
    def output_url(self) -> str | None:
        """The URL `output:` named; `output` is then the local copy the run writes (its
        journal beside it), published to this URL at the end."""
        return self._output_url

    @property
    def may_name_other_models(self) -> bool:
        """Can requests name models other than `model`? Batch-API lines name their own; with
        input_format auto a JSONL input may be one (the reader decides)."""
        if self.input_format == "auto":
            parquet = self.input.suffix.lower() in (".parquet", ".pq")
            return not parquet and self.messages is None  # a template job reads plain rows
        return self.input_format == "batch"

    def check_limit_models(
        self, models_seen: set[str], *, as_error: type[Exception] = JobSpecError
    ) -> None:
        """Refuse a `limits:` entry for a model no request names: a typo there would
        silently pace that model at the default limits. The engine calls it after its scan
        with the models the request bodies name (Batch-API input); template jobs are also
        checked when the job file is read."""
        unused = sorted(set(self.limits) - models_seen)
        if unused:
            used = ", ".join(sorted(models_seen)) or "none"
            raise as_error(
                f"limits: {', '.join(map(repr, unused))} "
                f"{'is not a model' if len(unused) == 1 else 'are not models'} this job "
                f"sends to (its requests name: {used}); a typo here would silently give the "
                "default limits. Correct the name or remove the entry"
            )

    def limit_for(self, model: str) -> Limit:
        return self.limits.get(model, Limit())


def role_problem(role: Any) -> str | None:
    """Why `role` is not a chat message role, in words (with the likely intended one)."""
    if isinstance(role, str) and role in MESSAGE_ROLES:
        return None
    hint = ""
    if isinstance(role, str):
        close = difflib.get_close_matches(role.lower(), MESSAGE_ROLES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"role {role!r} is not a chat role{hint}; use one of {', '.join(MESSAGE_ROLES)}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def param_problem(key: str, value: Any) -> str | None:
    """What is wrong with one chat parameter's value, per OpenAI's documented ranges, or None.

    The API answers 400 for each such row after a round trip; a job-wide typo (temperature: 7)
    is cheaper to say once, before anything is sent. Null means "the default" there too."""
    if key not in _CHECKED_PARAMS or value is None:
        return None
    if key in PARAM_RANGES:
        low, high = PARAM_RANGES[key]
        if not _number(value) or not low <= value <= high:
            return f"must be a number from {low:g} to {high:g} (not {value!r})"
    elif key == "seed":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be a whole number (not {value!r})"
    elif key == "stop":
        if isinstance(value, str):
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"must be a string or a list of strings (not {value!r})"
        if len(value) > MAX_STOP_SEQUENCES:
            return f"takes at most {MAX_STOP_SEQUENCES} stop sequences (not {len(value)})"
    return None


def check_params(params: dict[str, Any], *, where: str) -> None:
    bad = [p for p in UNSUPPORTED_PARAMS if p in params]
    if bad:
        raise ValueError(
            f"{where}: {', '.join(bad)} not supported by the Langdock API; remove "
            f"{'it' if len(bad) == 1 else 'them'}"
        )
    if params.get("stream"):
        raise ValueError(f"{where}: stream: true is not supported; batcher reads whole answers")
    for key in ("max_tokens", "max_completion_tokens"):
        value = params.get(key)
        if key in params and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            # Admission charges max_tokens up front: it must be a count, found before paying.
            raise ValueError(
                f"{where}.{key}: must be a whole number of tokens, at least 1 (not {value!r})"
            )
    for key, value in params.items():
        problem = param_problem(key, value)
        if problem:
            raise ValueError(f"{where}.{key}: {problem}")


def check_model(model: str, allow_any_model: bool, *, where: str) -> None:
    if not allow_any_model and model not in SUPPORTED_MODELS:
        raise ValueError(
            f"{where}: unknown model {model!r}; Langdock serves {', '.join(SUPPORTED_MODELS)}. "
            "For a workspace with its own provider keys set allow_any_model: true"
        )


def check_o_series_params(model: str, params: dict[str, Any], *, where: str) -> None:
    """The o-series refuse sampling parameters; say so before sending instead of after."""
    if not is_o_series(model):
        return
    temp = params.get("temperature")
    if temp is not None and temp != 1:
        raise ValueError(
            f"{where}: {model} accepts only the default temperature (1); remove temperature"
        )
    bad = [p for p in O_SERIES_REFUSED_PARAMS if p in params]
    if bad:
        raise ValueError(f"{where}: {model} does not accept {', '.join(bad)}; remove them")
    if "max_tokens" in params and "max_completion_tokens" in params:
        raise ValueError(f"{where}: give max_completion_tokens or max_tokens, not both")


def _format_validation_error(path: Path | str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid job file"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see the README's job file reference)"
        # A message that names its own place ("params.temperature: ...") is not prefixed again.
        lines.append(f"  {msg}" if msg.startswith((f"{loc}:", f"{loc}.")) else f"  {loc}: {msg}")
    return "\n".join(lines)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"key {key!r} on line {line} repeats line {first}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: YAML keeps the last value
    silently, so `model:` written twice would send to the model the user did not look at."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by the mapping's own keys
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # an unhashable key: PyYAML's own error says so
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """The job file's YAML, refusing duplicate keys (yaml.YAMLError for any problem)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def load_job(path: str | Path) -> Job:
    """Read, validate and resolve a job file; every problem becomes a JobSpecError."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobSpecError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"{path}: cannot read job file: {exc}") from None
    except _DuplicateKey as exc:
        raise JobSpecError(
            f"{path}:{exc.line}: key {exc.key!r} is given twice in one mapping (first on line "
            f"{exc.first}); YAML would silently keep only the last. Remove one of them"
        ) from None
    except yaml.YAMLError as exc:
        raise JobSpecError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:  # deeply nested flow collections
        raise JobSpecError(f"{path}: not valid YAML: nested too deeply") from None
    return job_from_mapping(raw, path.resolve().parent, source=str(path))


def job_from_mapping(raw: Any, job_dir: Path, *, source: str = "job") -> Job:
    """A job from a mapping with a job file's keys (the Python API's dict); relative paths are
    resolved against `job_dir`. Every problem becomes a JobSpecError naming `source`."""
    path = source
    if not isinstance(raw, dict):
        raise JobSpecError(f"{path}: a job file is a YAML mapping (input:, output:, model:, ...)")
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise JobSpecError(f"{path}: key {bad_keys[0]!r} is not a name; keys are words")
    urls: dict[str, str] = {}
    for key in ("input", "output"):
        value = raw.get(key)
        if is_url(value):  # not a path: never joined with job_dir
            try:
                urls[key] = check_url(value.strip())
            except ValueError as exc:
                raise JobSpecError(f"{path}: {key}: {exc}") from None
    try:
        job = Job.model_validate({**raw, "job_dir": job_dir})
    except ValidationError as exc:
        raise JobSpecError(_format_validation_error(path, exc)) from None
    state_dir = job_dir / (job.state_dir or ".batcher")
    job = job.model_copy(
        update={
            # A URL's run works on a local copy in state_dir (batcher/storage.py).
            **{key: state_path(state_dir, url) for key, url in urls.items()},
            **{key: job_dir / getattr(job, key) for key in ("input", "output") if key not in urls},
            "state_dir": state_dir if job.state_dir is not None or urls else None,
        }
    )
    job._input_url, job._output_url = urls.get("input"), urls.get("output")
    try:
        same = job.output.resolve() == job.input.resolve()
        is_job_file = os.path.isfile(path) and job.output.resolve() == Path(path).resolve()
        output_is_dir = job.output.is_dir()
        existing = job.output.lstat() if os.path.lexists(job.output) else None
    except (OSError, ValueError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise JobSpecError(f"{path}: input or output is not a usable path: {exc}") from None
    if same:
        raise JobSpecError(f"{path}: output is the input file; choose another output path")
    if is_job_file:
        raise JobSpecError(f"{path}: output is this job file; choose another output path")
    # The output is replaced whole (a new file renamed over it): a link would become a file
    # and its target never written, a FIFO or a device (/dev/null) would be replaced.
    if existing is not None and stat.S_ISLNK(existing.st_mode):
        raise JobSpecError(
            f"{path}: output: {job.output} is a symbolic link; batcher replaces its output "
            f"whole, which would replace the link. Give the file it points to: "
            f"{job.output.resolve()}"
        )
    if existing is not None and not (
        stat.S_ISREG(existing.st_mode) or stat.S_ISDIR(existing.st_mode)
    ):
        raise JobSpecError(
            f"{path}: output: {job.output} is not a regular file (a pipe, socket or device); "
            "give the path of a file to write"
        )
    if (
        existing is not None
        and stat.S_ISREG(existing.st_mode)
        and existing.st_size > 0
        and job.output_format == "parquet"
        and not _starts_with(job.output, b"PAR1")
    ):
        raise JobSpecError(
            f"{path}: output: {job.output} exists and is not a Parquet file; batcher would "
            "replace it. Choose another output path (or remove that file if it is an old output)"
        )
    if job.output.name.endswith(STATE_SUFFIXES):
        raise JobSpecError(
            f"{path}: output: {job.output.name} is named like batcher's own files beside an "
            f"output ({', '.join(STATE_SUFFIXES)}): it could be another job's journal. "
            "Choose another output name"
        )
    if output_is_dir:
        raise JobSpecError(
            f"{path}: output: {job.output} is a directory; give a file path inside it "
            f"(e.g. {job.output / 'results.parquet'})"
        )
    problem = output_suffix_problem(urls.get("output") or str(job.output), job.output_format)
    if problem:
        raise JobSpecError(f"{path}: {problem}")
    return job


def _starts_with(file: Path, magic: bytes) -> bool:
    try:
        with file.open("rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return True  # unreadable: the write will say why


# What batcher keeps beside an output (`<output>.journal`, ...): never an output itself.
STATE_SUFFIXES: tuple[str, ...] = (".journal", ".lock", ".history.jsonl")

# Suffixes that say "not Parquet": such a name with Parquet bytes inside misleads every tool.
TEXT_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")


def output_suffix_problem(output: str, output_format: str) -> str | None:
    """The output's name contradicts output_format (other or no suffixes are left alone)."""
    name = output.rstrip("/").rsplit("/", 1)[-1]
    suffix = Path(name).suffix.lower()
    if output_format == "parquet" and suffix in TEXT_SUFFIXES:
        return (
            f"output: {name} ends in {suffix} but output_format is parquet (the default), so "
            f"the file would hold Parquet. Name it {Path(name).stem}.parquet, or set "
            "output_format: batch for OpenAI's Batch-API JSONL"
        )
    if output_format == "batch" and suffix in PARQUET_SUFFIXES:
        return (
            f"output: {name} ends in {suffix} but output_format: batch writes JSONL. Name it "
            f"{Path(name).stem}.jsonl, or leave output_format out for Parquet"
        )
    return None


def request_fingerprint(job: Job, input_digest: str) -> str:
    """What shapes the requests: editing any of it makes old answers belong to another job.

    Limits, concurrency, endpoint, retry and limiter settings are left out on purpose: changing
    how fast we send does not change what we send.
    """
    shape = {
        "model": job.model,
        "messages": [m.model_dump(exclude_none=True) for m in job.messages or []],
        "params": job.params,
        "id_column": job.id_column,
        "input_format": job.input_format,
        "keep_columns": job.keep_columns,
        "input": input_digest,
    }
    blob = json.dumps(shape, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
