"""The job file: typed, strict, validated. `load_job(path)` is the only way in.

Every key is documented in the README ("Job file reference"); unknown keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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

LANGDOCK_HOST = "https://api.langdock.com"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Strict):
    region: Literal["eu", "us", "global", "ch"] = "eu"
    base_url: str | None = None  # overrides region; the POST goes to {base_url}/chat/completions
    api_key_env: str = "LANGDOCK_API_KEY"
    timeout_s: float = Field(600.0, gt=0)  # per attempt; reasoning models can take minutes
    connect_timeout_s: float = Field(30.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url {url!r} must start with https:// (or http:// for a local server)"
            )
        return url

    @property
    def url(self) -> str:
        base = self.base_url or f"{LANGDOCK_HOST}/openai/{self.region}/v1"
        return base.rstrip("/")


class Limit(_Strict):
    rpm: int = Field(DEFAULT_RPM, gt=0)
    tpm: int = Field(DEFAULT_TPM, gt=0)


class Retry(_Strict):
    max_attempts: int = Field(8, ge=1)
    initial_wait_s: float = Field(1.0, ge=0)
    max_wait_s: float = Field(60.0, ge=0)


class LimiterConfig(_Strict):
    backend: Literal["local", "redis"] = "local"
    url: str = "redis://127.0.0.1:6379/0"
    workspace: str = "default"
    # Redis lost mid-run: stop, or go on with a local limiter at `local_share` of the quota.
    on_limiter_failure: Literal["stop", "local"] = "stop"
    local_share: float = Field(0.5, gt=0, le=1)
    # Fraction of each limit we aim for; the rest absorbs estimate error and clock jitter.
    headroom: float = Field(0.985, gt=0, le=1)
    adaptive: bool = True  # slow down on 429s we did not expect (someone else uses the quota)


class Price(_Strict):
    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)


class Message(_Strict):
    role: str
    content: str
    name: str | None = None


class Job(_Strict):
    input: Path
    output: Path
    input_format: Literal["auto", "jsonl", "parquet", "batch"] = "auto"
    id_column: str | None = None
    model: str | None = None
    endpoint: Endpoint = Endpoint()
    messages: list[Message] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Limit] = Field(default_factory=dict)
    concurrency: int = Field(64, ge=1, le=4096)
    keep_columns: list[str] = Field(default_factory=list)
    on_bad_row: Literal["fail", "skip"] = "fail"
    allow_any_model: bool = False
    assumed_max_tokens: int = Field(DEFAULT_ASSUMED_MAX_TOKENS, gt=0)
    retry: Retry = Retry()
    limiter: LimiterConfig = LimiterConfig()
    grace_period_s: float = Field(30.0, ge=0)
    progress_interval_s: float = Field(10.0, gt=0)
    prices: dict[str, Price] = Field(default_factory=dict)
    # Where the job file lives; relative paths were resolved against it.
    job_dir: Path = Field(Path("."), exclude=True)

    @field_validator("params")
    @classmethod
    def _no_unsupported_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        check_params(params, where="params")
        return params

    @model_validator(mode="after")
    def _model_rules(self) -> Job:
        if self.model is not None:
            check_model(self.model, self.allow_any_model, where="model")
            check_o_series_params(self.model, self.params, where="params")
        if "messages" in self.params or "model" in self.params:
            raise ValueError("params must not hold 'messages' or 'model': use the top-level keys")
        return self

    def limit_for(self, model: str) -> Limit:
        return self.limits.get(model, Limit())


def check_params(params: dict[str, Any], *, where: str) -> None:
    bad = [p for p in UNSUPPORTED_PARAMS if p in params]
    if bad:
        raise ValueError(
            f"{where}: {', '.join(bad)} not supported by the Langdock API; remove "
            f"{'it' if len(bad) == 1 else 'them'}"
        )
    if params.get("stream"):
        raise ValueError(f"{where}: stream: true is not supported; batcher reads whole answers")


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


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid job file"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see the README's job file reference)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_job(path: str | Path) -> Job:
    """Read, validate and resolve a job file; every problem becomes a JobSpecError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobSpecError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"{path}: cannot read job file: {exc}") from None
    except yaml.YAMLError as exc:
        raise JobSpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise JobSpecError(f"{path}: a job file is a YAML mapping (input:, output:, model:, ...)")
    job_dir = path.resolve().parent
    try:
        job = Job.model_validate({**raw, "job_dir": job_dir})
    except ValidationError as exc:
        raise JobSpecError(_format_validation_error(path, exc)) from None
    job = job.model_copy(update={"input": job_dir / job.input, "output": job_dir / job.output})
    if job.output.resolve() == job.input.resolve():
        raise JobSpecError(f"{path}: output is the input file; choose another output path")
    return job


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
