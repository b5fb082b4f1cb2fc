"""Every example job in jobs/ runs to completion against the bundled server (`--mock`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import run_batcher

JOBS = sorted(p.parent for p in (Path(__file__).parent.parent / "jobs").glob("*/job.yaml"))


@pytest.mark.parametrize("job_dir", JOBS, ids=[p.name for p in JOBS])
def test_example_job_runs(tmp_path: Path, job_dir: Path) -> None:
    work = tmp_path / job_dir.name
    shutil.copytree(job_dir, work, ignore=shutil.ignore_patterns("out"))
    # The job as shipped, paced 10x faster (the --mock server enforces the job's limits):
    # the demo's 200 rows take 24 s at Langdock's own, which proves nothing more.
    spec = yaml.safe_load((work / "job.yaml").read_text())
    for limit in spec.get("limits", {}).values():
        limit["rpm"], limit["tpm"] = limit["rpm"] * 10, limit["tpm"] * 10
    (work / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = run_batcher("run", work / "job.yaml", "--mock", timeout=240)
    assert res.returncode == 0, res.stderr
    spec = yaml.safe_load((work / "job.yaml").read_text())
    table = pq.read_table(work / spec["output"])
    assert table.num_rows > 0
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert len(set(table.column("id").to_pylist())) == table.num_rows


def test_there_are_example_jobs() -> None:
    assert {p.name for p in JOBS} >= {
        "demo",
        "sentiment-structured",
        "batch-api",
        "nightly-summaries",
    }
