"""The bundled Langdock-compatible local server: the README demo's default and the tests' backbone.

It behaves like Langdock in front of Azure OpenAI (see langdock-api.md), not like a convenient
double: same routes (regions, /api/public), Bearer auth, the same refusals (unsupported params,
o-series rules, unknown models), Azure's admission-time token charging over sliding windows,
429s with `retry-after(-ms)`, answers shaped like the real ones with dated model names.

Pieces, from pure to I/O:
- `SlidingWindowQuota`: one model's RPM/TPM limits over several sliding windows; clock injected,
  no I/O, unit-tested with a fake clock.
- `MockConfig`: every knob (limits, windows, faults, latency), frozen and validated.
- `MockServer`: the aiohttp app; `ThreadedMockServer` runs one in a background thread for sync
  code and subprocess tests; `serve_forever` / `main_serve` back `batcher serve-mock`.

Deterministic per-row faults are asked for by markers in the last user message:
`[[fail-400]]`, `[[fail-500]]`, `[[fail-500-once]]`, `[[drop-once]]`, `[[broken-json]]`,
`[[slow]]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import random
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from batcher.models import (
    DEFAULT_ASSUMED_MAX_TOKENS,
    DEFAULT_RPM,
    DEFAULT_TPM,
    O_SERIES_REFUSED_PARAMS,
    SUPPORTED_MODELS,
    UNSUPPORTED_PARAMS,
    is_o_series,
)
from batcher.tokens import count_prompt_tokens, get_encoding

REGIONS: tuple[str, ...] = ("eu", "us", "global", "ch")

# The dated names Azure reports in `model`; a name not listed is echoed back unchanged.
DATED_MODEL_NAMES: dict[str, str] = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "o1-preview": "o1-preview-2024-09-12",
    "o3-mini": "o3-mini-2025-01-31",
    "gpt-4": "gpt-4-0613",
    "gpt-35-turbo": "gpt-35-turbo-0125",
}

LABELS: tuple[str, ...] = ("positive", "negative", "neutral")

MARKER_FAIL_400 = "[[fail-400]]"
MARKER_FAIL_500 = "[[fail-500]]"
MARKER_FAIL_500_ONCE = "[[fail-500-once]]"
MARKER_DROP_ONCE = "[[drop-once]]"
MARKER_BROKEN_JSON = "[[broken-json]]"
MARKER_SLOW = "[[slow]]"

_EPS = 1e-9
_MAX_BODY_BYTES = 64 * 1024**2


# --------------------------------------------------------------------------------------------
# Sliding-window quota (pure)


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The verdict on one request. `retry_after_s` is exact: after that long it fits."""

    admitted: bool
    retry_after_s: float | None = None  # None when admitted, or when it can never fit
    limited_by: str | None = None  # "requests" | "tokens" when refused
    too_large: bool = False  # more than the whole minute's quota: no wait helps


@dataclass(frozen=True, slots=True)
class QuotaState:
    """What the x-ratelimit-* headers report: the tightest window, right now."""

    remaining_requests: int | None  # None: unlimited
    remaining_tokens: int | None
    reset_requests_s: float  # until the tightest window's oldest entry expires
    reset_tokens_s: float


class _Window:
    """One sliding window: the client usage of the last `length_s` seconds."""

    __slots__ = ("events", "length_s", "request_cap", "requests", "strict", "token_cap", "tokens")

    def __init__(
        self, length_s: float, request_cap: float | None, token_cap: float | None, strict: bool
    ) -> None:
        self.length_s = length_s
        self.request_cap = request_cap
        self.token_cap = token_cap
        self.strict = strict
        self.events: deque[tuple[float, int]] = deque()  # (time, tokens); tokens 0 = failed
        self.requests = 0
        self.tokens = 0

    def expire(self, now: float) -> None:
        # An entry made at t counts while now < t + length_s.
        cutoff = now - self.length_s
        events = self.events
        while events and events[0][0] <= cutoff:
            _, tok = events.popleft()
            self.requests -= 1
            self.tokens -= tok

    def add(self, now: float, tokens: int) -> None:
        self.events.append((now, tokens))
        self.requests += 1
        self.tokens += tokens

    def _fits(self, requests: int, tokens: int, cost: int) -> bool:
        if not self.strict and requests == 0:
            # A short window holds at least one request, else a small limit (or a prompt bigger
            # than limit*w/60) could never pass; the 60 s window still caps the minute.
            return True
        if self.request_cap is not None and requests + 1 > self.request_cap + _EPS:
            return False
        return self.token_cap is None or tokens + cost <= self.token_cap + _EPS

    def blocked_by(self, cost: int) -> str:
        if self.request_cap is not None and self.requests + 1 > self.request_cap + _EPS:
            return "requests"
        return "tokens"

    def wait_for(self, cost: int, now: float) -> float | None:
        """Seconds until a request of `cost` tokens fits; 0 now; None never."""
        requests, tokens = self.requests, self.tokens
        if self._fits(requests, tokens, cost):
            return 0.0
        for t, tok in self.events:
            requests -= 1
            tokens -= tok
            if self._fits(requests, tokens, cost):
                return max(0.0, t + self.length_s - now)
        return None

    def remaining(self) -> tuple[float | None, float | None]:
        r = None if self.request_cap is None else self.request_cap - self.requests
        t = None if self.token_cap is None else self.token_cap - self.tokens
        return r, t

    def reset_s(self, now: float) -> float:
        return max(0.0, self.events[0][0] + self.length_s - now) if self.events else 0.0


