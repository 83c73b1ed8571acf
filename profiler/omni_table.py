"""`python -m profiler omni-table <folder> [--runs probe,warmup]`: vLLM-Omni's per-stage table
(`<profiles-dir>/<gpu>-vllm-omni/<model>.parquet`, rows engine = vllm-omni, the profiler table
schema) from the DEDICATED zero-load runs of `python -m profiler.omni_bench`: the `warmup` and
`probe` runs (one request at a time) and their stage-log lines, i.e. vLLM-Omni's own
synchronized stage timer (`--enable-diffusion-pipeline-profiler`) inside a real server. The
open-loop runs (`low`, `sat`, `bursty_*`, `over`) are the validation data of
`python -m sim.tools.validate`: the builder refuses them.

What is fitted (every fit on the batches of the chosen runs; the server's own start-up
warm-up batch, the first compile, is left out):
- dit_step: one transformer forward at batch 1 (diffuse / steps, CFG = two forwards, the
  negative prompt's over its own text stream). A forward is host-bound below a floor and
  compute-bound above it:  t(S, T) = max(floor, a_img S + a_txt T + g (S + T)^2)  with S image
  tokens (+ an edit's condition latents) and T text-stream tokens. Fitted by least squares with
  the floor/compute split of each forward re-assigned until stable. Batches whose forward is
  more than COMPILE_RATIO x the fit are compile events (torch.compile recompiling for a new
  shape), left out of the fit and listed (their extra seconds) in the rows' `extra`.
  Rows: a product grid over S x T (batch 1), so the simulator reads both axes
  (LatencyModel.dit_step_text); rows outside the measured S / T range say `within_measured:
  false`.
- text_encode: Qwen2.5-VL under transformers, per pass t(x) = a + b x (x encoder input tokens),
  fitted on the stage log's sum over the prompt and negative-prompt passes; edits
  (component text_encoder_vl, the ~1 MP condition image inside every pass) keep the text slope b
  and fit their own a.
- vae_decode: t(p) = max(floor, b p) fitted on decodes of an output size the server had
  decoded before (p output pixels); a size's first decode in the server's life (the stage log
  of the whole call) costs c more, c = the mean excess of the first decodes over the law
  (`extra.first_use_ms`; sim.engines.omni charges it per replica and size).
- preprocess / postprocess (the API server and stage process around the engine, not the GPU):
  `api_generate` (send -> forward start, generate), `api_edit` (edit: multipart upload, image
  decode and the ~1 MP resize, by input pixels), `api` postprocess (forward end -> last byte:
  tensor to PNG, base64, HTTP, by output pixels), each a Theil-Sen line; `pipeline_generate` /
  `pipeline_edit` (forward minus its timed stages: the pipeline's own CPU work inside the
  batch, which holds the engine) the median.
vae_encode has no rows: the condition image is always ~1 MP, where vLLM-Omni's encode equals the
diffusers table's (printed); the simulator reads that table for it.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from profiler.omni_runs import OmniBenchRun, OmniRunError, find_runs, server_calls
from profiler.schema import normalize, validate_rows, write_table

ROOT = Path(__file__).resolve().parents[1]
TABLE_RUNS = ("warmup", "probe")          # dedicated zero-load runs: the only ones a table uses
COMPILE_RATIO = 3.0                        # a forward this much over the fit is a compile event
SUFFIX = "-vllm-omni"                      # table set of a GPU: <gpu>-vllm-omni
# grids the fitted rows are written on (the simulator interpolates between them)
GRID_S = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 4608, 5120, 5632,
          6144, 7168, 8192, 9216, 10240, 11264, 12288, 13312, 14336, 16384)
GRID_T = (1, 8, 32, 64, 128, 256, 512, 1024, 1280, 1536, 1792, 2048)
GRID_TEXT = (16, 32, 40, 64, 128, 256, 512, 768, 1024)
GRID_TEXT_VL = (1024, 1152, 1280, 1408, 1536, 1664, 1792, 2048, 2304)
GRID_SIDES = (64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1152, 1328, 1536, 1792, 2048)


def refuse_runs(names: Sequence[str]) -> None:
    """Only the dedicated zero-load runs build tables (module docstring)."""
    bad = [n for n in names if n not in TABLE_RUNS]
    if bad:
        raise OmniRunError(f"--runs {','.join(bad)}: validation data (open-loop runs replayed by "
                           f"python -m sim.tools.validate) never build a table; allowed: "
                           f"{', '.join(TABLE_RUNS)} (one request at a time)")


def select_runs(folder: str | Path, names: Sequence[str], model: Optional[str] = None) -> list[OmniBenchRun]:
    refuse_runs(names)
    runs = [r for r in find_runs(folder) if r.run in names and (model is None or r.model == model)]
    for r in runs:
        if not r.sequential:
            raise OmniRunError(f"{r.path}: run {r.run!r} is open loop (request_rate "
                               f"{r.obj.get('request_rate')!r}); allowed for a table: one request at a "
                               f"time (max_concurrency 1)")
    if not runs:
        raise OmniRunError(f"{folder}: no omni_bench run named {', '.join(names)}"
                           + (f" of model {model}" if model else "") + "; allowed: a folder with "
                           "<model>__warmup__<call>.json.gz / <model>__probe.json.gz from profiler.omni_bench")
    return runs


def table_batches(folder: str | Path, runs: list[OmniBenchRun]) -> pd.DataFrame:
    """Batches of `runs` (one row per pipeline forward), each with its request's geometry in
    vLLM-Omni's pipeline (sim.engines.omni.qwen_geometry) and `first_use`: the first decode of
    its output size in its server's life (from the call's whole stage log)."""
    from profiler.models import load_model
    from sim.engines.omni import qwen_geometry
    keep = {(r.served, r.call_id, r.run) for r in runs}
    frames = []
    for (served, call), c in server_calls(folder, find_runs(folder)).items():
        if not any((served, call) == k[:2] for k in keep):
            continue
        if c.stagelog is None:
            raise OmniRunError(f"{folder}: no stagelog_{served}__{call}.jsonl.gz for the runs of that "
                               f"server start; allowed: the folder omni_bench wrote (stage logs beside the runs)")
        b = c.batches()
        seen: set[tuple[int, int]] = set()
        first = []
        for h, w in b[["height", "width"]].itertuples(index=False):
            first.append((h, w) not in seen)
            seen.add((h, w))
        b["first_use"] = first
        b["served"], b["call_id"] = served, call
        frames.append(b[[(served, call, run) in keep for run in b["run"]]])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if df.empty:
        raise OmniRunError(f"{folder}: the stage logs hold no batch of the chosen runs; allowed: "
                           "runs served with --enable-diffusion-pipeline-profiler (omni_bench's default)")
    model = runs[0].model
    spec = load_model(model)
    cond = load_model(spec.condition_encoder) if spec.condition_encoder else None
    geo = []
    for r in df.itertuples(index=False):
        inp = (int(r.image_height), int(r.image_width)) if r.task == "edit" else None
        geo.append(qwen_geometry(spec, cond, int(r.prompt_tokens), (int(r.height), int(r.width)), inp))
    df["S"] = [g.seq for g in geo]
    df["T"] = [g.text for g in geo]
    df["T_neg"] = [g.neg_text for g in geo]
    df["enc_tokens"] = [g.enc_tokens for g in geo]
    df["neg_tokens"] = [g.neg_tokens for g in geo]
    df["pixels"] = df["height"] * df["width"]
    df["in_pixels"] = [(r.image_height * r.image_width) if r.task == "edit" else 0
                       for r in df.itertuples(index=False)]
    stages = df[["text_encode_s", "diffuse_s", "vae_decode_s"]].sum(axis=1) + df["vae_encode_s"].fillna(0.0)
    df["pipeline_s"] = df["forward_s"] - stages
    df["pre_s"] = df["t_start"] - df["wall_sent"]
    df["post_s"] = df["wall_sent"] + df["latency_s"] - df["t_end"]
    return df.reset_index(drop=True)


# --- fits ------------------------------------------------------------------------------------------

@dataclass
class FloorFit:
    """y_i = sum over the passes p of item i of max(floor, x_ip . coef), coef >= 0."""
    floor: float
    coef: np.ndarray
    names: tuple[str, ...]
    resid: np.ndarray = field(repr=False)
    iterations: int = 0

    def one(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(self.floor, np.asarray(x, float) @ self.coef)

    def as_dict(self) -> dict[str, Any]:
        r = self.resid
        return {"floor_s": self.floor, **{n: float(c) for n, c in zip(self.names, self.coef)},
                "rel_resid_median": float(np.median(np.abs(r))) if len(r) else None,
                "rel_resid_max": float(np.max(np.abs(r))) if len(r) else None,
                "iterations": self.iterations}


def fit_floor(passes: list[list[np.ndarray]], y: np.ndarray, names: tuple[str, ...],
              max_iter: int = 50) -> FloorFit:
    """Least-squares fit of the FloorFit law: with each pass assigned to the floor or the
    compute regime the law is linear in (floor, coef); regimes are re-assigned from the fit
    until they no longer change. Negative coefficients are held at 0 (active set)."""
    y = np.asarray(y, float)
    k = len(names)
    # start: every pass compute-bound, floor at the least per-pass time
    fl = float(np.min(y / np.array([len(p) for p in passes])))
    coef = np.zeros(k)
    regime = [[True] * len(p) for p in passes]
    it = 0
    for it in range(1, max_iter + 1):
        free = np.ones(k, bool)
        while True:
            A = np.zeros((len(y), 1 + k))
            for i, (ps, rg) in enumerate(zip(passes, regime)):
                for x, comp in zip(ps, rg):
                    if comp:
                        A[i, 1:] += x
                    else:
                        A[i, 0] += 1.0
            cols = [0] + [1 + j for j in range(k) if free[j]]
            use_floor = A[:, 0].any()
            if not use_floor:
                cols = cols[1:]
            sol = np.linalg.lstsq(A[:, cols], y, rcond=None)[0]
            full = np.zeros(1 + k)
            full[cols] = sol
            neg = [j for j in range(k) if free[j] and full[1 + j] < 0]
            if not neg:
                break
            free[neg[0]] = False
        if use_floor:
            fl = float(full[0])
        coef = full[1:]
        new = [[bool(x @ coef > fl) for x in ps] for ps in passes]
        if new == regime:
            break
        regime = new
    pred = np.array([sum(max(fl, float(x @ coef)) for x in ps) for ps in passes])
    return FloorFit(fl, coef, names, (pred - y) / y, it)


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the Theil-Sen line (median of pairwise slopes): robust to the odd
    outlier (e.g. the first answer of a benchmark session) without choosing which to drop."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), 1)
    dx = x[j] - x[i]
    ok = dx != 0
    b = float(np.median((y[j] - y[i])[ok] / dx[ok])) if ok.any() else 0.0
    return float(np.median(y - b * x)), b


@dataclass
class OmniFits:
    dit: FloorFit
    compile_events: list[dict[str, Any]]
    te: dict[str, Any]
    vae: FloorFit                   # decodes of a size seen before
    first_use_ms: float
    pre: dict[str, Any]
    post: tuple[float, float]
    pipeline: dict[str, float]
    ranges: dict[str, tuple[float, float]]
    n_batches: int


def dit_passes(df: pd.DataFrame) -> list[list[np.ndarray]]:
    """Per batch: the feature vector [S, T, (S + T)^2] of each transformer forward of one step."""
    out = []
    for r in df.itertuples(index=False):
        ps = [np.array([r.S, r.T, (r.S + r.T) ** 2], float)]
        if r.cfg:
            ps.append(np.array([r.S, r.T_neg, (r.S + r.T_neg) ** 2], float))
        out.append(ps)
    return out


def fit_all(df: pd.DataFrame) -> OmniFits:
    """Every fit of the module docstring on the table batches."""
    use = df[df["run"] != "server_warmup"].copy()
    if (use["batch_size"] != 1).any():
        raise OmniRunError("table batches of batch size > 1 found; allowed: the zero-load runs' "
                           "batches of one request (vLLM-Omni's default max_num_seqs 1)")
    names = ("s_per_image_token", "s_per_text_token", "s_per_joint_token_sq")
    per_step = (use["diffuse_s"] / use["steps"]).to_numpy(float)
    keep = np.ones(len(use), bool)
    events: list[dict[str, Any]] = []
    while True:
        fit = fit_floor([p for p, k in zip(dit_passes(use), keep) if k], per_step[keep], names)
        pred = np.array([sum(float(fit.one(x)) for x in ps) for ps in dit_passes(use)])
        worst = np.where(keep, per_step / pred, 0.0)
        j = int(np.argmax(worst))
        if worst[j] <= COMPILE_RATIO:
            break
        keep[j] = False
        r = use.iloc[j]
        events.append({"run": r["run"], "task": r["task"], "height": int(r["height"]),
                       "width": int(r["width"]), "steps": int(r["steps"]), "image_tokens": int(r["S"]),
                       "first_use": bool(r["first_use"]), "diffuse_s": float(r["diffuse_s"]),
                       "extra_s": float(r["diffuse_s"] - r["steps"] * pred[j])})
    dit_df = use[keep]
    # text encoder: stage log sums the prompt and negative-prompt passes
    te: dict[str, Any] = {}
    gen = use[use["task"] == "generate"]
    x = (gen["enc_tokens"] + np.where(gen["cfg"], gen["neg_tokens"], 0)).to_numpy(float)
    n = np.where(gen["cfg"], 2.0, 1.0)
    A = np.c_[n, x]
    a, b = np.linalg.lstsq(A, gen["text_encode_s"].to_numpy(float), rcond=None)[0] if len(gen) >= 2 else (np.nan, 0.0)
    if not (b >= 0):
        b = 0.0
        a = float(np.median(gen["text_encode_s"] / n))
    te["text_encoder"] = {"a_s": float(a), "b_s_per_token": float(b), "n": int(len(gen)),
                          "tokens": [int(gen["neg_tokens"].min()) if len(gen) else 0, int(gen["enc_tokens"].max()) if len(gen) else 0]}
    ed = use[use["task"] == "edit"]
    if len(ed):
        ne = np.where(ed["cfg"], 2.0, 1.0)
        xe = (ed["enc_tokens"] + np.where(ed["cfg"], ed["neg_tokens"], 0)).to_numpy(float)
        a_vl = float(np.median((ed["text_encode_s"].to_numpy(float) - b * xe) / ne))
        te["text_encoder_vl"] = {"a_s": a_vl, "b_s_per_token": float(b), "n": int(len(ed)),
                                 "tokens": [int(ed["neg_tokens"].min()), int(ed["enc_tokens"].max())],
                                 "slope_from": "text_encoder (the same LLM)"}
    # VAE decode: the base law on decodes of sizes seen before, then the first-use cost c as
    # the mean excess of first decodes over it
    vd = use.dropna(subset=["vae_decode_s"])
    fu = vd["first_use"].to_numpy(bool)
    px = vd["pixels"].to_numpy(float)
    y = vd["vae_decode_s"].to_numpy(float)
    if (~fu).sum() < 2:
        raise OmniRunError("fewer than two decodes of an output size seen before in the chosen runs; "
                           "allowed: zero-load runs that repeat sizes (omni_bench's warmup + probe do)")
    base = fit_floor([[np.array([p])] for p in px[~fu]], y[~fu], ("s_per_pixel",))
    c = float(np.mean(y[fu] - base.one(px[fu][:, None]))) if fu.any() else 0.0
    c = max(c, 0.0)
    pred = base.one(px[:, None]) + c * fu
    base.resid = (pred - y) / y
    # API server and the pipeline's CPU work
    pre: dict[str, Any] = {}
    if len(gen):
        pre["api_generate"] = float(gen["pre_s"].median())
    if len(ed):
        pre["api_edit"] = theil_sen(ed["in_pixels"], ed["pre_s"])
    post = theil_sen(use["pixels"], use["post_s"])
    pipe = {f"pipeline_{t}": float(g["pipeline_s"].median()) for t, g in use.groupby("task")}
    S_all = np.r_[dit_df["S"], dit_df["S"]]
    T_all = np.r_[dit_df["T"], dit_df.loc[dit_df["cfg"], "T_neg"]]
    ranges = {"S": (float(S_all.min()), float(S_all.max())), "T": (float(T_all.min()), float(T_all.max())),
              "pixels": (float(vd["pixels"].min()), float(vd["pixels"].max())),
              "in_pixels": (float(ed["in_pixels"].min()), float(ed["in_pixels"].max())) if len(ed) else (0.0, 0.0)}
    return OmniFits(fit, events, te, base, c * 1e3, pre, post, pipe, ranges, int(len(use)))


# --- rows ------------------------------------------------------------------------------------------

def build_rows(df: pd.DataFrame, fits: OmniFits, runs: list[OmniBenchRun], command: str) -> list[dict[str, Any]]:
    """Table rows (profiler/schema.py) of the fits, with the runs' provenance."""
    prov = runs[0].provenance
    model = runs[0].model
    settings = {"server_command": prov.get("server_command"), "server_settings": prov.get("server_settings"),
                "bench_command": prov.get("bench_command"),
                "sources": sorted({str(r.path.name) for r in runs}),
                "timer": "vLLM-Omni --enable-diffusion-pipeline-profiler (synchronized stage durations)",
                "method": "fits of profiler.omni_table on the zero-load runs (module docstring)"}
    base = {"model": model, "engine": "vllm-omni", "engine_version": str(prov.get("engine_version", "unknown")),
            "torch_version": str(prov.get("torch_version", "unknown")),
            "gpu": str(prov.get("gpu") or prov.get("nvidia_smi_name") or "unknown"),
            "dtype": "bfloat16", "tp": 1, "batch_size": 1, "status": "ok", "context_len": None,
            "num_tokens": None, "height": None, "width": None, "peak_mem_bytes": None,
            "measured_at": str(min(r.provenance.get("measured_at", "") for r in runs)),
            "git_sha": str(prov.get("git_sha", "")), "command": command,
            "engine_settings": json.dumps(settings, sort_keys=True, default=str)}
    rows: list[dict[str, Any]] = []

    def add(stage: str, ms: float, resid: np.ndarray, extra: dict[str, Any], n: int, **axes: Any) -> None:
        r = np.asarray(resid, float)
        lo, hi = (float(np.quantile(r, 0.1)), float(np.quantile(r, 0.9))) if len(r) else (0.0, 0.0)
        rows.append({**base, "stage": stage, "latency_ms_median": float(ms),
                     "latency_ms_p10": float(ms) * min(1.0, 1.0 - hi), "latency_ms_p90": float(ms) * max(1.0, 1.0 - lo),
                     "n_samples": n, "extra": json.dumps(extra, sort_keys=True, default=str), **axes})

    d = fits.dit
    s_lo, s_hi = fits.ranges["S"]
    t_lo, t_hi = fits.ranges["T"]
    dit_extra = {"fit": d.as_dict(), "law": "max(floor, a_img S + a_txt T + g (S + T)^2) per forward",
                 "compile_events": fits.compile_events, "measured_S": [s_lo, s_hi], "measured_T": [t_lo, t_hi]}
    for S in GRID_S:
        for T in GRID_T:
            ms = float(d.one(np.array([[S, T, (S + T) ** 2]]))[0]) * 1e3
            inside = s_lo <= S <= s_hi and t_lo <= T <= t_hi
            add("dit_step", ms, d.resid, {**dit_extra, "within_measured": inside}, fits.n_batches,
                component="transformer", seq_len=S, num_tokens=T)
    for comp, grid in (("text_encoder", GRID_TEXT), ("text_encoder_vl", GRID_TEXT_VL)):
        f = fits.te.get(comp)
        if not f:
            continue
        lo, hi = f["tokens"]
        for x in grid:
            add("text_encode", (f["a_s"] + f["b_s_per_token"] * x) * 1e3, np.array([]),
                {"fit": f, "law": "a + b x per pass", "within_measured": lo <= x <= hi}, f["n"],
                component=comp, num_tokens=x)
    v = fits.vae
    p_lo, p_hi = fits.ranges["pixels"]
    for s in GRID_SIDES:
        p = s * s
        add("vae_decode", float(v.one(np.array([[p]]))[0]) * 1e3, v.resid,
            {"fit": v.as_dict(), "law": "max(floor, b pixels) + first_use_ms on a size's first decode",
             "first_use_ms": fits.first_use_ms, "within_measured": p_lo <= p <= p_hi}, fits.n_batches,
            component="vae", height=s, width=s)
    if "api_generate" in fits.pre:
        add("preprocess", fits.pre["api_generate"] * 1e3, np.array([]),
            {"what": "API server + stage process, send -> forward start (generate)", "law": "median"},
            fits.n_batches, component="api_generate")
    if "api_edit" in fits.pre:
        a, b = fits.pre["api_edit"]
        lo, hi = fits.ranges["in_pixels"]
        for s in GRID_SIDES:
            add("preprocess", max(a + b * s * s, 1e-3) * 1e3, np.array([]),
                {"what": "API server + stage process, send -> forward start (edit: upload, decode, resize)",
                 "law": "Theil-Sen a + b input_pixels", "a_s": a, "b_s_per_pixel": b,
                 "within_measured": lo <= s * s <= hi}, fits.n_batches, component="api_edit", height=s, width=s)
    a, b = fits.post
    for s in GRID_SIDES:
        add("postprocess", max(a + b * s * s, 1e-3) * 1e3, np.array([]),
            {"what": "forward end -> last response byte (to PIL, PNG, base64, HTTP)",
             "law": "Theil-Sen a + b output_pixels", "a_s": a, "b_s_per_pixel": b,
             "within_measured": p_lo <= s * s <= p_hi}, fits.n_batches, component="api", height=s, width=s)
    for comp, val in sorted(fits.pipeline.items()):
        add("preprocess", max(val, 1e-6) * 1e3, np.array([]),
            {"what": "pipeline forward minus its timed stages (CPU work inside the batch; holds the engine)",
             "law": "median"}, fits.n_batches, component=comp)
    return rows


