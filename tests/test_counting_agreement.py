"""Images and tools counted once, for `estimate` and for admission (batcher.prepare) alike."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from batcher.estimate import estimate_job
from batcher.spec import Images, load_job
from batcher.tokens import count_request_tokens

TOOL = {
    "type": "function",
    "function": {
        "name": "label",
        "description": "Record the label of the picture.",
        "parameters": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["cat", "dog"]}},
        },
    },
}


def data_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(image: str | None = None, detail: str = "high", tools: bool = False) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Cat or dog?"}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image, "detail": detail}})
    out: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 10,
    }
    if tools:
        out["tools"] = [TOOL]
    return out


def batch_job(tmp_path: Path, bodies: list[dict[str, Any]], **spec: Any) -> Any:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        for i, b in enumerate(bodies)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    doc = {"input": "in.jsonl", "output": "out.parquet", "input_format": "batch", **spec}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    return load_job(tmp_path / "job.yaml")


def test_estimate_charges_images_and_tools(tmp_path: Path) -> None:
    image = data_url(1024, 1024)
    bodies = [body(), body(image), body(image, "low"), body(tools=True)]
    job = batch_job(tmp_path, bodies)
    report = estimate_job(job)
    text = count_request_tokens(body(), "gpt-4o")
    with_tool = count_request_tokens(body(tools=True), "gpt-4o")
    assert with_tool > text
    assert report["models"]["gpt-4o"]["prompt_tokens"] == text + (text + 765) + (text + 85) + (
        with_tool
    )


def test_images_settings_reach_the_count(tmp_path: Path) -> None:
    image = data_url(1024, 1024)
    mini = {**body(image), "model": "gpt-4o-mini"}
    text = count_request_tokens({**body(), "model": "gpt-4o-mini"}, "gpt-4o-mini")
    billing = estimate_job(batch_job(tmp_path, [mini]))
    context = estimate_job(batch_job(tmp_path, [mini], images={"count_as": "context"}))
    assert billing["models"]["gpt-4o-mini"]["prompt_tokens"] == text + 2833 + 4 * 5667
    assert context["models"]["gpt-4o-mini"]["prompt_tokens"] == text + 765
    assert load_job(tmp_path / "job.yaml").images == Images(count_as="context")