class SlidingWindowQuota:
    """One model's RPM/TPM limits, enforced like Azure: over sliding windows, at admission.

    Each window of `w` seconds allows `limit * w / 60` requests and tokens; a request is admitted
    only if it fits every window for both. The longest window (60 s) is strict: a request that
    cannot fit even an empty minute is "too large". Shorter windows always take one request
    when they hold none, so small limits still make progress at the minute's pace.

    Foreign load (other users of the workspace, invisible to clients) is modelled as usage at
    the constant rate `foreign_share * limit` per minute. Sliding over a constant-rate stream,
    every window always holds `foreign_share` of its allowance, so clients keep
    `(1 - foreign_share)` of each window: exactly what the caps here are.
    """

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        windows_s: tuple[float, ...] = (60.0, 10.0),
        foreign_share: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not windows_s or min(windows_s) <= 0:
            raise ValueError("windows_s needs at least one positive window length")
        longest = max(windows_s)
        keep = 1.0 - foreign_share
        self.rpm = rpm
        self.tpm = tpm
        self.clock = clock
        self._windows = [
            _Window(
                w,
                None if rpm is None else rpm * w / 60.0 * keep,
                None if tpm is None else tpm * w / 60.0 * keep,
                strict=(w == longest),
            )
            for w in sorted(set(windows_s), reverse=True)
        ]

    def _expire(self, now: float) -> None:
        for w in self._windows:
            w.expire(now)

    def try_admit(self, tokens: int) -> QuotaDecision:
        """Admit and charge `tokens` now, or say how long until this request would fit."""
        now = self.clock()
        self._expire(now)
        worst = 0.0
        limited_by: str | None = None
        for w in self._windows:
            wait = w.wait_for(tokens, now)
            if wait is None:
                return QuotaDecision(False, None, w.blocked_by(tokens), too_large=True)
            if wait > 0 and (limited_by is None or wait > worst):
                worst, limited_by = wait, w.blocked_by(tokens)
        if limited_by is not None:
            return QuotaDecision(False, worst, limited_by)
        for w in self._windows:
            w.add(now, tokens)
        return QuotaDecision(True)

    def record_failed(self) -> None:
        """A refused request that still counts as a request (Azure: failures may count)."""
        now = self.clock()
        self._expire(now)
        for w in self._windows:
            w.add(now, 0)

    def state(self) -> QuotaState:
        now = self.clock()
        self._expire(now)
        req: tuple[float, float] | None = None  # (remaining, reset) of the tightest window
        tok: tuple[float, float] | None = None
        for w in self._windows:
            r, t = w.remaining()
            if r is not None and (req is None or r < req[0]):
                req = (r, w.reset_s(now))
            if t is not None and (tok is None or t < tok[0]):
                tok = (t, w.reset_s(now))
        return QuotaState(
            remaining_requests=None if req is None else max(0, math.floor(req[0] + _EPS)),
            remaining_tokens=None if tok is None else max(0, math.floor(tok[0] + _EPS)),
            reset_requests_s=0.0 if req is None else req[1],
            reset_tokens_s=0.0 if tok is None else tok[1],
        )

    def clear(self) -> None:
        for w in self._windows:
            w.events.clear()
            w.requests = w.tokens = 0


