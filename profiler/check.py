"""`python -m profiler check|show <table>`: schema + physics sanity, and a readable summary."""
from __future__ import annotations

import math

import pandas as pd

from profiler import schema

# axes that stay fixed while batch_size varies, per stage (monotone-in-batch groups)
_GROUP = ["model", "stage", "engine", "component", "num_tokens", "context_len",
          "num_decode_seqs", "height", "width", "seq_len"]


OVERHEAD_RATIO = 3.0  # measured / roofline above this: launch/CPU-overhead bound, not physics


def overhead_bound(df: pd.DataFrame) -> pd.Series:
    """True where a measured point is overhead-bound (latency > 3x its roofline floor).

    There the step time is set by kernel launches and host work (eager diffusers at tiny
    shapes, a vLLM step's scheduling), which physics does not order by batch, so a drop in
    latency with a larger batch is measurement noise rather than a broken table."""
    from profiler.backends.analytic import roofline_ms
    from profiler.models import load_model
    out = []
    for _, r in df.iterrows():
        try:
            p = {k: (None if pd.isna(r[k]) else (int(r[k]) if k not in (
                "model", "stage", "component") else r[k]))
                 for k in ("model", "stage", "component", "batch_size", "num_tokens",
                           "context_len", "num_decode_seqs", "height", "width", "seq_len")}
            ms = roofline_ms(load_model(p["model"]), p)[0]
            out.append(r["engine"] != "analytic" and r["latency_ms_median"] > OVERHEAD_RATIO * ms)
        except Exception:
            out.append(False)
    return pd.Series(out, index=df.index, dtype=bool)


def _groups_monotone(df: pd.DataFrame, axis: str, fixed: list[str], tol: float,
                     label: str, warnings: list[str] | None = None) -> list[str]:
    problems = []
    keyed = df.copy()
    for c in fixed:
        keyed[c] = keyed[c].astype(object).where(keyed[c].notna(), "-")
    for key, g in keyed.groupby(fixed, dropna=False):
        g = g.sort_values(axis)
        lat = g["latency_ms_median"].to_numpy()
        xs = g[axis].to_numpy()
        ob = g["_overhead"].to_numpy() if "_overhead" in g else [False] * len(lat)
        for i in range(1, len(lat)):
            if lat[i] < lat[i - 1] * (1 - tol):
                sink = problems
                if (ob[i] or ob[i - 1]) and warnings is not None:
                    sink = warnings
                sink.append(
                    f"{label}: latency falls from {lat[i-1]:.3f} ms at {axis}={xs[i-1]} to "
                    f"{lat[i]:.3f} ms at {axis}={xs[i]} for "
                    + ", ".join(f"{c}={v}" for c, v in zip(fixed, key) if v != "-"))
    return problems


def check_frame(df: pd.DataFrame, tol: float = 0.15,
                warnings: list[str] | None = None) -> list[str]:
    """Problems found (empty = the table passes). Non-monotone steps between two
    overhead-bound points (see `overhead_bound`) go to `warnings` instead, when given."""
    problems = schema.validate_rows(df)
    ok = df[df["status"] == "ok"].copy()
    if warnings is not None and len(ok):
        ok["_overhead"] = overhead_bound(ok)
    for col in ("latency_ms_p10", "latency_ms_p90"):
        v = ok[col].dropna()
        if len(v) and (~v.map(lambda x: math.isfinite(x) and x > 0)).any():
            problems.append(f"{col} must be positive and finite on status=ok rows")
    bad = ok[(ok["latency_ms_p10"] > ok["latency_ms_median"] * 1.0001) |
             (ok["latency_ms_median"] > ok["latency_ms_p90"] * 1.0001)]
    if len(bad):
        problems.append(f"{len(bad)} rows break p10 <= median <= p90")
    keys = df.apply(schema.point_key, axis=1)
    dup = keys[keys.duplicated()]
    if len(dup):
        problems.append(f"{len(dup)} duplicate grid points, e.g. {dup.iloc[0]}")
    for col in ("gpu", "engine_version", "torch_version", "git_sha", "measured_at"):
        if df[col].isna().any():
            problems.append(f"provenance column {col} is null on some rows")
    # physics: more work in a step never makes it faster (beyond noise)
    vary_batch = ok[ok["stage"] != "prefill"].copy()
    # decode rows carry num_tokens = batch: it varies with the batch, not a fixed axis
    vary_batch.loc[vary_batch["stage"] == "decode", "num_tokens"] = None
    problems += _groups_monotone(vary_batch, "batch_size", _GROUP, tol, "not monotone in batch",
                                 warnings)
    dec = ok[ok["stage"] == "decode"]
    problems += _groups_monotone(dec, "context_len",
                                 ["model", "engine", "batch_size"], tol,
                                 "decode not monotone in context", warnings)
    pre = ok[(ok["stage"] == "prefill") & (ok["context_len"].fillna(0) == 0) &
             (ok["num_decode_seqs"].fillna(0) == 0)]
    problems += _groups_monotone(pre, "num_tokens", ["model", "engine"], tol,
                                 "prefill not monotone in tokens", warnings)
    return problems


