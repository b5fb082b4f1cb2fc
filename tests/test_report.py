"""`batcher report`: of a finished job and of a job stopped half-way, as text and as an HTML
page that a real headless browser (Debian's chromium) renders offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import review_rows, run_batcher, write_job, write_jsonl
from PIL import Image

from batcher.history import history_path, read_history
from batcher.journal import journal_path
from batcher.report import INSTALL_HINT, build_report, histogram, sparkline

SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "review_label",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number"},
                "spam": {"type": "boolean"},
            },
            "required": ["label", "confidence", "spam"],
            "additionalProperties": False,
        },
    },
}
ROWS = 40
FAST_LIMITS = {"gpt-4o-mini": {"rpm": 60_000, "tpm": 10_000_000}}


def structured_job(tmp: Path, url: str, rows: list[dict[str, Any]], **overrides: Any) -> Path:
    write_jsonl(tmp / "input.jsonl", rows)
    return write_job(
        tmp,
        url,
        params={"max_tokens": 60, "temperature": 0, "response_format": SCHEMA},
        limits=FAST_LIMITS,
        **overrides,
    )


@pytest.fixture
def finished(tmp_path: Path, mock_server) -> Path:
    """A labeling job that finished: two rows refused (400), a short 429 storm."""
    srv = mock_server(
        rpm=None, tpm=None, rate_limit_storm_requests=(5, 7), storm_retry_after_s=0.05
    )
    rows = review_rows(ROWS, marker={3: "[[fail-400]]", 9: "[[fail-400]]"})
    job = structured_job(tmp_path, srv.url, rows)
    res = run_batcher("run", job)
    assert res.returncode == 3, res.stderr  # finished with error rows
    assert history_path(tmp_path / "out/result.parquet").exists()  # the run recorded it
    return job


@pytest.fixture
def stopped(tmp_path: Path, mock_server) -> Path:
    """A job stopped half-way: the second half meets an outage (every attempt a 5xx), the
    circuit breaker stops the run (exit 4); the output is not written, the journal is."""
    srv = mock_server(rpm=None, tpm=None)
    rows = review_rows(ROWS, marker={i: "[[fail-500]]" for i in range(ROWS // 2, ROWS)})
    job = structured_job(tmp_path, srv.url, rows, concurrency=2)
    res = run_batcher("run", job)
    assert res.returncode == 4, res.stderr
    output = tmp_path / "out/result.parquet"
    assert not output.exists() and journal_path(output).exists()
    assert history_path(output).exists()
    return job


# ---- text ---------------------------------------------------------------------------------


def test_text_report_of_a_finished_job(finished: Path) -> None:
    res = run_batcher("report", finished)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "40 rows (Parquet output)" in out
    assert "request rejected (400)" in out and "e.g. ids r3, r9" in out
    assert re.search(r"run 1 \(\w+\) .*: .*ended completed", out)
    assert "requests/min" in out and "tokens/min" in out
    assert "latency distribution (s):" in out
    assert "field label:" in out and "field spam:" in out
    assert "field confidence (numbers, 38 values):" in out
    assert "cost:" in out

    data = json.loads(run_batcher("report", finished, "--json").stdout)
    assert sum(data["labels"]["label"].values()) == 38
    assert set(data["labels"]["spam"]) <= {"true", "false"}
    assert data["numeric_fields"]["confidence"]["n"] == 38
    assert data["latency_histogram"]["n"] == 38  # the refused rows have no latency
    assert data["runs"] and data["runs"][0]["points"]


def test_text_report_of_a_stopped_job(stopped: Path) -> None:
    res = run_batcher("report", stopped.parent / "out/result.parquet")  # the output's path
    assert res.returncode == 0, res.stderr
    assert "(journal of an unfinished job)" in res.stdout
    report = build_report(stopped)
    insp = report["inspection"]
    assert insp["source"] == "journal"
    assert 0 < insp["rows"] < ROWS
    assert report["runs"]


def test_report_of_nothing_says_what_to_give(tmp_path: Path) -> None:
    res = run_batcher("report", tmp_path / "nothing.parquet")
    assert res.returncode != 0
    assert "no output, journal or run history" in res.stderr


def test_histogram_and_sparkline() -> None:
    h = histogram([0.0, 1.0, 1.0, 2.0], bins=2)
    assert h == {"edges": [0.0, 1.0, 2.0], "counts": [1, 3], "n": 4}
    assert histogram([5.0, 5.0]) == {"edges": [5.0, 5.0], "counts": [2], "n": 2}
    assert histogram([])["n"] == 0
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert len(sparkline(list(range(1000)), width=60)) == 60


def test_html_needs_the_extra_and_says_how_to_get_it(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = run_batcher("report", finished, "--html", tmp_path / "r.html")
    assert res.returncode == 2
    assert INSTALL_HINT in res.stderr and "without --html" in res.stderr
    assert not (tmp_path / "r.html").exists()


# ---- HTML in a real browser -----------------------------------------------------------------


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def _offline_prefix() -> list[str]:
    """`unshare -n`: a network namespace with no network at all, where we may make one."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []  # the flags below still send every request to nowhere


