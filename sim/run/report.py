"""A run's picture: report.html beside summary.json, one self-contained file (inline SVG figures,
no script, no network), readable in any browser and small enough to keep per run.

What it shows: the headline numbers (and, in red at the top, what a reader must know about the
latency tables: extrapolated, clamped or analytic), latency CDFs by task, throughput and SLO
attainment over time, per-pool GPU utilization over time, and where a request's time goes by
stage. Inputs: summary.json's dict, requests.parquet and timeline.parquet (sim.run.timeline)
when the run wrote them; a figure whose data the run did not write says so instead. The parquet
columns are read into numpy arrays without pandas (a single run loads none).
"""
from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sim.names import TEXT_OUT_TASKS
from sim.run.gc_control import gc_frozen
from sim.run.output import latency_model_notes, write_text_atomic

TASK_ORDER = ("text", "understand", "generate", "edit", "inpaint", "outpaint")
CDF_POINTS = 300                  # quantiles drawn per CDF (keeps the file small at any size)
TIME_BINS = 60                    # bins of the throughput/attainment timeline
COLUMNS = ["task", "arrival", "finish", "e2el_ms", "ttft_ms", "slo_met"]
TIMELINE_COLUMNS = ["t_start", "t_end", "pool", "gpus", "utilization"]

# a parquet file's columns by name (read_columns): equal-length numpy arrays, float64 with NaN for
# a null of a floating column, object (None for null) for any other
Columns = dict[str, np.ndarray]


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    s = buf.getvalue()
    return s[s.index("<svg"):]               # drop the XML prolog and doctype: inline in HTML


def _figure(w: float = 7.0, h: float = 3.2, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h))
    axes = fig.subplots(1, ncols)
    return fig, axes


def _plain_log_formatter(**kw: Any) -> Any:
    """matplotlib's LogFormatter (same choice of which ticks get a label) writing "0.03", "2",
    "10" rather than "3e-02" (its `_num_to_string` is the one formatting hook it has)."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return f"{x:g}"

    return PlainLogFormatter(10, **kw)


def _tasks(values: Any) -> list[str]:
    present = list(dict.fromkeys(values))
    return [t for t in TASK_ORDER if t in present] + sorted(t for t in present if t not in TASK_ORDER)


def _positive_s(df: Columns, col: str, task: str) -> np.ndarray:
    """The task's positive values of a ms column, in seconds, in row order (NaN dropped)."""
    v = df[col][df["task"] == task] / 1000.0
    return v[v > 0]


