"""Structured answers: a `response_format` JSON schema becomes a typed Arrow struct column.

When the job asks for `response_format: {type: json_schema, json_schema: {name, schema,
strict}}`, each answer is parsed, validated against the schema (Draft 2020-12) and shaped to
an Arrow struct, so a labeling job's answers land as typed columns (`parsed.label`,
`parsed.score`, ...) instead of JSON text to parse again downstream.

Schema -> Arrow:
    string / string enum  -> string          integer -> int64       number -> float64
    boolean               -> bool_           array   -> list_(items)
    object + properties   -> struct          ["T", "null"] / anyOf [T, null] -> T (nullable)
    anything else (free-form objects, mixed unions, recursive $refs) -> string holding JSON
Every Arrow field is nullable: a row that failed has no answer at all, and whether a value may
be null is the validator's business, not the column type's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_MESSAGE = 200  # jsonschema quotes whole instances; keep error cells readable


@dataclass(frozen=True, slots=True)
class _Shape:
    """How one schema node is stored: its Arrow type and how to convert a validated value."""

    kind: str  # "scalar" | "float" | "int" | "json" | "list" | "struct"
    arrow: pa.DataType
    item: _Shape | None = None  # list
    fields: tuple[tuple[str, _Shape], ...] = ()  # struct

    def convert(self, value: Any) -> Any:
        if value is None:
            return None
        if self.kind == "json":
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if self.kind == "int":
            number = int(value)  # 3.0 is an integer to JSON Schema
            if not _INT64_MIN <= number <= _INT64_MAX:
                raise ValueError(f"integer {number} does not fit a 64-bit column")
            return number
        if self.kind == "float":
            return float(value)
        if self.kind == "list":
            if not isinstance(value, list) or self.item is None:
                raise ValueError(f"expected an array, got {type(value).__name__}")
            return [self.item.convert(v) for v in value]
        if self.kind == "struct":
            # A schema without `type: object` lets other values through validation.
            if not isinstance(value, dict):
                raise ValueError(f"expected an object, got {type(value).__name__}")
            return {name: shape.convert(value.get(name)) for name, shape in self.fields}
        return value


_JSON = _Shape("json", pa.string())
_SCALARS = {
    "string": _Shape("scalar", pa.string()),
    "boolean": _Shape("scalar", pa.bool_()),
    "integer": _Shape("int", pa.int64()),
    "number": _Shape("float", pa.float64()),
}


class _Mapper:
    """Walks a schema (resolving local `$ref`s) and builds its `_Shape`."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def shape(self, node: Any, active: frozenset[str] = frozenset()) -> _Shape:
        if not isinstance(node, Mapping):
            return _JSON  # `true` / `{}`-like schemas accept anything
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref in active:  # recursive type: no finite Arrow type holds it
                return _JSON
            target = self._resolve(ref)
            if target is None and ref.startswith("#"):
                # jsonschema would raise at the first answer, and the server refuses the schema
                raise ValueError(f"$ref {ref!r} points to nothing in the schema")
            return _JSON if target is None else self.shape(target, active | {ref})
        for key in ("anyOf", "oneOf"):
            options = node.get(key)
            if isinstance(options, list):
                rest = [o for o in options if not _is_null_schema(o)]
                return self.shape(rest[0], active) if len(rest) == 1 else _JSON
        if "enum" in node or "const" in node:
            values = node["enum"] if "enum" in node else [node["const"]]
            return self._literal_shape(values, node.get("type"))
        kind = node.get("type")
        if isinstance(kind, list):
            rest = [k for k in kind if k != "null"]
            if len(rest) != 1:
                return _SCALARS["number"] if set(rest) == {"integer", "number"} else _JSON
            kind = rest[0]
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "array":
            items = node.get("items")
            item = self.shape(items, active) if items is not None else _JSON
            return _Shape("list", pa.list_(item.arrow), item=item)
        if kind == "object" or (kind is None and "properties" in node):
            props = node.get("properties")
            if not isinstance(props, Mapping) or not props:
                return _JSON  # free-form mapping: keys unknown until the answer comes
            fields = tuple((str(name), self.shape(sub, active)) for name, sub in props.items())
            arrow = pa.struct([pa.field(name, s.arrow) for name, s in fields])
            return _Shape("struct", arrow, fields=fields)
        return _JSON

    @staticmethod
    def _literal_shape(values: Any, kind: Any) -> _Shape:
        values = [v for v in values if v is not None] if isinstance(values, list) else []
        if values and all(isinstance(v, str) for v in values):
            return _SCALARS["string"]
        if values and all(isinstance(v, bool) for v in values):
            return _SCALARS["boolean"]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return _SCALARS["integer"]
        return _SCALARS[kind] if isinstance(kind, str) and kind in _SCALARS else _JSON

    def _resolve(self, ref: str) -> Any:
        """A local JSON pointer ("#/$defs/Label"); None for anything remote."""
        if not ref.startswith("#"):
            return None
        node: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node


