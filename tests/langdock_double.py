"""A Langdock/Azure stand-in written from /work/shared/langdock-api.md, not from our mock.

It varies what the API document leaves open, so tests can find where batcher relies on the
bundled mock's conveniences:

- per-model limits over **fixed** windows (counters that reset at window boundaries) or
  **sliding** ones, of lengths chosen per resource (requests: 1 s and 60 s by default, the
  way Azure evaluates RPM; tokens: the minute, Azure's "running count reset each minute");
- tokens charged at admission by its *own* estimate: `len(text) // chars_per_token` plus a
  per-message overhead, plus `max_tokens` (or a large default when absent), times a factor;
  so it never agrees exactly with batcher's tiktoken count;
- a share of every limit taken by invisible other users (`capacity` < 1);
- 429 bodies in the three shapes the document quotes (Azure, OpenAI, Anthropic-style), with or
  without `retry-after`, `retry-after-ms` and `x-ratelimit-*` headers;
- failed requests counted toward the limit, or not;
- strict request checks: 401 for a wrong Bearer key, 400 for `n`, `service_tier`,
  `parallel_tool_calls`, `stream_options`, for `max_tokens` or a temperature other than 1 on
  the o-series, 404 for an unknown model or path;
- occasional 500/503 answers with an HTML body, slow answers for `[[slow]]` rows;
- answers with a dated `model` name and `usage`;
- counters: requests, 429s, answers per status, accepted per model, duplicate bodies answered
  200 (the same request paid for twice).

`ThreadedDouble` runs it on its own event loop in a daemon thread, for tests that drive the
CLI as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from helpers import serve_app

WindowKind = Literal["fixed", "sliding"]
BodyShape = Literal["azure", "openai", "anthropic"]

DATED_NAMES = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "o1-preview": "o1-preview-2024-09-12",
    "o3-mini": "o3-mini-2025-01-31",
    "gpt-4": "gpt-4-0613",
    "gpt-35-turbo": "gpt-35-turbo-0125",
}
UNSUPPORTED = ("n", "service_tier", "parallel_tool_calls", "stream_options")
HTML_ERROR = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class DoubleConfig:
    """Every knob; the defaults are a strict server with fixed windows and no extra headers."""

    api_key: str | None = None  # None: any non-empty Bearer key
    limits: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # model -> (rpm, tpm)
    window_kind: WindowKind = "fixed"
    request_windows_s: tuple[float, ...] = (1.0, 60.0)
    token_windows_s: tuple[float, ...] = (60.0,)
    capacity: float = 1.0  # share of each limit left for us; the rest is other users' load
    # Request ordinals (1-based) refused with a 429 whatever the quota: another user's burst.
    refuse_requests: frozenset[int] = frozenset()
    count_failed: bool = True  # a refused request still counts as a request
    chars_per_token: int = 4
    message_overhead: int = 4
    default_max_tokens: int = 16_384  # charged when the body sets no max_tokens
    token_factor: float = 1.0
    body_shape: BodyShape = "azure"
    retry_after: bool = False
    retry_after_ms: bool = False
    ratelimit_headers: bool = False
    # The window x-ratelimit-remaining/reset-* describe: OpenAI documents the minute; a gateway
    # evaluating short windows may report one of those. None: the tightest window right now.
    ratelimit_window_s: float | None = 60.0
    prefixes: tuple[str, ...] = ("",)  # "" and/or "/api/public"
    regions: tuple[str, ...] = ("eu", "us", "global", "ch")
    error_rate: float = 0.0  # share of admitted requests answered 500/503 with HTML
    latency_s: float = 0.0
    slow_s: float = 2.0  # extra latency for a request whose text contains [[slow]]
    seed: int = 0


@dataclass
class _Window:
    """One resource of one model over one window length, fixed or sliding."""

    length: float
    budget: float
    kind: WindowKind
    start: float = 0.0  # fixed: start of the current window
    used: float = 0.0  # fixed: what the current window holds
    log: deque[tuple[float, float]] = field(default_factory=deque)  # sliding: (t, amount)

    def _roll(self, now: float) -> None:
        if self.kind == "fixed":
            start = math.floor(now / self.length) * self.length
            if start != self.start:
                self.start, self.used = start, 0.0
        else:
            while self.log and self.log[0][0] <= now - self.length:
                self.used -= self.log.popleft()[1]

    def room_for(self, amount: float, now: float) -> bool:
        """Fits, or the window is empty (a request bigger than a short window goes alone)."""
        self._roll(now)
        return self.used + amount <= self.budget + 1e-9 or self.used == 0

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` fits."""
        self._roll(now)
        if self.room_for(amount, now):
            return 0.0
        if self.kind == "fixed":
            return self.start + self.length - now
        need, freed = self.used + amount - self.budget, 0.0
        for t, a in self.log:
            freed += a
            if freed >= need:
                return t + self.length - now
        return self.length

    def add(self, amount: float, now: float) -> None:
        self._roll(now)
        self.used += amount
        if self.kind == "sliding":
            self.log.append((now, amount))

    def remaining(self, now: float) -> int:
        self._roll(now)
        return max(0, math.floor(self.budget - self.used))

    def reset_in(self, now: float) -> float:
        self._roll(now)
        if self.kind == "fixed":
            return self.start + self.length - now
        return self.log[0][0] + self.length - now if self.log else 0.0


