"""A JSON value valid against a JSON schema, chosen deterministically from a request digest.

Answers for `json_schema` response formats and tool-call arguments; the same request always
gets the same value. Pure.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from typing import Any


def pick(key: bytes, salt: str, n: int) -> int:
    """A deterministic index in range(n) from a request digest and a path."""
    h = hashlib.blake2b(key + salt.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % n


def schema_instance(schema: Mapping[str, Any], key: bytes) -> Any:
    """A JSON value valid against `schema`, chosen deterministically from `key`."""
    return _instance(schema, schema, key, "$", 0)


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    """The schema a local `$ref` names; {} (anything) for one that names nothing."""
    node: Any = root
    if ref.startswith("#"):
        for part in ref.lstrip("#").strip("/").split("/"):
            if part:
                if not isinstance(node, dict):
                    return {}
                node = node.get(part.replace("~1", "/").replace("~0", "~"))
    return node if isinstance(node, dict) else {}


def _instance(schema: Any, root: Mapping[str, Any], key: bytes, path: str, depth: int) -> Any:
    if not isinstance(schema, dict) or depth > 32:
        return None
    if "$ref" in schema:
        return _instance(_resolve(root, schema["$ref"]), root, key, path, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][pick(key, path, len(schema["enum"]))]
    for combo in ("anyOf", "oneOf"):
        options = [o for o in schema.get(combo) or [] if o.get("type") != "null"]
        if options:
            return _instance(options[0], root, key, path, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(root, part["$ref"]) if "$ref" in part else part
            for k, v in part.items():
                if k == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **v}
                else:
                    merged.setdefault(k, v)
        return _instance(merged, root, key, path, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {
            name: _instance(sub, root, key, f"{path}.{name}", depth + 1)
            for name, sub in props.items()
        }
    if kind == "array":
        count = max(1, schema.get("minItems", 1))
        if "maxItems" in schema:
            count = min(count, schema["maxItems"])
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [_instance(items, root, key, f"{path}[{i}]", depth + 1) for i in range(count)]
    if kind == "integer":
        lo, hi = _bounds(schema, integer=True)
        return lo + pick(key, path, hi - lo + 1)
    if kind == "number":
        lo, hi = _bounds(schema, integer=False)
        return lo + (hi - lo) * (1 + pick(key, path, 9)) / 10
    if kind == "boolean":
        return pick(key, path, 2) == 0
    if kind == "null":
        return None
    return _string_instance(schema, key, path)


def _bounds(schema: Mapping[str, Any], *, integer: bool) -> tuple[Any, Any]:
    """A small range inside the schema's (exclusive) minimum/maximum."""
    step = 1 if integer else 0
    lo: Any = schema.get("minimum")
    if "exclusiveMinimum" in schema:
        lo = schema["exclusiveMinimum"] + step
    hi: Any = schema.get("maximum")
    if "exclusiveMaximum" in schema:
        hi = schema["exclusiveMaximum"] - step
    if lo is None and hi is None:
        lo, hi = (1, 10) if integer else (0.0, 10.0)
    elif lo is None:
        lo = hi - 10
    elif hi is None:
        hi = lo + 10
    if integer:
        lo, hi = math.ceil(lo), math.floor(hi)
    return lo, hi  # for numbers, picks are strictly inside (lo, hi) so exclusive bounds hold


def _string_instance(schema: Mapping[str, Any], key: bytes, path: str) -> str:
    fmt = schema.get("format")
    fixed = {
        "date": "2024-05-13",
        "date-time": "2024-05-13T12:00:00Z",
        "time": "12:00:00Z",
        "email": "someone@example.com",
        "uri": "https://example.com/",
        "uuid": str(uuid.UUID(bytes=hashlib.blake2b(key + path.encode(), digest_size=16).digest())),
    }
    if fmt in fixed:
        return fixed[fmt]
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
    text = f"{words[pick(key, path, len(words))]} {words[pick(key, path + '#', len(words))]}"
    min_len = schema.get("minLength", 0)
    if len(text) < min_len:
        text += "x" * (min_len - len(text))
    if "maxLength" in schema:
        text = text[: schema["maxLength"]]
    return text
