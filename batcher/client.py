"""The HTTP edge: one aiohttp session, one call, every answer classified by errors.classify."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from batcher import fastjson
from batcher.errors import (
    AnswerTooLarge,
    APIConnectionError,
    APITimeout,
    TruncatedAnswer,
    WebPageAnswer,
    classify,
    server_message,
)


@dataclass(slots=True)  # not frozen: built per row (see records.Request)
class Answer:
    body: dict[str, Any]
    headers: Mapping[str, str]  # case-insensitive: aiohttp's, as the server sent them
    latency_s: float


_MAX_HEADER_BYTES = 64 * 1024
_MAX_HEADERS = 1024

# A key this long is masked in answers too (real keys are; "sk-" keys run 40+ characters).
MASK_IN_ANSWERS_FROM = 12


class ChatClient:
    """POSTs chat-completion bodies to `{base_url}/chat/completions` over one keep-alive pool."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        concurrency: int,
        timeout_s: float,
        connect_timeout_s: float = 30.0,
        max_answer_mb: float = 64.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._key = api_key
        self._key_bytes = api_key.encode()
        self._mask_answers = len(self._key_bytes) >= MASK_IN_ANSWERS_FROM
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._concurrency = concurrency
        self._max_answer_mb = max_answer_mb
        self._max_answer = int(max_answer_mb * 1024 * 1024)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ChatClient:
        connector = aiohttp.TCPConnector(limit=self._concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            # Every request of this session is a JSON POST: its headers are the session's
            # (per-request headers are merged into a new dict on every call).
            headers={"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"},
            # aiohttp refuses a header line over 8 KB or more than 128 headers as a "400" of its
            # own: a billed 200 behind a chatty gateway was retried and never counted as spent.
            max_line_size=_MAX_HEADER_BYTES,
            max_field_size=_MAX_HEADER_BYTES,
            max_headers=_MAX_HEADERS,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def complete(self, body: dict[str, Any]) -> Answer:
        """One attempt. Returns the parsed answer or raises an APIError subclass."""
        assert self._session is not None, "use ChatClient as an async context manager"
        start = time.monotonic()
        try:
            # The body as bytes: aiohttp's json= would encode it with the slower json.dumps.
            data = fastjson.dumps(body)
            async with self._session.post(self.url, data=data, allow_redirects=False) as resp:
                status = resp.status
                headers = resp.headers
                try:
                    declared = resp.content_length
                    if (
                        declared is not None
                        and declared <= self._max_answer
                        and "Content-Encoding" not in headers
                    ):
                        raw = await resp.read()  # as declared: within the cap (no extra await)
                    else:
                        raw = await self._read_capped(resp)
                except (
                    aiohttp.ClientPayloadError,
                    asyncio.IncompleteReadError,
                    TimeoutError,
                ) as exc:
                    if not 200 <= status < 300:
                        raise
                    # The server answered 2xx and cut or stalled the body: billed, unreadable.
                    how = "stalled" if isinstance(exc, TimeoutError) else "was cut off"
                    raise TruncatedAnswer(
                        f"answer {status} {how} mid-body ({type(exc).__name__})",
                        status=status,
                        headers=headers,
                    ) from None
        except TimeoutError:
            raise APITimeout(
                f"no answer within {self._timeout.total:g} s (endpoint.timeout_s)"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise APIConnectionError(f"cannot connect to {self.url}: {exc.os_error}") from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            raise APIConnectionError(f"connection failed: {type(exc).__name__}: {exc}") from None
        latency = time.monotonic() - start
        # Some gateways echo the key back in a 401 body, which error messages quote; an answer
        # that holds it would put it in the output and the store. A short key ("none", "EMPTY",
        # as local servers take) is no secret and would mangle the answers: errors only.
        masking = self._mask_answers or not 200 <= status < 300
        if masking and raw.find(self._key_bytes) >= 0:
            raw = raw.replace(self._key_bytes, b"***")
        try:
            parsed: Any = fastjson.loads(raw) if raw else None
        except (ValueError, RecursionError):  # not JSON, or nested past any real answer
            parsed = raw
        else:
            if masking and raw.find(b"\\u") >= 0:
                parsed = self._unescaped_mask(parsed)
        error = classify(status, headers, parsed)
        if error is not None:
            raise error
        if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
            # Billed (the server answered 2xx) but unreadable: retried within the row's
            # attempts like a dropped connection, and counted as spent.
            if isinstance(parsed, bytes) and parsed[:200].lstrip()[:1] == b"<":
                title = server_message(parsed[:100_000].replace(self._key_bytes, b"***"))
                raise WebPageAnswer(
                    f"answer {status} is a web page ({title!r})", status=status, headers=headers
                )
            # What it was, as decoded and masked (a key JSON-escaped in it stays masked).
            shown = raw if isinstance(parsed, bytes) else fastjson.dumps(parsed)
            raise TruncatedAnswer(
                "answer {} is not a whole chat completion: {!r}".format(
                    status,
                    shown[:200].replace(self._key_bytes, b"***").decode("utf-8", "replace"),
                ),
                status=status,
                headers=headers,
            )
        return Answer(parsed, headers, latency)

    def _unescaped_mask(self, parsed: Any) -> Any:
        """`parsed` with the key masked where the body held it JSON-escaped ("\\u0073k-..."):
        the raw bytes did not show it, the decoded strings do."""
        again = fastjson.dumps(parsed)  # escapes nothing the key is made of
        if again.find(self._key_bytes) < 0:
            return parsed
        return fastjson.loads(again.replace(self._key_bytes, b"***"))

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, or AnswerTooLarge past the cap: a body of unknown or compressed
        length is read block by block (a 300 KB gzip body inflated to 300 MB, and a few of
        them in flight took gigabytes)."""
        answer = 200 <= resp.status < 300
        declared = resp.content_length
        if answer and declared is not None and declared > self._max_answer:
            raise self._too_large(resp)
        blocks: list[bytes] = []
        size = 0
        content = resp.content
        while block := await content.readany():
            size += len(block)
            if size > self._max_answer:
                if answer:
                    raise self._too_large(resp)
                break  # an error's body only gives its message: its start will do
            blocks.append(block)
        return blocks[0] if len(blocks) == 1 else b"".join(blocks)

    def _too_large(self, resp: aiohttp.ClientResponse) -> AnswerTooLarge:
        return AnswerTooLarge(
            f"the answer ({resp.status}) is larger than endpoint.max_answer_mb "
            f"({self._max_answer_mb:g} MB): not kept (it was paid for). Raise max_answer_mb if "
            "answers this large are expected",
            status=resp.status,
            headers=resp.headers,
        )
