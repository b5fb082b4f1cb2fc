import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.errors import InputDataError
from batcher.inspect_output import (
    MAX_ERROR_GROUPS,
    inspect_path,
    normalise_error,
    render_inspection,
)
from batcher.journal import journal_path
from batcher.records import Result
from batcher.spec import Price

RATE = (
    "rate limited (429): Requests to the ChatCompletions_Create Operation under Azure OpenAI "
    "API version 2024-02-01 have exceeded token rate limit. Please retry after {} seconds."
)


def results() -> list[Result]:
    """Ten rows: seven answered (one cut off), three failed in two alike ways."""
    out = []
    for i in range(7):
        out.append(
            Result(
                id=f"r{i}",
                status="ok",
                content='{"label": "pos"}',
                finish_reason="length" if i == 6 else "stop",
                prompt_tokens=100,
                completion_tokens=10,
                total_tokens=110,
                attempts=1 if i < 5 else 3,
                latency_s=float(i + 1),  # 1..7 s
                model="gpt-4o-mini-2024-07-18",
                parsed={"label": "negative" if i % 3 == 0 else "positive", "score": i / 10},
                keep={"text": f"row {i}"},
            )
        )
    for i, wait in ((7, 6), (8, 13)):
        out.append(
            Result(id=f"r{i}", status="error", attempts=8, latency_s=0.5, error=RATE.format(wait))
        )
    out.append(
        Result(
            id="r9",
            status="error",
            attempts=1,
            latency_s=0.2,
            error="request rejected (400): 'max_tokens' 99999 is too large",
        )
    )
    return out


PARSED_TYPE = pa.struct([("label", pa.string()), ("score", pa.float64())])


def write_parquet(path: Path, rows: list[Result]) -> Path:
    """An output shaped like batcher's writer: result columns, kept columns, `parsed`."""
    records = [r.to_record() for r in rows]
    cols = {
        "id": pa.array([r["id"] for r in records], pa.string()),
        "status": pa.array([r["status"] for r in records], pa.string()),
        "content": pa.array([r["content"] for r in records], pa.string()),
        "finish_reason": pa.array([r["finish_reason"] for r in records], pa.string()),
        "prompt_tokens": pa.array([r["prompt_tokens"] for r in records], pa.int64()),
        "completion_tokens": pa.array([r["completion_tokens"] for r in records], pa.int64()),
        "total_tokens": pa.array([r["total_tokens"] for r in records], pa.int64()),
        "attempts": pa.array([r["attempts"] for r in records], pa.int32()),
        "latency_s": pa.array([r["latency_s"] for r in records], pa.float64()),
        "error": pa.array([r["error"] for r in records], pa.string()),
        "model": pa.array([r["model"] for r in records], pa.string()),
        "text": pa.array([r.get("keep", {}).get("text") for r in records], pa.string()),
        "parsed": pa.array([r.get("parsed") for r in records], PARSED_TYPE),
    }
    # Small row groups, so the reader really goes batch by batch.
    pq.write_table(pa.table(cols), path, row_group_size=3)
    return path


def write_journal(path: Path, rows: list[Result]) -> Path:
    lines = [{"t": "h", "version": 1, "fingerprint": "f", "created": "2025-01-01T00:00:00"}]
    lines.append({"t": "run", "started": "2025-01-01T00:00:00", "pid": 1})
    lines += [{"t": "r", **r.to_record()} for r in rows]
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    path.write_text(text + '{"t": "r", "id": "torn', encoding="utf-8")  # a crash's torn tail
    return path


def check_report(report: dict) -> None:
    assert report["rows"] == 10
    assert report["status"] == {"ok": 7, "error": 3}
    assert report["finish_reason"] == {"stop": 6, "(none)": 3, "length": 1}
    assert report["tokens"] == {"prompt": 700, "completion": 70, "total": 770}
    # gpt-4o-mini: 0.15 / 0.60 per 1M
    assert report["cost_usd"] == pytest.approx((700 * 0.15 + 70 * 0.60) / 1e6)
    model = report["models"]["gpt-4o-mini-2024-07-18"]
    assert model["rows"] == 7
    assert "built-in table as of" in model["price_source"]
    lat = report["latency_s"]
    assert lat["rows"] == 10
    assert lat["max"] == 7.0
    assert lat["p50"] == pytest.approx(2.5)  # of 0.2, 0.5, 0.5, 1..7
    assert report["attempts"] == {"1": 6, "3": 2, "8": 2}
    assert report["retried_rows"] == 4
    errors = report["errors"]
    assert errors["rows"] == 3
    assert errors["kinds"] == 2
    first = errors["top"][0]
    assert first["count"] == 2
    assert first["sample_ids"] == ["r7", "r8"]
    assert "(429)" in first["kind"]
    assert "retry after <n> seconds" in first["kind"]
    assert first["message"] == RATE.format(6)  # a real message of the group
    assert errors["top"][1]["sample_ids"] == ["r9"]
    assert report["parsed"]["rows"] == 7
    assert report["parsed"]["values"] == {"label": {"positive": 4, "negative": 3}}


