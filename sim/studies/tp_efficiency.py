"""Tensor-parallel efficiency: the analytic layer's figure (sim.studies.analytic.tp_efficiency:
compute t1/p plus two ring all-reduces of the layer's activations per layer over NVLink) next to
the measured one, with the error, point by point.

    python -m sim.studies.tp_efficiency model=qwen2_5_vl_32b [gpu=h100] [profiles_dir=traces/profiles]
                                        [tp=2,4,8] [json=<file>]

Measured efficiency at a grid point = t1 / (p * t_p), where t1 is the one-GPU table
(<profiles_dir>/<gpu>/<model>.parquet) and t_p the TP-p table (<profiles_dir>/<gpu>-tp<p>/, written
by `python -m profiler sweep model=... tp=p`) at the same point (stage, batch, tokens, context,
decode sequences). The analytic figure uses the same t1 and the point's tokens (prefill: the
step's tokens; decode: the batch). Error = analytic / measured - 1. A TP size whose table is not
there prints "not measured" with the analytic figures at the analytic report's cases (prefill of
a typical request, decode at batch 32, the t1 from the measured table or, without one, the
roofline table). Pipeline parallelism has no measured table yet (no PP sweep): its analytic
figures print as "not measured".
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from profiler.models import UnknownModelError, available_models, load_model
from profiler.schema import read_table, table_path
from sim.studies.analytic import (DEFAULT_NVLINK_GB_S, TYPICAL, pp_efficiency, rel_err, tp_efficiency)

MATCH = ("stage", "batch_size", "num_tokens", "context_len", "num_decode_seqs")
USAGE = ("usage: python -m sim.studies.tp_efficiency model=<name> [gpu=h100] [profiles_dir=traces/profiles] "
         "[tp=2,4,8] [json=<file>]")


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    df = df[(df["stage"].isin(("prefill", "decode"))) & (df["status"].fillna("ok") == "ok")]
    return df[df["latency_ms_median"].notna()]


def _key(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in MATCH[1:]:
        out[c] = out[c].fillna(-1).astype("int64")
    return out


def measured_points(t1: pd.DataFrame, tp_df: pd.DataFrame, p: int, llm: dict[str, Any], dtype_bytes: int,
                    bw_gb_s: float = DEFAULT_NVLINK_GB_S) -> list[dict[str, Any]]:
    """One row per grid point measured at TP 1 and TP p: both latencies, both efficiencies, error."""
    a, b = _key(_ok(t1)), _key(_ok(tp_df))
    m = a.merge(b, on=list(MATCH), suffixes=("_1", "_p"))
    rows = []
    for _, r in m.sort_values(list(MATCH)).iterrows():
        t1_s, tp_s = r["latency_ms_median_1"] / 1e3, r["latency_ms_median_p"] / 1e3
        tokens = int(r["num_tokens"]) if r["stage"] == "prefill" else int(r["batch_size"])
        if r["stage"] == "prefill" and int(r["num_decode_seqs"]) > 0:
            tokens += int(r["num_decode_seqs"])
        ana = tp_efficiency(t1_s, int(llm["num_hidden_layers"]), tokens, int(llm["hidden_size"]), dtype_bytes, p, bw_gb_s)
        meas = t1_s / (p * tp_s)
        rows.append({"stage": r["stage"], "batch_size": int(r["batch_size"]), "num_tokens": int(r["num_tokens"]),
                     "context_len": int(r["context_len"]), "num_decode_seqs": int(r["num_decode_seqs"]),
                     "tp": p, "t1_ms": t1_s * 1e3, "tp_ms": tp_s * 1e3, "analytic_efficiency": ana,
                     "measured_efficiency": meas, "rel_error": rel_err(ana, meas)})
    return rows


def report(model: str, gpu: str = "h100", profiles_dir: str | Path = "traces/profiles",
           tps: tuple[int, ...] = (2, 4, 8), bw_gb_s: float = DEFAULT_NVLINK_GB_S) -> dict[str, Any]:
    spec = load_model(model)
    llm_name = model if spec.family in ("llm", "vlm") else spec.condition_encoder
    if not llm_name:
        raise ValueError(f"model={model!r} has no LLM: TP efficiency is reported for LLM stages; "
                         f"allowed: an llm / vlm entry or a diffusion model with a condition encoder")
    llm = load_model(llm_name).llm
    root = Path(profiles_dir)
    t1_path = table_path(root, gpu, llm_name)
    t1_src = "measured"
    if not t1_path.exists():
        t1_path, t1_src = table_path(root, f"{gpu}-analytic", llm_name), "roofline (engine = analytic)"
    t1 = read_table(t1_path) if t1_path.exists() else None
    rep: dict[str, Any] = {"model": llm_name, "gpu": gpu, "nvlink_gb_s": bw_gb_s, "t1_table": str(t1_path),
                           "t1_source": t1_src if t1 is not None else "missing", "tp": {}, "pp": {}}
    # the analytic report's cases: prefill of a typical request, a decode step at batch 32
    cases = []
    if t1 is not None:
        ok = _ok(t1)
        pre = ok[(ok["stage"] == "prefill") & (ok["context_len"].fillna(0) == 0)
                 & (ok["num_decode_seqs"].fillna(0) == 0) & (ok["batch_size"].fillna(1) == 1)]
        if len(pre):
            r = pre.iloc[(pre["num_tokens"] - TYPICAL["prompt_tokens"]).abs().argsort()].iloc[0]
            cases.append(("prefill", int(r["num_tokens"]), float(r["latency_ms_median"]) / 1e3))
        dec = ok[ok["stage"] == "decode"]
        if len(dec):
            r = dec.iloc[((dec["batch_size"] - 32).abs() * 1e6 + (dec["context_len"] - 1024).abs()).argsort()].iloc[0]
            cases.append((f"decode_b{int(r['batch_size'])}_c{int(r['context_len'])}", int(r["batch_size"]),
                          float(r["latency_ms_median"]) / 1e3))
    for p in tps:
        path = table_path(root, f"{gpu}-tp{p}", llm_name)
        entry: dict[str, Any] = {"table": str(path),
                                 "analytic_cases": {n: tp_efficiency(t, int(llm["num_hidden_layers"]), tok,
                                                                     int(llm["hidden_size"]), spec.dtype_bytes, p, bw_gb_s)
                                                    for n, tok, t in cases}}
        if not path.exists() or t1 is None or t1_src != "measured":
            entry["status"] = "not measured" + ("" if path.exists() else f" (no {path})") + (
                "" if t1_src == "measured" else " (no measured TP 1 table)")
            entry["points"] = []
        else:
            pts = measured_points(t1, read_table(path), p, llm, spec.dtype_bytes, bw_gb_s)
            entry["points"] = pts
            entry["status"] = f"measured ({len(pts)} points matched)" if pts else "measured, no point matches TP 1"
            errs = [abs(x["rel_error"]) for x in pts if x["rel_error"] is not None]
            if errs:
                for st in ("prefill", "decode"):
                    e = [x for x in pts if x["stage"] == st and x["rel_error"] is not None]
                    if e:
                        entry[f"{st}_median_abs_rel_error"] = float(pd.Series([abs(x["rel_error"]) for x in e]).median())
                        entry[f"{st}_median_measured_efficiency"] = float(pd.Series([x["measured_efficiency"] for x in e]).median())
        rep["tp"][p] = entry
    for p in tps:
        rep["pp"][p] = {"status": "not measured (no pipeline-parallel table: no PP sweep planned)",
                        "analytic_m4": {n: pp_efficiency(p, 4, t, tok * int(llm["hidden_size"]) * spec.dtype_bytes, bw_gb_s)
                                        for n, tok, t in cases},
                        "analytic_m16": {n: pp_efficiency(p, 16, t, tok * int(llm["hidden_size"]) * spec.dtype_bytes, bw_gb_s)
                                         for n, tok, t in cases}}
    return rep


def print_report(rep: dict[str, Any]) -> None:
    print(f"TP efficiency of {rep['model']} on {rep['gpu']}: analytic (t1/p + 2 ring all-reduces per layer over "
          f"{rep['nvlink_gb_s']:.0f} GB/s NVLink) vs measured t1 / (p * t_p); TP 1 table: {rep['t1_source']}")
    for p, e in rep["tp"].items():
        cases = ", ".join(f"{n} {v:.3f}" for n, v in e["analytic_cases"].items()) or "no TP 1 table"
        print(f"\n== TP {p}: {e['status']}")
        print(f"   analytic at the report's cases: {cases}")
        if e["points"]:
            print(f"   {'stage':8s} {'batch':>5s} {'tokens':>6s} {'ctx':>6s} {'dec':>4s} {'t1 ms':>9s} {'tp ms':>9s} "
                  f"{'analytic':>8s} {'measured':>8s} {'error':>8s}")
            for x in e["points"]:
                err = f"{x['rel_error'] * 100:+7.1f}%" if x["rel_error"] is not None and math.isfinite(x["rel_error"]) else "-"
                print(f"   {x['stage']:8s} {x['batch_size']:5d} {x['num_tokens']:6d} {x['context_len']:6d} "
                      f"{x['num_decode_seqs']:4d} {x['t1_ms']:9.3f} {x['tp_ms']:9.3f} {x['analytic_efficiency']:8.3f} "
                      f"{x['measured_efficiency']:8.3f} {err:>8s}")
            for st in ("prefill", "decode"):
                if f"{st}_median_abs_rel_error" in e:
                    print(f"   {st}: median measured efficiency {e[f'{st}_median_measured_efficiency']:.3f}, "
                          f"median |error| {e[f'{st}_median_abs_rel_error'] * 100:.1f}%")
    for p, e in rep["pp"].items():
        print(f"\n== PP {p}: {e['status']}; analytic m=4: "
              + ", ".join(f"{n} {v:.3f}" for n, v in e["analytic_m4"].items())
              + "; m=16: " + ", ".join(f"{n} {v:.3f}" for n, v in e["analytic_m16"].items()))


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    allowed = ("model", "gpu", "profiles_dir", "tp", "json")
    kw: dict[str, str] = {}
    for tok in argv:
        if tok in ("-h", "--help"):
            print(USAGE)
            return 0
        k, eq, v = tok.partition("=")
        if not eq or k not in allowed:
            print(f"error: argument {tok!r}: allowed keys {list(allowed)}; {USAGE}", file=sys.stderr)
            return 2
        kw[k] = v
    if "model" not in kw or kw["model"] not in available_models():
        print(f"error: model={kw.get('model')!r}; allowed: {list(available_models())}", file=sys.stderr)
        return 2
    try:
        tps = tuple(int(x) for x in kw.get("tp", "2,4,8").split(",") if x.strip())
        if not tps or any(p < 2 for p in tps):
            raise ValueError(f"tp={kw.get('tp')!r}: allowed: a comma list of sizes >= 2")
        rep = report(kw["model"], kw.get("gpu", "h100"), kw.get("profiles_dir", "traces/profiles"), tps)
    except (ValueError, UnknownModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(rep)
    if kw.get("json"):
        Path(kw["json"]).write_text(json.dumps(rep, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