def _is_null_schema(node: Any) -> bool:
    return isinstance(node, Mapping) and node.get("type") == "null"


def _pointer(path: Any) -> str:
    parts = [str(p) for p in path]
    return "/" + "/".join(parts) if parts else "(top level)"


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


class StructuredOutput:
    """The job's response schema: parses answers and gives their Arrow type."""

    def __init__(self, name: str, schema: Mapping[str, Any], strict: bool | None) -> None:
        # Imported here: ~20 ms at every start, and only a job with a schema needs it.
        import jsonschema
        from jsonschema.exceptions import best_match

        where = "params.response_format.json_schema.schema"
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            at = _pointer(exc.path)
            raise ValueError(
                f"{where} is not a valid JSON schema: {at}: {_short(exc.message)}"
            ) from None
        try:
            shape = _Mapper(schema).shape(schema)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if shape.kind != "struct":
            raise ValueError(
                f"{where}: the top level must be an object with properties (type: object, "
                "properties: {...}); each property becomes a column of `parsed`"
            )
        self.name = name
        self.schema = schema
        self.strict = strict
        self._shape = shape
        self._validator = jsonschema.Draft202012Validator(schema)
        self._best_match = best_match

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> StructuredOutput | None:
        """The schema in `params.response_format`, or None when answers are free text.

        `{"type": "json_object"}` (JSON without a schema) gives None: nothing to type columns by.
        """
        fmt = params.get("response_format")
        if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
            return None
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ValueError(
                "params.response_format: type json_schema needs json_schema: {name: ..., "
                "schema: {...}}"
            )
        name, schema, strict = spec.get("name"), spec.get("schema"), spec.get("strict")
        if not isinstance(name, str) or not name:
            raise ValueError("params.response_format.json_schema.name: give the schema a name")
        if not isinstance(schema, Mapping):
            raise ValueError(
                "params.response_format.json_schema.schema: missing; give the JSON schema of "
                "the answer (type: object, properties: {...})"
            )
        if strict is not None and not isinstance(strict, bool):
            raise ValueError("params.response_format.json_schema.strict: true or false")
        return cls(name, schema, strict)

    @property
    def arrow_type(self) -> pa.StructType:
        return self._shape.arrow

    def parse(self, content: str) -> dict[str, Any]:
        """The answer as a dict shaped like `arrow_type`; ValueError says what is wrong."""
        try:
            value = json.loads(content)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"answer is not valid JSON: {_short(str(exc))}") from None
        error = self._best_match(self._validator.iter_errors(value))
        if error is not None:
            raise ValueError(
                "answer does not match the response_format schema: "
                f"{_pointer(error.absolute_path)}: {_short(error.message)}"
            )
        try:
            return self._shape.convert(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"answer does not match the response_format schema: {exc}") from None