# --- report ----------------------------------------------------------------------------------------

def compare_with_diffusers(fits: OmniFits, model: str, profiles_dir: Path, gpu: str) -> list[str]:
    """Where vLLM-Omni differs from the eager diffusers / vLLM tables, and by how much."""
    from sim.engines.latency import LatencyModel
    lines = []
    try:
        lat = LatencyModel(profiles_dir, gpu, "clamp")
        for S in (1024, 4096, 6889):
            o = float(fits.dit.one(np.array([[S, 64, (S + 64) ** 2]]))[0])
            e = lat.dit_step(model, 1, S)
            lines.append(f"dit_step b=1 S={S} T=64: vLLM-Omni {o * 1e3:6.1f} ms, diffusers {e * 1e3:6.1f} ms "
                         f"({(o / e - 1) * 100:+.0f}%)")
        for s in (512, 1024, 1328):
            o = float(fits.vae.one(np.array([[s * s]]))[0])
            e = lat.vae(model, "vae_decode", 1, s, s)
            lines.append(f"vae_decode {s}x{s} (size seen before): vLLM-Omni {o * 1e3:6.1f} ms, diffusers "
                         f"{e * 1e3:6.1f} ms ({(o / e - 1) * 100:+.0f}%); first decode of a size +{fits.first_use_ms:.1f} ms")
        e = lat.vae(model, "vae_encode", 1, 1024, 1024)
        lines.append(f"vae_encode 1024x1024: diffusers {e * 1e3:.1f} ms (the simulator reads it; vLLM-Omni's "
                     f"median over the zero-load edits is printed above)")
        from profiler.models import load_model
        cm = load_model(model).condition_encoder
        if cm:
            f = fits.te["text_encoder"]
            for x in (40, 100, 300):
                o = f["a_s"] + f["b_s_per_token"] * x
                e = lat.prefill(cm, x)
                lines.append(f"condition encode {x} tokens (one pass): vLLM-Omni (transformers) {o * 1e3:5.1f} ms, "
                             f"vLLM prefill {e * 1e3:5.1f} ms ({(o / e - 1) * 100:+.0f}%)")
    except (OSError, ValueError) as e:
        lines.append(f"(no comparison: {type(e).__name__}: {str(e).splitlines()[0]})")
    return lines


