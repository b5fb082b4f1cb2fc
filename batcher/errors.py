"""The one exception tree of batcher, and the exit codes the CLI maps it to.

    BatcherError                      anything batcher reports to the user
    ├── JobSpecError                  the job file is wrong                  -> exit 2
    ├── InputDataError                the input file or a row is wrong       -> exit 2
    ├── JournalError                  the job's journal refuses this run     -> exit 2
    │   ├── FingerprintMismatch       the job changed since the journal began
    │   └── JobLocked                 another process runs this job          -> exit 5
    ├── StorageError                  cannot write output/journal (ENOSPC…)  -> exit 4
    ├── LimiterError                  the shared limiter (Redis) failed      -> exit 4
    └── APIError                      the chat-completions server said no
        ├── RetryableAPIError         worth another attempt after a wait
        │   ├── RateLimited           429
        │   ├── ServerError           5xx
        │   ├── APITimeout            no answer within the request timeout
        │   └── APIConnectionError    refused / dropped / reset connection
        └── FatalAPIError             another attempt gives the same answer
            ├── AuthenticationError   401/403: stops the whole job           -> exit 4
            │                         (a 403 for one row while others are answered, as a
            │                         firewall blocks a prompt: that row's error; the engine's
            │                         RefusalStreak decides)
            ├── EndpointMoved         3xx (never followed): stops the whole job -> exit 4
            │                         (exit 2 at the first request)
            ├── AnswerTooLarge        a body past endpoint.max_answer_mb: the row's error
            └── BadRequest            400/404/422/other 4xx: the row is recorded as an error
                                      (404 for three rows in a row of one model, none answered
                                      between: the deployment is gone, stops the job -> exit 4)

Every message says what to do next. `classify()` is the single place that maps an HTTP answer
to this tree; nothing else looks at status codes or message text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Exit codes of `batcher run` (documented in the README for cron)."""

    OK = 0  # every row answered
    INTERNAL = 1  # a bug: unexpected exception
    CONFIG = 2  # bad job file, bad input, journal refuses (also click's usage errors)
    ROW_ERRORS = 3  # the job finished, but some rows are recorded as errors
    FATAL = 4  # the job stopped: auth rejected, disk full, limiter lost, ...
    LOCKED = 5  # another batcher process is running this job
    BUDGET = 6  # max_cost_usd reached: raise it and run again to go on
    INTERRUPTED = 130  # SIGINT (Ctrl-C)
    TERMINATED = 143  # SIGTERM


class BatcherError(Exception):
    """Root of every error batcher reports; `str()` is the user-facing message."""

    exit_code: ExitCode = ExitCode.INTERNAL


class JobSpecError(BatcherError):
    exit_code = ExitCode.CONFIG


class InputDataError(BatcherError):
    exit_code = ExitCode.CONFIG


class JournalError(BatcherError):
    exit_code = ExitCode.CONFIG


class FingerprintMismatch(JournalError):
    pass


class JobLocked(JournalError):
    exit_code = ExitCode.LOCKED


class StorageError(BatcherError):
    exit_code = ExitCode.FATAL


class LimiterError(BatcherError):
    exit_code = ExitCode.FATAL


class BudgetReached(BatcherError):
    """max_cost_usd is reached: nothing more is admitted; raise it and run again."""

    exit_code = ExitCode.BUDGET


class APIError(BatcherError):
    exit_code = ExitCode.FATAL

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said
        self.headers: Mapping[str, str] = headers or {}
        self.detail = detail  # the server's own words (its error message), if it answered
        self.sent_seq = 0  # the attempt's number in the run's send order (set by the engine)


class RetryableAPIError(APIError):
    pass


class RateLimited(RetryableAPIError):
    pass


class ServerError(RetryableAPIError):
    pass


class APITimeout(RetryableAPIError):
    pass


class APIConnectionError(RetryableAPIError):
    pass


class TruncatedAnswer(RetryableAPIError):
    """A 2xx whose body is not a whole chat completion: the server billed it, we cannot read it."""


