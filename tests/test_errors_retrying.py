"""classify() maps answers to the error tree; the retry wait honours the server's figure."""

from __future__ import annotations

import pytest
from tenacity import RetryCallState, wait_fixed

from batcher.errors import (
    AuthenticationError,
    BadRequest,
    RateLimited,
    ServerError,
    classify,
    parse_retry_after,
)
from batcher.retrying import wait_retry_after_or

AZURE_429 = {"error": {"code": "429", "message": "... Please retry after 6 seconds."}}
OPENAI_429 = {"error": {"message": "Rate limit", "type": "tokens", "code": "rate_limit_exceeded"}}
ANTHROPIC_429 = {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}}


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (200, {}, None),
        (429, AZURE_429, RateLimited),
        (429, OPENAI_429, RateLimited),
        (429, ANTHROPIC_429, RateLimited),
        (429, "not json at all", RateLimited),
        (401, {"error": {"message": "bad key"}}, AuthenticationError),
        (403, {}, AuthenticationError),
        (400, {"error": {"message": "n not supported"}}, BadRequest),
        (404, {"error": {"message": "no such model"}}, BadRequest),
        (422, {}, BadRequest),
        (408, {}, ServerError),
        (500, {}, ServerError),
        (503, "<html>busy</html>", ServerError),
    ],
)
def test_classify_by_status_not_text(status: int, body: object, cls: type | None) -> None:
    err = classify(status, {}, body)
    assert (err is None) if cls is None else isinstance(err, cls)


def test_server_message_is_kept() -> None:
    err = classify(400, {}, {"error": {"message": "context length exceeded"}})
    assert "context length exceeded" in str(err) and "400" in str(err)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "6"}, 6.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"retry-after-ms": "120"}, 0.12),
        ({"retry-after-ms": "120", "retry-after": "1"}, 0.12),  # the finer one wins
        ({"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}, None),
        ({"retry-after": "-1"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def _state(exc: BaseException, attempt: int) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


@pytest.mark.parametrize(
    ("attempt", "headers", "low", "high"),
    [
        (1, {"retry-after": "6"}, 6.0, 6.6),  # the server's figure + up to 10% jitter
        (3, {"retry-after-ms": "250"}, 0.25, 0.275),
        (2, {"retry-after": "600"}, 30.0, 30.0),  # capped
        (1, {}, 7.0, 7.0),  # no figure: the fallback strategy
    ],
)
def test_wait_retry_after_or(attempt: int, headers: dict, low: float, high: float) -> None:
    wait = wait_retry_after_or(wait_fixed(7), max_s=30)
    err = classify(429, headers, {})
    assert err is not None
    assert low <= wait(_state(err, attempt)) <= high


def test_retry_policy_decides_by_type_and_attempts() -> None:
    from batcher.errors import APITimeout
    from batcher.retrying import retry_policy
    from batcher.spec import Retry

    policy = retry_policy(Retry(max_attempts=3, initial_wait_s=1, max_wait_s=10))
    timeout = APITimeout("slow")
    assert policy.should_retry(timeout, 1) and policy.should_retry(timeout, 2)
    assert not policy.should_retry(timeout, 3)  # the third attempt was the last
    assert not policy.should_retry(classify(400, {}, {}), 1)  # never retried
    assert not policy.should_retry(classify(401, {}, {}), 1)
    limited = classify(429, {"retry-after-ms": "300"}, {})
    assert limited is not None and 0.3 <= policy.wait_s(limited, 1) <= 0.33
    assert 0 <= policy.wait_s(timeout, 1) <= 2.0  # initial 1 s + up to 1 s jitter
    assert policy.wait_s(timeout, 10) <= 10.0 + 1.0  # capped at max_wait_s (+ jitter)