def _cdf(ax: Any, df: Columns, col: str, tasks: list[str], label: str) -> None:
    q = np.linspace(0.0, 1.0, CDF_POINTS)
    drawn = False
    for t in tasks:
        v = _positive_s(df, col, t)
        if not len(v):
            continue
        ax.plot(np.quantile(v, q), q, label=f"{t} (n={len(v):,})", lw=1.6)
        drawn = True
    ax.set_xscale("log")
    # plain tick labels ("0.1", "2", "10"): the default ones are mathtext (10^{-1}), which
    # reads worse and costs a pyparsing run per label
    ax.xaxis.set_major_formatter(_plain_log_formatter())
    ax.xaxis.set_minor_formatter(_plain_log_formatter(labelOnlyBase=False))
    ax.set_xlabel(f"{label} (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="lower right")


def fig_latency_cdfs(df: Columns) -> str:
    tasks = _tasks(df["task"])
    text = [t for t in tasks if t in TEXT_OUT_TASKS]
    fig, axes = _figure(11, 3.6, 2 if text else 1)
    axes = np.atleast_1d(axes)
    _cdf(axes[0], df, "e2el_ms", tasks, "end-to-end latency")
    axes[0].set_title("E2E latency by task")
    if text:
        _cdf(axes[1], df, "ttft_ms", text, "time to first token")
        axes[1].set_title("TTFT (text-out tasks)")
    return _svg(fig)


def _slo_met(values: np.ndarray) -> np.ndarray:
    """slo_met as booleans, a null counting as met."""
    return np.fromiter((True if v is None else bool(v) for v in values), dtype=bool,
                       count=len(values))


def fig_throughput(df: Columns) -> str:
    fin = df["finish"]
    end = float(np.nanmax(fin)) if len(fin) else 0.0
    fig, axes = _figure(11, 3.4, 2)
    if not end > 0:
        return _svg(fig)
    edges = np.linspace(0.0, end, TIME_BINS + 1)
    width = edges[1] - edges[0]
    mid = (edges[:-1] + edges[1:]) / 2
    arr, _ = np.histogram(df["arrival"], edges)
    done, _ = np.histogram(fin, edges)
    met = _slo_met(df["slo_met"])
    good, _ = np.histogram(fin[met], edges)
    ax = axes[0]
    ax.plot(mid, arr / width, label="arrivals", lw=1.2, color="0.5")
    ax.plot(mid, done / width, label="completions", lw=1.6)
    ax.plot(mid, good / width, label="completions within SLO (goodput)", lw=1.2, ls="--")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("requests / s")
    ax.set_title("throughput over time")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    for t in _tasks(df["task"]):
        m = df["task"] == t
        n_t, _ = np.histogram(fin[m], edges)
        g_t, _ = np.histogram(fin[m & met], edges)
        with np.errstate(invalid="ignore", divide="ignore"):
            ax.plot(mid, np.where(n_t > 0, g_t / np.maximum(n_t, 1), np.nan) * 100, lw=1.2,
                    label=t)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("simulated time (s, by completion)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title("SLO attainment over time, by task")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _svg(fig)


def _pool_lines(tl: Columns) -> list[tuple[str, float, np.ndarray, np.ndarray]]:
    """Per pool (sorted by name; a null pool is left out): its mean GPU count (NaN skipped) and
    its utilization as a step line (x, y in %), flat over each of its intervals, in row order."""
    out = []
    for pool in sorted({p for p in tl["pool"] if p is not None}):
        m = tl["pool"] == pool
        x = np.c_[tl["t_start"][m], tl["t_end"][m]].ravel()
        out.append((pool, np.nanmean(tl["gpus"][m]), x, np.repeat(tl["utilization"][m] * 100, 2)))
    return out


def fig_utilization(tl: Columns) -> str:
    fig, ax = _figure(11, 3.4)
    for pool, gpus, x, y in _pool_lines(tl):
        n = f"{gpus:g}" if gpus == int(gpus) else f"{gpus:.1f} on average"
        ax.plot(x, y, lw=1.3, label=f"{pool} ({n} GPU{'' if gpus == 1 else 's'})")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("busy (%)")
    ax.set_title("GPU utilization over time, per pool")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, alpha=0.3)
    return _svg(fig)


def fig_stages(per_stage: dict[str, dict[str, Any]]) -> str:
    names = [s for s, d in per_stage.items() if d.get("visits")]
    q = np.array([per_stage[s].get("mean_queue_ms") or 0.0 for s in names]) / 1000
    sv = np.array([per_stage[s].get("mean_service_ms") or 0.0 for s in names]) / 1000
    fig, ax = _figure(11, 0.45 * max(len(names), 2) + 1.2)
    y = np.arange(len(names))
    ax.barh(y, q, color="#d9a441", label="waiting in queue")
    ax.barh(y, sv, left=q, color="#4c72b0", label="being served")
    ax.set_yticks(y, [f"{s} ({per_stage[s]['visits']:,} visits)" for s in names])
    ax.invert_yaxis()
    ax.set_xlabel("mean seconds per visit")
    ax.set_title("where a request's time goes, by stage")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig)


def _f(x: Any, unit: str = "", d: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{d}f}{unit}"
    return f"{x}{unit}"


def _s(ms: Any) -> str:
    return "-" if ms is None else f"{ms / 1000:,.2f} s"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def headline_rows(s: dict[str, Any]) -> list[list[str]]:
    conc = s.get("max_concurrency")
    return [
        ["policy / workload / cluster", f"{s.get('policy')} / {s.get('workload')} / {s.get('cluster')}"
                                        f" ({s.get('num_gpus')} x {s.get('gpu_kind')})"],
        ["client", "open loop" if conc is None else f"closed loop, at most {conc} in flight"],
        ["completed / duration", f"{s.get('completed'):,} / {_f(s.get('duration'), ' s', 1)}"],
        ["request throughput / goodput", f"{_f(s.get('request_throughput'), '', 3)} / "
                                         f"{_f(s.get('goodput'), '', 3)} req/s"],
        ["SLO attainment", _pct(s.get("slo_attainment"))],
        ["E2EL median / p99", f"{_s(s.get('median_e2el_ms'))} / {_s(s.get('p99_e2el_ms'))}"],
        ["TTFT median / p99", f"{_f(s.get('median_ttft_ms'), ' ms')} / {_f(s.get('p99_ttft_ms'), ' ms')}"],
        ["TPOT median / p99", f"{_f(s.get('median_tpot_ms'), ' ms')} / {_f(s.get('p99_tpot_ms'), ' ms')}"],
        ["mean GPU utilization", _pct((s.get("utilization") or {}).get("mean_gpu"))],
        ["$ / 1k requests", _f(s.get("usd_per_1k_requests"), "", 4)],
    ]


