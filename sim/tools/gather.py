"""Gather a sweep: `python -m sim.tools.gather <multirun_dir> [--out sweep.parquet]`.

Finds every summary.json under the directory (a Hydra multirun dir: one subdir per job, each with
.hydra/overrides.yaml), and writes one row per run to a parquet file (default
<multirun_dir>/sweep.parquet):
- `run_dir` (relative to the sweep dir) and `overrides` (the job's overrides, space-joined);
- one `override.<key>` column per overridden key (the value as Hydra parsed it, as a string);
- every summary key, nested dicts flattened with "." (`per_task.text.p99_e2el_ms`,
  `utilization.per_pool.dit:qwen_image`), except the per-GPU utilization map (one key per GPU;
  it stays in each run's summary.json) and lists (kept as JSON strings).
Runs without summary.json (unfinished) are skipped and counted on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.tools.gather",
                                 description="Gather every summary.json of a sweep into one parquet.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="parquet path (default <sweep_dir>/sweep.parquet)")
    a = ap.parse_args(argv)
    try:
        df = gather(a.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"error: no summary.json under {a.sweep_dir}", file=sys.stderr)
        return 1
    out = Path(a.out) if a.out else Path(a.sweep_dir) / "sweep.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(out)
    print(f"gathered {len(df)} runs, {len(df.columns)} columns -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
