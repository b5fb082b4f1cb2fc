"""Templates and request bodies: pure logic, no I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.errors import InputDataError, JobSpecError
from batcher.readers import Row
from batcher.requests import RequestBuilder, Template
from batcher.spec import Job


def job(**kw: object) -> Job:
    base: dict[str, object] = {
        "input": Path("in.jsonl"),
        "output": Path("out.parquet"),
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Review: {text}"}],
    }
    base.update(kw)
    return Job.model_validate(base)


@pytest.mark.parametrize(
    ("text", "data", "expected"),
    [
        ("plain", {}, "plain"),
        ("{a} and {b}", {"a": "x", "b": "y"}, "x and y"),
        ('JSON stays: {"k": 1} {a}', {"a": "v"}, 'JSON stays: {"k": 1} v'),
        ("{{a}} is literal", {"a": "nope"}, "{a} is literal"),
        ("{ a } not a placeholder", {}, "{ a } not a placeholder"),
        ("n={n} f={f} l={l}", {"n": 3, "f": 1.5, "l": [1, "x"]}, 'n=3 f=1.5 l=[1, "x"]'),
        ("{a}{a}", {"a": "z"}, "zz"),
    ],
)
def test_template_render(text: str, data: dict, expected: str) -> None:
    assert Template.compile(text).render(data) == expected


def test_template_columns() -> None:
    assert Template.compile("{a} {{b}} {c}").columns == ("a", "c")


def test_body_from_template_and_params() -> None:
    b = RequestBuilder(job(params={"max_tokens": 5, "temperature": 0}))
    body = b.build_body(Row("1", 1, {"text": "good"}))
    assert body == {
        "model": "gpt-4o-mini",
        "max_tokens": 5,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Review: good"}],
    }


def test_missing_and_null_columns_name_row_and_column() -> None:
    b = RequestBuilder(job())
    with pytest.raises(InputDataError, match=r"in.jsonl:7 \(id r7\).*no column 'text'"):
        b.build_body(Row("r7", 7, {"txt": "x"}))
    with pytest.raises(InputDataError, match="column 'text' is null"):
        b.build_body(Row("r8", 8, {"text": None}))


def test_o_series_translates_max_tokens() -> None:
    b = RequestBuilder(job(model="o3-mini", params={"max_tokens": 100}))
    body = b.build_body(Row("1", 1, {"text": "x"}))
    assert body["max_completion_tokens"] == 100 and "max_tokens" not in body


def test_o1_preview_refuses_system_messages() -> None:
    with pytest.raises(JobSpecError, match="system messages"):
        RequestBuilder(
            job(
                model="o1-preview",
                messages=[
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "{text}"},
                ],
            )
        )


def test_batch_body_gets_job_params_and_checks() -> None:
    b = RequestBuilder(job(messages=None, model=None, params={"temperature": 0}), batch_format=True)
    line = {
        "custom_id": "a",
        "body": {
            "model": "gpt-4o",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
        },
    }
    body = b.build_body(Row("a", 1, line))
    assert body["temperature"] == 0 and body["model"] == "gpt-4o"
    bad = {
        "custom_id": "b",
        "body": {"model": "gpt-4o", "n": 2, "messages": [{"role": "user", "content": "hi"}]},
    }
    with pytest.raises(InputDataError, match="n not supported"):
        b.build_body(Row("b", 2, bad))


def test_check_columns_on_known_schema() -> None:
    b = RequestBuilder(job(keep_columns=["lang"]))
    with pytest.raises(InputDataError, match="no column 'text'"):
        b.check_columns(["id", "body"])
    with pytest.raises(InputDataError, match="keep_columns names 'lang'"):
        b.check_columns(["id", "text"])


def test_the_scans_model_of_raises_exactly_when_build_body_does() -> None:
    """model_of checks only the template's columns once a row has built: its verdict (and
    message) must be build_body's for any row, before and after that first row."""
    from datetime import datetime

    b = RequestBuilder(
        job(
            messages=[
                {"role": "system", "content": "Label {kind}."},
                {"role": "user", "content": "{text} ({n})"},
            ]
        )
    )
    rows = [
        {"text": "a"},  # no kind, no n: fails before any row built
        {"kind": "k", "text": "t", "n": "1"},
        {"kind": "k", "text": "t", "n": 2},  # a number: built in full, fine
        {"kind": "k", "text": None, "n": "1"},  # null
        {"kind": "k", "n": "1"},  # missing
        {"kind": "k", "text": "t", "n": {"nested": [datetime(2026, 1, 1)]}},  # cannot be JSON
        {"kind": "k", "text": "t", "n": "3", "extra": None},
    ]
    for i, data in enumerate(rows):
        row = Row(str(i), i + 1, data)
        try:
            expected: str | Exception = b.build_body(row)["model"]
        except InputDataError as exc:
            expected = exc
        if isinstance(expected, Exception):
            with pytest.raises(InputDataError) as got:
                b.model_of(row)
            assert str(got.value) == str(expected)
        else:
            assert b.model_of(row) == expected == "gpt-4o-mini"


def test_a_batch_s_text_is_measured_for_where_its_tokens_are_counted() -> None:
    """`Built.text_chars`: the characters token counting will encode (text contents and text
    parts), which decides whether a batch is counted on the loop or in its thread."""
    from batcher.engine import COUNT_ON_LOOP_CHARS
    from batcher.prepare import Built

    short = {"messages": [{"role": "system", "content": "abc"}, {"role": "user", "content": "de"}]}
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "xyz"}, {"type": "image_url"}]}
        ]
    }
    built = Built(by_model={"m": ([], [short, parts, {"messages": None}], [])})
    assert built.text_chars() == 8
    long = {"messages": [{"role": "user", "content": "w " * COUNT_ON_LOOP_CHARS}]}
    assert Built(by_model={"m": ([], [long], [])}).text_chars() > COUNT_ON_LOOP_CHARS
