"""`python -m profiler analytic-error <model>... [--gpu h100]`: how far the roofline tables are
from the measured ones.

For each model, the measured table `<profiles>/<gpu>/<model>.parquet` and the roofline table
`<profiles>/<gpu>-analytic/<model>.parquet` are joined on the grid-point key (profiler.schema
KEY_COLUMNS; status=ok rows on both sides). Per stage (text_encode and VAE stages per component
too) it reports the points matched, the median and the largest-magnitude relative error
`analytic / measured - 1` (negative: the roofline is faster than the engine, as a floor should
be) and the median measured/analytic ratio. `--json PATH` also writes the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from profiler import schema

ROOT = Path(__file__).resolve().parents[1]


def _keyed(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df["status"] == "ok"].copy()
    df["_key"] = [schema.point_key(r) for _, r in df.iterrows()]
    return df.groupby("_key", as_index=False).agg(
        stage=("stage", "first"), component=("component", "first"),
        latency_ms=("latency_ms_median", "median"))


def compare_tables(measured: pd.DataFrame, analytic: pd.DataFrame) -> pd.DataFrame:
    """One row per grid point present (ok) in both: stage, component, measured and analytic
    latency (ms) and rel_error = analytic / measured - 1."""
    m, a = _keyed(measured), _keyed(analytic)
    j = m.merge(a[["_key", "latency_ms"]], on="_key", suffixes=("_measured", "_analytic"))
    j["rel_error"] = j["latency_ms_analytic"] / j["latency_ms_measured"] - 1.0
    return j


def summarize_errors(points: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    if points.empty:
        return out
    points = points.copy()
    per_comp = points["stage"].isin(["text_encode", "vae_encode", "vae_decode"])
    points["group"] = np.where(per_comp & points["component"].notna(),
                               points["stage"] + ":" + points["component"].fillna(""),
                               points["stage"])
    for g, d in points.groupby("group", sort=True):
        e = d["rel_error"].to_numpy()
        i = int(np.argmax(np.abs(e)))
        out.append({"stage": g, "points": int(len(d)), "median_rel_error": float(np.median(e)),
                    "max_abs_rel_error": float(abs(e[i])), "max_rel_error_signed": float(e[i]),
                    "median_measured_over_analytic": float(np.median(
                        d["latency_ms_measured"] / d["latency_ms_analytic"]))})
    return out


def model_report(model: str, gpu: str, profiles_dir: Path) -> dict[str, Any]:
    mp = schema.table_path(profiles_dir, gpu, model)
    ap = schema.table_path(profiles_dir, f"{gpu}-analytic", model)
    for p, what in ((mp, "measured"), (ap, "roofline")):
        if not p.exists():
            cmd = (f"python -m profiler sweep model={model}" if what == "measured" else
                   f"python -m profiler sweep backend=analytic model={model} gpu_spec={gpu}")
            raise FileNotFoundError(f"{p}: no {what} table for model={model!r} (make it with `{cmd}`)")
    m, a = schema.read_table(mp), schema.read_table(ap)
    if "analytic" in set(m["engine"].dropna()):
        raise ValueError(f"{mp}: engine=analytic rows in the measured table; allowed: measured rows")
    pts = compare_tables(m, a)
    return {"model": model, "gpu": gpu, "measured_table": str(mp), "analytic_table": str(ap),
            "measured_engines": sorted(set(m["engine"].dropna())),
            "points_matched": int(len(pts)), "stages": summarize_errors(pts)}


def print_report(rep: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"{rep['model']} on {rep['gpu']}: roofline (engine=analytic) vs measured "
                    f"({', '.join(rep['measured_engines'])}); rel. error = analytic/measured - 1")
    for c in ("stage", "points", "median rel. error", "max |rel. error| (signed)",
              "median measured/analytic"):
        t.add_column(c, justify="left" if c == "stage" else "right")
    for s in rep["stages"]:
        t.add_row(s["stage"], str(s["points"]), f"{100 * s['median_rel_error']:+.1f} %",
                  f"{100 * s['max_abs_rel_error']:.1f} % ({100 * s['max_rel_error_signed']:+.1f} %)",
                  f"{s['median_measured_over_analytic']:.2f}x")
    Console(width=120).print(t)
    if not rep["stages"]:
        print(f"  no grid point is in both tables ({rep['measured_table']}, {rep['analytic_table']})")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler analytic-error",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--gpu", default="h100", help="measured table folder (and <gpu>-analytic)")
    ap.add_argument("--profiles-dir", default="traces/profiles")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    a = ap.parse_args(argv)
    prof = Path(a.profiles_dir)
    prof = prof if prof.is_absolute() else ROOT / prof
    reps = []
    try:
        for m in a.models:
            rep = model_report(m, a.gpu, prof)
            print_report(rep)
            reps.append(rep)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        Path(a.json).write_text(json.dumps(reps, indent=1))
    return 0
