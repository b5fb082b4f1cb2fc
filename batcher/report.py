"""`batcher report`: what a job did, as a page to look at in the morning (or as text).

Three sources, none of them engine internals: the results (the Parquet output, or the journal
of a job not finished; summed by `batcher.inspect_output`, whose error grouping and label
tallies are reused here), one more streamed pass over the results for the latency
distribution and the numeric fields of structured answers, and the run history
(`batcher.history`) for everything over time. `build_report` returns data; `render_text` and
`render_html` draw it.

The HTML page is one self-contained file that opens offline: no script, no external link;
the charts are SVG drawn by matplotlib (the optional `report` extra) and inlined.
"""

from __future__ import annotations

import html
import io
import math
from array import array
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from batcher.errors import BatcherError, ExitCode, InputDataError
from batcher.history import HISTORY_SUFFIX, History, history_path, read_history
from batcher.inspect_output import inspect_path, output_kind, render_inspection
from batcher.journal import journal_latest_mask, journal_path, read_results
from batcher.pricing import format_usd
from batcher.progress import format_duration
from batcher.spec import Price

HISTOGRAM_BINS = 20
SPARK = "▁▂▃▄▅▆▇█"
INSTALL_HINT = "pip install 'batcher[report]'"


class ReportUnavailable(BatcherError):
    """The HTML report needs the optional plotting dependency."""

    exit_code = ExitCode.CONFIG


# ---- finding the job's files ----


def _locate(path: Path) -> tuple[Path, Mapping[str, Price] | None, bool]:
    """(output path, the job file's prices, whether `path` is a job file) for a job file, an
    output, a journal or a history."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        from batcher.spec import load_job

        job = load_job(path)
        return job.output, job.prices, True
    name = path.name
    for suffix in (HISTORY_SUFFIX, ".journal"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)]), None, False
    return path, None, False


# ---- one streamed pass: latencies and numeric structured fields ----


def _result_batches(output: Path) -> Iterator[tuple[list[Any], list[Any] | None]]:
    """(latency_s values, parsed values or None) per batch, from the output or the journal (also
    for a Batch-API output, which keeps no latencies)."""
    if output.exists() and output_kind(output) == "parquet":
        pf = pq.ParquetFile(output)
        names = set(pf.schema_arrow.names)
        columns = [c for c in ("latency_s", "parsed") if c in names]
        for batch in pf.iter_batches(batch_size=16_384, columns=columns):
            latency = batch.column("latency_s").to_pylist() if "latency_s" in names else []
            parsed = batch.column("parsed").to_pylist() if "parsed" in names else None
            yield latency, parsed
        return
    journal = journal_path(output)
    if not journal.exists():
        return
    mask, _ = journal_latest_mask(journal)
    lat: list[Any] = []
    parsed_values: list[Any] = []
    for i, rec in enumerate(read_results(journal)):
        if mask is not None and not mask[i]:
            continue
        lat.append(rec.get("latency_s"))
        parsed_values.append(rec.get("parsed"))
        if len(lat) >= 16_384:
            yield lat, parsed_values
            lat, parsed_values = [], []
    if lat:
        yield lat, parsed_values


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _scan_results(output: Path) -> tuple[array[float], dict[str, array[float]]]:
    """Every answer's latency, and the values of parsed fields that hold only numbers."""
    latencies: array[float] = array("d")
    numbers: dict[str, array[float]] = {}
    not_numeric: set[str] = set()
    for lat, parsed in _result_batches(output):
        latencies.extend(v for v in lat if _number(v) is not None)
        for value in parsed or ():
            if not isinstance(value, Mapping):
                continue
            for name, v in value.items():
                if name in not_numeric or v is None:
                    continue
                x = _number(v)
                if x is None:
                    not_numeric.add(name)
                    numbers.pop(name, None)
                else:
                    numbers.setdefault(name, array("d")).append(x)
    return latencies, numbers