def report(df: pd.DataFrame, fits: OmniFits) -> list[str]:
    d = fits.dit.as_dict()
    out = [f"{fits.n_batches} batches ({', '.join(f'{k} {v}' for k, v in df['run'].value_counts().items())})",
           f"dit_step per forward: max({d['floor_s'] * 1e3:.1f} ms, {d['s_per_image_token'] * 1e6:.2f} us x S + "
           f"{d['s_per_text_token'] * 1e6:.2f} us x T + {d['s_per_joint_token_sq'] * 1e9:.3f} ns x (S+T)^2); "
           f"|rel resid| median {d['rel_resid_median'] * 100:.1f}%, max {d['rel_resid_max'] * 100:.1f}%; measured "
           f"S {fits.ranges['S'][0]:.0f}..{fits.ranges['S'][1]:.0f}, T {fits.ranges['T'][0]:.0f}..{fits.ranges['T'][1]:.0f}",
           f"compile events (left out): " + ("; ".join(
               f"{e['run']} {e['height']}x{e['width']} {e['steps']} steps (S={e['image_tokens']}): +{e['extra_s']:.2f} s"
               for e in fits.compile_events) or "none")]
    for comp, f in fits.te.items():
        out.append(f"text_encode {comp}: {f['a_s'] * 1e3:.1f} ms + {f['b_s_per_token'] * 1e6:.2f} us x tokens per pass "
                   f"(n={f['n']}, tokens {f['tokens'][0]}..{f['tokens'][1]})")
    v = fits.vae.as_dict()
    out.append(f"vae_decode: max({v['floor_s'] * 1e3:.1f} ms, {v['s_per_pixel'] * 1e9:.1f} ns x pixels) + "
               f"{fits.first_use_ms:.1f} ms on a size's first decode; |rel resid| median {v['rel_resid_median'] * 100:.1f}%")
    ed = df[df["task"] == "edit"]
    if len(ed):
        out.append(f"vae_encode (edit condition, ~1 MP): vLLM-Omni median {ed['vae_encode_s'].median() * 1e3:.1f} ms "
                   f"(n={len(ed)}); no rows written (see below)")
    for k, v2 in fits.pre.items():
        out.append(f"preprocess {k}: " + (f"{v2 * 1e3:.1f} ms" if isinstance(v2, float) else
                                          f"{v2[0] * 1e3:.1f} ms + {v2[1] * 1e9:.1f} ns x input pixels"))
    out.append(f"postprocess api: {fits.post[0] * 1e3:.1f} ms + {fits.post[1] * 1e9:.1f} ns x output pixels")
    for k, v2 in fits.pipeline.items():
        out.append(f"preprocess {k} (inside the batch): {v2 * 1e3:.1f} ms")
    return out