def test_parquet_output(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "out.parquet", results())
    report = inspect_path(path)
    assert report["source"] == "parquet"
    check_report(report)


def test_partial_job_from_its_journal(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    write_journal(journal_path(output), results())
    # The output itself does not exist yet: inspect finds the journal beside it.
    report = inspect_path(output)
    assert report["source"] == "journal"
    assert report["superseded_records"] == 0
    check_report(report)
    # The journal named directly works the same.
    assert inspect_path(journal_path(output))["rows"] == 10


def test_journal_last_record_of_an_id_wins(tmp_path: Path) -> None:
    rows = results()
    retried = Result(
        id="r9",
        status="ok",
        finish_reason="stop",
        prompt_tokens=100,
        completion_tokens=10,
        total_tokens=110,
        attempts=1,
        latency_s=1.0,
        model="gpt-4o-mini-2024-07-18",
        parsed={"label": "positive", "score": 0.5},
    )
    path = write_journal(tmp_path / "out.parquet.journal", [*rows, retried])
    report = inspect_path(path)
    assert report["rows"] == 10
    assert report["superseded_records"] == 1
    assert report["status"] == {"ok": 8, "error": 2}
    assert report["errors"]["kinds"] == 1


def test_job_prices_and_unknown_models(tmp_path: Path) -> None:
    rows = [
        Result(id="a", status="ok", prompt_tokens=1_000_000, completion_tokens=0, model="mine"),
        Result(id="b", status="ok", prompt_tokens=1_000_000, completion_tokens=0, model="gpt-4o"),
    ]
    path = write_journal(tmp_path / "x.journal", rows)
    report = inspect_path(path)
    assert report["cost_usd"] is None  # "mine" has no price: no total pretends to be whole
    assert report["cost_usd_priced_models"] == pytest.approx(2.50)
    assert "at least $2.50" in render_inspection(report)
    report = inspect_path(path, prices={"mine": Price(input_per_1m=1.0, output_per_1m=1.0)})
    assert report["cost_usd"] == pytest.approx(3.50)
    assert report["models"]["mine"]["price_source"] == "job file"


def test_job_file_path_finds_its_output(tmp_path: Path) -> None:
    write_parquet(tmp_path / "out.parquet", results())
    (tmp_path / "input.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "job.yaml").write_text(
        "input: input.jsonl\noutput: out.parquet\nmodel: gpt-4o-mini\n"
        "prices:\n  gpt-4o-mini: {input_per_1m: 1, output_per_1m: 1}\n"
    )
    report = inspect_path(tmp_path / "job.yaml")
    assert report["rows"] == 10
    assert report["models"]["gpt-4o-mini-2024-07-18"]["price_source"] == "job file"


def test_render_inspection(tmp_path: Path) -> None:
    text = render_inspection(inspect_path(write_parquet(tmp_path / "o.parquet", results())))
    assert "10 rows (Parquet output)" in text
    assert "status:        ok 7 · error 3" in text
    assert "700 prompt + 70 completion = 770" in text
    assert "p50 2.50s" in text
    assert "4 rows needed a retry" in text
    assert "e.g. ids r7, r8" in text
    assert "label: positive 4 · negative 3" in text
    json.dumps(inspect_path(tmp_path / "o.parquet"))  # --json: the dict is plain JSON


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="no journal"):
        inspect_path(tmp_path / "nothing.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(InputDataError, match="written by batcher"):
        inspect_path(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(InputDataError, match="neither a Parquet output nor a Batch-API output"):
        inspect_path(tmp_path / "junk.parquet")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (RATE.format(6), RATE.format(60)),
        (
            "server error (503): upstream timeout after 30.5s",
            "server error (503): upstream timeout after 2.1s",
        ),
        (
            "in.jsonl:17 (id r17): column 'text' is null",
            "in.jsonl:2045 (id abc-99): column 'text' is null",
        ),
        (
            "request rejected (400): request req_8f7a6b5c4d failed",
            "request rejected (400): request req_1a2b3c4d5e failed",
        ),
    ],
)
def test_alike_errors_group(a: str, b: str) -> None:
    assert normalise_error(a) == normalise_error(b)


def test_different_statuses_stay_apart() -> None:
    assert normalise_error("request rejected (400): bad") != normalise_error(
        "request rejected (404): bad"
    )
    assert MAX_ERROR_GROUPS >= 1000
