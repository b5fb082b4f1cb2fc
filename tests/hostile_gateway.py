"""A misbehaving chat-completions gateway for the tests of issue 11, separate from our mock.

It answers by a script: a list of phases `(count, behaviour)`, each serving the next `count`
requests (None: every request from there on), so a test says "5 good answers, then 500 on
everything" in request counts, never in time. `switch()` replaces the script while it runs
("the gateway is back"). Behaviours:

    ok(latency_s, headers)     a normal chat.completion (after `latency_s`)
    rate_limited(headers)      429 with exactly these headers (retry-after: inf, -1, ...)
    server_error(status)       5xx with an nginx HTML page
    rejected(status)           401 / 403 with Azure's body
    firewall()                 403 with a Cloudflare page (for `by_prompt`: one prompt blocked)
    deployment_gone()          404 DeploymentNotFound, as Azure words it
    context_length()           400 context_length_exceeded, as Azure words it
    stall()                    no answer until the client gives up (ends when the server stops)
    drop()                     the connection closed without an answer
    truncated()                200 whose JSON body stops half-way
    cut()                      200 whose connection closes half-way through the body
    stall_body()               200 and half the body, then nothing until the client gives up
    malformed(shape)           200 with one field in a wrong shape (MALFORMED_SHAPES)

A request whose body is longer than `context_chars` is answered `context_length()` whatever
the script says: a model's context window. A request whose body holds a key of `by_prompt`
gets that behaviour instead (a firewall that blocks one prompt). Every request is recorded
(`received`), and every well-formed 200 the gateway sent is counted (`ok_sent`): what the user
was billed for.

`HostileGateway` runs on 127.0.0.1 (free port) on its own event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from helpers import serve_app

Action = Literal["answer", "stall", "drop", "cut", "stall_body"]
STALL_MAX_S = 30.0  # a stalled answer ends by itself after this, even if nobody stops us
PAD = "x" * 5_000  # makes a malformed body long: the row's error must keep only its start


@dataclass(frozen=True)
class Behaviour:
    name: str
    action: Action = "answer"
    status: int = 200
    body: bytes | None = None  # None: a well-formed completion
    headers: Mapping[str, str] = field(default_factory=dict)
    latency_s: float = 0.0
    # Answer only once this many requests got this behaviour (they are then all in flight
    # together: the order of their answers says nothing of the order they were sent in).
    together: int = 0


def completion(content: Any = "label: fine", **changes: Any) -> dict[str, Any]:
    """A gpt-4o-mini chat.completion as Azure sends it; `changes` replace top-level keys."""
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_5f20662549",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
    }
    body.update(changes)
    return body


def _with_choice(**changes: Any) -> dict[str, Any]:
    body = completion(system_fingerprint=PAD)
    body["choices"][0].update(changes)
    return body


def _with_message(**changes: Any) -> dict[str, Any]:
    body = completion(system_fingerprint=PAD)
    body["choices"][0]["message"].update(changes)
    return body


# Shape -> body. Each is a 200 a gateway really could send; `system_fingerprint` is padded so
# the raw body kept in a row's error has to be truncated.
MALFORMED_SHAPES: dict[str, Callable[[], dict[str, Any]]] = {
    "content_list": lambda: _with_message(
        content=[{"type": "text", "text": "label: "}, {"type": "text", "text": "fine"}]
    ),
    "content_number": lambda: _with_message(content=42),
    "usage_strings": lambda: completion(
        system_fingerprint=PAD,
        usage={"prompt_tokens": "20", "completion_tokens": "3", "total_tokens": "23"},
    ),
    "usage_floats": lambda: completion(
        system_fingerprint=PAD,
        usage={"prompt_tokens": 20.5, "completion_tokens": 3.25, "total_tokens": 23.75},
    ),
    "usage_nulls": lambda: completion(
        system_fingerprint=PAD,
        usage={"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
    ),
    "usage_not_object": lambda: completion(system_fingerprint=PAD, usage=[20, 3, 23]),
    "choices_null": lambda: completion(system_fingerprint=PAD, choices=[None]),
    "message_string": lambda: _with_choice(message="label: fine"),
    "model_object": lambda: completion(system_fingerprint=PAD, model={"name": "gpt-4o-mini"}),
    "finish_reason_number": lambda: _with_choice(finish_reason=1),
    "content_lone_surrogate": lambda: _with_message(content="label: \ud800 fine"),
    "usage_beyond_int64": lambda: completion(
        system_fingerprint=PAD,
        usage={"prompt_tokens": 2**70, "completion_tokens": 3, "total_tokens": 2**70 + 3},
    ),
    "usage_missing": lambda: {
        k: v for k, v in completion(system_fingerprint=PAD).items() if k != "usage"
    },
    "refusal_number": lambda: _with_message(refusal=5),
    "tool_calls_object": lambda: _with_message(
        content=None, tool_calls={"id": "call_1", "function": {"name": "f", "arguments": "{}"}}
    ),
    "tool_call_arguments_number": lambda: _with_message(
        content=None,
        tool_calls=[
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": 7}}
        ],
    ),
}
# A 200 that Python's json cannot even parse: nested deeper than its recursion limit.
DEEPLY_NESTED = b'{"choices": [], "usage": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"


def _azure_error(message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def ok(latency_s: float = 0.0, headers: Mapping[str, str] | None = None) -> Behaviour:
    return Behaviour("ok", headers=dict(headers or {}), latency_s=latency_s)


def rate_limited(headers: Mapping[str, str] | None = None) -> Behaviour:
    body = _azure_error(
        "Requests to the ChatCompletions_Create Operation have exceeded the rate limit.",
        "429",
        "rate_limit_error",
    )
    return Behaviour("429", status=429, body=body, headers=dict(headers or {}))


def server_error(status: int = 500) -> Behaviour:
    html = (
        f"<html>\r\n<head><title>{status} Internal Server Error</title></head>\r\n<body>"
        f"<center><h1>{status}</h1></center><hr><center>nginx</center></body></html>\r\n"
    )
    return Behaviour(str(status), status=status, body=html.encode())


def rejected(status: int = 401) -> Behaviour:
    body = _azure_error(
        "Access denied due to invalid subscription key or wrong API endpoint.",
        str(status),
        "authentication_error",
    )
    return Behaviour(str(status), status=status, body=body)


def firewall() -> Behaviour:
    """403 with Cloudflare's HTML page, as a web application firewall blocks one prompt."""
    html = (
        "<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head>"
        "<body><h1>Sorry, you have been blocked</h1></body></html>"
    )
    return Behaviour("firewall", status=403, body=html.encode())