def git_sha() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def build(folder: str | Path, runs: Sequence[str] = TABLE_RUNS, model: Optional[str] = None
          ) -> tuple[pd.DataFrame, OmniFits, list[dict[str, Any]], list[OmniBenchRun]]:
    """(batches, fits, rows, runs) for one model entry (the first found when model is None)."""
    chosen = select_runs(folder, runs, model)
    model = model or chosen[0].model
    chosen = [r for r in chosen if r.model == model]
    df = table_batches(folder, chosen)
    fits = fit_all(df)
    cmd = (f"python -m profiler omni-table {folder} --runs {','.join(runs)} (built "
           f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')} at {git_sha()[:12] or 'unknown'})")
    return df, fits, build_rows(df, fits, chosen, cmd), chosen


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler omni-table", description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="folder of profiler.omni_bench results (runs and stage logs)")
    ap.add_argument("--runs", default=",".join(TABLE_RUNS),
                    help=f"comma list of zero-load runs; allowed: {', '.join(TABLE_RUNS)}")
    ap.add_argument("--model", default=None, help="model entry (default: every one found)")
    ap.add_argument("--gpu", default="h100", help="table set <gpu>-vllm-omni")
    ap.add_argument("--profiles-dir", default="traces/profiles")
    ap.add_argument("--dry-run", action="store_true", help="print the fits; write nothing")
    a = ap.parse_args(argv)
    names = [x.strip() for x in a.runs.split(",") if x.strip()]
    try:
        refuse_runs(names)
        models = [a.model] if a.model else sorted({r.model for r in find_runs(a.folder) if r.run in names})
        if not models:
            raise OmniRunError(f"{a.folder}: no omni_bench run named {', '.join(names)}; allowed: a folder "
                               "of profiler.omni_bench results")
        for m in models:
            df, fits, rows, chosen = build(a.folder, names, m)
            out = Path(a.profiles_dir) / f"{a.gpu}{SUFFIX}" / f"{m}.parquet"
            print(f"== {m}: {', '.join(r.name for r in chosen)} -> {out}")
            for line in report(df, fits):
                print("   " + line)
            for line in compare_with_diffusers(fits, m, Path(a.profiles_dir), a.gpu):
                print("   " + line)
            if a.dry_run:
                print(f"   (dry run: {len(rows)} rows not written)")
                continue
            frame = pd.DataFrame(rows)
            problems = validate_rows(normalize(frame))
            if problems:
                raise OmniRunError(f"{out}: the rows break the table contract: {problems[0]}")
            write_table(frame, out)
            print(f"   wrote {len(rows)} rows")
    except OmniRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
