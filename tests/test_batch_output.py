"""`output_format: batch`: the output is OpenAI's Batch output JSONL, read back here by a parser
written from OpenAI's documented format (not from batcher's writer), so downstream code that
reads OpenAI's batch results reads batcher's unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import run_batcher, write_job, write_jsonl

from batcher.writer import batch_output_line, write_batch_output

FAST = {"rpm": None, "tpm": None}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def parse_openai_batch_output(path: Path) -> dict[str, dict[str, Any]]:
    """OpenAI's Batch output file: one JSON object a line, `id`, `custom_id`, `response`
    (`status_code`, `request_id`, `body`: a chat.completion) and `error` (`code`, `message`);
    lines in any order, matched on custom_id. Returns {custom_id: outcome}."""
    out: dict[str, dict[str, Any]] = {}
    for text in path.read_text(encoding="utf-8").splitlines():
        line = json.loads(text)
        assert set(line) == {"id", "custom_id", "response", "error"}, line
        assert isinstance(line["id"], str) and line["id"].startswith("batch_req_")
        cid = line["custom_id"]
        assert isinstance(cid, str) and cid not in out, f"{cid} twice"
        response, error = line["response"], line["error"]
        if error is not None:
            assert isinstance(error["code"], str) and isinstance(error["message"], str)
            assert response is None or response["status_code"] >= 400
            out[cid] = {"ok": False, "code": error["code"], "message": error["message"]}
            continue
        assert response["status_code"] == 200 and isinstance(response["request_id"], str)
        body = response["body"]
        assert body["object"] == "chat.completion" and isinstance(body["created"], int)
        assert body["id"].startswith("chatcmpl") and isinstance(body["model"], str)
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        out[cid] = {
            "ok": True,
            "content": choice["message"]["content"],
            "tool_calls": choice["message"].get("tool_calls"),
            "finish_reason": choice["finish_reason"],
            "model": body["model"],
        }
    return out


def _batch_input(n: int, *, fail: set[int], tools: set[int]) -> list[dict[str, Any]]:
    lines = []
    for i in range(n):
        body: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"Say hi {i} {'[[fail-400]]' * (i in fail)}"}],
            "max_tokens": 10,
        }
        if i in tools:
            body["tools"] = TOOLS
        lines.append(
            {
                "custom_id": f"request-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        )
    return lines


def _batch_job(tmp: Path, url: str, **extra: Any) -> Path:
    """A job over `batch.jsonl` (a Batch-API input: no template) writing Batch-API output."""
    return write_job(
        tmp,
        url,
        input="batch.jsonl",
        output="out/results.jsonl",
        output_format="batch",
        messages=None,
        id_column=None,
        model=None,
        params={"temperature": 0},
        **extra,
    )


def test_batch_output_read_back_as_openai_documents_it(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "batch.jsonl", _batch_input(24, fail={3, 11}, tools={5, 6}))
    job = _batch_job(tmp_path, srv.url)
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr  # finished with row errors
    got = parse_openai_batch_output(tmp_path / "out/results.jsonl")
    assert list(got) == [f"request-{i}" for i in range(24)]  # output_order: input (default)
    failed = {cid for cid, o in got.items() if not o["ok"]}
    assert failed == {"request-3", "request-11"}
    assert got["request-3"]["code"] == "request_failed" and "400" in got["request-3"]["message"]
    assert got["request-0"]["content"] and got["request-0"]["model"].startswith("gpt-4o-mini")
    call = got["request-5"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    json.loads(call["function"]["arguments"])
    assert got["request-5"]["finish_reason"] == "tool_calls"

    # --retry-errors appends a second record for each failed row: still one line per row.
    again = run_batcher("run", job, "--retry-errors")
    assert again.returncode == 3, again.stderr
    journal = (tmp_path / "out/results.jsonl.journal").read_text()
    assert journal.count('"request-3"') == 2
    regot = parse_openai_batch_output(tmp_path / "out/results.jsonl")
    assert list(regot) == list(got)
    assert {cid for cid, o in regot.items() if not o["ok"]} == failed


def test_error_codes_and_rebuilt_completion() -> None:
    refused = batch_output_line(
        {"id": "r1", "status": "error", "attempts": 0, "error": "row 3: no text"}, created=7
    )
    assert refused["response"] is None
    assert refused["error"] == {"code": "invalid_input", "message": "row 3: no text"}
    ok = batch_output_line(
        {
            "id": "r2",
            "status": "ok",
            "content": "hi",
            "finish_reason": "stop",
            "prompt_tokens": 5,
            "completion_tokens": 1,
            "total_tokens": 6,
            "model": "gpt-4o-mini-2024-07-18",
            "attempts": 2,
        },
        created=7,
    )
    body = ok["response"]["body"]
    assert body["created"] == 7 and body["choices"][0]["message"]["content"] == "hi"
    assert "tool_calls" not in body["choices"][0]["message"]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    # The same row gives the same ids every time the output is written.
    assert batch_output_line({"id": "r2", "status": "ok"}, created=8)["id"] == ok["id"]


def test_count_mismatch_publishes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    with pytest.raises(Exception, match="nothing was published"):
        write_batch_output(out, [{"id": "a", "status": "ok"}], expected_rows=2)
    assert list(tmp_path.iterdir()) == []


def test_completion_order_still_has_every_row_once(tmp_path: Path, mock_server) -> None:
    srv = mock_server(**FAST)
    write_jsonl(tmp_path / "batch.jsonl", _batch_input(12, fail={4}, tools=set()))
    job = _batch_job(tmp_path, srv.url, output_order="completion")
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr
    got = parse_openai_batch_output(tmp_path / "out/results.jsonl")
    assert sorted(got) == sorted(f"request-{i}" for i in range(12))
    assert [cid for cid, o in got.items() if not o["ok"]] == ["request-4"]
