"""The answers: chat.completion bodies shaped like Azure's via Langdock, deterministic (pure).

The answer is a function of the last user message (and the response format or tools asked
for), so a test knows what comes back; `max_tokens` cuts it like the real service
(`finish_reason: "length"`). With `tools` (or legacy `functions`) the answer is a call of one
of them, with arguments valid for its parameter schema.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from batcher.mock.faults import MARKER_BROKEN_JSON
from batcher.mock.schema import pick, schema_instance
from batcher.mock.validation import last_user_text, tool_functions
from batcher.tokens import count_prompt_tokens

# The dated names Azure reports in `model`; a name not listed is echoed back unchanged.
DATED_MODEL_NAMES: dict[str, str] = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "o1-preview": "o1-preview-2024-09-12",
    "o3-mini": "o3-mini-2025-01-31",
    "gpt-4": "gpt-4-0613",
    "gpt-35-turbo": "gpt-35-turbo-0125",
}

LABELS: tuple[str, ...] = ("positive", "negative", "neutral")

# A function without `parameters` takes no arguments: it is called with "{}".
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def canonical_digest(body: Mapping[str, Any]) -> bytes:
    """16-byte hash of a request body, independent of key order and whitespace."""
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(raw.encode(), digest_size=16).digest()


@functools.lru_cache(maxsize=64)
def _message_overhead(model: str) -> int:
    return count_prompt_tokens([{"role": "assistant", "content": ""}], model)


def _text_tokens(text: str, model: str) -> int:
    """Tokens of an answer's text: the chat counter with the per-message overhead taken out."""
    if not text:
        return 0
    full = count_prompt_tokens([{"role": "assistant", "content": text}], model)
    return max(1, full - _message_overhead(model))


def _truncate(text: str, limit: int, model: str) -> tuple[str, int, bool]:
    """(text cut to at most `limit` tokens, its token count, whether it was cut)."""
    tokens = _text_tokens(text, model)
    if tokens <= limit:
        return text, tokens, False
    lo, hi = 0, len(text)  # longest prefix that fits: binary search on characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_tokens(text[:mid], model) <= limit:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo]
    return cut, _text_tokens(cut, model), True


def _user_key(body: Mapping[str, Any]) -> tuple[str, bytes]:
    user = last_user_text(body["messages"])
    return user, hashlib.blake2b(user.encode(), digest_size=16).digest()


def _break_json(text: str) -> str:
    return text[:-1] + ' "unterminated'


def answer_content(body: Mapping[str, Any]) -> str:
    """The full (uncut) answer text: a function of the last user message and response_format."""
    user, key = _user_key(body)
    label = LABELS[pick(key, "label", len(LABELS))]
    echo = " ".join(user.split()[:8])
    fmt = body.get("response_format") or {}
    kind = fmt.get("type")
    if kind == "json_schema":
        schema = fmt["json_schema"].get("schema") or {"type": "object"}
        text = json.dumps(schema_instance(schema, key), ensure_ascii=False)
    elif kind == "json_object":
        text = json.dumps({"label": label, "echo": echo}, ensure_ascii=False)
    else:
        return f"label: {label}\nYou said: {echo}"
    return _break_json(text) if MARKER_BROKEN_JSON in user else text


def calls_a_tool(body: Mapping[str, Any]) -> bool:
    """Whether the answer is a tool (or function) call: tools offered and not turned off."""
    if body.get("tools"):
        return body.get("tool_choice") != "none"
    return bool(body.get("functions")) and body.get("function_call") != "none"


def tool_call(body: Mapping[str, Any]) -> tuple[str, str]:
    """(function name, JSON arguments) the answer calls: the forced one, else one picked from
    the last user message; arguments valid for the function's `parameters` schema."""
    user, key = _user_key(body)
    functions = tool_functions(body)
    choice = body.get("tool_choice") if body.get("tools") else body.get("function_call")
    if isinstance(choice, dict):
        forced = choice.get("function", choice) if body.get("tools") else choice
        fn = next(f for f in functions if f["name"] == forced["name"])
    else:
        fn = functions[pick(key, "tool", len(functions))]
    schema = fn.get("parameters") or _NO_PARAMETERS
    arguments = json.dumps(schema_instance(schema, key), ensure_ascii=False)
    return fn["name"], _break_json(arguments) if MARKER_BROKEN_JSON in user else arguments


def build_completion(
    body: Mapping[str, Any], key: bytes, prompt_tokens: int, serial: int
) -> dict[str, Any]:
    """A chat.completion answer, shaped like Azure's via Langdock; `key` makes the id unique."""
    model = body["model"]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    message: dict[str, Any]
    if calls_a_tool(body):
        name, arguments = tool_call(body)
        name_tokens = _text_tokens(name, model)
        if limit is not None:
            arguments, arg_tokens, cut = _truncate(arguments, max(0, limit - name_tokens), model)
        else:
            arg_tokens, cut = _text_tokens(arguments, model), False
        completion_tokens = name_tokens + arg_tokens
        call = {"name": name, "arguments": arguments}
        message = {"role": "assistant", "content": None, "refusal": None}
        if body.get("tools"):
            call_id = "call_" + hashlib.blake2b(key + b"call", digest_size=12).hexdigest()
            message["tool_calls"] = [{"id": call_id, "type": "function", "function": call}]
            finish = "tool_calls"
        else:
            message["function_call"] = call
            finish = "function_call"
    else:
        text = answer_content(body)
        if limit is not None:
            text, completion_tokens, cut = _truncate(text, limit, model)
        else:
            completion_tokens, cut = _text_tokens(text, model), False
        message = {"role": "assistant", "content": text, "refusal": None}
        finish = "stop"
    return {
        "id": f"chatcmpl-{key.hex()[:20]}{serial:010d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": DATED_MODEL_NAMES.get(model, model),
        "system_fingerprint": "fp_" + hashlib.blake2b(model.encode(), digest_size=5).hexdigest(),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "length" if cut else finish,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