def task_rows(s: dict[str, Any]) -> list[list[str]]:
    pt = s.get("per_task") or {}
    return [[t, f"{pt[t].get('completed', 0):,}", _f(pt[t].get("request_throughput"), "", 3),
             _s(pt[t].get("median_e2el_ms")), _s(pt[t].get("p99_e2el_ms")),
             _pct(pt[t].get("slo_attainment"))] for t in _tasks(pt)]


def pool_rows(s: dict[str, Any]) -> list[list[str]]:
    u = s.get("utilization") or {}
    n = u.get("gpus_per_pool") or {}
    return [[p, str(n.get(p, "")), _pct(v)] for p, v in sorted((u.get("per_pool") or {}).items())]


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;padding:0 16px;color:#222}h1{font-size:20px;margin-bottom:4px}h2{font-size:16px;margin-top:28px;
border-bottom:1px solid #ddd;padding-bottom:4px}.sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f4f4f4}.warn{background:#fde8e8;border:1px solid #e0a0a0;color:#900;
padding:8px 12px;margin:10px 0;font-weight:600}.grid{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}.grid>div{flex:0 0 auto}
svg{max-width:100%;height:auto}.missing{color:#888;font-style:italic}"""


def _n_rows(cols: Columns) -> int:
    return len(next(iter(cols.values())))


def render(summary: dict[str, Any], title: str, requests: Columns | None,
           timeline: Columns | None) -> str:
    s = summary
    warn = "".join(f'<div class="warn">{html.escape(n)}</div>' for _, n in latency_model_notes(s))
    prov = s.get("provenance") or {}
    sub = (f"seed {s.get('seed')} &middot; {s.get('num_requests', s.get('completed')):,} requests"
           f" &middot; simulated in {_f(s.get('sim_wall_s'), ' s')}"
           + (f" &middot; commit {html.escape(str(prov['git_commit'])[:10])}" if prov.get("git_commit") else ""))
    parts = [f"<h1>{html.escape(title)}</h1><div class='sub'>{sub}</div>", warn,
             "<div class='grid'><div>", _table(["metric", "value"], headline_rows(s)), "</div><div>",
             _table(["task", "completed", "req/s", "E2EL p50", "E2EL p99", "SLO attainment"],
                    task_rows(s)),
             _table(["pool", "GPUs", "mean utilization"], pool_rows(s)), "</div></div>"]
    missing = "<p class='missing'>requests.parquet was not written (output.write_requests=false)</p>"
    parts.append("<h2>Latency CDFs by task</h2>")
    parts.append(fig_latency_cdfs(requests) if requests is not None and _n_rows(requests) else missing)
    parts.append("<h2>Throughput and SLO attainment</h2>")
    parts.append(fig_throughput(requests) if requests is not None and _n_rows(requests) else missing)
    parts.append("<h2>GPU utilization per pool</h2>")
    parts.append(fig_utilization(timeline) if timeline is not None and _n_rows(timeline)
                 else "<p class='missing'>no timeline.parquet in the run folder</p>")
    parts.append("<h2>Stage breakdown</h2>")
    parts.append(fig_stages(s.get("per_stage") or {}))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def read_columns(path: Path, columns: list[str]) -> Columns:
    """The named columns of one parquet file (Columns), holding the values pd.read_parquet would.
    Read with ParquetFile (pq.read_table loads pyarrow.dataset) and converted through Python
    lists (arrow's to_numpy and to_pandas load pandas)."""
    with pq.ParquetFile(path) as f:
        table = f.read(columns=columns)
    return {c: np.array(table.column(c).to_pylist(),
                        dtype=np.float64 if pa.types.is_floating(table.schema.field(c).type)
                        else object) for c in columns}


@gc_frozen()
def write_report(outdir: Path, summary: dict[str, Any], title: str) -> Path:
    """Write outdir/report.html from the summary and the run's parquet files; returns its path."""
    import matplotlib
    outdir = Path(outdir)
    req_path, tl_path = outdir / "requests.parquet", outdir / "timeline.parquet"
    requests = read_columns(req_path, COLUMNS) if req_path.is_file() else None
    timeline = read_columns(tl_path, TIMELINE_COLUMNS) if tl_path.is_file() else None
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):
        text = render(summary, title, requests, timeline)
    path = outdir / "report.html"
    write_text_atomic(path, text)
    return path