def deployment_gone() -> Behaviour:
    body = _azure_error(
        "The API deployment for this resource does not exist. If you created the deployment "
        "within the last 5 minutes, please wait a moment and try again.",
        "DeploymentNotFound",
    )
    return Behaviour("404", status=404, body=body)


def context_length() -> Behaviour:
    body = _azure_error(
        "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 131000 tokens. Please reduce the length of the messages.",
        "context_length_exceeded",
    )
    return Behaviour("context_length", status=400, body=body)


def stall() -> Behaviour:
    return Behaviour("stall", action="stall")


def drop() -> Behaviour:
    return Behaviour("drop", action="drop")


def truncated() -> Behaviour:
    whole = json.dumps(completion()).encode()
    return Behaviour("truncated", body=whole[: len(whole) // 2])


def cut() -> Behaviour:
    return Behaviour("cut", action="cut", body=json.dumps(completion()).encode())


def stall_body() -> Behaviour:
    return Behaviour("stall_body", action="stall_body", body=json.dumps(completion()).encode())


def malformed(shape: str) -> Behaviour:
    return Behaviour(f"malformed:{shape}", body=json.dumps(MALFORMED_SHAPES[shape]()).encode())


def raw_200(body: bytes, name: str = "raw") -> Behaviour:
    """A 200 with exactly these bytes (DEEPLY_NESTED, invalid UTF-8, ...)."""
    return Behaviour(name, body=body)


Phase = tuple[int | None, Behaviour]


@dataclass(frozen=True)
class Received:
    n: int  # 1-based ordinal over the gateway's life
    body: Any
    behaviour: str
    in_flight: int = 0  # other requests being answered when this one arrived


class HostileGateway:
    """The scripted gateway on 127.0.0.1; `url` is a base_url for the job file."""

    def __init__(
        self,
        script: Sequence[Phase],
        *,
        context_chars: int | None = None,
        by_prompt: Mapping[str, Behaviour] | None = None,
    ) -> None:
        self.context_chars = context_chars
        self.by_prompt = {k.encode(): v for k, v in (by_prompt or {}).items()}
        self.received: list[Received] = []
        self.ok_sent = 0  # well-formed 200 answers sent: what the user paid for
        self.in_flight = 0
        self._script: list[Phase] = list(script)
        self._base = 0  # requests before the current script began
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._stopped: asyncio.Event | None = None
        self._gathered: dict[str, asyncio.Event] = {}  # per `together` behaviour: all came
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/openai/eu/v1"

    @property
    def requests(self) -> int:
        return len(self.received)

    def switch(self, script: Sequence[Phase]) -> None:
        """Serve the following requests by `script`, its counts starting from now."""

        def apply() -> None:
            self._script, self._base = list(script), len(self.received)

        self._call(apply)

    def behaviours(self) -> list[str]:
        return [r.behaviour for r in self.received]

    def _next(self, n: int) -> Behaviour:
        """The behaviour for request number `n`."""
        k = n - self._base  # its ordinal in the current script
        for count, behaviour in self._script:
            if count is None or k <= count:
                return behaviour
            k -= count
        return self._script[-1][1]  # past the end: the last behaviour goes on

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        n = len(self.received) + 1
        behaviour = self._next(n)
        if self.context_chars is not None and len(raw) > self.context_chars:
            behaviour = context_length()
        for marker, special in self.by_prompt.items():
            if marker in raw:
                behaviour = special
        self.received.append(Received(n, body, behaviour.name, self.in_flight))
        self.in_flight += 1
        try:
            return await self._perform(request, behaviour)
        finally:
            self.in_flight -= 1

    async def _perform(self, request: web.Request, behaviour: Behaviour) -> web.StreamResponse:
        if behaviour.together:
            gathered = self._gathered.setdefault(behaviour.name, asyncio.Event())
            if sum(r.behaviour == behaviour.name for r in self.received) >= behaviour.together:
                gathered.set()
            with contextlib.suppress(TimeoutError):  # ends by itself, all came or not
                await asyncio.wait_for(gathered.wait(), STALL_MAX_S)
        if behaviour.latency_s:
            await asyncio.sleep(behaviour.latency_s)
        if behaviour.action == "stall":
            assert self._stopped is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), STALL_MAX_S)
            return web.Response(status=503, text="stalled")
        if behaviour.action == "drop":
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError  # nothing to answer on a closed connection
        if behaviour.action in ("cut", "stall_body"):  # the status line and half the body
            assert behaviour.body is not None and self._stopped is not None
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            resp.content_length = len(behaviour.body)
            await resp.prepare(request)
            await resp.write(behaviour.body[: len(behaviour.body) // 2])
            if behaviour.action == "stall_body":  # ... then nothing, until we stop
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), STALL_MAX_S)
            if request.transport is not None:
                request.transport.close()
            return resp
        headers = {"content-type": "application/json", **behaviour.headers}
        if behaviour.body is None:
            self.ok_sent += 1
            return web.Response(body=json.dumps(completion()).encode(), headers=headers)
        return web.Response(status=behaviour.status, body=behaviour.body, headers=headers)

    # ---- running it ----

    def start(self) -> HostileGateway:
        self._thread.start()

        async def up() -> int:
            self._stopped = asyncio.Event()
            app = web.Application()
            app.router.add_post("/openai/eu/v1/chat/completions", self._chat)
            self._runner, port = await serve_app(app)
            return port

        self.port = asyncio.run_coroutine_threadsafe(up(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        async def down() -> None:
            if self._stopped is not None:
                self._stopped.set()  # stalled answers end now
            if self._runner is not None:
                await self._runner.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(down(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the gateway's loop, between two requests."""

        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def __enter__(self) -> HostileGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
