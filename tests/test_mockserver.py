"""The bundled mock server: pure window logic on a fake clock, then real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from helpers import read_output, run_batcher, write_job, write_jsonl
from PIL import Image

from batcher.mock import (
    DATED_MODEL_NAMES,
    MockConfig,
    MockServer,
    Refusal,
    SlidingWindowQuota,
    ThreadedMockServer,
    admission_cost,
    build_completion,
    canonical_digest,
    format_reset,
    prompt_tokens,
    schema_instance,
    validate_request,
)
from batcher.mock.faults import RequestFaults, draw_faults, in_storm
from batcher.models import DEFAULT_ASSUMED_MAX_TOKENS
from batcher.tokens import count_prompt_tokens, tools_tokens

KEY = "sk-test-secret-0123456789"
StartMock = Callable[..., ThreadedMockServer]  # the conftest `mock_server` factory
UNLIMITED: dict[str, Any] = {"rpm": None, "tpm": None}  # for tests about anything but limits


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def chat(text: str = "hello", model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
        },
    },
}
LABEL_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "record_label",
        "parameters": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}},
            "required": ["label"],
        },
    },
}
NO_ARGS_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "ping"}}


def with_image(
    url: str, detail: str | None = None, text: str = "Describe.", **extra: Any
) -> dict[str, Any]:
    image: dict[str, Any] = {"url": url} if detail is None else {"url": url, "detail": detail}
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": image}]
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **extra}


def png_data_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def admit_many(quota: SlidingWindowQuota, tokens: int, limit: int = 10_000) -> int:
    n = 0
    while n < limit and quota.try_admit(tokens).admitted:
        n += 1
    return n


# -- SlidingWindowQuota: pure, fake clock --------------------------------------------------------


def test_short_window_admits_its_share_of_the_minute() -> None:
    clock = FakeClock()
    quota = SlidingWindowQuota(60, None, windows_s=(60, 10), clock=clock)
    assert admit_many(quota, 1) == 10  # 60 rpm over 10 s -> 10
    refused = quota.try_admit(1)
    assert not refused.admitted and refused.limited_by == "requests"
    assert refused.retry_after_s == pytest.approx(10.0)
    clock.advance(9.999)
    assert not quota.try_admit(1).admitted
    clock.advance(0.001)  # exactly retry_after_s after the first admissions
    assert admit_many(quota, 1) == 10


def test_the_minute_caps_the_sum_of_short_windows() -> None:
    clock = FakeClock()
    quota = SlidingWindowQuota(60, None, windows_s=(60, 10), clock=clock)
    for _ in range(6):
        assert admit_many(quota, 1) == 10
        clock.advance(10)
    # t=60: the t=0 batch has expired from the minute (an entry counts while now < t + 60).
    assert admit_many(quota, 1) == 10
    clock.advance(9.5)  # t=69.5: the minute holds t=10..60 = 60, the 10 s window t=60 = 10
    refused = quota.try_admit(1)
    assert refused.retry_after_s == pytest.approx(0.5)  # both free up at t=70


def test_tokens_are_limited_per_window_and_retry_after_is_exact() -> None:
    clock = FakeClock()
    quota = SlidingWindowQuota(None, 600, windows_s=(60, 10), clock=clock)  # 100 tokens / 10 s
    assert quota.try_admit(40).admitted
    clock.advance(2)
    assert quota.try_admit(40).admitted
    clock.advance(1)
    refused = quota.try_admit(40)  # 80 + 40 > 100
    assert refused.limited_by == "tokens"
    assert refused.retry_after_s == pytest.approx(7.0)  # the first 40 leave at t=10
    assert quota.try_admit(20).admitted  # a smaller one still fits
    clock.advance(7)
    assert quota.try_admit(40).admitted


def test_request_larger_than_a_short_window_passes_alone_but_never_the_minute() -> None:
    clock = FakeClock()
    quota = SlidingWindowQuota(None, 600, windows_s=(60, 10), clock=clock)
    too_large = quota.try_admit(601)
    assert too_large.too_large and too_large.retry_after_s is None
    assert quota.try_admit(150).admitted  # > 100 for 10 s, but the 10 s window was empty
    clock.advance(1)
    refused = quota.try_admit(150)
    assert refused.retry_after_s == pytest.approx(9.0)


def test_foreign_share_leaves_the_rest_of_every_window() -> None:
    clock = FakeClock()
    quota = SlidingWindowQuota(600, 60_000, windows_s=(60, 10), foreign_share=0.25, clock=clock)
    assert admit_many(quota, 10) == 75  # 100 per 10 s, a quarter used by others
    state = quota.state()
    assert state.remaining_requests == 0
    assert state.remaining_tokens == 7500 - 750
    clock.advance(10)
    assert admit_many(quota, 10) == 75


def test_failed_requests_count_toward_the_request_window() -> None:
    clock = FakeClock()
    quota = SlidingWindowQuota(2, None, windows_s=(60,), clock=clock)
    assert quota.try_admit(1).admitted
    clock.advance(1)
    quota.record_failed()
    clock.advance(1)
    refused = quota.try_admit(1)
    assert refused.retry_after_s == pytest.approx(58.0)  # the admitted one leaves at t=60


def test_state_reports_the_tightest_window() -> None:
    clock = FakeClock()
    quota = SlidingWindowQuota(60, 6000, windows_s=(60, 10), clock=clock)
    quota.try_admit(300)
    clock.advance(4)
    state = quota.state()
    assert (state.remaining_requests, state.remaining_tokens) == (9, 700)
    assert state.reset_requests_s == pytest.approx(6.0)
    quota.clear()
    assert quota.state().remaining_tokens == 1000


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.12, "120ms"),
        (0.0004, "1ms"),
        (1.0, "1s"),
        (6.5, "6.5s"),
        (59.9854, "59.985s"),
        (90, "1m30s"),
    ],
)
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rpm": 0},
        {"tpm": -1},
        {"windows_s": (10,)},
        {"windows_s": (60, 0)},
        {"foreign_share": 1.0},
        {"drop_rate": 1.5},
        {"latency_s": -1},
        {"api_keys": set()},
        {"models": ()},
        {"model_limits": {"gpt-4o": (0, 10)}},
        {"rate_limit_storm_requests": (0, 3)},
        {"rate_limit_storm_requests": (5, 2)},
        {"storm_retry_after_s": -1},
        {"image_count_as": "pixels"},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MockConfig(**kwargs)


def test_config_normalises_collections() -> None:
    config = MockConfig(api_keys={"a"}, models=["m"], windows_s=[60, 1], model_limits={"m": (1, 2)})
    assert config.api_keys == frozenset({"a"})
    assert config.models == ("m",)
    assert config.windows_s == (60.0, 1.0)
    assert config.limits_for("m") == (1, 2)
    assert config.limits_for("other") == (config.rpm, config.tpm)


# -- validation and answers: pure -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": "gpt-4o"}, 400, "messages"),
        ({"model": "gpt-4o", "messages": []}, 400, "messages"),
        (chat(n=1), 400, "n"),
        (chat(service_tier="auto"), 400, "service_tier"),
        (chat(parallel_tool_calls=False), 400, "parallel_tool_calls"),
        (chat(stream_options={"include_usage": True}), 400, "stream_options"),
        (chat(stream=True), 400, "stream"),
        (chat(max_tokens=0), 400, "max_tokens"),
        (chat(max_tokens=5, max_completion_tokens=5), 400, "max_tokens"),
        (chat(model="o3-mini", max_tokens=10), 400, "max_tokens"),
        (chat(model="o1-preview", temperature=0.2), 400, "temperature"),
        (chat(model="o3-mini-2025-01-31", top_p=0.5), 400, "top_p"),
        (chat(response_format={"type": "json_object"}), 400, "messages"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
            400,
            "response_format.json_schema.name",
        ),
        (chat(response_format={"type": "yaml"}), 400, "response_format.type"),
        (chat(model="gpt-5"), 404, "model"),
        (
            {"model": "gpt-4o", "messages": [{"role": "usr", "content": "hi"}]},
            400,
            "messages[0].role",
        ),
        (chat(temperature=7), 400, "temperature"),
        (chat(temperature=-0.1), 400, "temperature"),
        (chat(temperature="0"), 400, "temperature"),
        (chat(top_p=1.5), 400, "top_p"),
        (chat(presence_penalty=-3), 400, "presence_penalty"),
        (chat(frequency_penalty=2.5), 400, "frequency_penalty"),
        (chat(seed="42"), 400, "seed"),
        (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (chat(stop=[1]), 400, "stop"),
        (chat(tools=[]), 400, "tools"),
        (chat(tools=[{"type": "retrieval"}]), 400, "tools[0].type"),
        (
            chat(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
            400,
            "tools[0].function.name",
        ),
        (
            chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
            400,
            "tools[0].function.parameters",
        ),
        (chat(tool_choice="auto"), 400, "tool_choice"),
        (chat(tools=[WEATHER_TOOL], tool_choice="always"), 400, "tool_choice"),
        (
            chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "x"}}),
            400,
            "tool_choice",
        ),
        (chat(functions=[{"name": "a b"}]), 400, "functions[0].name"),
        (chat(function_call="auto"), 400, "function_call"),
        (with_image("ftp://example.com/a.png"), 400, "messages[0].content[1].image_url.url"),
        (
            with_image("https://example.com/a.png", "medium"),
            400,
            "messages[0].content[1].image_url.detail",
        ),
    ],
)
def test_refusals(body: dict[str, Any], status: int, param: str) -> None:
    with pytest.raises(Refusal) as info:
        validate_request(body, ("gpt-4o", "gpt-4o-mini", "o3-mini", "o1-preview"))
    assert info.value.status == status
    assert info.value.body["error"]["param"] == param
    assert info.value.body["error"]["type"] == "invalid_request_error"


def test_an_image_that_does_not_decode_is_refused() -> None:
    with pytest.raises(Refusal) as info:
        validate_request(with_image("data:image/png;base64,bm90IGFuIGltYWdl"), None)
    assert info.value.status == 400
    assert info.value.body["error"]["code"] == "invalid_image_format"


def test_accepted_requests() -> None:
    models = ("gpt-4o-mini", "o3-mini")
    validate_request(chat(model="o3-mini", max_completion_tokens=10, temperature=1), models)
    validate_request(chat("answer in JSON", response_format={"type": "json_object"}), models)
    validate_request(chat(model="my-deployment"), None)  # models=None serves any name
    validate_request(chat(tools=[WEATHER_TOOL, NO_ARGS_TOOL], tool_choice="required"), models)
    validate_request(chat(functions=[{"name": "f"}], function_call={"name": "f"}), models)
    validate_request(with_image("https://example.com/a.png", "low"), None)
    validate_request(with_image(png_data_url(3, 2), "high"), None)
    edges = {"temperature": 2, "top_p": 0, "presence_penalty": -2, "frequency_penalty": 2.0}
    validate_request(chat(**edges, seed=7, stop=["a", "b", "c", "d"]), models)
    validate_request(chat(temperature=None, stop="END"), models)
    for role in ("system", "developer", "assistant", "tool", "function"):
        body = chat()
        body["messages"].insert(0, {"role": role, "content": "x"})
        validate_request(body, models)


def test_completion_is_deterministic_and_truthful() -> None:
    body = chat("I really like the new design of the app", max_tokens=200)
    key = canonical_digest(body)
    prompt = count_prompt_tokens(body["messages"], "gpt-4o-mini")
    first = build_completion(body, key, prompt, serial=1)
    second = build_completion(dict(reversed(body.items())), canonical_digest(body), prompt, 2)
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"]
    assert first["id"] != second["id"] and first["id"].startswith("chatcmpl-")
    assert text.split("\n")[0] in ("label: positive", "label: negative", "label: neutral")
    assert first["model"] == DATED_MODEL_NAMES["gpt-4o-mini"]
    assert first["choices"][0]["finish_reason"] == "stop"
    usage = first["usage"]
    assert usage["prompt_tokens"] == prompt
    assert usage["total_tokens"] == prompt + usage["completion_tokens"]
    assert admission_cost(body, prompt) == prompt + 200
    assert admission_cost(chat(), 9) == 9 + DEFAULT_ASSUMED_MAX_TOKENS
    # The label follows the user's text, not the other parameters.
    other = chat("I really like the new design of the app", temperature=0.3)
    other_text = build_completion(other, canonical_digest(other), 1, 1)["choices"][0]["message"]
    assert other_text["content"].split("\n")[0] == text.split("\n")[0]


def test_completion_is_cut_at_max_tokens() -> None:
    body = chat("a long enough message to echo back", max_completion_tokens=3)
    answer = build_completion(body, canonical_digest(body), 10, serial=1)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] <= 3
    assert answer["choices"][0]["message"]["content"]


SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "note": {"type": ["string", "null"], "minLength": 20, "maxLength": 30},
            "when": {"type": "string", "format": "date"},
            "author": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
        },
        "required": ["label", "score", "confidence", "ok", "tags", "note", "when", "author"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "item": {"type": "object", "properties": {"sku": {"const": "A-1"}}, "required": ["sku"]}
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 100}]},
        },
        "required": ["items", "maybe"],
    },
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_instances_validate(schema: dict[str, Any]) -> None:
    for i in range(20):
        jsonschema.validate(schema_instance(schema, str(i).encode()), schema)


def tool_message(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    answer = build_completion(body, canonical_digest(body), 10, 1)
    return answer["choices"][0]["message"], answer["choices"][0]["finish_reason"]


def test_tools_are_answered_with_a_call_valid_for_the_schema() -> None:
    tools = [WEATHER_TOOL, LABEL_TOOL, NO_ARGS_TOOL]
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    called = set()
    for i in range(30):
        body = chat(f"row {i}", tools=tools)
        message, finish = tool_message(body)
        assert finish == "tool_calls" and message["content"] is None
        (call,) = message["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
        schema = by_name[name].get("parameters", {"type": "object"})
        jsonschema.validate(arguments, schema)
        assert arguments or name == "ping"  # a function without parameters gets "{}"
        assert tool_message(body)[0] == message  # deterministic
        called.add(name)
    assert called == set(by_name)  # the pick follows the user's text


def test_tool_choice_forces_or_turns_off_the_call() -> None:
    forced = {"type": "function", "function": {"name": "record_label"}}
    for i in range(5):
        message, _ = tool_message(
            chat(f"{i}", tools=[WEATHER_TOOL, LABEL_TOOL], tool_choice=forced)
        )
        assert message["tool_calls"][0]["function"]["name"] == "record_label"
    message, finish = tool_message(chat("x", tools=[WEATHER_TOOL], tool_choice="none"))
    assert finish == "stop" and message["content"].startswith("label: ")
    assert "tool_calls" not in message


def test_legacy_functions_are_answered_with_function_call() -> None:
    message, finish = tool_message(chat("x", functions=[WEATHER_TOOL["function"]]))
    assert finish == "function_call" and message["content"] is None
    assert message["function_call"]["name"] == "get_weather"
    jsonschema.validate(
        json.loads(message["function_call"]["arguments"]),
        WEATHER_TOOL["function"]["parameters"],
    )


def test_tool_call_arguments_are_cut_at_max_tokens() -> None:
    body = chat("x", tools=[WEATHER_TOOL], max_tokens=6)
    answer = build_completion(body, canonical_digest(body), 10, 1)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] <= 6
    with pytest.raises(ValueError):
        json.loads(answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])


# -- what the server charges: batcher.tokens' rule, imported -------------------------------------


def without_images(body: dict[str, Any]) -> dict[str, Any]:
    (message,) = body["messages"]
    text = [p for p in message["content"] if p["type"] == "text"]
    return {**body, "messages": [{**message, "content": text}]}


@pytest.mark.parametrize(
    ("model", "detail", "count_as", "extra"),
    [
        ("gpt-4o", "high", "billing", 85 + 4 * 170),  # 1024x1024 -> 768x768 -> 4 tiles
        ("gpt-4o", "auto", "billing", 85 + 4 * 170),
        ("gpt-4o", "low", "billing", 85),
        ("gpt-4o-mini", "high", "billing", 2833 + 4 * 5667),
        ("gpt-4o-mini", "high", "context", 85 + 4 * 170),
    ],
)
def test_images_are_charged_by_the_providers_rule(
    model: str, detail: str, count_as: Any, extra: int
) -> None:
    body = with_image(png_data_url(1024, 1024), detail, model=model)
    text_only = prompt_tokens(without_images(body), count_as)
    assert prompt_tokens(body, count_as) == text_only + extra


def test_a_remote_image_is_charged_the_worst_case_without_fetching() -> None:
    body = with_image("https://127.0.0.1:9/never-fetched.png", "high")
    assert prompt_tokens(body) == prompt_tokens(without_images(body)) + 85 + 8 * 170


def test_tool_definitions_are_charged_by_the_cookbook_convention() -> None:
    for tools in ([WEATHER_TOOL], [WEATHER_TOOL, LABEL_TOOL, NO_ARGS_TOOL]):
        body = chat("x", model="gpt-4o", tools=tools)
        extra = prompt_tokens(body) - prompt_tokens(chat("x", model="gpt-4o"))
        assert extra == tools_tokens(body, "gpt-4o") > 0


async def test_usage_and_admission_count_images_and_tools(mock_server: StartMock) -> None:
    srv = mock_server(rpm=None, tpm=None)
    body = with_image(png_data_url(1024, 1024), "high", tools=[WEATHER_TOOL], max_tokens=50)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
        http.post(srv.url + "/chat/completions", json=body) as resp,
    ):
        answer = await resp.json()
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    plain = count_prompt_tokens(without_images(body)["messages"], "gpt-4o")
    assert answer["usage"]["prompt_tokens"] == prompt_tokens(body) >= plain + 765 + 1
    assert srv.stats()["admitted_tokens"] == prompt_tokens(body) + 50


def test_an_image_job_at_the_limits_gets_no_429(tmp_path: Path, mock_server: StartMock) -> None:
    """batcher and the server count images and tools by one rule, so pacing at the server's
    TPM never overruns it. The run lasts longer than one 10-s window, so it runs at the limit;
    counting an image as its text (~800 tokens short per request) would send ~6x too fast."""
    rows, tpm = 40, 180_000  # ~11 s of quota
    srv = mock_server(rpm=100_000, tpm=tpm)
    image = png_data_url(1024, 1024)
    lines = [
        {
            "custom_id": f"img-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": with_image(
                image, "high", text=f"Label photo {i}.", tools=[LABEL_TOOL], max_tokens=30
            ),
        }
        for i in range(rows)
    ]
    write_jsonl(tmp_path / "batch.jsonl", lines)
    job = write_job(
        tmp_path,
        srv.url,
        input="batch.jsonl",
        messages=None,
        id_column=None,
        model=None,
        params={"temperature": 0},
        concurrency=16,
        limits={"gpt-4o": {"rpm": 100_000, "tpm": tpm}},
    )
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    assert {r["status"] for r in read_output(tmp_path / "out/result.parquet")} == {"ok"}
    stats = srv.stats()
    assert stats["accepted"] == rows
    assert stats["admitted_tokens"] > rows * (765 + 30)  # the images were charged
    assert stats["rate_limited"] == 0
    per_second = [tokens for _, _, tokens in stats["admitted_series"]]
    busiest_window = max(sum(per_second[i : i + 10]) for i in range(len(per_second)))
    assert busiest_window > 0.8 * tpm / 6  # it did run at the 10-s window's limit


# -- faults: keyed to request numbers, pure ------------------------------------------------------


def test_faults_are_a_function_of_seed_and_request_number() -> None:
    config = MockConfig(error_rate_5xx=0.15, drop_rate=0.05, latency_jitter_s=0.2, seed=3)
    faults = [draw_faults(config, n) for n in range(1, 4001)]
    assert faults == [draw_faults(config, n) for n in range(1, 4001)]
    drops = sum(f.drop for f in faults)
    errors = sum(f.status_5xx is not None for f in faults)
    assert 0.04 < drops / 4000 < 0.06  # 5 %
    assert 0.13 < errors / (4000 - drops) < 0.17  # 15 % of those not dropped
    assert {f.status_5xx for f in faults} == {None, 500, 502, 503}
    assert all(0 <= f.extra_latency_s < 0.2 for f in faults)
    assert faults != [draw_faults(replace(config, seed=4), n) for n in range(1, 4001)]
    assert all(draw_faults(MockConfig(), n) == RequestFaults() for n in range(1, 100))


def test_storm_covers_its_request_numbers() -> None:
    config = MockConfig(rate_limit_storm_requests=(2, 4))
    assert [in_storm(config, n) for n in range(1, 7)] == [False, True, True, True, False, False]
    assert not any(in_storm(MockConfig(), n) for n in range(1, 10))


# -- HTTP: routes, auth, validation ----------------------------------------------------------------


async def test_routes_regions_and_public_form(mock_server: StartMock) -> None:
    srv = mock_server(api_keys={KEY}, **UNLIMITED)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for region in ("eu", "us", "global", "ch"):
            for public in (False, True):
                url = srv.url_for(region, public=public) + "/chat/completions"
                async with http.post(url, json=chat()) as resp:
                    assert resp.status == 200, url
                    assert (await resp.json())["object"] == "chat.completion"
        async with http.post(srv.url_for("asia") + "/chat/completions", json=chat()) as resp:
            assert resp.status == 404
        async with http.get(srv.url_for("us", public=True) + "/models") as resp:
            listing = await resp.json()
        assert listing["object"] == "list"
        assert [m["id"] for m in listing["data"]] == list(srv.config.models or ())
        async with http.post(srv.url + "/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert "JSON" in (await resp.json())["error"]["message"]
    assert srv.url == f"{srv.root}/openai/eu/v1"


async def test_auth_and_the_key_stays_secret(mock_server: StartMock) -> None:
    srv = mock_server(api_keys={KEY})
    url = srv.url + "/chat/completions"
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer sk-wrong-key"}, {"Authorization": "Bearer "}):
            async with http.post(url, json=chat(), headers=headers) as resp:
                assert resp.status == 401
                body = await resp.text()
                assert json.loads(body)["error"]["code"] == "invalid_api_key"
                assert "sk-wrong-key" not in body
        async with http.get(srv.url + "/models") as resp:
            assert resp.status == 401
    any_key = mock_server(**UNLIMITED)  # api_keys=None: any non-empty key
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer whatever"}) as http,
        http.post(any_key.url + "/chat/completions", json=chat()) as resp,
    ):
        assert resp.status == 200
    assert KEY not in json.dumps(srv.stats())


# -- HTTP: rate limits -----------------------------------------------------------------------------


async def post(
    http: aiohttp.ClientSession, srv: ThreadedMockServer, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    async with http.post(srv.url + "/chat/completions", json=body) as resp:
        await resp.read()
        return resp


async def test_429_with_azure_headers_and_body(mock_server: StartMock) -> None:
    clock = FakeClock()
    srv = mock_server(clock=clock, rpm=60, tpm=None, windows_s=(60, 10))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for i in range(10):
            ok = await post(http, srv, chat(f"row {i}"))
            assert ok.status == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "60"
        assert ok.headers["x-ratelimit-remaining-requests"] == "0"
        assert ok.headers["x-ratelimit-reset-requests"] == "10s"
        assert "x-ratelimit-limit-tokens" not in ok.headers  # tpm=None: unlimited
        clock.advance(2.5)
        async with http.post(srv.url + "/chat/completions", json=chat("row 10")) as resp:
            assert resp.status == 429
            assert resp.headers["retry-after"] == "8"  # 7.5 s rounded up
            assert resp.headers["retry-after-ms"] == "7500"
            error = (await resp.json())["error"]
            assert error["code"] == "429"
            assert "Please retry after 8 seconds" in error["message"]
        clock.advance(7.5)
        assert (await post(http, srv, chat("row 10"))).status == 200
    stats = srv.stats()
    assert stats["by_status"] == {"200": 11, "429": 1}
    assert stats["rate_limited"] == 1
    assert stats["limits"]["rpm"] == 60 and stats["limits"]["windows_s"] == [60.0, 10.0]
    assert [(t, n) for t, n, _ in stats["admitted_series"]] == [(0.0, 10), (10.0, 1)]


async def test_headers_can_be_switched_off_and_failures_can_count(mock_server: StartMock) -> None:
    clock = FakeClock()
    srv = mock_server(
        clock=clock,
        rpm=2,
        tpm=None,
        windows_s=(60,),
        retry_after_headers=False,
        ratelimit_headers=False,
        failed_requests_count=True,
    )
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        first = await post(http, srv, chat("a"))
        assert first.status == 200
        assert not any(h.lower().startswith("x-ratelimit") for h in first.headers)
        clock.advance(1)
        assert (await post(http, srv, chat("b"))).status == 200
        clock.advance(1)
        refused = await post(http, srv, chat("c"))  # counted as a request at t=2
        assert refused.status == 429
        assert "retry-after" not in refused.headers and "retry-after-ms" not in refused.headers
        clock.advance(59)  # t=61: "a" and "b" have left, the refused "c" still counts
        assert (await post(http, srv, chat("c"))).status == 200
        assert (await post(http, srv, chat("d"))).status == 429


async def test_token_charge_uses_prompt_estimate_plus_max_tokens(mock_server: StartMock) -> None:
    srv = mock_server(rpm=None, tpm=60_000)
    body = chat("count me", max_tokens=100)
    expected = count_prompt_tokens(body["messages"], "gpt-4o-mini") + 100
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        ok = await post(http, srv, body)
        assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 10_000 - expected
        assert (await post(http, srv, chat("no ceiling"))).status == 200
        too_big = await post(http, srv, chat("x", max_tokens=70_000))
        assert too_big.status == 429 and "retry-after" not in too_big.headers
    stats = srv.stats()
    assert stats["accepted_by_model"]["gpt-4o-mini"]["tokens"] == stats["admitted_tokens"]
    assert (
        stats["admitted_tokens"]
        == expected
        + count_prompt_tokens(chat("no ceiling")["messages"], "gpt-4o-mini")
        + DEFAULT_ASSUMED_MAX_TOKENS
    )


async def test_rate_limit_storm(mock_server: StartMock) -> None:
    clock = FakeClock()
    srv = mock_server(clock=clock, rate_limit_storm_s=5)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        clock.advance(1.5)
        storm = await post(http, srv, chat())
        assert storm.status == 429 and storm.headers["retry-after-ms"] == "3500"
        clock.advance(3.5)
        assert (await post(http, srv, chat())).status == 200
    assert srv.stats()["admitted"] == 1  # the 429 was never charged


async def test_rate_limit_storm_keyed_to_request_numbers(mock_server: StartMock) -> None:
    srv = mock_server(rate_limit_storm_requests=(2, 3), storm_retry_after_s=0.25, **UNLIMITED)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        assert (await post(http, srv, chat("1"))).status == 200
        assert (await post(http, srv, chat("x [[fail-400]]"))).status == 400  # not counted
        storm = await post(http, srv, chat("2"))
        assert storm.status == 429
        assert (storm.headers["retry-after-ms"], storm.headers["retry-after"]) == ("250", "1")
        assert (await post(http, srv, chat("3"))).status == 429
        assert (await post(http, srv, chat("4"))).status == 200
        srv.reset()  # counting starts again
        assert [(await post(http, srv, chat(f"{i}"))).status for i in range(4)] == [
            200,
            429,
            429,
            200,
        ]
    assert srv.stats()["admitted"] == 2  # 429s are never charged


# -- HTTP: markers, faults, counters --------------------------------------------------------------


async def test_markers(mock_server: StartMock) -> None:
    srv = mock_server(slow_marker_s=0.2, **UNLIMITED)
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": SCHEMAS[0], "strict": True},
    }
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        assert (await post(http, srv, chat("x [[fail-400]]"))).status == 400
        assert (await post(http, srv, chat("x [[fail-500]]"))).status == 500
        assert (await post(http, srv, chat("x [[fail-500]]"))).status == 500
        assert (await post(http, srv, chat("y [[fail-500-once]]"))).status == 500
        assert (await post(http, srv, chat("y [[fail-500-once]]"))).status == 200
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(http, srv, chat("z [[drop-once]]"))
        assert (await post(http, srv, chat("z [[drop-once]]"))).status == 200

        async with http.post(
            srv.url + "/chat/completions", json=chat("w", response_format=schema_format)
        ) as resp:
            content = (await resp.json())["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMAS[0])
        async with http.post(
            srv.url + "/chat/completions",
            json=chat("w [[broken-json]]", response_format=schema_format),
        ) as resp:
            broken = (await resp.json())["choices"][0]["message"]["content"]
        with pytest.raises(ValueError):
            json.loads(broken)

        started = time.monotonic()
        assert (await post(http, srv, chat("v [[slow]]"))).status == 200
        assert time.monotonic() - started >= 0.2
    stats = srv.stats()
    assert stats["by_status"] == {"200": 5, "400": 1, "500": 3}
    assert stats["dropped"] == 1
    assert stats["requests"] == 10
    # The 400 was refused before admission; every other request was charged exactly once.
    assert stats["admitted"] == 9
    assert stats["accepted"] == 5
    assert stats["duplicates"] == 0


async def test_duplicates_count_bodies_answered_twice(mock_server: StartMock) -> None:
    srv = mock_server(**UNLIMITED)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        await post(http, srv, chat("same", max_tokens=5))
        await post(http, srv, {"max_tokens": 5, **chat("same")})  # same body, other key order
        await post(http, srv, chat("same", max_tokens=6))
        await post(http, srv, chat("same [[fail-500]]"))  # failures are not answers
        await post(http, srv, chat("same [[fail-500]]"))
        stats = srv.stats()
        assert (stats["accepted"], stats["duplicates"]) == (3, 1)
        async with http.post(srv.root + "/_mock/reset") as resp:
            assert resp.status == 200
        async with http.get(srv.root + "/_mock/stats") as resp:
            fresh = await resp.json()
        assert (fresh["requests"], fresh["duplicates"], fresh["admitted_series"]) == (0, 0, [])
        await post(http, srv, chat("same", max_tokens=5))
        assert srv.stats()["duplicates"] == 0


async def test_random_faults_and_drops(mock_server: StartMock) -> None:
    faulty = mock_server(error_rate_5xx=1.0, seed=7, **UNLIMITED)
    dropping = mock_server(drop_rate=1.0, **UNLIMITED)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for i in range(6):
            assert (await post(http, faulty, chat(f"{i}"))).status in (500, 502, 503)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(http, dropping, chat())
    assert faulty.stats()["admitted"] == 6 and faulty.stats()["accepted"] == 0
    assert dropping.stats()["dropped"] == 1


async def test_latency_is_added(mock_server: StartMock) -> None:
    srv = mock_server(latency_s=0.1, latency_jitter_s=0.05, **UNLIMITED)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        started = time.monotonic()
        assert (await post(http, srv, chat())).status == 200
        assert time.monotonic() - started >= 0.1


async def test_in_loop_server_start_stop() -> None:
    server = MockServer(MockConfig(models=None, **UNLIMITED))
    url = await server.start()
    try:
        async with (
            aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as http,
            http.post(url + "/chat/completions", json=chat(model="my-dep")) as resp,
        ):
            assert (await resp.json())["model"] == "my-dep"
    finally:
        await server.stop()


# -- the official openai client --------------------------------------------------------------------


def test_openai_client_parses_answers_and_raises_its_errors(mock_server: StartMock) -> None:
    srv = mock_server(api_keys={KEY}, rpm=1, windows_s=(60,))
    client = openai.OpenAI(base_url=srv.url, api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Great service!"}], max_tokens=50
    )
    assert answer.model == "gpt-4o-2024-08-06"
    assert answer.choices[0].message.content.startswith("label: ")
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert [m.id for m in client.models.list()] == list(srv.config.models or ())

    messages = [{"role": "user", "content": "again"}]
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="o3-mini", messages=messages, max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=messages)
    wrong = openai.OpenAI(base_url=srv.url, api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="gpt-4o", messages=messages)


def test_openai_structured_output(mock_server: StartMock) -> None:
    srv = mock_server()
    client = openai.OpenAI(base_url=srv.url_for("us", public=True), api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Classify: fine"}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMAS[1]}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMAS[1])


def test_openai_client_parses_tool_calls(mock_server: StartMock) -> None:
    srv = mock_server()
    client = openai.OpenAI(base_url=srv.url, api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


# -- serve-mock entry point ----------------------------------------------------------------------


def test_serve_forever_prints_url_and_stops_on_sigterm() -> None:
    code = "from batcher.mock import main_serve; main_serve(None, '127.0.0.1', 0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/openai/eu/v1")
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        assert client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        ).choices
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