class WebPageAnswer(TruncatedAnswer):
    """A 2xx that is an HTML page (a login page, a web front end): at the first request the
    base_url is wrong; later, a gateway's hiccup like any unreadable answer."""


class FatalAPIError(APIError):
    pass


class AuthenticationError(FatalAPIError):
    pass


class BadRequest(FatalAPIError):
    pass


class EndpointMoved(FatalAPIError):
    pass


class AnswerTooLarge(FatalAPIError):
    """A body past endpoint.max_answer_mb: not read on (a 2xx was billed), the row's error."""


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` (preferred: finer) or `retry-after` (seconds).

    An HTTP-date `retry-after` is not used by Azure/Langdock; it is ignored rather than guessed.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = lower.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if value >= 0 and math.isfinite(value):  # "inf", "nan", "-1": no advice at all
            return value
    return None


def failure_kind(exc: APIError) -> str:
    """A short name for how an attempt failed: what the circuit breaker compares."""
    if isinstance(exc, RateLimited):
        return "429"
    if isinstance(exc, TruncatedAnswer):
        return "truncated"
    if isinstance(exc, APITimeout):
        return "timeout"
    if isinstance(exc, APIConnectionError):
        return "connection"
    if exc.status is not None:
        return f"{exc.status // 100}xx"
    return type(exc).__name__


def server_message(body: Any) -> str:
    """The human part of an error body, whatever its gateway's shape."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            if "<html" in body[:500].lower():  # a gateway's error page: its title says enough
                title = re.search(r"<title>(.*?)</title>", body, re.I | re.S)
                return title.group(1).strip()[:200] if title else "(an HTML error page)"
            return body.strip()[:500] or "(empty body)"
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("code") or err.get("type")
            if msg:
                return str(msg)[:500]
        elif isinstance(err, str):
            return err[:500]
        if "message" in body:
            return str(body["message"])[:500]
    return json.dumps(body)[:500] if body is not None else "(empty body)"


def classify(status: int, headers: Mapping[str, str], body: Any) -> APIError | None:
    """Map one HTTP answer to the error tree; None for a success (2xx).

    Decided by status code only: gateways word their rate-limit bodies differently.
    """
    if 200 <= status < 300:
        return None
    msg = server_message(body)
    kw: dict[str, Any] = {"status": status, "headers": headers, "detail": msg}
    if status == 429:
        return RateLimited(
            f"rate limited (429): {msg}", retry_after=parse_retry_after(headers), **kw
        )
    if 300 <= status < 400:
        # Not followed: a 302/303 turns the POST into a GET without the prompt (whose 200 read
        # as an answer for every row), a 307 sends the prompts to whoever the header names.
        location = str(headers.get("location") or "(no location)")[:200]
        return EndpointMoved(
            f"the server redirected the request ({status}) to {location}; batcher does not "
            "follow redirects. Set endpoint.base_url to the address that answers.",
            **kw,
        )
    if status in (401, 403):
        return AuthenticationError(
            # The server's sentence may end in its own period ("...settings."): one, not two.
            f"the server rejected the API key ({status}): {msg.rstrip('. ')}. Check that the "
            "key is valid for this workspace and allowed to use this model.",
            **kw,
        )
    if status == 408 or status >= 500:
        return ServerError(
            f"server error ({status}): {msg}", retry_after=parse_retry_after(headers), **kw
        )
    code = error_code(body)
    where = f"{status}, {code}" if code else f"{status}"
    return BadRequest(f"request rejected ({where}): {msg}", **kw)


def refusal_message(exc: APIError) -> str:
    """A row's error for a 403 or a 404 while its model answered other rows."""
    said = (exc.detail or "").rstrip(". ")
    if exc.status == 403:
        return (
            f"the server refused this row (403: {said}) while it answered other rows with the "
            "same key: a firewall or a content policy may block this prompt"
        )
    return f"{exc} (other rows of this model were answered)"


def error_code(body: Any) -> str | None:
    """OpenAI's machine-readable `error.code` (e.g. context_length_exceeded), if the body has
    one: it tells a row's own fault from a wrong setup without reading the prose."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return err["code"][:64]
    return None
