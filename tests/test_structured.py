import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.structured import StructuredOutput

LABEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number"},
        "stars": {"type": "integer"},
        "sarcastic": {"type": "boolean"},
        "topics": {"type": "array", "items": {"type": "string"}},
        "reason": {"type": ["string", "null"]},
        "entity": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "offset": {"type": "integer"}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "extra": {"type": "object"},
    },
    "required": ["label", "confidence", "stars", "sarcastic", "topics"],
    "additionalProperties": False,
}


def params_for(schema: Any, **kw: Any) -> dict[str, Any]:
    return {
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "label", "schema": schema, "strict": True, **kw},
        },
    }


def label_output() -> StructuredOutput:
    out = StructuredOutput.from_params(params_for(LABEL_SCHEMA))
    assert out is not None
    return out


def test_no_schema_means_free_text() -> None:
    assert StructuredOutput.from_params({}) is None
    assert StructuredOutput.from_params({"response_format": {"type": "json_object"}}) is None
    assert StructuredOutput.from_params({"response_format": {"type": "text"}}) is None


def test_arrow_type_from_schema() -> None:
    out = label_output()
    assert out.name == "label"
    assert out.strict is True
    assert out.arrow_type == pa.struct(
        [
            ("label", pa.string()),
            ("confidence", pa.float64()),
            ("stars", pa.int64()),
            ("sarcastic", pa.bool_()),
            ("topics", pa.list_(pa.string())),
            ("reason", pa.string()),
            ("entity", pa.struct([("name", pa.string()), ("offset", pa.int64())])),
            ("extra", pa.string()),  # free-form object: JSON text
        ]
    )


def test_parse_shapes_the_answer_to_the_struct(tmp_path: Path) -> None:
    out = label_output()
    answer = {
        "label": "positive",
        "confidence": 1,  # JSON integer in a number field becomes a float
        "stars": 4.0,  # 4.0 is an integer to JSON Schema
        "sarcastic": False,
        "topics": ["food", "service"],
        "entity": {"name": "Luigi's"},
        "extra": {"k": [1, 2]},
    }
    parsed = out.parse(json.dumps(answer))
    assert parsed == {
        "label": "positive",
        "confidence": 1.0,
        "stars": 4,
        "sarcastic": False,
        "topics": ["food", "service"],
        "reason": None,
        "entity": {"name": "Luigi's", "offset": None},
        "extra": '{"k":[1,2]}',
    }
    assert isinstance(parsed["confidence"], float)
    assert isinstance(parsed["stars"], int)
    # The shaped dict (and a failed row's None) goes into a Parquet struct column as is.
    column = pa.array([parsed, None], type=out.arrow_type)
    pq.write_table(pa.table({"parsed": column}), tmp_path / "out.parquet")
    back = pq.read_table(tmp_path / "out.parquet").column("parsed").to_pylist()
    assert back == [parsed, None]


def test_not_json_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"^answer is not valid JSON: "):
        label_output().parse("Sure! Here is the label: positive")


@pytest.mark.parametrize(
    ("answer", "where"),
    [
        (
            {"label": "meh", "confidence": 0.5, "stars": 1, "sarcastic": True, "topics": []},
            "/label",
        ),
        ({"label": "positive", "confidence": 0.5, "stars": 1, "sarcastic": True}, "top level"),
        (
            {"label": "positive", "confidence": 0.5, "stars": "3", "sarcastic": 1, "topics": []},
            "/s",  # /stars or /sarcastic: whichever best_match picks
        ),
        (
            {"label": "positive", "confidence": 0.5, "stars": 1, "sarcastic": True, "topics": [7]},
            "/topics/0",
        ),
    ],
)
def test_schema_mismatch_names_the_path(answer: dict[str, Any], where: str) -> None:
    with pytest.raises(ValueError) as info:
        label_output().parse(json.dumps(answer))
    msg = str(info.value)
    assert msg.startswith("answer does not match the response_format schema: ")
    assert where in msg
    assert len(msg) < 400


def test_refs_anyof_enums_and_recursion() -> None:
    schema = {
        "$defs": {
            "Span": {
                "type": "object",
                "properties": {"start": {"type": "integer"}, "end": {"type": "integer"}},
            },
            "Node": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            },
        },
        "type": "object",
        "properties": {
            "span": {"anyOf": [{"$ref": "#/$defs/Span"}, {"type": "null"}]},
            "level": {"enum": [1, 2, 3]},
            "kind": {"const": "x"},
            "mixed": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "num": {"type": ["integer", "number"]},
            "tree": {"$ref": "#/$defs/Node"},
        },
    }
    out = StructuredOutput.from_params(params_for(schema))
    assert out is not None
    t = out.arrow_type
    assert t.field("span").type == pa.struct([("start", pa.int64()), ("end", pa.int64())])
    assert t.field("level").type == pa.int64()
    assert t.field("kind").type == pa.string()
    assert t.field("mixed").type == pa.string()
    assert t.field("num").type == pa.float64()
    # A recursive type has no finite Arrow type: the recursion point holds JSON text.
    assert t.field("tree").type == pa.struct([("children", pa.list_(pa.string()))])
    parsed = out.parse(
        '{"span": null, "level": 2, "kind": "x", "mixed": 5, "num": 3,'
        ' "tree": {"children": [{"children": []}]}}'
    )
    assert parsed["mixed"] == "5"
    assert parsed["num"] == 3.0
    assert parsed["tree"] == {"children": ['{"children":[]}']}
    pa.array([parsed], type=t)  # fits its column


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"response_format": {"type": "json_schema"}}, "needs json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "give the schema a name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "schema: missing",
        ),
        (params_for({"type": "objekt"}), "not a valid JSON schema"),
        (params_for({"type": "string"}), "top level must be an object with properties"),
        (params_for({"type": "object"}), "top level must be an object with properties"),
        (params_for(LABEL_SCHEMA, strict="yes"), "strict: true or false"),
        (  # jsonschema raised at the first answer; the run blamed the service (exit 4)
            params_for({"type": "object", "properties": {"a": {"$ref": "#/defs/nope"}}}),
            r"\$ref '#/defs/nope' points to nothing in the schema",
        ),
    ],
)
def test_bad_schema_in_job_file(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StructuredOutput.from_params(params)


def test_answer_of_wrong_shape_without_type_keyword() -> None:
    # No `type: object` at the top: the validator lets an array through; parse still refuses.
    out = StructuredOutput.from_params(params_for({"properties": {"a": {"type": "string"}}}))
    assert out is not None
    with pytest.raises(ValueError, match="expected an object"):
        out.parse("[1, 2]")