@dataclass
class _Quota:
    rpm: int
    tpm: int
    requests: list[_Window]
    tokens: list[_Window]


@dataclass
class DoubleStats:
    requests: int = 0
    rate_limited: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # per model asked for
    charged_tokens: Counter[str] = field(default_factory=Counter)  # our own estimate
    answered_bodies: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, status) per answer

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.answered_bodies.values() if n > 1)

    @property
    def rate_limited_fraction(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0


def _fmt_duration(seconds: float) -> str:
    """x-ratelimit-reset-* as OpenAI writes it: "120ms", "1s", "6.5s", "1m0s"."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 1):g}s"
    return f"{int(seconds // 60)}m{round(seconds % 60):d}s"


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers=dict(headers or {}),
    )


def _error(
    status: int, message: str, code: str, type_: str = "invalid_request_error"
) -> web.Response:
    return _json(
        status, {"error": {"message": message, "type": type_, "param": None, "code": code}}
    )


def is_o_series(model: str) -> bool:
    return model.startswith(("o1", "o3", "o4"))


class LangdockDouble:
    """The aiohttp application and its state; everything runs on one event loop."""

    def __init__(self, config: DoubleConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.stats = DoubleStats()
        self._rng = random.Random(config.seed)
        self._quotas: dict[str, _Quota] = {}
        self.app = web.Application()
        for prefix in config.prefixes:
            for region in config.regions:
                root = f"{prefix}/openai/{region}/v1"
                self.app.router.add_post(f"{root}/chat/completions", self._chat)
                self.app.router.add_get(f"{root}/models", self._models)

    # ---- quota ----

    def _quota(self, model: str) -> _Quota | None:
        if model not in self.config.limits:
            return None
        if model not in self._quotas:
            rpm, tpm = self.config.limits[model]
            cap, kind = self.config.capacity, self.config.window_kind
            self._quotas[model] = _Quota(
                rpm,
                tpm,
                [_Window(w, rpm * w / 60 * cap, kind) for w in self.config.request_windows_s],
                [_Window(w, tpm * w / 60 * cap, kind) for w in self.config.token_windows_s],
            )
        return self._quotas[model]

    def estimate(self, body: Mapping[str, Any]) -> tuple[int, int]:
        """(prompt tokens, tokens charged at admission) by this server's own rule."""
        cfg = self.config
        prompt = 0
        for message in body.get("messages") or []:
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            text = f"{content or ''}{message.get('name') or ''}"
            prompt += len(text) // cfg.chars_per_token + cfg.message_overhead
        out = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(out, int):
            out = cfg.default_max_tokens
        return prompt, math.ceil((prompt + out) * cfg.token_factor)

    def _admit(self, quota: _Quota, cost: int, now: float) -> float:
        """0 and charged if admitted; else the seconds until it would fit (nothing charged)."""
        wait = max(
            [w.wait_for(1, now) for w in quota.requests]
            + [w.wait_for(cost, now) for w in quota.tokens]
        )
        if wait > 0:
            if self.config.count_failed:
                for w in quota.requests:
                    w.add(1, now)
            return wait
        for w in quota.requests:
            w.add(1, now)
        for w in quota.tokens:
            w.add(cost, now)
        return 0.0

    def _ratelimit_headers(self, quota: _Quota, now: float) -> dict[str, str]:
        """Per-minute limits; remaining and reset of the window `ratelimit_window_s` names."""

        def pick(windows: list[_Window]) -> _Window:
            length = self.config.ratelimit_window_s
            if length is None:
                return min(windows, key=lambda w: w.remaining(now) / w.budget)
            return min(windows, key=lambda w: abs(w.length - length))

        req, tok = pick(quota.requests), pick(quota.tokens)
        return {
            "x-ratelimit-limit-requests": str(quota.rpm),
            "x-ratelimit-limit-tokens": str(quota.tpm),
            "x-ratelimit-remaining-requests": str(req.remaining(now)),
            "x-ratelimit-remaining-tokens": str(tok.remaining(now)),
            "x-ratelimit-reset-requests": _fmt_duration(req.reset_in(now)),
            "x-ratelimit-reset-tokens": _fmt_duration(tok.reset_in(now)),
        }

    def _too_many(self, wait: float, quota: _Quota | None, now: float) -> web.Response:
        cfg = self.config
        seconds = max(1, math.ceil(wait))
        self.stats.rate_limited += 1
        if cfg.body_shape == "azure":
            body: Any = {
                "error": {
                    "code": "429",
                    "message": "Requests to the ChatCompletions_Create Operation under Azure "
                    "OpenAI API version 2024-06-01 have exceeded token rate limit of your "
                    f"current OpenAI S0 pricing tier. Please retry after {seconds} seconds. "
                    "Please go here: https://aka.ms/oai/quotaincrease if you would like to "
                    "further increase the default rate limit.",
                }
            }
        elif cfg.body_shape == "openai":
            body = {
                "error": {
                    "message": f"Rate limit reached for requests. Please try again in {wait:.3f}s.",
                    "type": "tokens",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
        else:
            body = {
                "type": "error",
                "error": {"type": "rate_limit_error", "message": "Rate limited"},
            }
        headers: dict[str, str] = {}
        if cfg.retry_after:
            headers["retry-after"] = str(seconds)
        if cfg.retry_after_ms:
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        if cfg.ratelimit_headers and quota is not None:
            headers.update(self._ratelimit_headers(quota, now))
        return _json(429, body, headers)

    # ---- checks ----

    def _check_body(self, body: Any) -> web.Response | None:
        if not isinstance(body, dict):
            return _error(400, "We could not parse the JSON body of your request.", "invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or model not in DATED_NAMES:
            return _error(
                404,
                "The API deployment for this resource does not exist.",
                "DeploymentNotFound",
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' is a required property", "invalid_request")
        for key in UNSUPPORTED:
            if key in body:
                return _error(400, f"Unrecognized request argument supplied: {key}", "invalid")
        if is_o_series(model):
            if "max_tokens" in body:
                return _error(
                    400,
                    "Unsupported parameter: 'max_tokens' is not supported with this model. "
                    "Use 'max_completion_tokens' instead.",
                    "unsupported_parameter",
                )
            temp = body.get("temperature")
            if temp is not None and temp != 1:
                return _error(
                    400,
                    f"Unsupported value: 'temperature' does not support {temp} with this "
                    "model. Only the default (1) value is supported.",
                    "unsupported_value",
                )
            if model.startswith("o1-preview") and any(
                m.get("role") == "system" for m in messages if isinstance(m, dict)
            ):
                return _error(
                    400, "Unsupported value: 'messages[0].role' does not support 'system'.", "x"
                )
        return None

    # ---- handlers ----

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return False
        return self.config.api_key is None or auth[7:] == self.config.api_key

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "Invalid API key.", "401", "authentication_error")
        data = [{"id": m, "object": "model", "owned_by": "langdock"} for m in DATED_NAMES]
        return _json(200, {"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        self.stats.paths[request.path] += 1
        resp = await self._answer(request)
        self.stats.by_status[resp.status] += 1
        self.stats.events.append((self.clock(), resp.status))
        return resp

    async def _answer(self, request: web.Request) -> web.Response:
        cfg = self.config
        if not self._authorized(request):
            return _error(
                401,
                "Access denied due to invalid subscription key or wrong API endpoint.",
                "401",
                "authentication_error",
            )
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        bad = self._check_body(body)
        if bad is not None:
            return bad
        model = body["model"]
        prompt, cost = self.estimate(body)
        now = self.clock()
        quota = self._quota(model)
        if self.stats.requests in cfg.refuse_requests:
            return self._too_many(1.0, quota, now)
        if quota is not None:
            wait = self._admit(quota, cost, now)
            if wait > 0:
                return self._too_many(wait, quota, now)
        text = json.dumps(body["messages"])
        delay = cfg.latency_s + (cfg.slow_s if "[[slow]]" in text else 0.0)
        if delay:
            await asyncio.sleep(delay)
        if cfg.error_rate and self._rng.random() < cfg.error_rate:
            code, reason = self._rng.choice([(500, "Internal Server Error"), (503, "Unavailable")])
            html = HTML_ERROR.format(code=code, reason=reason)
            return web.Response(status=code, text=html, content_type="text/html")
        self.stats.accepted[model] += 1
        self.stats.charged_tokens[model] += cost
        self.stats.answered_bodies[json.dumps(body, sort_keys=True)] += 1
        completion = 3
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": DATED_NAMES[model],
            "system_fingerprint": "fp_5f20662549",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "label: fine", "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        headers = self._ratelimit_headers(quota, now) if quota and cfg.ratelimit_headers else {}
        return _json(200, answer, headers)


class ThreadedDouble:
    """A LangdockDouble served on 127.0.0.1 (free port) by a daemon thread's event loop."""

    def __init__(self, config: DoubleConfig) -> None:
        self.double = LangdockDouble(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def stats(self) -> DoubleStats:
        return self.double.stats

    def url(self, region: str = "eu", prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{prefix}/openai/{region}/v1"

    def start(self) -> ThreadedDouble:
        self._thread.start()

        async def up() -> int:
            self._runner, port = await serve_app(self.double.app)
            return port

        self.port = asyncio.run_coroutine_threadsafe(up(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            fut.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ThreadedDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
