"""Answer -> Result: what counts as an error row."""

from __future__ import annotations

from typing import Any

import pytest

from batcher.answers import result_from_answer
from batcher.client import Answer
from batcher.records import Request
from batcher.structured import StructuredOutput

REQ = Request("r1", {"model": "gpt-4o"}, "gpt-4o", 10, {"k": 1})


def answer(message: dict[str, Any], finish: str | None = "stop", **extra: Any) -> Answer:
    body = {
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        **extra,
    }
    return Answer(body, {}, 0.123456)


def test_ok_answer() -> None:
    r = result_from_answer(REQ, answer({"content": "positive"}), 2, None)
    assert (r.status, r.content, r.attempts, r.total_tokens) == ("ok", "positive", 2, 10)
    assert r.model == "gpt-4o-2024-08-06" and r.keep == {"k": 1} and r.latency_s == 0.1235


@pytest.mark.parametrize(
    ("message", "finish", "words"),
    [
        ({"content": None}, "content_filter", "content filter"),
        ({"content": ""}, "length", "raise max_tokens"),
        ({"content": None}, "stop", "no content"),
        ({"content": None, "refusal": "I can't help"}, "stop", "refused"),
    ],
)
def test_answers_without_text_are_errors(message: dict, finish: str, words: str) -> None:
    r = result_from_answer(REQ, answer(message, finish), 1, None)
    assert r.status == "error" and words in (r.error or "")


def test_tool_calls_are_the_content() -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    r = result_from_answer(REQ, answer({"content": None, "tool_calls": calls}), 1, None)
    assert r.status == "ok" and '"name": "f"' in (r.content or "")


def test_structured_parse_failure_keeps_content() -> None:
    so = StructuredOutput.from_params(
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {
                        "type": "object",
                        "properties": {"a": {"type": "integer"}},
                        "required": ["a"],
                    },
                },
            }
        }
    )
    good = result_from_answer(REQ, answer({"content": '{"a": 3}'}), 1, so)
    assert good.parsed == {"a": 3}
    bad = result_from_answer(REQ, answer({"content": '{"a": "x"}'}), 1, so)
    assert bad.status == "error" and bad.content == '{"a": "x"}' and bad.parsed is None
