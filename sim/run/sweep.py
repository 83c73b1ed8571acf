"""A sweep's results table: every run of a multirun folder gathered into one frame, written to
<sweep dir>/sweep.parquet and printed as a comparison table when the multirun ends (SweepTable, a
Hydra callback set in conf/config.yaml); `python -m sim.tools.gather <multirun_dir>` (sim.tools)
does the same for any folder, any time.

`gather` finds every summary.json under the directory (a Hydra multirun dir: one subdir per job, each with
.hydra/overrides.yaml), and writes one row per run to a parquet file (default
<multirun_dir>/sweep.parquet):
- `run_dir` (relative to the sweep dir) and `overrides` (the job's overrides, space-joined);
- one `override.<key>` column per overridden key (the value as Hydra parsed it, as a string);
- every summary key, nested dicts flattened with "." (`per_task.text.p99_e2el_ms`,
  `utilization.per_pool.dit:qwen_image`), except the per-GPU utilization map (one key per GPU;
  it stays in each run's summary.json) and lists (kept as JSON strings).
Runs without summary.json (unfinished) are skipped and counted on stderr.

It prints a comparison table (one row per run: the overrides that vary, throughput, SLO
attainment, p50/p99 E2EL, GPU utilization, $/1k requests, and a flag on runs whose latency
lookups left the measured tables). Every `python -m sim --multirun` ends with it (`SweepTable`,
a Hydra callback set in conf/config.yaml).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.experimental.callback import Callback

if TYPE_CHECKING:       # pandas is imported where a sweep is gathered: Hydra sets the callback
    import pandas as pd     # up on every run, and a single run needs no pandas

SKIP = {"utilization.per_gpu"}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in SKIP:
            continue
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def read_overrides(run_dir: Path) -> list[str]:
    p = run_dir / ".hydra" / "overrides.yaml"
    if not p.exists():
        return []
    data = yaml.safe_load(p.read_text()) or []
    return [str(x) for x in data]


def gather(sweep_dir: str | Path) -> pd.DataFrame:
    import pandas as pd
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    rows = []
    for sp in sorted(root.rglob("summary.json")):
        run_dir = sp.parent
        try:
            summary = json.loads(sp.read_text())
        except ValueError as e:
            print(f"skipping {sp}: {e}", file=sys.stderr)
            continue
        ov = read_overrides(run_dir)
        row: dict[str, Any] = {"run_dir": str(run_dir.relative_to(root)), "overrides": " ".join(ov)}
        for o in ov:
            k, _, v = o.partition("=")
            row[f"override.{k.lstrip('+~')}"] = v
        row.update(flatten(summary))
        rows.append(row)
    df = pd.DataFrame(rows)
    # mixed-type object columns (e.g. None and floats) -> parquet-friendly
    for c in df.columns:
        if df[c].dtype == object:
            vals = df[c].dropna()
            if len(vals) and not all(isinstance(v, str) for v in vals):
                if all(isinstance(v, (int, float, bool)) for v in vals):
                    df[c] = pd.to_numeric(df[c], errors="coerce")
                else:
                    df[c] = df[c].map(lambda v: None if v is None else str(v))
    return df


def _run_order(run_dir: str) -> tuple[int, str]:
    head = run_dir.split("_", 1)[0]
    return (int(head), run_dir) if head.isdigit() else (1 << 30, run_dir)


def _cell(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return fmt.format(v)


# (header, summary column, format); a column the runs lack is left out
METRICS: tuple[tuple[str, str, str], ...] = (
    ("req/s", "request_throughput", "{:,.3f}"),
    ("goodput", "goodput", "{:,.3f}"),
    ("SLO att.", "slo_attainment", "{:.1%}"),
    ("E2EL p50 s", "median_e2el_ms", "{:,.2f}"),
    ("E2EL p99 s", "p99_e2el_ms", "{:,.2f}"),
    ("GPU util", "utilization.mean_gpu", "{:.1%}"),
    ("$/1k", "usd_per_1k_requests", "{:,.3f}"),
)
SECONDS = {"median_e2el_ms", "p99_e2el_ms"}


def comparison_rows(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the sweep's comparison table: the overrides that vary between runs
    (all of them when none varies), then the headline metrics; runs in job order."""
    ov = [c for c in df.columns if c.startswith("override.")]
    varying = [c for c in ov if df[c].astype(str).nunique() > 1] or ov
    metrics = [m for m in METRICS if m[1] in df.columns]
    oog = [c for c in df.columns if c.startswith("latency_model.out_of_grid_lookups.")]
    head = ["run"] + [c[len("override."):] for c in varying] + [m[0] for m in metrics]
    if oog:
        head.append("latency tables")
    rows = []
    for _, r in sorted(df.iterrows(), key=lambda kv: _run_order(str(kv[1]["run_dir"]))):
        row = [str(r["run_dir"])] + [_cell(r[c], "{}") for c in varying]
        for _, col, fmt in metrics:
            v = r[col]
            if col in SECONDS and v is not None and v == v:
                v = float(v) / 1000.0
            row.append(_cell(v, fmt))
        if oog:
            n = sum(float(r[c]) for c in oog if r[c] is not None and r[c] == r[c])
            row.append(f"EXTRAPOLATED ({n:,.0f} lookups)" if n else "measured grid")
        rows.append(row)
    return head, rows


def print_comparison(df: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    head, rows = comparison_rows(df)
    t = Table(title=title)
    console = Console(width=None if sys.stdout.isatty() else 200)   # a log keeps every column
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 or not rows or not rows[0][i][:1].isdigit()
                     else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def write_parquet(df: pd.DataFrame, out: Path) -> None:
    from sim.run.output import write_parquet_atomic
    import pyarrow as pa
    write_parquet_atomic(out, pa.Table.from_pandas(df, preserve_index=False))


class SweepTable(Callback):
    """Hydra callback: when a multirun ends, gather its runs into <sweep dir>/sweep.parquet and
    print the comparison table with where each run's report.html is."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        df = gather(root) if root.is_dir() else None
        if df is None or df.empty:
            print(f"sweep {root}: no summary.json written")
            return
        out = root / "sweep.parquet"
        write_parquet(df, out)
        print_comparison(df, f"sweep {root}: {len(df)} runs")
        reports = sorted(root.glob("*/report.html"))
        print(f"table: {out} (python -m sim.tools.gather {root})")
        if reports:
            print(f"reports: {root}/<run>/report.html ({len(reports)} runs)")
