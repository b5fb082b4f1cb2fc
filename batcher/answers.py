"""A chat-completion answer -> the row's Result: content, usage, and what counts as an error.

Pure: no I/O. An answer is an error row (retriable with --retry-errors) when it carries no
text, a refusal, or structured output that does not parse or validate; its content is kept.
"""

from __future__ import annotations

import json

from batcher.client import Answer
from batcher.records import STATUS_ERROR, STATUS_OK, Request, Result
from batcher.structured import StructuredOutput


def no_content_reason(finish_reason: str | None) -> str:
    if finish_reason == "length":
        return (
            "the answer was cut off before any text (finish_reason: length); raise max_tokens "
            "(reasoning models spend max_completion_tokens on thinking first)"
        )
    if finish_reason == "content_filter":
        return "the content filter withheld the answer (finish_reason: content_filter)"
    return f"the answer has no content (finish_reason: {finish_reason})"


def result_from_answer(
    req: Request, answer: Answer, attempts: int, structured: StructuredOutput | None
) -> Result:
    body = answer.body
    choice = body["choices"][0] if body["choices"] else {}
    message = choice.get("message") or {}
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        content = json.dumps(message["tool_calls"], ensure_ascii=False)
    usage = body.get("usage") or {}
    finish = choice.get("finish_reason")
    status, error, parsed = STATUS_OK, None, None
    if message.get("refusal"):
        status, error = STATUS_ERROR, f"the model refused: {message['refusal']}"
    elif not content:
        status, error = STATUS_ERROR, no_content_reason(finish)
    elif structured is not None:
        try:
            parsed = structured.parse(content)
        except ValueError as exc:
            status, error = STATUS_ERROR, str(exc)
    return Result(
        id=req.row_id,
        status=status,
        content=content,
        finish_reason=finish,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        total_tokens=usage.get("total_tokens"),
        attempts=attempts,
        latency_s=round(answer.latency_s, 4),
        error=error,
        model=body.get("model"),
        keep=req.keep,
        parsed=parsed,
    )
