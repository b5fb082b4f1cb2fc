import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from batcher.errors import InputDataError
from batcher.estimate import estimate_job, render_estimate
from batcher.readers import open_input
from batcher.requests import RequestBuilder
from batcher.spec import Job, load_job
from batcher.tokens import admission_cost, count_prompt_tokens, max_output_tokens

REQUIRED_KEYS = {
    "rows",
    "prompt_tokens",
    "reserved_completion_tokens",
    "cost_usd",
    "cost_usd_prompt_only",
    "duration_s",
    "binding_limit",
    "models",
    "prices_as_of",
    "over_context",
    "over_context_count",
    "default_max_tokens_rows",
}
MODEL_KEYS = {
    "rows",
    "prompt_tokens",
    "reserved_completion_tokens",
    "cost_usd",
    "price_source",
    "rpm",
    "tpm",
    "duration_s",
    "binding_limit",
}


def make_job(tmp_path: Path, rows: list[dict[str, Any]], **spec: Any) -> Job:
    (tmp_path / "input.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    doc: dict[str, Any] = {
        "input": "input.jsonl",
        "output": "out.parquet",
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Label the review: positive, negative or neutral."},
            {"role": "user", "content": "Review: {text}"},
        ],
        "params": {"max_tokens": 5},
        **spec,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    return load_job(tmp_path / "job.yaml")


def reviews(n: int) -> list[dict[str, Any]]:
    return [{"text": f"Review number {i}: " + "quite good, " * (i % 7)} for i in range(n)]


def engine_accounting(job: Job) -> tuple[int, int, int]:
    """(rows, prompt tokens, admission tokens) the way the engine charges each request."""
    reader = open_input(job)
    builder = RequestBuilder(job, batch_format=reader.format == "batch")
    rows = prompt = admitted = 0
    for batch in reader.iter_batches(100):
        for row in batch:
            body = builder.build_body(row)
            rows += 1
            prompt += count_prompt_tokens(body["messages"], body["model"])
            admitted += admission_cost(body, body["model"], job.assumed_max_tokens)
    return rows, prompt, admitted


def test_figures_equal_the_engines_accounting(tmp_path: Path) -> None:
    job = make_job(tmp_path, reviews(2500))  # more than one batch
    report = estimate_job(job, batch_rows=1000)
    rows, prompt, admitted = engine_accounting(job)
    assert report["rows"] == rows == 2500
    assert report["prompt_tokens"] == prompt
    assert report["reserved_completion_tokens"] == 5 * rows
    assert report["admission_tokens"] == admitted
    assert set(report) >= REQUIRED_KEYS
    assert set(report["models"]["gpt-4o-mini"]) >= MODEL_KEYS
    json.dumps(report)  # --json: plain JSON


def test_cost_bounds_use_the_dated_price_table(tmp_path: Path) -> None:
    job = make_job(tmp_path, reviews(10))
    report = estimate_job(job)
    p, r = report["prompt_tokens"], report["reserved_completion_tokens"]
    assert report["cost_usd"] == pytest.approx((p * 0.15 + r * 0.60) / 1e6, abs=1e-6)
    assert report["cost_usd_prompt_only"] == pytest.approx(p * 0.15 / 1e6, abs=1e-6)
    model = report["models"]["gpt-4o-mini"]
    assert model["price_source"] == f"built-in table as of {report['prices_as_of']}"
    text = render_estimate(report)
    assert "built-in table as of" in text
    assert "nothing was sent" in text


def test_job_file_prices_and_unpriced_models(tmp_path: Path) -> None:
    priced = make_job(
        tmp_path, reviews(4), prices={"gpt-4o-mini": {"input_per_1m": 1e6, "output_per_1m": 0}}
    )
    report = estimate_job(priced)
    assert report["cost_usd"] == pytest.approx(report["prompt_tokens"])
    assert report["models"]["gpt-4o-mini"]["price_source"] == "job file"

    unknown = make_job(tmp_path, reviews(4), model="my-deployment", allow_any_model=True)
    report = estimate_job(unknown)
    assert report["cost_usd"] is None
    assert report["unpriced_models"] == ["my-deployment"]
    assert "add it under prices:" in render_estimate(report)


def test_binding_limit_switches_between_rpm_and_tpm(tmp_path: Path) -> None:
    rows = reviews(600)
    # 600 small requests against 500 rpm and plenty of tpm: requests bind.
    job = make_job(tmp_path, rows, limits={"gpt-4o-mini": {"rpm": 500, "tpm": 10_000_000}})
    report = estimate_job(job)
    assert report["binding_limit"] == "rpm"
    assert report["duration_s"] == pytest.approx(600 / 500 * 60, abs=0.1)
    # Same rows, a tight token limit: tokens bind.
    job = make_job(tmp_path, rows, limits={"gpt-4o-mini": {"rpm": 500, "tpm": 2_000}})
    report = estimate_job(job)
    assert report["binding_limit"] == "tpm"
    assert report["duration_s"] == pytest.approx(report["admission_tokens"] / 2_000 * 60, abs=0.1)
    assert report["models"]["gpt-4o-mini"]["binding_limit"] == "tpm"


