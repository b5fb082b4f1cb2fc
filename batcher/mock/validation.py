"""What Langdock/Azure refuse, refused the same way: status, OpenAI-style error body, `param`.

`validate_request` raises `Refusal` for the first problem it finds; the app turns it into the
answer. Pure: no quota, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from batcher.images import size_from_data_url
from batcher.mock.faults import MARKER_FAIL_400
from batcher.models import O_SERIES_REFUSED_PARAMS, UNSUPPORTED_PARAMS, is_o_series

IMAGE_DETAILS: tuple[str, ...] = ("low", "high", "auto")
ROLES: tuple[str, ...] = ("system", "assistant", "user", "function", "tool", "developer")
# OpenAI's documented ranges (inclusive) of the numeric sampling parameters.
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
}
MAX_STOP = 4
TOOL_CHOICES: tuple[str, ...] = ("none", "auto", "required")
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class Refusal(Exception):
    """An OpenAI-style error answer, raised while validating a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return text_of(msg.get("content"))
    return ""


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Refusal(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
            f"but got {value!r} instead.",
            param=name,
            code="integer_below_min_value",
        )
    return value


def validate_request(body: Any, models: tuple[str, ...] | None) -> dict[str, Any]:
    """Refuse what Langdock/Azure refuse; returns the body when it would be served."""
    if not isinstance(body, dict):
        raise Refusal(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Refusal(
            400, "Missing required parameter: 'model'.", param="model", code="missing_required"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refusal(
            400,
            "Missing required parameter: 'messages' (a non-empty array).",
            param="messages",
            code="missing_required",
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise Refusal(
                400,
                f"Invalid 'messages[{i}]': expected an object with a 'role'.",
                param=f"messages[{i}]",
            )
        if msg["role"] not in ROLES:
            raise Refusal(
                400,
                f"Invalid value: '{msg['role']}'. Supported values are: "
                f"{', '.join(repr(r) for r in ROLES[:-1])}, and {ROLES[-1]!r}.",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise Refusal(
                400,
                f"Invalid type for 'messages[{i}].content': expected a string or an array.",
                param=f"messages[{i}].content",
                code="invalid_type",
            )
    for name in UNSUPPORTED_PARAMS:
        if name in body:
            raise Refusal(
                400,
                f"Unsupported parameter: '{name}' is not supported by this API.",
                param=name,
                code="unsupported_parameter",
            )
    if body.get("stream"):
        raise Refusal(
            400,
            "Unsupported value: 'stream' is not supported by this API; send stream=false.",
            param="stream",
            code="unsupported_value",
        )
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _validate_sampling(body)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise Refusal(
            400,
            "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
            param="max_tokens",
            code="invalid_value",
        )
    if is_o_series(model):
        if body.get("max_tokens") is not None:
            raise Refusal(
                400,
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                param="max_tokens",
                code="unsupported_parameter",
            )
        temperature = body.get("temperature")
        if temperature is not None and temperature != 1:
            raise Refusal(
                400,
                f"Unsupported value: 'temperature' does not support {temperature} with this "
                "model. Only the default (1) value is supported.",
                param="temperature",
                code="unsupported_value",
            )
        for name in O_SERIES_REFUSED_PARAMS:
            if body.get(name) is not None:
                raise Refusal(
                    400,
                    f"Unsupported parameter: '{name}' is not supported with this model.",
                    param=name,
                    code="unsupported_parameter",
                )
    _validate_response_format(body)
    _validate_images(messages)
    _validate_tools(body)
    if MARKER_FAIL_400 in last_user_text(messages):
        raise Refusal(400, "Invalid request (the test asked for it with [[fail-400]]).")
    if models is not None and model not in models:
        raise Refusal(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return body


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a number" if isinstance(value, (int, float)) else "null"


def _validate_sampling(body: Mapping[str, Any]) -> None:
    """The ranges and types OpenAI checks (a 400 `invalid_request_error`, as there)."""
    for name, (low, high) in RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Refusal(
                400,
                f"Invalid type for '{name}': expected a decimal, but got "
                f"{_type_name(value)} instead.",
                param=name,
                code="invalid_type",
            )
        if not low <= value <= high:
            above = value > high
            raise Refusal(
                400,
                f"Invalid '{name}': decimal {'above maximum' if above else 'below minimum'} "
                f"value. Expected a value {'<=' if above else '>='} {high if above else low:g}, "
                f"but got {value!r} instead.",
                param=name,
                code=f"decimal_{'above_max' if above else 'below_min'}_value",
            )
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise Refusal(
            400,
            f"Invalid type for 'seed': expected an integer, but got {_type_name(seed)} instead.",
            param="seed",
            code="invalid_type",
        )
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise Refusal(
            400,
            "Invalid type for 'stop': expected a string or an array of strings.",
            param="stop",
            code="invalid_type",
        )
    if len(stop) > MAX_STOP:
        raise Refusal(
            400,
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, "
            f"but got an array with length {len(stop)} instead.",
            param="stop",
            code="array_above_max_length",
        )


def _validate_response_format(body: Mapping[str, Any]) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise Refusal(
            400,
            "Invalid 'response_format.type': expected 'text', 'json_object' or 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )
    if kind == "json_object":
        # OpenAI and Azure insist the prompt asks for JSON in json_object mode.
        if not any("json" in text_of(m.get("content")).lower() for m in body["messages"]):
            raise Refusal(
                400,
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'.",
                param="messages",
            )
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise Refusal(
                400,
                "Missing required parameter: 'response_format.json_schema.name'.",
                param="response_format.json_schema.name",
                code="missing_required_parameter",
            )
        if not isinstance(spec.get("schema", {}), dict):
            raise Refusal(
                400,
                "Invalid 'response_format.json_schema.schema': expected an object.",
                param="response_format.json_schema.schema",
            )


def _validate_images(messages: list[dict[str, Any]]) -> None:
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            where = f"messages[{i}].content[{j}].image_url"
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url.startswith(
                ("data:image/", "http://", "https://")
            ):
                raise Refusal(
                    400,
                    f"Invalid '{where}.url': expected an https URL or a base64 data URL "
                    "(data:image/png;base64,...).",
                    param=f"{where}.url",
                    code="invalid_image_url",
                )
            if url.startswith("data:") and size_from_data_url(url) is None:
                raise Refusal(
                    400,
                    "You uploaded an unsupported image. Please make sure your image is below "
                    "20 MB in size and is of one the following formats: "
                    "['png', 'jpeg', 'gif', 'webp'].",
                    code="invalid_image_format",
                )
            detail = image.get("detail", "auto") if isinstance(image, dict) else "auto"
            if detail not in IMAGE_DETAILS:
                raise Refusal(
                    400,
                    f"Invalid value for '{where}.detail': expected one of "
                    f"{', '.join(IMAGE_DETAILS)}, got {detail!r}.",
                    param=f"{where}.detail",
                    code="invalid_value",
                )


def tool_functions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The function definitions a (validated) request offers: from `tools`, else `functions`."""
    if body.get("tools"):
        return [tool["function"] for tool in body["tools"]]
    return list(body.get("functions") or [])


def _validate_tools(body: Mapping[str, Any]) -> None:
    for field, choice_field in (("tools", "tool_choice"), ("functions", "function_call")):
        defs = body.get(field)
        if defs is None:
            if body.get(choice_field) is not None:
                raise Refusal(
                    400,
                    f"Invalid value for '{choice_field}': '{choice_field}' is only allowed when "
                    f"'{field}' are specified.",
                    param=choice_field,
                )
            continue
        if not isinstance(defs, list) or not defs:
            raise Refusal(
                400,
                f"Invalid '{field}': expected a non-empty array.",
                param=field,
                code="invalid_type" if not isinstance(defs, list) else "empty_array",
            )
        names = [_function_name(field, i, d) for i, d in enumerate(defs)]
        _validate_choice(choice_field, body.get(choice_field), names)


def _function_name(field: str, i: int, definition: Any) -> str:
    """Check one tool (`{"type": "function", "function": {...}}`) or legacy function."""
    fn = definition
    if field == "tools":
        if not isinstance(definition, dict) or definition.get("type") != "function":
            raise Refusal(
                400,
                f"Invalid value for '{field}[{i}].type': only 'function' tools are supported.",
                param=f"{field}[{i}].type",
                code="invalid_value",
            )
        fn = definition.get("function")
        where = f"{field}[{i}].function"
    else:
        where = f"{field}[{i}]"
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise Refusal(
            400,
            f"Invalid '{where}.name': expected a string of letters, digits, '_' or '-' "
            "(at most 64).",
            param=f"{where}.name",
            code="invalid_value",
        )
    assert isinstance(fn, dict)
    if not isinstance(fn.get("parameters", {}), dict):
        raise Refusal(
            400,
            f"Invalid '{where}.parameters': expected a JSON schema object.",
            param=f"{where}.parameters",
            code="invalid_type",
        )
    return name


def _validate_choice(field: str, choice: Any, names: list[str]) -> None:
    if choice is None or choice in TOOL_CHOICES:
        return
    if isinstance(choice, dict):
        fn = choice.get("function") if field == "tool_choice" else choice
        name = fn.get("name") if isinstance(fn, dict) else None
        if name in names:
            return
        raise Refusal(
            400,
            f"Invalid value for '{field}': no function named {name!r} is defined.",
            param=field,
            code="invalid_value",
        )
    raise Refusal(
        400,
        f"Invalid value for '{field}': expected one of {', '.join(TOOL_CHOICES)} or a "
        "function to call.",
        param=field,
        code="invalid_value",
    )