def render(page: Path, tmp: Path) -> tuple[str, str, Image.Image]:
    """(DOM after load, browser log, screenshot) of `page`, with the network off."""
    base = [
        *_offline_prefix(),
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--proxy-server=http://127.0.0.1:9",  # belt and braces: nothing reaches the network
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1100,3000",
    ]
    shot = tmp / "shot.png"
    runs = []
    for i, extra in enumerate(("--dump-dom", f"--screenshot={shot}")):
        proc = subprocess.run(
            [*base, f"--user-data-dir={tmp / f'profile-{i}'}", extra, page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(proc)
    return runs[0].stdout, runs[0].stderr + runs[1].stderr, Image.open(shot)


def check_page(page: Path, tmp: Path, charts: list[str]) -> str:
    text = page.read_text()
    # Self-contained: no script to fail, nothing fetched from elsewhere.
    assert "<script" not in text.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text, re.I)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", text, re.I)
    dom, log, shot = render(page, tmp)
    # The page's own console: chromium's built-in pages (chrome://...) log there too, e.g.
    # "Slow network is detected" on a loaded machine.
    console = [
        line
        for line in log.splitlines()
        if ("Uncaught" in line or "CONSOLE" in line) and "chrome://" not in line
    ]
    assert not console, console[-10:]
    for chart in charts:
        assert re.search(rf'<figure class="chart" id="{chart}"><svg', dom), chart
    # The screenshot shows a page, not a blank: charts bring many colours (antialiasing).
    assert shot.size == (1100, 3000)
    colours = shot.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50
    return dom


def test_html_report_of_a_finished_job_renders_offline(finished: Path, tmp_path: Path) -> None:
    page = tmp_path / "report" / "finished.html"
    res = run_batcher("report", finished, "--html", page)
    assert res.returncode == 0, res.stderr
    assert f"wrote {page}" in res.stdout
    dom = check_page(
        page,
        tmp_path,
        [
            "chart-rates",
            "chart-throttling",
            "chart-latency-time",
            "chart-latency",
            "chart-field-0",
            "chart-field-1",
            "chart-number-0",
        ],
    )
    assert "request rejected (400)" in dom and "r3, r9" in dom  # errors with sample ids
    assert "Cost" in dom and "$" in dom
    assert "Field label: rows per value" in dom
    assert "Field confidence: distribution of values" in dom


def test_html_report_of_a_stopped_job_renders_offline(stopped: Path, tmp_path: Path) -> None:
    page = tmp_path / "stopped.html"
    res = run_batcher("report", stopped, "--html", page)
    assert res.returncode == 0, res.stderr
    dom = check_page(page, tmp_path, ["chart-rates", "chart-throttling", "chart-latency"])
    assert "journal (not finished)" in dom
    assert len(read_history(history_path(stopped.parent / "out/result.parquet")).runs) >= 1