def test_models_run_in_parallel_so_the_slowest_sets_the_duration(tmp_path: Path) -> None:
    lines = []
    for i in range(30):
        model = "gpt-4o" if i % 3 else "gpt-35-turbo"
        lines.append(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"hello {i}"}],
                    "max_tokens": 100,
                },
            }
        )
    job = make_job(
        tmp_path,
        lines,
        model=None,
        messages=None,
        params={},
        limits={"gpt-4o": {"rpm": 10, "tpm": 1_000_000}, "gpt-35-turbo": {"rpm": 60}},
    )
    report = estimate_job(job)
    assert report["models"]["gpt-4o"]["rows"] == 20
    assert report["models"]["gpt-35-turbo"]["rows"] == 10
    assert report["models"]["gpt-4o"]["duration_s"] == pytest.approx(120)
    assert report["models"]["gpt-35-turbo"]["duration_s"] == pytest.approx(10)
    assert report["duration_s"] == pytest.approx(120)
    rows, prompt, admitted = engine_accounting(job)
    assert (report["rows"], report["prompt_tokens"], report["admission_tokens"]) == (
        rows,
        prompt,
        admitted,
    )


def test_over_context_rows_are_listed(tmp_path: Path) -> None:
    rows = [{"text": "short"}, {"text": "word " * 9000}, {"text": "fine"}]
    job = make_job(tmp_path, rows, model="gpt-4")  # 8,192-token context
    report = estimate_job(job)
    assert report["over_context_count"] == 1
    (entry,) = report["over_context"]
    assert entry["id"] == "1"
    assert entry["context_window"] == 8192
    assert entry["tokens"] > 8192
    assert "exceed their model's context window" in render_estimate(report)


def test_rows_over_the_tpm_limit_are_not_counted_as_sendable(tmp_path: Path) -> None:
    rows = [{"text": "short"}, {"text": "word " * 3000}]
    job = make_job(tmp_path, rows, limits={"gpt-4o-mini": {"tpm": 1000}})
    report = estimate_job(job)
    assert report["rows"] == 1
    assert report["over_tpm_rows"] == 1
    assert report["models"]["gpt-4o-mini"]["over_tpm_ids"] == ["1"]
    assert "will be recorded as errors" in render_estimate(report)


def test_rows_without_max_tokens_are_charged_the_assumed_default(tmp_path: Path) -> None:
    job = make_job(tmp_path, reviews(3), params={}, assumed_max_tokens=1000)
    report = estimate_job(job)
    assert report["default_max_tokens_rows"] == 3
    assert report["reserved_completion_tokens"] == 3000
    assert max_output_tokens({}, 1000) == (1000, True)
    assert "set no max_tokens" in render_estimate(report)


def test_bad_rows(tmp_path: Path) -> None:
    rows = [{"text": "ok"}, {"other": "no text column"}, {"text": "ok too"}]
    with pytest.raises(InputDataError, match="no column 'text'"):
        estimate_job(make_job(tmp_path, rows))
    report = estimate_job(make_job(tmp_path, rows, on_bad_row="skip"))
    assert report["rows"] == 2
    assert report["bad_rows"] == 1
    assert "bad rows will be recorded as errors" in render_estimate(report)


def documented_keys(text: str) -> set[str]:
    """Every mapping key of the YAML, and keys shown commented out (`# base_url: ...`)."""
    keys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            keys.update(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(text))
    keys.update(re.findall(r"^\s*#\s*([a-z_]+):", text, flags=re.M))
    return keys


def test_init_writes_a_runnable_documented_example(tmp_path: Path) -> None:
    from batcher.init_job import write_example
    from batcher.spec import Endpoint, Limit, LimiterConfig, Message, Price, Retry

    job_path = write_example(tmp_path / "mylabels")
    assert job_path == tmp_path / "mylabels" / "job.yaml"
    assert (tmp_path / "mylabels" / "input.jsonl").exists()
    text = job_path.read_text()
    keys = documented_keys(text)
    for model in (Job, Endpoint, LimiterConfig, Limit, Message, Price, Retry):
        missing = set(model.model_fields) - {"job_dir"} - keys
        assert not missing, f"{model.__name__}: {missing} not in the example job"
    job = load_job(job_path)
    report = estimate_job(job)
    assert report["rows"] == 20
    assert report["default_max_tokens_rows"] == 0
    assert report["models"]["gpt-4o-mini"]["price_source"] == "job file"


def test_init_with_a_yaml_name_and_no_overwrite(tmp_path: Path) -> None:
    from batcher.errors import JobSpecError
    from batcher.init_job import write_example

    job_path = write_example(tmp_path / "reviews.yaml")
    assert job_path == tmp_path / "reviews.yaml"
    job = load_job(job_path)
    assert job.input == tmp_path / "reviews-input.jsonl"
    assert job.output == tmp_path / "out" / "reviews.parquet"
    assert estimate_job(job)["rows"] == 20
    job_path.write_text("# my edits\n")
    with pytest.raises(JobSpecError, match=r"already exists; .* --force"):
        write_example(tmp_path / "reviews.yaml")
    assert job_path.read_text() == "# my edits\n"
    write_example(tmp_path / "reviews.yaml", force=True)
    assert "review_label" in job_path.read_text()
