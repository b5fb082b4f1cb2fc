"""A chat-completion answer -> the row's Result, every value in its column's type.

Pure: no I/O. Whatever JSON a server sends, the outcome is a Result that the journal and the
Parquet output can hold, never an exception: a gateway that answers `content: 42`,
`choices: [null]` or `usage: {"prompt_tokens": "12"}` must not crash the run, nor be journaled
as a value that later breaks the output for every run that follows.

    content            a string, or a list of parts whose text parts are joined
    tool_calls         [{id, name, arguments}] strings (arguments as the JSON text sent)
    usage              non-negative integers; a count left out is unknown (total: the sum)
    model, finish_reason, refusal   strings or null

An answer outside these shapes is an error row (retriable with --retry-errors) whose `error`
names what is wrong and keeps the start of the raw body. So is an answer that carries no text
and no tool call, a refusal, or structured output that does not parse or validate; its content
is kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from batcher.client import Answer
from batcher.records import SOURCE_API, STATUS_ERROR, STATUS_OK, Request, Result, ToolCall
from batcher.schema import is_count
from batcher.structured import StructuredOutput

RAW_BODY_CHARS = 1_000  # of a malformed answer's body kept in the row's error

_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


class MalformedAnswer(ValueError):
    """The answer is JSON but not a chat completion in the shapes batcher stores."""


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
    req: Request,
    answer: Answer,
    attempts: int,
    structured: StructuredOutput | None,
    *,
    cost: Callable[[int | None, int | None], float | None] | None = None,
    source: str = SOURCE_API,
) -> Result:
    """The row's Result for an answer; a malformed answer is an error row, never an exception.

    Built once, final (a dataclasses.replace per row was a measurable share of the engine's
    CPU): `cost(prompt_tokens, completion_tokens)` books the answer and gives its cost_usd
    (called once); `source` other than SOURCE_API is a reused answer (no latency of its own).
    The request's key goes with the result, for reruns."""
    body: Any = answer.body
    usual = _usual(body) if structured is None else None
    if usual is not None:  # the shape nearly every answer has, read without the checks' calls
        text, finish, model, prompt, completion, total = usual
        return Result(  # positional (Result's field order): a third faster than by keyword
            req.row_id,
            STATUS_OK,
            text,
            finish,
            prompt,
            completion,
            total,
            attempts,
            round(answer.latency_s, 4) if source == SOURCE_API else None,
            None,  # error
            model,
            req.keep,
            None,  # parsed
            None,  # tool_calls
            source,
            None if cost is None else cost(prompt, completion),
            None if req.key is None else req.key.key,
        )
    usage = _usage_or_none(body)

    def result(status: str, error: str | None, **answered: Any) -> Result:
        tokens = usage or {}
        prompt, completion = tokens.get("prompt_tokens"), tokens.get("completion_tokens")
        return Result(
            req.row_id,
            status,
            error=error,
            attempts=attempts,
            latency_s=round(answer.latency_s, 4) if source == SOURCE_API else None,
            keep=req.keep,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=tokens.get("total_tokens"),
            source=source,
            cost_usd=None if cost is None else cost(prompt, completion),
            key=None if req.key is None else req.key.key,
            **answered,
        )

    try:
        if not isinstance(body, dict):
            raise MalformedAnswer("the answer is not a JSON object")
        model = _optional_text(body, "model")
        choice = _first_choice(body)
        message = _message(choice)
        finish = _optional_text(choice, "finish_reason")
        content = _content(message.get("content"))
        tool_calls = _tool_calls(message)
        refusal = _optional_text(message, "refusal")
        if usage is None:
            _usage(body)  # it did not parse: this raises, saying why
    except MalformedAnswer as exc:
        return result(STATUS_ERROR, _malformed(str(exc), body))
    status, error, parsed = STATUS_OK, None, None
    if refusal:
        status, error = STATUS_ERROR, f"the model refused: {refusal}"
    elif not content and not tool_calls:
        status, error = STATUS_ERROR, no_content_reason(finish)
    elif structured is not None and content:
        try:
            parsed = structured.parse(content)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
            status, error = STATUS_ERROR, _clean(str(exc))
    return result(
        status,
        error,
        content=content,
        finish_reason=finish,
        model=model,
        parsed=parsed,
        tool_calls=tool_calls,
    )