def format_reset(seconds: float) -> str:
    """OpenAI-style duration for x-ratelimit-reset-*: "120ms", "6s", "6.5s", "1m30s"."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60.0)
    sec = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{sec}s" if minutes >= 1 else f"{sec}s"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class MockConfig:
    """Every knob of the mock server. Limits are per model; `None` means unlimited."""

    api_keys: frozenset[str] | None = None  # None: any non-empty Bearer key is accepted
    models: tuple[str, ...] | None = SUPPORTED_MODELS  # None: any model name is served
    rpm: int | None = DEFAULT_RPM
    tpm: int | None = DEFAULT_TPM
    model_limits: Mapping[str, tuple[int | None, int | None]] = field(default_factory=dict)
    windows_s: tuple[float, ...] = (60.0, 10.0)
    retry_after_headers: bool = True  # the real Langdock may not pass them through
    ratelimit_headers: bool = True  # x-ratelimit-*
    failed_requests_count: bool = False  # a 429'd request still counts as a request
    foreign_share: float = 0.0  # share of every limit used by invisible other users
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    seed: int = 0
    error_rate_5xx: float = 0.0
    drop_rate: float = 0.0
    rate_limit_storm_s: float = 0.0  # 429 to everything during the first N seconds
    slow_marker_s: float = 2.0  # extra latency for [[slow]]
    stats_bucket_s: float = 1.0  # resolution of the admitted-per-interval series

    def __post_init__(self) -> None:
        # Normalise collections so callers may pass sets/lists/dicts and the config stays frozen.
        if self.api_keys is not None:
            keys = frozenset(self.api_keys)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise ValueError("api_keys must be None or a non-empty set of non-empty strings")
            object.__setattr__(self, "api_keys", keys)
        if self.models is not None:
            models = tuple(self.models)
            if not models:
                raise ValueError("models must be None (accept any) or a non-empty list")
            object.__setattr__(self, "models", models)
        limits = {}
        for model, pair in dict(self.model_limits).items():
            rpm, tpm = pair
            limits[model] = (rpm, tpm)
            _check_limit(f"model_limits[{model!r}] rpm", rpm)
            _check_limit(f"model_limits[{model!r}] tpm", tpm)
        object.__setattr__(self, "model_limits", limits)
        _check_limit("rpm", self.rpm)
        _check_limit("tpm", self.tpm)
        windows = tuple(float(w) for w in self.windows_s)
        if not windows or min(windows) <= 0 or max(windows) != 60.0:
            raise ValueError("windows_s must be positive lengths in seconds, the longest 60")
        object.__setattr__(self, "windows_s", windows)
        if not 0.0 <= self.foreign_share < 1.0:
            raise ValueError("foreign_share must be in [0, 1)")
        for name in ("error_rate_5xx", "drop_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        for name in ("latency_s", "latency_jitter_s", "rate_limit_storm_s", "slow_marker_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.stats_bucket_s <= 0:
            raise ValueError("stats_bucket_s must be > 0")

    def limits_for(self, model: str) -> tuple[int | None, int | None]:
        return self.model_limits.get(model, (self.rpm, self.tpm))


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None (unlimited), got {value!r}")


# --------------------------------------------------------------------------------------------
# Requests and answers (pure)


class _Refusal(Exception):
    """An OpenAI-style error answer, raised while validating a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return _text_of(msg.get("content"))
    return ""


def canonical_digest(body: Mapping[str, Any]) -> bytes:
    """16-byte hash of a request body, independent of key order and whitespace."""
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(raw.encode(), digest_size=16).digest()


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Refusal(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value!r} instead.",
            param=name,
            code="integer_below_min_value",
        )
    return value


