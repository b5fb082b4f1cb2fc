"""Property: any YAML mapping is either a valid job or a JobSpecError, never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.errors import JobSpecError
from batcher.spec import Job, load_job, request_fingerprint

KEYS = [*Job.model_fields, "nope", "Model", ""]
NESTED = [
    "region",
    "base_url",
    "api_key_env",
    "timeout_s",
    "rpm",
    "tpm",
    "max_attempts",
    "backend",
    "headroom",
    "role",
    "content",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "stream",
    "n",
    "input_per_1m",
    "failures",
    "count_as",
    "gpt-4o-mini",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "gpt-4o-mini",
            "o3-mini",
            "in.jsonl",
            "out.parquet",
            "batch",
            "auto",
            "skip",
            "local",
            "redis",
            "user",
            "{text}",
            ".",
            "/",
            "a\x00b",
            "eu",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(NESTED), st.text(max_size=6)), inner, max_size=4),
    ),
    max_leaves=12,
)
mappings = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)
# Near-valid jobs: one or two keys changed, nested sections with known keys and small values.
small = st.one_of(
    st.integers(min_value=-3, max_value=5000),
    st.floats(min_value=-1, max_value=1e4),
    st.booleans(),
    st.sampled_from(["gpt-4o-mini", "gpt-4o", "o3-mini", "eu", "local", "skip", "user", "x"]),
)
sections = st.dictionaries(st.sampled_from(NESTED), small, max_size=3)
plausible = st.dictionaries(
    st.sampled_from(KEYS),
    st.one_of(small, sections, st.lists(st.text(max_size=8), max_size=3)),
    max_size=2,
)
BASE = {"input": "in.jsonl", "output": "out.parquet", "model": "gpt-4o-mini"}


def _check(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(text, encoding="utf-8")
        (Path(tmp) / "in.jsonl").write_text('{"text": "x"}\n')
        try:
            job = load_job(path)
        except JobSpecError:
            return
        assert isinstance(job, Job)
        request_fingerprint(job, "digest")  # a valid job can always be fingerprinted


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=mappings, base=st.booleans())
def test_any_mapping_is_a_job_or_a_job_spec_error(extra: dict[str, Any], base: bool) -> None:
    raw = {**BASE, **extra} if base else extra
    _check(yaml.safe_dump(raw, allow_unicode=True))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=plausible)
def test_near_valid_jobs_are_a_job_or_a_job_spec_error(extra: dict[str, Any]) -> None:
    _check(yaml.safe_dump({**BASE, **extra}, allow_unicode=True))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_a_job_or_a_job_spec_error(text: str) -> None:
    _check(text)


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(KEYS[:12]), first=scalars, second=scalars)
def test_a_duplicate_key_is_always_refused(key: str, first: Any, second: Any) -> None:
    text = yaml.safe_dump({**BASE, key: first}) + yaml.safe_dump({key: second})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_job(path)
        except JobSpecError as exc:
            assert "given twice" in str(exc)
        else:
            raise AssertionError("a duplicate key was accepted")