def _usual(
    body: Any,
) -> tuple[str, str | None, str | None, int, int, int] | None:
    """(content, finish_reason, model, prompt, completion and total tokens) of an answer in the
    usual shape: one text content, no tool call, no refusal, every usage count; None for any
    other (the full reading then decides, and says what is wrong). What it returns is what the
    full reading gives for that answer."""
    if type(body) is not dict:
        return None
    choices = body.get("choices")
    if type(choices) is not list or not choices or type(choices[0]) is not dict:
        return None
    choice = choices[0]
    message = choice.get("message")
    if type(message) is not dict or "tool_calls" in message or "function_call" in message:
        return None
    content, refusal = message.get("content"), message.get("refusal")
    finish, model, usage = choice.get("finish_reason"), body.get("model"), body.get("usage")
    if (
        type(content) is not str
        or not content
        or refusal is not None
        or not (finish is None or type(finish) is str)
        or not (model is None or type(model) is str)
        or type(usage) is not dict
    ):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if not (is_count(prompt) and is_count(completion) and is_count(total)):
        return None
    return (
        _clean(content),
        None if finish is None else _clean(finish),
        None if model is None else _clean(model),
        prompt,
        completion,
        total,
    )


def _malformed(why: str, body: Any) -> str:
    try:
        raw = json.dumps(body, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # circular or absurdly deep: say so, keep going
        raw = "(not serialisable)"
    if len(raw) > RAW_BODY_CHARS:
        raw = raw[:RAW_BODY_CHARS] + f"... ({len(raw):,} characters)"
    return _clean(f"the answer could not be read: {why}; raw answer: {raw}")


def _clean(text: str) -> str:
    """The text, with lone surrogates (JSON allows "\\ud800"; UTF-8 does not) replaced."""
    if text.isascii():  # most answers: no surrogate possible, no encoding needed
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode()
    return text


def _optional_text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return None if value is None else _clean(value)
    raise MalformedAnswer(f"{key} is {_kind(value)}, not a string")


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "null")


def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list):
        raise MalformedAnswer(f"choices is {_kind(choices)}, not a list")
    if not choices:
        return {}  # no choice at all: an answer without content (an error row, said so)
    if not isinstance(choices[0], dict):
        raise MalformedAnswer(f"choices[0] is {_kind(choices[0])}, not an object")
    return choices[0]


def _message(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message")
    if message is None:
        return {}
    if not isinstance(message, dict):
        raise MalformedAnswer(f"message is {_kind(message)}, not an object")
    return message


def _content(content: Any) -> str | None:
    """A string as it is; a list of parts as its text parts joined; null as None."""
    if content is None or isinstance(content, str):
        return None if content is None else _clean(content)
    if not isinstance(content, list):
        raise MalformedAnswer(f"content is {_kind(content)}, not a string or a list of parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif not (isinstance(part, dict) and part.get("type") not in (None, "text")):
            # a text part without its text, or a number/list/null part
            raise MalformedAnswer(f"a content part is {_kind(part)} without text")
        # other typed parts (audio, refusal, ...) hold no text for the content column
    return _clean("".join(texts))


def _tool_calls(message: dict[str, Any]) -> list[ToolCall] | None:
    """`tool_calls` (or the older single `function_call`) as [{id, name, arguments}]."""
    calls = message.get("tool_calls")
    legacy = message.get("function_call")
    if calls is None and legacy is None:
        return None
    if calls is None:
        calls = [{"function": legacy}]
    if not isinstance(calls, list):
        raise MalformedAnswer(f"tool_calls is {_kind(calls)}, not a list")
    out: list[ToolCall] = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise MalformedAnswer("a tool call has no function name")
        arguments = function.get("arguments")
        if isinstance(arguments, dict | list):  # some gateways send the object, not its text
            arguments = json.dumps(arguments, ensure_ascii=False)
        elif arguments is not None and not isinstance(arguments, str):
            raise MalformedAnswer(f"tool call arguments are {_kind(arguments)}, not a string")
        call_id = call.get("id") if isinstance(call, dict) else None
        if call_id is not None and not isinstance(call_id, str):
            raise MalformedAnswer(f"a tool call id is {_kind(call_id)}, not a string")
        out.append(
            {
                "id": None if call_id is None else _clean(call_id),
                "name": _clean(function["name"]),
                "arguments": None if arguments is None else _clean(arguments),
            }
        )
    return out or None


def _usage(body: dict[str, Any]) -> dict[str, int]:
    """The token counts. A count left out is unknown (some gateways send no `usage`, or no
    total: then it is the sum); a count present must be a non-negative integer."""
    if "usage" not in body:
        return {}
    usage = body["usage"]
    if not isinstance(usage, dict):
        raise MalformedAnswer(f"usage is {_kind(usage)}, not an object")
    counts: dict[str, int] = {}
    for key in _USAGE_KEYS:
        if key not in usage:
            continue
        value = usage[key]
        if not is_count(value):
            raise MalformedAnswer(f"usage.{key} is {value!r:.40}, not a non-negative integer")
        counts[key] = value
    if "total_tokens" not in counts and "prompt_tokens" in counts and "completion_tokens" in counts:
        counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
    return counts


def _usage_or_none(body: Any) -> dict[str, int] | None:
    """The usage when it is well formed (kept on an error row too: those tokens were paid)."""
    if not isinstance(body, dict):
        return None
    try:
        return _usage(body)
    except MalformedAnswer:
        return None