def check_table(path, tol: float = 0.15, warnings: list[str] | None = None) -> list[str]:
    try:
        df = schema.read_table(path)
    except Exception as e:  # unreadable / schema-breaking file
        return [f"cannot read {path}: {type(e).__name__}: {e}"]
    return check_frame(df, tol, warnings)


def summary_frame(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (stage, comp), g in df.groupby([df["stage"], df["component"].fillna("-")]):
        ok = g[g["status"] == "ok"]
        rows.append({
            "stage": stage, "component": comp, "ok": len(ok),
            "oom": int((g["status"] == "oom").sum()), "error": int((g["status"] == "error").sum()),
            "min_ms": ok["latency_ms_median"].min() if len(ok) else float("nan"),
            "max_ms": ok["latency_ms_median"].max() if len(ok) else float("nan"),
            "batch": _rng(g["batch_size"]), "tokens": _rng(g["num_tokens"]),
            "context": _rng(g["context_len"]), "hw": _rng(g["height"]) + "x" + _rng(g["width"]),
        })
    return pd.DataFrame(rows)


def _rng(s: pd.Series) -> str:
    s = s.dropna()
    if not len(s):
        return "-"
    return f"{int(s.min())}" if s.min() == s.max() else f"{int(s.min())}..{int(s.max())}"


def show(path, stage: str | None = None, rows: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table
    df = schema.read_table(path)
    con = Console(width=160)
    first = df.iloc[0] if len(df) else None
    if first is not None:
        con.print(f"[bold]{path}[/bold]: {len(df)} rows, model={first['model']}, "
                  f"engine={first['engine']} {first['engine_version']}, gpu={first['gpu']}, "
                  f"torch={first['torch_version']}, dtype={first['dtype']}, "
                  f"git={str(first['git_sha'])[:10]}, measured {df['measured_at'].min()} .. "
                  f"{df['measured_at'].max()}")
    if stage:
        df = df[df["stage"] == stage]
    sm = summary_frame(df)
    t = Table(title="per stage")
    for c in sm.columns:
        t.add_column(c, justify="right" if c not in ("stage", "component") else "left")
    for _, r in sm.iterrows():
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r])
    con.print(t)
    if rows:
        cols = ["stage", "component", "batch_size", "num_tokens", "context_len",
                "num_decode_seqs", "height", "width", "seq_len", "latency_ms_median",
                "latency_ms_p10", "latency_ms_p90", "n_samples", "peak_mem_bytes", "status"]
        t2 = Table(title=f"first {rows} rows")
        for c in cols:
            t2.add_column(c)
        for _, r in df.head(rows).iterrows():
            t2.add_row(*["" if pd.isna(r[c]) else (f"{r[c]:.3f}" if isinstance(r[c], float)
                         else str(r[c])) for c in cols])
        con.print(t2)
    es = df["engine_settings"].dropna()
    if len(es):
        con.print(f"engine_settings (first row): {es.iloc[0]}")
