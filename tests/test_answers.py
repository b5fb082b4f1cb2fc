"""Answer -> Result: what counts as an error row."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher import fastjson
from batcher.answers import result_from_answer
from batcher.client import Answer
from batcher.journal import _result_line
from batcher.records import Request
from batcher.structured import StructuredOutput
from batcher.writer import _columns, output_schema

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


def test_tool_calls_are_typed_data() -> None:
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {"y": [2]}}},
    ]
    r = result_from_answer(
        REQ, answer({"content": None, "tool_calls": calls}, "tool_calls"), 1, None
    )
    assert (r.status, r.content, r.finish_reason) == ("ok", None, "tool_calls")
    assert r.tool_calls == [
        {"id": "c1", "name": "f", "arguments": '{"x": 1}'},
        {"id": "c2", "name": "g", "arguments": '{"y": [2]}'},  # an object becomes its JSON text
    ]
    legacy = {"content": None, "function_call": {"name": "f", "arguments": "{}"}}
    r = result_from_answer(REQ, answer(legacy), 1, None)
    assert r.tool_calls == [{"id": None, "name": "f", "arguments": "{}"}]
    assert (
        "tool_calls" not in result_from_answer(REQ, answer({"content": "x"}), 1, None).to_record()
    )


def test_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "posi"}, "tive", {"type": "refusal", "refusal": ""}]
    r = result_from_answer(REQ, answer({"content": parts}), 1, None)
    assert (r.status, r.content) == ("ok", "positive")


def test_usage_without_total_is_summed_and_missing_counts_are_none() -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 1}
    r = result_from_answer(REQ, answer({"content": "a"}, usage=usage), 1, None)
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (4, 1, 5)
    r = result_from_answer(REQ, answer({"content": "a"}, usage={"total_tokens": 9}), 1, None)
    assert r.ok and (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (None, None, 9)
    body = dict(answer({"content": "a"}).body)
    del body["usage"]
    r = result_from_answer(REQ, Answer(body, {}, 0.1), 1, None)
    assert r.ok and r.prompt_tokens is None


def _body(**changes: Any) -> dict[str, Any]:
    body = answer({"content": "positive"}).body
    return {**body, **changes}


def _with_choice(**changes: Any) -> dict[str, Any]:
    body = _body()
    return {**body, "choices": [{**body["choices"][0], **changes}]}


def _with_message(**changes: Any) -> dict[str, Any]:
    choice = _body()["choices"][0]
    return _with_choice(message={**choice["message"], **changes})


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (_with_message(content=42), "content is a number"),
        (_with_message(content={"text": "x"}), "content is an object"),
        (_with_message(content=[1, 2]), "content part is a number"),
        (_with_message(content=[{"type": "text", "text": 3}]), "content part is an object"),
        (_body(usage={"prompt_tokens": "7", "completion_tokens": 3}), "usage.prompt_tokens"),
        (_body(usage={"prompt_tokens": 7.5, "completion_tokens": 3}), "not a non-negative int"),
        (_body(usage={"prompt_tokens": 7.0, "completion_tokens": 3}), "usage.prompt_tokens"),
        (_body(usage={"prompt_tokens": None, "completion_tokens": 3}), "usage.prompt_tokens"),
        (_body(usage={"prompt_tokens": -1, "completion_tokens": 3}), "usage.prompt_tokens"),
        (_body(usage={"prompt_tokens": True, "completion_tokens": 3}), "usage.prompt_tokens"),
        (_body(usage=[7, 3]), "usage is a list"),
        (_body(usage=None), "usage is null"),
        (_body(usage="7"), "usage is a string"),
        (_body(choices=[None]), "choices[0] is null"),
        (_body(choices={"0": {}}), "choices is an object"),
        (_body(choices=None), "choices is null"),
        (_with_choice(message="positive"), "message is a string"),
        (_with_choice(finish_reason=1), "finish_reason is a number"),
        (_body(model={"name": "gpt-4o"}), "model is an object"),
        (_with_message(refusal=["no"]), "refusal is a list"),
        (_with_message(tool_calls={"f": 1}), "tool_calls is an object"),
        (_with_message(tool_calls=[{"function": {"arguments": "{}"}}]), "no function name"),
        (_with_message(tool_calls=[{"function": {"name": "f", "arguments": 3}}]), "arguments"),
        (_with_message(tool_calls=[{"id": 7, "function": {"name": "f"}}]), "id is a number"),
        ([1, 2, 3], "not a JSON object"),
    ],
)
def test_malformed_answers_are_error_rows_with_the_raw_body(body: Any, words: str) -> None:
    r = result_from_answer(REQ, Answer(body, {}, 0.5), 3, None)
    assert r.status == "error" and r.content is None and r.attempts == 3
    assert words in (r.error or ""), r.error
    assert "raw answer: " in (r.error or "")


def test_a_malformed_answer_keeps_its_paid_usage_and_a_truncated_body() -> None:
    body = _with_message(content=42, padding="x" * 50_000)
    r = result_from_answer(REQ, Answer(body, {}, 0.5), 1, None)
    assert (r.status, r.prompt_tokens, r.total_tokens) == ("error", 7, 10)
    assert len(r.error or "") < 1_300 and "characters)" in (r.error or "")


def test_lone_surrogates_are_replaced() -> None:
    body = json.loads('{"choices": [{"message": {"content": "a\\ud800b"}}], "model": "m\\udfff"}')
    r = result_from_answer(REQ, Answer(body, {}, 0.1), 1, None)
    assert r.ok and r.content == "a?b" and r.model == "m?"
    json.dumps(r.to_record(), ensure_ascii=False).encode()  # the journal can write it


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


# ---- property: any JSON body -> a typed Result or a row error, and it always writes ----

# Text with lone surrogates too: JSON can carry "\ud800", UTF-8 (the journal, Parquet) cannot.
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
WORDS = st.text(st.characters(exclude_categories=()), min_size=1, max_size=12)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

ODD = JSON.filter(lambda v: v is not None) | st.none()  # JSON's favourite, None, less often


def shaped(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right shape, sometimes anything: so the search reaches the deep fields."""
    # (one_of would pick the two about evenly; hypothesis favours 0 and the ends of a range)
    return st.sampled_from(range(10)).flatmap(lambda i: ODD if i == 7 else valid)


