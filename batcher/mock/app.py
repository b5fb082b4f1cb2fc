"""The Langdock-compatible HTTP app on aiohttp: routes, auth, quota, faults, answers, counters.

`MockServer` runs on the caller's event loop (`start` / `stop`); `batcher.mock.runner` runs one
in a thread or as `batcher serve-mock`. The decisions live in the pure modules beside this one;
this one does the I/O and the order: route, auth, validate, storm, quota, latency, faults,
answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from batcher.mock.answers import build_completion, canonical_digest
from batcher.mock.config import MOCK_HEADER, MockConfig
from batcher.mock.cost import admission_cost, prompt_tokens
from batcher.mock.faults import (
    MARKER_DROP_ONCE,
    MARKER_FAIL_500,
    MARKER_FAIL_500_ONCE,
    MARKER_SLOW,
    draw_faults,
    in_storm,
)
from batcher.mock.quota import SlidingWindowQuota, format_reset
from batcher.mock.stats import MockStats
from batcher.mock.validation import Refusal, last_user_text, validate_request
from batcher.models import SUPPORTED_MODELS
from batcher.tokens import get_encoding

REGIONS: tuple[str, ...] = ("eu", "us", "global", "ch")

_EPS = 1e-9
_MAX_BODY_BYTES = 64 * 1024**2


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
        self._quotas: dict[str, SlidingWindowQuota] = {}
        self._stats = MockStats(clock, self._t0, self.config.stats_bucket_s)
        self._seen_once: dict[str, set[bytes]] = {"fail-500": set(), "drop": set()}
        self._serial = 0  # completions answered: part of each completion's id
        self._chat_requests = 0  # valid chat requests since start or reset: faults key on it
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
        self._chat_requests = 0
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
                raise Refusal(
                    400,
                    "We could not parse the JSON body of your request. The API expects a JSON "
                    "payload; check that you send Content-Type: application/json.",
                ) from None
            validate_request(body, self.config.models)
        except Refusal as refusal:
            return _error(refusal.status, refusal.body)

        model: str = body["model"]
        quota = self._quota(model)
        self._chat_requests += 1
        number = self._chat_requests
        if in_storm(self.config, number):
            return self._too_many(quota, self.config.storm_retry_after_s, "requests")
        storm_left = self._t0 + self.config.rate_limit_storm_s - self.clock()
        if storm_left > 0:
            return self._too_many(quota, storm_left, "requests")

        prompt = prompt_tokens(body, self.config.image_count_as)
        cost = admission_cost(body, prompt)
        decision = quota.try_admit(cost)
        if not decision.admitted:
            if self.config.failed_requests_count:
                quota.record_failed()
            return self._too_many(quota, decision.retry_after_s, decision.limited_by or "tokens")
        self._stats.admit(model, cost)
        headers = self._ratelimit_headers(quota)

        # Admitted and charged once; whatever happens next (faults included) is not charged again.
        digest = canonical_digest(body)
        user = last_user_text(body["messages"])
        faults = draw_faults(self.config, number)
        delay = self.config.latency_s + faults.extra_latency_s
        if MARKER_SLOW in user:
            delay += self.config.slow_marker_s
        if delay > 0:
            await asyncio.sleep(delay)

        once = self._first_time("fail-500", MARKER_FAIL_500_ONCE, user, digest)
        if MARKER_FAIL_500 in user or once:
            return _error(500, _server_error())
        if self._first_time("drop", MARKER_DROP_ONCE, user, digest) or faults.drop:
            _drop(request)
        if faults.status_5xx is not None:
            return _error(faults.status_5xx, _server_error())

        self._serial += 1
        completion = build_completion(body, digest, prompt, self._serial)
        self._stats.accept(model, cost, digest)
        headers["x-request-id"] = str(uuid.uuid4())
        if self.config.marked:
            headers[MOCK_HEADER] = "1"
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