def histogram(values: array[float] | list[float], bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Equal-width bins over [min, max]: {"edges": [bins + 1], "counts": [bins]}."""
    if not values:
        return {"edges": [], "counts": [], "n": 0}
    lo, hi = min(values), max(values)
    if hi <= lo:
        return {"edges": [lo, lo], "counts": [len(values)], "n": len(values)}
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    edges = [round(lo + i * width, 6) for i in range(bins + 1)]
    return {"edges": edges, "counts": counts, "n": len(values)}


# ---- the history as series ----


def _runs(history: History) -> list[dict[str, Any]]:
    """Each run's samples on one running-time axis (runs laid end to end, in minutes)."""
    runs = []
    offset = 0.0
    for number, run in enumerate(history.runs, start=1):
        start_t = run.start.get("t")
        if start_t is None and run.samples:
            start_t = run.samples[0]["t"] - run.samples[0].get("dt", 0.0)
        start_t = float(start_t or 0.0)
        points = []
        limit_rpm = limit_tpm = 0.0
        for s in run.samples:
            dt = float(s.get("dt") or 0.0)
            if dt <= 0:
                continue
            models = s.get("models") or {}
            limit_rpm = float(sum(m.get("rpm", 0) for m in models.values()))
            limit_tpm = float(sum(m.get("tpm", 0) for m in models.values()))
            lat = s.get("latency_s") or {}
            points.append(
                {
                    "x_min": round((offset + float(s["t"]) - start_t) / 60, 4),
                    "rpm": round(s.get("requests", 0) * 60 / dt, 2),
                    "tpm": round(s.get("tokens", 0) * 60 / dt, 1),
                    "limit_rpm": limit_rpm,
                    "limit_tpm": limit_tpm,
                    "effective_rpm": sum(m.get("effective_rpm", 0) for m in models.values()),
                    "effective_tpm": sum(m.get("effective_tpm", 0) for m in models.values()),
                    "paused": any(m.get("paused") for m in models.values()),
                    "rate_limited": s.get("rate_limited", 0),
                    "retries": s.get("retries", 0),
                    "ok": s.get("ok", 0),
                    "error": s.get("error", 0),
                    "p50": lat.get("p50"),
                    "p90": lat.get("p90"),
                    "p99": lat.get("p99"),
                    "spend_usd": s.get("spend_usd"),
                }
            )
        end = run.end or {}
        last_t = float(run.samples[-1]["t"]) if run.samples else start_t
        duration = float(end.get("elapsed_s") or (float(end.get("t", last_t)) - start_t))
        runs.append(
            {
                "number": number,
                "run_id": run.run_id,
                "started": _iso(start_t),
                "offset_min": round(offset / 60, 4),
                "duration_s": round(max(duration, 0.0), 3),
                # the end line's figure is exact (the start line's only the journal's count)
                "resumed_rows": end.get("rows_done_before", run.start.get("rows_done_before", 0)),
                "ended": end.get("reason") or ("stopped" if run.end else "no end record (crash?)"),
                "rows_ok": sum(p["ok"] for p in points),
                "rows_error": sum(p["error"] for p in points),
                "requests": sum(s.get("requests", 0) for s in run.samples),
                "rate_limited": sum(p["rate_limited"] for p in points),
                "retries": sum(p["retries"] for p in points),
                "peak_rpm": max((p["rpm"] for p in points), default=0.0),
                "limit_rpm": limit_rpm,
                "limit_tpm": limit_tpm,
                "spend_usd": end.get("spend_usd", points[-1]["spend_usd"] if points else None),
                "points": points,
            }
        )
        offset += max(duration, (float(last_t) - start_t))
    return runs


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "?"


# ---- the report as data ----


def build_report(path: Path, prices: Mapping[str, Price] | None = None) -> dict[str, Any]:
    """Everything the report shows, as JSON-able data, for a job file, output or journal."""
    output, job_prices, is_job = _locate(Path(path))
    prices = prices if prices is not None else job_prices
    hist_file = history_path(output)
    history = read_history(hist_file)
    has_results = output.exists() or journal_path(output).exists()
    if not has_results and not history.runs:
        if is_job:  # exit 2 as `inspect` does for the same job
            raise InputDataError(
                f"{path}: the job has not run yet: no output, journal or run history at "
                f"{output} (run it with `batcher run {path}`)"
            )
        raise BatcherError(
            f"{path}: no output, journal or run history there; give the job file or its output path"
        )
    try:
        inspection = inspect_path(output, prices) if has_results else None
        latencies, numbers = _scan_results(output) if has_results else (array("d"), {})
    except OSError as exc:
        raise InputDataError(f"{output}: cannot read: {exc.strerror or exc}") from None
    labels = ((inspection or {}).get("parsed") or {}).get("values", {})
    return {
        "title": output.name,
        "output": str(output),
        "history_file": str(hist_file),
        "history_skipped_lines": history.skipped_lines,
        "generated": _iso(datetime.now(UTC).timestamp()),
        "inspection": inspection,
        "latency_histogram": histogram(latencies),
        "labels": labels,
        # numeric fields inspect does not tally as labels: measurements, scores
        "numeric_fields": {
            name: histogram(values) for name, values in numbers.items() if name not in labels
        },
        "runs": _runs(history),
    }


# ---- text ----


def sparkline(values: list[float], width: int = 60) -> str:
    """Values squeezed into `width` block characters (means of equal slices)."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)])
        ]
    top = max(values) or 1.0
    return "".join(
        SPARK[min(int(v / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for v in values
    )


def _bars(labels: list[str], counts: list[int], width: int = 40) -> list[str]:
    top = max(counts, default=0) or 1
    pad = max((len(label) for label in labels), default=0)
    return [
        f"    {label:>{pad}} {'█' * round(c / top * width):<{width}} {c:,}"
        for label, c in zip(labels, counts, strict=True)
    ]


def _hist_lines(hist: Mapping[str, Any], unit: str = "") -> list[str]:
    edges, counts = hist["edges"], hist["counts"]
    if not counts:
        return []
    labels = [f"{edges[i]:.3g}-{edges[i + 1]:.3g}{unit}" for i in range(len(counts))]
    return _bars(labels, counts)


def render_text(report: Mapping[str, Any]) -> str:
    """The report for a terminal: inspect's summary, the runs over time, the distributions."""
    lines: list[str] = []
    if report["inspection"] is not None:
        lines.append(render_inspection(report["inspection"]))
    else:
        lines.append(f"{report['output']}: no results yet (only a run history)")
    runs = report["runs"]
    if not runs:
        lines.append(f"runs:          no run history ({Path(report['history_file']).name})")
    for run in runs:
        spend = "" if run["spend_usd"] is None else f", spend {format_usd(run['spend_usd'])}"
        lines.append(
            f"run {run['number']} ({run['run_id']}) {run['started']}: "
            f"{format_duration(run['duration_s'])}, ended {run['ended']}; "
            + (f"{run['resumed_rows']:,} rows done before, " if run["resumed_rows"] else "")
            + f"{run['rows_ok']:,} ok, {run['rows_error']:,} errors, {run['requests']:,} requests, "
            f"{run['rate_limited']:,} 429s, {run['retries']:,} retries{spend}"
        )
        points = run["points"]
        if points and not run["requests"]:
            reused = (
                f" (its {run['rows_ok']:,} answers came from the store)" if run["rows_ok"] else ""
            )
            lines.append(f"  nothing was sent in this run{reused}")
        elif points:
            lines.append(
                f"  requests/min  {sparkline([p['rpm'] for p in points])}  peak "
                f"{run['peak_rpm']:,.0f} / limit {run['limit_rpm']:,.0f}"
            )
            lines.append(
                f"  tokens/min    {sparkline([p['tpm'] for p in points])}  peak "
                f"{max(p['tpm'] for p in points):,.0f} / limit {run['limit_tpm']:,.0f}"
            )
            if run["rate_limited"] or run["retries"]:
                lines.append(
                    f"  429s+retries  "
                    f"{sparkline([p['rate_limited'] + p['retries'] for p in points])}"
                )
    if report["latency_histogram"]["n"]:
        lines.append("latency distribution (s):")
        lines += _hist_lines(report["latency_histogram"])
    for name, tally in report["labels"].items():
        lines.append(f"field {name}:")
        lines += _bars(list(tally), list(tally.values()))
    for name, hist in report["numeric_fields"].items():
        lines.append(f"field {name} (numbers, {hist['n']:,} values):")
        lines += _hist_lines(hist)
    return "\n".join(lines)


# ---- HTML ----


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportUnavailable(
            f"the HTML report draws its charts with matplotlib, which is not installed: "
            f"{INSTALL_HINT} (without --html the same figures print as text)"
        ) from None
    return matplotlib, Figure


class _Charts:
    """matplotlib figures -> inline SVG strings."""

    def __init__(self) -> None:
        self.matplotlib, self.Figure = _matplotlib()

    def figure(self, rows: int = 1, height: float = 3.0) -> tuple[Any, Any]:
        fig = self.Figure(figsize=(9, height * rows), layout="constrained")
        axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
        for ax in axes:
            ax.grid(True, alpha=0.3)
        return fig, axes

    def svg(self, fig: Any, chart_id: str, caption: str) -> str:
        buf = io.StringIO()
        with self.matplotlib.rc_context({"svg.fonttype": "none"}):
            fig.savefig(buf, format="svg")
        text = buf.getvalue()
        text = text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: inline SVG
        return (
            f'<figure class="chart" id="{chart_id}">{text}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )


def _run_marks(ax: Any, runs: list[dict[str, Any]]) -> None:
    for run in runs[1:]:
        ax.axvline(run["offset_min"], color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            f"run {run['number']}",
            (run["offset_min"], 1),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            va="top",
            ha="left",
            color="grey",
        )


def _timeline_charts(c: _Charts, runs: list[dict[str, Any]]) -> list[str]:
    if not any(run["points"] for run in runs):
        return []
    out = []
    fig, (ax_r, ax_t) = c.figure(2)
    for i, run in enumerate(runs):
        pts = run["points"]
        if not pts:
            continue
        x = [p["x_min"] for p in pts]
        first = i == 0
        for ax, key, unit in ((ax_r, "rpm", "requests/min"), (ax_t, "tpm", "tokens/min")):
            ax.plot(x, [p[key] for p in pts], color="C0", label=unit if first else None)
            ax.step(
                x,
                [p[f"limit_{key}"] for p in pts],
                color="C3",
                linestyle="--",
                where="post",
                label="limit" if first else None,
            )
            ax.step(
                x,
                [p[f"effective_{key}"] for p in pts],
                color="C2",
                linestyle=":",
                where="post",
                label="limiter's pace" if first else None,
            )
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
    for ax in (ax_r, ax_t):
        _run_marks(ax, runs)
        ax.legend(loc="lower right", fontsize=8)
    ax_t.set_xlabel("running time (min; runs laid end to end)")
    out.append(
        c.svg(fig, "chart-rates", "Requests and tokens per minute, against the limits (all models)")
    )

    fig, (ax,) = c.figure(1)
    for i, run in enumerate(runs):
        pts = run["points"]
        if pts:
            x = [p["x_min"] for p in pts]
            ax.step(
                x,
                [p["rate_limited"] for p in pts],
                color="C3",
                where="pre",
                label="429s" if i == 0 else None,
            )
            ax.step(
                x,
                [p["retries"] for p in pts],
                color="C1",
                where="pre",
                label="retries" if i == 0 else None,
            )
    _run_marks(ax, runs)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("per interval")
    ax.set_xlabel("running time (min)")
    ax.legend(loc="upper right", fontsize=8)
    out.append(c.svg(fig, "chart-throttling", "429 answers and retries over time"))

    if any(p["p50"] is not None for run in runs for p in run["points"]):
        fig, (ax,) = c.figure(1)
        for i, run in enumerate(runs):
            pts = [p for p in run["points"] if p["p50"] is not None]
            for q, color in (("p50", "C0"), ("p90", "C1"), ("p99", "C3")):
                ax.plot(
                    [p["x_min"] for p in pts],
                    [p[q] for p in pts],
                    color=color,
                    marker=".",
                    label=q if i == 0 else None,
                )
        _run_marks(ax, runs)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("seconds")
        ax.set_xlabel("running time (min)")
        ax.legend(loc="upper right", fontsize=8)
        out.append(c.svg(fig, "chart-latency-time", "Latency percentiles per interval"))
    return out


def _hist_chart(
    c: _Charts, hist: Mapping[str, Any], chart_id: str, caption: str, xlabel: str
) -> str:
    fig, (ax,) = c.figure(1, height=2.6)
    edges, counts = hist["edges"], hist["counts"]
    widths = [edges[i + 1] - edges[i] for i in range(len(counts))]
    ax.bar(edges[:-1], counts, width=[w or 1.0 for w in widths], align="edge", color="C0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return c.svg(fig, chart_id, caption)


def _label_chart(c: _Charts, name: str, tally: Mapping[str, int], chart_id: str) -> str:
    items = list(tally.items())[:30]
    fig, (ax,) = c.figure(1, height=max(1.6, 0.3 * len(items) + 0.8))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="C0")
    ax.set_xlabel("rows")
    return c.svg(fig, chart_id, f"Field {name}: rows per value")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1000px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;
padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.n{text-align:right;font-variant-numeric:tabular-nums}figure.chart{margin:1em 0}
figure.chart svg{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}
.muted{color:#777}code{background:#f5f5f5;padding:0 .2em}
"""


def _table(
    headers: list[str] | None, rows: list[list[Any]], numeric: set[int] | None = None
) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers or [])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if i in numeric else ''}>{html.escape(str(v))}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained page: inline CSS and SVG, no script, no external resource."""
    c = _Charts()
    esc = html.escape
    insp = report["inspection"]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>batcher report: {esc(report['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>batcher report: {esc(report['title'])}</h1>",
        f"<p class=muted>{esc(report['output'])} · generated {esc(report['generated'])}</p>",
    ]
    # -- overview
    parts.append("<h2 id=overview>Overview</h2>")
    if insp is not None:
        status = ", ".join(f"{k} {v:,}" for k, v in insp["status"].items()) or "-"
        tok = insp["tokens"]
        what = {"parquet": "finished output", "batch": "Batch-API output"}.get(
            insp["source"],
            "journal (finished)" if insp.get("finished") else "journal (not finished)",
        )
        parts.append(
            _table(
                None,
                [
                    ["results", f"{insp['rows']:,} rows from the {what}"],
                    ["status", status],
                    ["tokens", f"{tok['prompt']:,} prompt + {tok['completion']:,} completion"],
                    ["retried rows", f"{insp['retried_rows']:,}"],
                ],
            )
        )
    runs = report["runs"]
    if runs:
        parts.append(
            _table(
                [
                    "run",
                    "started",
                    "duration",
                    "ended",
                    "ok",
                    "errors",
                    "requests",
                    "429s",
                    "retries",
                    "peak rpm / limit",
                    "spend",
                ],
                [
                    [
                        f"{r['number']} ({r['run_id']})",
                        r["started"],
                        format_duration(r["duration_s"]),
                        r["ended"],
                        f"{r['rows_ok']:,}",
                        f"{r['rows_error']:,}",
                        f"{r['requests']:,}",
                        f"{r['rate_limited']:,}",
                        f"{r['retries']:,}",
                        f"{r['peak_rpm']:,.0f} / {r['limit_rpm']:,.0f}"
                        if r["requests"]
                        else "nothing sent",
                        "-" if r["spend_usd"] is None else format_usd(r["spend_usd"]),
                    ]
                    for r in runs
                ],
                numeric={4, 5, 6, 7, 8},
            )
        )
    # -- over time
    parts.append("<h2 id=throughput>Throughput, limits and throttling</h2>")
    timeline = _timeline_charts(c, runs)
    parts += timeline or [
        f"<p class=muted>No run history ({esc(Path(report['history_file']).name)}): "
        "runs record it while they go.</p>"
    ]
    # -- latency
    parts.append("<h2 id=latency>Latency</h2>")
    lat_hist = report["latency_histogram"]
    if lat_hist["n"]:
        if insp is not None and insp["latency_s"]["rows"]:
            lat = insp["latency_s"]
            parts.append(
                f"<p>p50 {lat['p50']:.2f} s · p90 {lat['p90']:.2f} s · p99 {lat['p99']:.2f} s · "
                f"max {lat['max']:.2f} s over {lat['rows']:,} answers</p>"
            )
        parts.append(_hist_chart(c, lat_hist, "chart-latency", "Latency of the answers", "seconds"))
    else:
        parts.append("<p class=muted>No answers with a latency yet.</p>")
    # -- errors
    parts.append("<h2 id=errors>Errors</h2>")
    errors = (insp or {}).get("errors") or {"rows": 0, "top": []}
    if errors["rows"]:
        parts.append(
            f"<p>{errors['rows']:,} rows, {errors['kinds']:,} kinds (messages alike but for "
            "numbers and ids are grouped; one example each)</p>"
        )
        parts.append(
            _table(
                ["rows", "error", "sample ids"],
                [
                    [f"{e['count']:,}", e["message"], ", ".join(e["sample_ids"])]
                    for e in errors["top"]
                ],
                numeric={0},
            )
        )
    else:
        parts.append("<p>No error rows.</p>")
    # -- cost
    parts.append("<h2 id=cost>Cost</h2>")
    if insp is not None:
        total = insp["cost_usd"]
        parts.append(
            "<p>"
            + (
                f"Total {format_usd(total)}"
                if total is not None
                else f"At least {format_usd(insp['cost_usd_priced_models'])} (some models "
                "have no price; add them under <code>prices:</code> in the job file)"
            )
            + f" · prices as of {esc(insp['prices_as_of'])}</p>"
        )
        parts.append(
            _table(
                ["model", "rows", "prompt tokens", "completion tokens", "cost", "price from"],
                [
                    [
                        name,
                        f"{m['rows']:,}",
                        f"{m['prompt_tokens']:,}",
                        f"{m['completion_tokens']:,}",
                        format_usd(m["cost_usd"]),
                        m["price_source"],
                    ]
                    for name, m in insp["models"].items()
                ],
                numeric={1, 2, 3, 4},
            )
        )
    # -- structured fields
    labels, numeric = report["labels"], report["numeric_fields"]
    if labels or numeric:
        parts.append("<h2 id=fields>Structured answers</h2>")
        for i, (name, tally) in enumerate(labels.items()):
            parts.append(_label_chart(c, name, tally, f"chart-field-{i}"))
        for i, (name, hist) in enumerate(numeric.items()):
            parts.append(
                _hist_chart(
                    c, hist, f"chart-number-{i}", f"Field {name}: distribution of values", name
                )
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: Mapping[str, Any], path: Path) -> Path:
    """Render and write the page (atomically: a temp file renamed over `path`)."""
    page = render_html(report)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise BatcherError(f"{path}: cannot write the report: {exc.strerror or exc}") from None
    return path