def optional_dict(
    required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(required, optional=optional)


COUNT = shaped(st.integers(min_value=0, max_value=2**40))
TOOL_CALL = optional_dict(
    {"function": shaped(optional_dict({"name": shaped(TEXT)}, {"arguments": shaped(TEXT)}))},
    {"id": shaped(TEXT), "type": st.just("function")},
)
MESSAGE = optional_dict(
    {
        "content": shaped(
            WORDS
            | st.lists(
                shaped(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})), max_size=3
            )
        ),
    },
    {
        "role": st.just("assistant"),
        "refusal": shaped(st.none() | TEXT),
        "tool_calls": shaped(st.lists(shaped(TOOL_CALL), max_size=3)),
        "function_call": shaped(optional_dict({}, {"name": TEXT, "arguments": TEXT})),
    },
)
CHOICE = optional_dict({"message": shaped(MESSAGE)}, {"finish_reason": shaped(TEXT)})
BODY = shaped(
    optional_dict(
        {"choices": shaped(st.lists(shaped(CHOICE), min_size=1, max_size=2))},
        {
            "model": shaped(TEXT),
            "usage": shaped(
                optional_dict(
                    {"prompt_tokens": COUNT, "completion_tokens": COUNT},
                    {"total_tokens": COUNT},
                )
            ),
        },
    )
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODY, structured=st.booleans())
def test_any_json_answer_is_a_typed_result_or_a_row_error(body: Any, structured: bool) -> None:
    so = STRUCTURED if structured else None
    r = result_from_answer(REQ, Answer(body, {}, 0.25), 1, so)
    assert r.status in ("ok", "error")
    assert r.ok or r.error
    # The journal's round trip, then the output's strict conversion: no fallback needed.
    rec = fastjson.loads(_result_line(r))
    del rec["t"]
    schema = output_schema(["k"], None, so.arrow_type if so is not None else None)
    columns = _columns([rec], ["k"], {"k"}, schema)  # the writer's strict path, no fallback
    table = pa.Table.from_arrays(
        [pa.array(v, type=schema.field(n).type) for n, v in columns.items()], schema=schema
    )
    pq.write_table(table, io.BytesIO())


STRUCTURED = StructuredOutput.from_params(
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


_USUAL = {
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}
_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**64),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.sampled_from(["", "stop", "x\ud800y", "ünï"]),
    st.lists(st.none(), max_size=2),
    st.dictionaries(st.sampled_from(["text", "type"]), st.text(max_size=3), max_size=2),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(
        [
            ("model",),
            ("choices",),
            ("usage",),
            ("choices", 0),
            ("choices", 0, "message"),
            ("choices", 0, "finish_reason"),
            ("choices", 0, "message", "content"),
            ("choices", 0, "message", "refusal"),
            ("choices", 0, "message", "tool_calls"),
            ("choices", 0, "message", "function_call"),
            ("usage", "prompt_tokens"),
            ("usage", "completion_tokens"),
            ("usage", "total_tokens"),
        ]
    ),
    value=_FIELD_VALUES,
    drop=st.booleans(),
)
def test_the_usual_answer_s_quick_reading_agrees_with_the_full_one(
    path: tuple[Any, ...], value: Any, drop: bool
) -> None:
    """Answers in the usual shape are read without the full checks; any answer, one field
    changed or dropped, gives the same Result either way (the full reading alone decides the
    rest)."""
    from batcher import answers

    body = json.loads(json.dumps(_USUAL))
    parent: Any = body
    for step in path[:-1]:
        parent = parent[step]
    if drop and isinstance(parent, dict):
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value
    quick = result_from_answer(REQ, Answer(body, {}, 0.5), 1, None, cost=lambda p, c: 0.25)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(answers, "_usual", lambda body: None)
        full = result_from_answer(REQ, Answer(body, {}, 0.5), 1, None, cost=lambda p, c: 0.25)
    assert quick == full