def validate_request(body: Any, models: tuple[str, ...] | None) -> dict[str, Any]:
    """Refuse what Langdock/Azure refuse; returns the body when it would be served."""
    if not isinstance(body, dict):
        raise _Refusal(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Refusal(
            400, "Missing required parameter: 'model'.", param="model", code="missing_required"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Refusal(
            400,
            "Missing required parameter: 'messages' (a non-empty array).",
            param="messages",
            code="missing_required",
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _Refusal(
                400,
                f"Invalid 'messages[{i}]': expected an object with a 'role'.",
                param=f"messages[{i}]",
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _Refusal(
                400,
                f"Invalid type for 'messages[{i}].content': expected a string or an array.",
                param=f"messages[{i}].content",
                code="invalid_type",
            )
    for name in UNSUPPORTED_PARAMS:
        if name in body:
            raise _Refusal(
                400,
                f"Unsupported parameter: '{name}' is not supported by this API.",
                param=name,
                code="unsupported_parameter",
            )
    if body.get("stream"):
        raise _Refusal(
            400,
            "Unsupported value: 'stream' is not supported by this API; send stream=false.",
            param="stream",
            code="unsupported_value",
        )
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _Refusal(
            400,
            "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
            param="max_tokens",
            code="invalid_value",
        )
    if is_o_series(model):
        if body.get("max_tokens") is not None:
            raise _Refusal(
                400,
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                param="max_tokens",
                code="unsupported_parameter",
            )
        temperature = body.get("temperature")
        if temperature is not None and temperature != 1:
            raise _Refusal(
                400,
                f"Unsupported value: 'temperature' does not support {temperature} with this "
                "model. Only the default (1) value is supported.",
                param="temperature",
                code="unsupported_value",
            )
        for name in O_SERIES_REFUSED_PARAMS:
            if body.get(name) is not None:
                raise _Refusal(
                    400,
                    f"Unsupported parameter: '{name}' is not supported with this model.",
                    param=name,
                    code="unsupported_parameter",
                )
    _validate_response_format(body)
    if MARKER_FAIL_400 in _last_user_text(messages):
        raise _Refusal(400, "Invalid request (the test asked for it with [[fail-400]]).")
    if models is not None and model not in models:
        raise _Refusal(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return body


def _validate_response_format(body: Mapping[str, Any]) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _Refusal(
            400,
            "Invalid 'response_format.type': expected 'text', 'json_object' or 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )
    if kind == "json_object":
        # OpenAI and Azure insist the prompt asks for JSON in json_object mode.
        if not any("json" in _text_of(m.get("content")).lower() for m in body["messages"]):
            raise _Refusal(
                400,
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'.",
                param="messages",
            )
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _Refusal(
                400,
                "Missing required parameter: 'response_format.json_schema.name'.",
                param="response_format.json_schema.name",
                code="missing_required_parameter",
            )
        if not isinstance(spec.get("schema", {}), dict):
            raise _Refusal(
                400,
                "Invalid 'response_format.json_schema.schema': expected an object.",
                param="response_format.json_schema.schema",
            )


def _pick(key: bytes, salt: str, n: int) -> int:
    """A deterministic index in range(n) from a request digest and a path."""
    h = hashlib.blake2b(key + salt.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % n


def schema_instance(schema: Mapping[str, Any], key: bytes) -> Any:
    """A JSON value valid against `schema`, chosen deterministically from `key`."""
    return _instance(schema, schema, key, "$", 0)


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    node: Any = root
    if ref.startswith("#"):
        for part in ref.lstrip("#").strip("/").split("/"):
            if part:
                node = node[part.replace("~1", "/").replace("~0", "~")]
    return node if isinstance(node, dict) else {}


def _instance(schema: Any, root: Mapping[str, Any], key: bytes, path: str, depth: int) -> Any:
    if not isinstance(schema, dict) or depth > 32:
        return None
    if "$ref" in schema:
        return _instance(_resolve(root, schema["$ref"]), root, key, path, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][_pick(key, path, len(schema["enum"]))]
    for combo in ("anyOf", "oneOf"):
        options = [o for o in schema.get(combo) or [] if o.get("type") != "null"]
        if options:
            return _instance(options[0], root, key, path, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(root, part["$ref"]) if "$ref" in part else part
            for k, v in part.items():
                if k == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **v}
                else:
                    merged.setdefault(k, v)
        return _instance(merged, root, key, path, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {
            name: _instance(sub, root, key, f"{path}.{name}", depth + 1)
            for name, sub in props.items()
        }
    if kind == "array":
        count = max(1, schema.get("minItems", 1))
        if "maxItems" in schema:
            count = min(count, schema["maxItems"])
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_instance(items, root, key, f"{path}[{i}]", depth + 1) for i in range(count)]
    if kind == "integer":
        lo, hi = _bounds(schema, integer=True)
        return lo + _pick(key, path, hi - lo + 1)
    if kind == "number":
        lo, hi = _bounds(schema, integer=False)
        return lo + (hi - lo) * (1 + _pick(key, path, 9)) / 10
    if kind == "boolean":
        return _pick(key, path, 2) == 0
    if kind == "null":
        return None
    return _string_instance(schema, key, path)


def _bounds(schema: Mapping[str, Any], *, integer: bool) -> tuple[Any, Any]:
    """A small range inside the schema's (exclusive) minimum/maximum."""
    step = 1 if integer else 0
    lo = schema.get("minimum")
    if "exclusiveMinimum" in schema:
        lo = schema["exclusiveMinimum"] + step
    hi = schema.get("maximum")
    if "exclusiveMaximum" in schema:
        hi = schema["exclusiveMaximum"] - step
    if lo is None and hi is None:
        lo, hi = (1, 10) if integer else (0.0, 10.0)
    elif lo is None:
        lo = hi - 10
    elif hi is None:
        hi = lo + 10
    if integer:
        lo, hi = math.ceil(lo), math.floor(hi)
    return lo, hi  # for numbers, picks are strictly inside (lo, hi) so exclusive bounds hold


def _string_instance(schema: Mapping[str, Any], key: bytes, path: str) -> str:
    fmt = schema.get("format")
    fixed = {
        "date": "2024-05-13",
        "date-time": "2024-05-13T12:00:00Z",
        "time": "12:00:00Z",
        "email": "someone@example.com",
        "uri": "https://example.com/",
        "uuid": str(uuid.UUID(bytes=hashlib.blake2b(key + path.encode(), digest_size=16).digest())),
    }
    if fmt in fixed:
        return fixed[fmt]
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
    text = f"{words[_pick(key, path, len(words))]} {words[_pick(key, path + '#', len(words))]}"
    min_len = schema.get("minLength", 0)
    if len(text) < min_len:
        text += "x" * (min_len - len(text))
    if "maxLength" in schema:
        text = text[: schema["maxLength"]]
    return text


@functools.lru_cache(maxsize=64)
def _message_overhead(model: str) -> int:
    return count_prompt_tokens([{"role": "assistant", "content": ""}], model)


def _text_tokens(text: str, model: str) -> int:
    """Tokens of an answer's text: the chat counter with the per-message overhead taken out."""
    if not text:
        return 0
    full = count_prompt_tokens([{"role": "assistant", "content": text}], model)
    return max(1, full - _message_overhead(model))


def _truncate(text: str, limit: int, model: str) -> tuple[str, int, bool]:
    """(text cut to at most `limit` tokens, its token count, whether it was cut)."""
    tokens = _text_tokens(text, model)
    if tokens <= limit:
        return text, tokens, False
    lo, hi = 0, len(text)  # longest prefix that fits: binary search on characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_tokens(text[:mid], model) <= limit:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    return cut, _text_tokens(cut, model), True


def answer_content(body: Mapping[str, Any]) -> str:
    """The full (uncut) answer text: a function of the last user message and response_format."""
    user = _last_user_text(body["messages"])
    key = hashlib.blake2b(user.encode(), digest_size=16).digest()
    label = LABELS[_pick(key, "label", len(LABELS))]
    echo = " ".join(user.split()[:8])
    fmt = body.get("response_format") or {}
    kind = fmt.get("type")
    if kind == "json_schema":
        schema = fmt["json_schema"].get("schema") or {"type": "object"}
        text = json.dumps(schema_instance(schema, key), ensure_ascii=False)
    elif kind == "json_object":
        text = json.dumps({"label": label, "echo": echo}, ensure_ascii=False)
    else:
        return f"label: {label}\nYou said: {echo}"
    if MARKER_BROKEN_JSON in user:
        text = text[:-1] + ' "unterminated'
    return text


def build_completion(
    body: Mapping[str, Any], key: bytes, prompt_tokens: int, serial: int
) -> dict[str, Any]:
    """A chat.completion answer, shaped like Azure's via Langdock; `key` makes the id unique."""
    model = body["model"]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    text = answer_content(body)
    if limit is not None:
        text, completion_tokens, cut = _truncate(text, limit, model)
    else:
        completion_tokens, cut = _text_tokens(text, model), False
    return {
        "id": f"chatcmpl-{key.hex()[:20]}{serial:010d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": DATED_MODEL_NAMES.get(model, model),
        "system_fingerprint": "fp_" + hashlib.blake2b(model.encode(), digest_size=5).hexdigest(),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": "length" if cut else "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def admission_cost(body: Mapping[str, Any], prompt_tokens: int) -> int:
    """What Azure charges at admission: the prompt estimate plus the output ceiling."""
    out = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_ASSUMED_MAX_TOKENS
    return prompt_tokens + out


# --------------------------------------------------------------------------------------------
# Counters


class MockStats:
    """What /_mock/stats reports.

    Memory grows only with distinct answered bodies (one 16-byte digest each, about 90 MB per
    million) and with run time (one series entry per bucket).
    """

    def __init__(self, clock: Callable[[], float], t0: float, bucket_s: float) -> None:
        self.clock = clock
        self.t0 = t0
        self.bucket_s = bucket_s
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: dict[str, int] = {}
        self.dropped = 0
        self.rate_limited = 0
        self.admitted: dict[str, list[int]] = {}  # model -> [requests, tokens] charged
        self.accepted: dict[str, list[int]] = {}  # model -> [requests, tokens] answered 200
        self.duplicates = 0
        self.answered: set[bytes] = set()
        self.first_accepted: float | None = None
        self.last_accepted: float | None = None
        self.series: dict[int, list[int]] = {}  # bucket -> [requests, tokens] admitted

    def answer(self, status: int) -> None:
        self.requests += 1
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1
        if status == 429:
            self.rate_limited += 1

    def drop(self) -> None:
        self.requests += 1
        self.dropped += 1

    def admit(self, model: str, tokens: int) -> None:
        now = self.clock() - self.t0
        row = self.admitted.setdefault(model, [0, 0])
        row[0] += 1
        row[1] += tokens
        bucket = self.series.setdefault(int(now // self.bucket_s), [0, 0])
        bucket[0] += 1
        bucket[1] += tokens

    def accept(self, model: str, tokens: int, digest: bytes) -> None:
        now = self.clock() - self.t0
        row = self.accepted.setdefault(model, [0, 0])
        row[0] += 1
        row[1] += tokens
        if digest in self.answered:
            self.duplicates += 1
        else:
            self.answered.add(digest)
        if self.first_accepted is None:
            self.first_accepted = now
        self.last_accepted = now

    def as_dict(self) -> dict[str, Any]:
        def per_model(rows: dict[str, list[int]]) -> dict[str, dict[str, int]]:
            return {m: {"requests": r, "tokens": t} for m, (r, t) in sorted(rows.items())}

        return {
            "uptime_s": self.clock() - self.t0,
            "requests": self.requests,
            "by_status": dict(sorted(self.by_status.items())),
            "dropped": self.dropped,
            "rate_limited": self.rate_limited,
            "accepted": sum(r for r, _ in self.accepted.values()),
            "accepted_tokens": sum(t for _, t in self.accepted.values()),
            "accepted_by_model": per_model(self.accepted),
            "admitted": sum(r for r, _ in self.admitted.values()),
            "admitted_tokens": sum(t for _, t in self.admitted.values()),
            "admitted_by_model": per_model(self.admitted),
            "duplicates": self.duplicates,
            "first_accepted_s": self.first_accepted,
            "last_accepted_s": self.last_accepted,
            "bucket_s": self.bucket_s,
            # [start of bucket in s since start, requests admitted, tokens admitted]
            "admitted_series": [
                [k * self.bucket_s, r, t] for k, (r, t) in sorted(self.series.items())
            ],
        }


# --------------------------------------------------------------------------------------------
# The HTTP server


def _error(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


class MockServer:
    """The Langdock-compatible server on an aiohttp event loop (the caller's)."""

    def __init__(
        self, config: MockConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or MockConfig()
        self.clock = clock
        self._t0 = clock()
        self._rng = random.Random(self.config.seed)
        self._quotas: dict[str, SlidingWindowQuota] = {}
        self._stats = MockStats(clock, self._t0, self.config.stats_bucket_s)
        self._seen_once: dict[str, set[bytes]] = {"fail-500": set(), "drop": set()}
        self._serial = 0
        self._runner: web.AppRunner | None = None
        self.root = ""  # http://host:port
        self.url = ""  # the OpenAI-SDK base URL: {root}/openai/eu/v1

    # -- lifecycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        for prefix in ("", "/api/public"):
            app.router.add_post(f"{prefix}/openai/{{region}}/v1/chat/completions", self._chat)
            app.router.add_get(f"{prefix}/openai/{{region}}/v1/models", self._models)
        app.router.add_get("/_mock/stats", self._stats_route)
        app.router.add_post("/_mock/reset", self._reset_route)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 picks a free port); returns the client base URL."""
        # Load both encodings before the first request: loading on demand blocked the loop for
        # up to a second, bunching the requests that arrived meanwhile into one window.
        await asyncio.to_thread(lambda: [get_encoding(n) for n in ("o200k_base", "cl100k_base")])
        # A short shutdown grace: slow answers must not hold up a test's teardown.
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.root = f"http://{host}:{bound[1]}"
        self.url = self.url_for("eu")
        self._t0 = self.clock()
        self._stats.t0 = self._t0
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url_for(self, region: str = "eu", *, public: bool = False) -> str:
        return f"{self.root}{'/api/public' if public else ''}/openai/{region}/v1"

    def stats(self) -> dict[str, Any]:
        """The counters, plus the limits in force so benchmarks can check against them."""
        config = self.config
        return {
            **self._stats.as_dict(),
            "limits": {
                "rpm": config.rpm,
                "tpm": config.tpm,
                "model_limits": {m: list(pair) for m, pair in config.model_limits.items()},
                "windows_s": list(config.windows_s),
                "foreign_share": config.foreign_share,
            },
        }

    def reset(self, *, quota: bool = False) -> None:
        """Zero the counters (and forget answered bodies); `quota` also empties the windows."""
        self._stats.reset()
        for seen in self._seen_once.values():
            seen.clear()
        if quota:
            for q in self._quotas.values():
                q.clear()

    # -- helpers ------------------------------------------------------------------------------

    def _quota(self, model: str) -> SlidingWindowQuota:
        quota = self._quotas.get(model)
        if quota is None:
            rpm, tpm = self.config.limits_for(model)
            quota = SlidingWindowQuota(
                rpm,
                tpm,
                windows_s=self.config.windows_s,
                foreign_share=self.config.foreign_share,
                clock=self.clock,
            )
            self._quotas[model] = quota
        return quota

    def _auth_error(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            message = (
                "You didn't provide an API key. Send it in the header "
                "'Authorization: Bearer <API key>'."
            )
        elif self.config.api_keys is not None and key not in self.config.api_keys:
            message = "Incorrect API key provided. Check the key in your workspace settings."
        else:
            return None
        body = {"error": {"message": message, "type": "invalid_request_error",
                          "param": None, "code": "invalid_api_key"}}  # fmt: skip
        return _error(401, body)

    def _ratelimit_headers(self, quota: SlidingWindowQuota) -> dict[str, str]:
        if not self.config.ratelimit_headers:
            return {}
        state = quota.state()
        headers: dict[str, str] = {}
        if quota.rpm is not None and state.remaining_requests is not None:
            headers["x-ratelimit-limit-requests"] = str(quota.rpm)
            headers["x-ratelimit-remaining-requests"] = str(state.remaining_requests)
            headers["x-ratelimit-reset-requests"] = format_reset(state.reset_requests_s)
        if quota.tpm is not None and state.remaining_tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(quota.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(state.remaining_tokens)
            headers["x-ratelimit-reset-tokens"] = format_reset(state.reset_tokens_s)
        return headers

    def _too_many(
        self, quota: SlidingWindowQuota, wait_s: float | None, limited_by: str
    ) -> web.Response:
        headers = self._ratelimit_headers(quota)
        kind = "call" if limited_by == "requests" else "token"
        if wait_s is None:
            message = (
                f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
                f"version 2024-10-21 have exceeded {kind} rate limit of your current OpenAI S0 "
                "pricing tier: this request alone is larger than the per-minute limit. "
                "Lower max_tokens or shorten the prompt."
            )
        else:
            whole = max(1, math.ceil(wait_s - _EPS))
            message = (
                f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
                f"version 2024-10-21 have exceeded {kind} rate limit of your current OpenAI S0 "
                f"pricing tier. Please retry after {whole} seconds. Please go here: "
                "https://aka.ms/oai/quotaincrease if you would like to further increase the "
                "default rate limit."
            )
            if self.config.retry_after_headers:
                headers["retry-after"] = str(whole)
                headers["retry-after-ms"] = str(max(1, math.ceil(wait_s * 1000 - _EPS)))
        return _error(429, {"error": {"code": "429", "message": message}}, headers)

    # -- routes -------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            response = await self._chat_inner(request)
        except _Dropped:
            self._stats.drop()
            return web.Response(status=200)  # never written: the transport is closed
        self._stats.answer(response.status)
        return response

    async def _chat_inner(self, request: web.Request) -> web.Response:
        if request.match_info["region"] not in REGIONS:
            return _error(404, _not_found(request.path))
        auth = self._auth_error(request)
        if auth is not None:
            return auth
        try:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise _Refusal(
                    400,
                    "We could not parse the JSON body of your request. The API expects a JSON "
                    "payload; check that you send Content-Type: application/json.",
                ) from None
            validate_request(body, self.config.models)
        except _Refusal as refusal:
            return _error(refusal.status, refusal.body)

        model: str = body["model"]
        quota = self._quota(model)
        now = self.clock()
        storm_left = self._t0 + self.config.rate_limit_storm_s - now
        if storm_left > 0:
            return self._too_many(quota, storm_left, "requests")

        prompt_tokens = count_prompt_tokens(body["messages"], model)
        cost = admission_cost(body, prompt_tokens)
        decision = quota.try_admit(cost)
        if not decision.admitted:
            if self.config.failed_requests_count:
                quota.record_failed()
            return self._too_many(quota, decision.retry_after_s, decision.limited_by or "tokens")
        self._stats.admit(model, cost)
        headers = self._ratelimit_headers(quota)

        # Admitted and charged once; whatever happens next (faults included) is not charged again.
        digest = canonical_digest(body)
        user = _last_user_text(body["messages"])
        delay = self.config.latency_s
        if self.config.latency_jitter_s:
            delay += self._rng.uniform(0.0, self.config.latency_jitter_s)
        if MARKER_SLOW in user:
            delay += self.config.slow_marker_s
        if delay > 0:
            await asyncio.sleep(delay)

        once = self._first_time("fail-500", MARKER_FAIL_500_ONCE, user, digest)
        if MARKER_FAIL_500 in user or once:
            return _error(500, _server_error())
        if self._first_time("drop", MARKER_DROP_ONCE, user, digest) or (
            self.config.drop_rate and self._rng.random() < self.config.drop_rate
        ):
            _drop(request)
        if self.config.error_rate_5xx and self._rng.random() < self.config.error_rate_5xx:
            return _error(self._rng.choice((500, 502, 503)), _server_error())

        self._serial += 1
        completion = build_completion(body, digest, prompt_tokens, self._serial)
        self._stats.accept(model, cost, digest)
        headers["x-request-id"] = str(uuid.uuid4())
        return web.json_response(completion, headers=headers)

    def _first_time(self, kind: str, marker: str, user: str, digest: bytes) -> bool:
        if marker not in user:
            return False
        seen = self._seen_once[kind]
        if digest in seen:
            return False
        seen.add(digest)
        return True

    async def _models(self, request: web.Request) -> web.Response:
        if request.match_info["region"] not in REGIONS:
            return _error(404, _not_found(request.path))
        auth = self._auth_error(request)
        if auth is not None:
            return auth
        names = self.config.models if self.config.models is not None else SUPPORTED_MODELS
        data = [
            {"id": name, "object": "model", "created": 1_715_558_400, "owned_by": "system"}
            for name in names
        ]
        return web.json_response({"object": "list", "data": data})

    async def _stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset_route(self, request: web.Request) -> web.Response:
        self.reset(quota=request.query.get("quota") in ("1", "true", "yes"))
        return web.json_response({"ok": True})


class _Dropped(Exception):
    """The connection was closed on purpose, without an answer."""


def _drop(request: web.Request) -> None:
    # Closing the transport before any byte of the answer makes aiohttp clients raise
    # ServerDisconnectedError, like a gateway that lost the upstream connection.
    if request.transport is not None:
        request.transport.close()
    raise _Dropped


def _not_found(path: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"Unknown route {path}: the region must be one of {', '.join(REGIONS)}.",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    }


def _server_error() -> dict[str, Any]:
    return {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


# --------------------------------------------------------------------------------------------
# Running it: in a background thread, or as `batcher serve-mock`


class ThreadedMockServer:
    """A MockServer on its own event loop in a daemon thread, for sync code and subprocesses.

    with ThreadedMockServer(MockConfig(rpm=60)) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="test")
    """

    def __init__(
        self,
        config: MockConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = MockServer(config, clock=clock)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def root(self) -> str:
        return self.server.root

    @property
    def config(self) -> MockConfig:
        return self.server.config

    def url_for(self, region: str = "eu", *, public: bool = False) -> str:
        return self.server.url_for(region, public=public)

    def start(self) -> str:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mock-server", daemon=True)
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(
                self.server.start(self.host, self.port), loop
            ).result(timeout=30)
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=30)
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return

        async def cancel_pending() -> None:
            # Slow answers (the [[slow]] marker, long latencies) still sleeping: end them so
            # closing the loop does not warn about destroyed pending tasks.
            me = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not me]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_pending(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=30)
        loop.close()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop: the counters are only touched from there."""
        if self._loop is None:
            return fn()

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        return self._call(self.server.stats)

    def reset(self, *, quota: bool = False) -> None:
        self._call(lambda: self.server.reset(quota=quota))

    def __enter__(self) -> ThreadedMockServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_forever(
    config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> None:
    """Serve until SIGINT/SIGTERM; prints the client base URL on stdout first."""
    server = MockServer(config)
    url = await server.start(host, port)
    print(url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main_serve(config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
    """Blocking entry point for `batcher serve-mock`."""
    asyncio.run(serve_forever(config, host, port))
