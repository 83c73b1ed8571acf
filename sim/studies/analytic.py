"""Analytic layer: closed-form capacity numbers for one model on one GPU, each next to the
measurement it can be checked against, with the relative error reported (never hidden).

    python -m sim.studies.analytic model=qwen_image gpu=h100 [profiles_dir=traces/profiles] [sim=true]

prints the report's headline numbers as a table (`format=json` prints the whole report as
JSON). What it computes (the design's "analytic layer"):

* serial latency of a *typical request* of the model, stage by stage, from the profile tables
  (the same LatencyModel and pipeline hops the simulator uses): VLM/LLM 600 prompt + 250 output
  tokens (+ one 1024x1024 image for a VLM); AR+DiT / DiT: the model's default resolution, steps
  and CFG (qwen_image 1328x1328, 50 steps, CFG; flux1_dev 1024x1024, 28 steps);
* bottleneck stage (largest serial share) and the upper-bound throughput of one GPU:
  ``bound_qps_serial = 1 / sum(stage latencies)`` and ``bound_qps_batched = 1 / sum(per-request
  cost of each stage at its best measured batch)`` where a stage's best batch maximises
  ``b / latency(b)`` over the measured batch sizes;
* batching gain ``g(b) = b * lat(1) / lat(b)`` measured vs the model ``g(b) = b / (1 + a (b-1))``
  (``a`` = per-extra-item overhead, least-squares fit; 0 = perfect batching, 1 = none), both
  reported with the model's relative error;
* memory per GPU = weights + KV cache (2 * layers * kv_heads * head_dim * bytes per token) +
  activations + diffusion state + framework overhead, the max concurrency it allows, next to the
  profiler's ``peak_mem_bytes`` per point and vLLM's recorded KV capacity (``engine_settings``)
  when the table is measured;
* utilization = simulated throughput (a short one-GPU ``Run`` at saturation with the typical
  request) / bound;
* TP efficiency: per layer, compute t/p plus two ring all-reduces of the layer's activations
  over NVLink, ``2 (p-1)/p * bytes / bw + latency``; PP efficiency: ``m / (m + p - 1)`` (bubble
  ``(p-1)/(m+p-1)``) for m micro-batches, plus one activation hop per stage boundary;
* cost per request and per 1k images from ``cost.usd_per_gpu_hour`` (conf/cost/*.yaml when
  present, else the schema default).

Profile tables: ``<profiles_dir>/<gpu>/<model>.parquet`` (measured); when that is missing the
roofline set ``<profiles_dir>/<gpu>-analytic/`` is used and the report says so.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from profiler.models import (ModelSpec, UnknownModelError, available_models, denoiser_width_layers,
                             load_model)
from sim.config import ConfigError, SimConfig
from sim.engines.cost import DECODE_BATCH_FOR_ESTIMATES as DECODE_BATCH_FOR_BOUND
from sim.engines.memory import DIFFUSION_STATE_BYTES_PER_TOKEN, FRAMEWORK_OVERHEAD_BYTES, GIB
from sim.names import (AR, DECODE, DIT_STEP, GENERATE, PREFILL, TEXT, TEXT_ENCODE, UNDERSTAND,
                       VAE_DECODE, VAE_ENCODE, VISION_ENCODE)

REPO_ROOT = Path(__file__).resolve().parents[2]
NVLINK_LATENCY_S = 5e-6          # per all-reduce launch + sync (NCCL small-message floor)
DEFAULT_NVLINK_GB_S = 450.0
GPU_MEM_GIB = {"h100": 80.0, "h200": 140.0}     # nvidia-smi: 81,559 / 143,771 MiB
TYPICAL = {"prompt_tokens": 600, "output_tokens": 250, "image": (1024, 1024)}
ACT_TENSORS_LLM = 6              # live hidden-sized tensors per token in one LLM layer step
ACT_TENSORS_MLP = 2              # live intermediate-sized tensors per token (gate, up)
USAGE = ("usage: python -m sim.studies.analytic model=<name> gpu=<gpu> [profiles_dir=<dir>] "
         "[sim=true|false] [num_requests=<n>] [format=table|json]")


class AnalyticError(ValueError):
    """User input the analytic report cannot serve (message names the allowed values)."""


# ------------------------------------------------------------------------------------------
# Closed forms (unit-tested)
# ------------------------------------------------------------------------------------------

def kv_bytes_per_token(spec: ModelSpec) -> int:
    """2 (K, V) * layers * kv_heads * head_dim * dtype bytes (0 for models without an LLM)."""
    return spec.kv_bytes_per_token()


def model_weights_bytes(spec: ModelSpec) -> int:
    """Weights a GPU holding the whole model needs (AR+DiT: plus its condition encoder)."""
    w = spec.weights_bytes()
    if spec.condition_encoder:
        w += load_model(spec.condition_encoder).weights_bytes()
    return w


def max_concurrency(mem_bytes: float, fixed_bytes: float, per_request_bytes: float) -> int:
    """Requests that fit: floor((memory - fixed) / per-request bytes), never negative."""
    if per_request_bytes <= 0:
        return 0
    return max(0, int((mem_bytes - fixed_bytes) // per_request_bytes))


def bound_qps(stage_seconds: dict[str, float]) -> float:
    """1 / sum of stage latencies (seconds): one GPU doing one request after another."""
    tot = sum(stage_seconds.values())
    return 1.0 / tot if tot > 0 else math.inf


def fit_batch_overhead(batches, latencies) -> dict[str, Any]:
    """Fit lat(b) = lat(1) * (1 + a (b - 1)), i.e. gain(b) = b / (1 + a (b-1)); returns a, the
    measured and modelled gains and the model's relative error per batch."""
    b = np.asarray(batches, dtype=float)
    lat = np.asarray(latencies, dtype=float)
    order = np.argsort(b)
    b, lat = b[order], lat[order]
    if len(b) == 0 or b[0] != 1:
        return {"overhead": None, "note": "no batch-1 point"}
    l1 = lat[0]
    x, y = b - 1, lat / l1 - 1
    a = float((x * y).sum() / (x * x).sum()) if (x * x).sum() > 0 else 0.0
    gain = b * l1 / lat
    model = b / (1 + a * (b - 1))
    err = (model - gain) / gain
    return {"overhead": a, "batch": b.astype(int).tolist(), "gain_measured": gain.tolist(),
            "gain_model": model.tolist(), "rel_error": err.tolist(),
            "max_abs_rel_error": float(np.max(np.abs(err))) if len(err) else 0.0}


def ring_allreduce_s(nbytes: float, p: int, bw_gb_s: float, latency_s: float = NVLINK_LATENCY_S) -> float:
    if p <= 1:
        return 0.0
    return 2 * (p - 1) / p * nbytes / (bw_gb_s * 1e9) + latency_s


def tp_efficiency(t1_s: float, layers: int, tokens: int, hidden: int, dtype_bytes: int, p: int,
                  bw_gb_s: float = DEFAULT_NVLINK_GB_S, allreduces_per_layer: int = 2) -> float:
    """Speed-up / p for tensor parallelism: compute t1/p, plus per layer `allreduces_per_layer`
    ring all-reduces of tokens*hidden activations over NVLink (no overlap assumed)."""
    if p <= 1:
        return 1.0
    comm = layers * allreduces_per_layer * ring_allreduce_s(tokens * hidden * dtype_bytes, p, bw_gb_s)
    tp = t1_s / p + comm
    return (t1_s / tp) / p


def pp_efficiency(p: int, m: int, t1_s: float = 0.0, hop_bytes: float = 0.0,
                  bw_gb_s: float = DEFAULT_NVLINK_GB_S) -> float:
    """Pipeline parallelism with m micro-batches over p stages: m / (m + p - 1), i.e. a bubble of
    (p-1)/(m+p-1); with t1_s > 0 each of the p-1 boundaries also adds one activation hop per
    micro-batch (hop_bytes / bw)."""
    if p <= 1:
        return 1.0
    eff = m / (m + p - 1)
    if t1_s > 0 and hop_bytes > 0:
        per_micro = t1_s / m / p                 # one stage's share of one micro-batch
        hop = hop_bytes / m / (bw_gb_s * 1e9)
        eff *= per_micro / (per_micro + hop)
    return eff


def rel_err(estimate: float | None, measured: float | None) -> float | None:
    if estimate is None or measured is None or not measured:
        return None
    return (float(estimate) - float(measured)) / float(measured)


def usd_per_gpu_hour(gpu: str) -> float:
    """conf/cost/*.yaml (key usd_per_gpu_hour) when present, else sim.config's default."""
    base = gpu.replace("-analytic", "")
    prices = dict(SimConfig().cost.usd_per_gpu_hour)
    cost_dir = REPO_ROOT / "conf" / "cost"
    try:
        import yaml
        for p in sorted(cost_dir.glob("*.yaml")):
            d = yaml.safe_load(p.read_text()) or {}
            prices.update(d.get("usd_per_gpu_hour", {}) or {})
    except Exception:  # pragma: no cover - a malformed cost file falls back to the default
        pass
    if base not in prices:
        raise AnalyticError(f"gpu={gpu!r} has no price; allowed: one of {sorted(prices)} "
                            "(cost.usd_per_gpu_hour)")
    return float(prices[base])


# ------------------------------------------------------------------------------------------
# Profile tables
# ------------------------------------------------------------------------------------------

def resolve_tables(profiles_dir: str | Path, gpu: str, model: str) -> tuple[Path, str]:
    """(root, folder) holding <model>.parquet (and its condition encoder's) for `gpu`:
    the measured folder <gpu>/ first, else the roofline folder <gpu>-analytic/."""
    root = Path(profiles_dir)
    if not root.is_absolute():
        root = REPO_ROOT / root
    spec = load_model(model)
    need = [model] + ([spec.condition_encoder] if spec.condition_encoder else [])
    tried = []
    for folder in (gpu, f"{gpu}-analytic") if not gpu.endswith("-analytic") else (gpu,):
        tried.append(str(root / folder))
        if all((root / folder / f"{m}.parquet").exists() for m in need):
            return root, folder
    raise FileNotFoundError(
        f"no profile tables for model={model!r} (needs {need}) on gpu={gpu!r}; looked in {tried}. "
        f"Measure them (`python -m profiler sweep model={model}`) or make roofline ones "
        f"(`python -m profiler sweep backend=analytic models=[{','.join(need)}] out_dir={root}`)")


def typical_request(spec: ModelSpec):
    """The model's typical request (see module doc) as a sim Request."""
    from sim.core.records import Request
    from sim.workloads.requests import image_tokens
    if spec.family in ("llm", "vlm"):
        task = UNDERSTAND if spec.family == "vlm" else TEXT
        ins = (TYPICAL["image"],) if spec.family == "vlm" else ()
        req = Request(0, 0.0, task, spec.name, TYPICAL["prompt_tokens"], TYPICAL["output_tokens"],
                      ins, None, 0, False, "interactive")
    else:
        d = spec.request_defaults
        out = (int(d["height"]), int(d["width"]))
        req = Request(0, 0.0, GENERATE, spec.name, int(d.get("text_tokens", 64)), 0,
                      (), out, int(d["steps"]), bool(d.get("cfg", False)),
                      "standard")
    req.image_tokens_in, req.image_tokens_out = image_tokens(spec, req.task, req.input_images,
                                                             req.output_image)
    return req


def _nearest(values, x: float) -> float:
    values = sorted(set(float(v) for v in values))
    return min(values, key=lambda v: abs(v - x))


class _Stages:
    """Per-stage serial latency and best-batch per-request cost of the typical request."""

    def __init__(self, lat, spec: ModelSpec, req):
        from sim.engines.pipeline import plan_hops
        self.lat, self.spec, self.req = lat, spec, req
        self.hops = plan_hops(req, fused=False)
        self.serial: dict[str, float] = {}       # seconds
        self.batched: dict[str, float] = {}      # seconds of GPU time per request at best batch
        self.best_batch: dict[str, Any] = {}
        self.batching: dict[str, Any] = {}
        self.detail: dict[str, Any] = {}
        for j in self.hops:
            getattr(self, f"_{j.stage}")(j)

    def _add(self, stage: str, serial: float, batched: float, best: Any) -> None:
        self.serial[stage] = self.serial.get(stage, 0.0) + serial
        self.batched[stage] = self.batched.get(stage, 0.0) + batched
        self.best_batch[stage] = best

    def _rows(self, model: str, stage: str) -> pd.DataFrame:
        df = self.lat.frame_df(model)
        return df[df["stage"] == stage]

    def _vision_encode(self, j) -> None:
        m, t = j.model, j.vision_tokens
        serial = self.lat.vision_encode(m, t)
        d = self._rows(m, VISION_ENCODE)
        per_tok = (d["latency_ms_median"] / 1e3 / (d["num_tokens"] * d["batch_size"]))
        best = d.loc[per_tok.idxmin()]
        self._add(VISION_ENCODE, serial, min(serial, float(per_tok.min()) * t),
                  {"batch_size": int(best["batch_size"]), "tokens_per_image": int(best["num_tokens"])})
        one = d[d["num_tokens"] == _nearest(d["num_tokens"], t)]
        if len(one["batch_size"].unique()) > 1:
            g = one.groupby("batch_size")["latency_ms_median"].median()
            self.batching[VISION_ENCODE] = fit_batch_overhead(g.index, g.values)

    def _ar(self, j) -> None:
        m = j.model
        lat = self.lat
        pre = lat.prefill(m, max(j.tokens, 1))
        d = self._rows(m, PREFILL)
        d = d[(d["num_decode_seqs"].fillna(0) == 0) & (d["context_len"].fillna(0) == 0)]
        per_tok = d["latency_ms_median"] / 1e3 / d["num_tokens"]
        best_n = int(d.loc[per_tok.idxmin(), "num_tokens"])
        self._add(PREFILL, pre, min(pre, float(per_tok.min()) * j.tokens), {"num_tokens": best_n})
        g = d.groupby("num_tokens")["latency_ms_median"].median()
        self.detail["prefill_tokens"] = j.tokens
        if j.out_tokens > 1:
            k = j.out_tokens - 1
            serial = float(np.asarray(lat.decode_steps(m, 1, j.tokens + 1, k)).sum())
            dd = self._rows(m, DECODE)
            ctx = _nearest(dd["context_len"], j.tokens + j.out_tokens / 2)
            at = dd[dd["context_len"] == ctx].groupby("batch_size")["latency_ms_median"].median() / 1e3
            thr = at.index.values / at.values           # sequences-steps per second
            b_best = int(at.index.values[int(np.argmax(thr))])
            per_req = k / float(thr.max())
            self._add(DECODE, serial, min(serial, per_req), {"batch_size": b_best, "context_len": ctx})
            self.batching[DECODE] = fit_batch_overhead(at.index.values, at.values)
            self.batching[DECODE]["context_len"] = ctx
            self.detail["decode_tokens"] = k
        del g

    def _text_encode(self, j) -> None:
        m = j.model
        serial = batched = 0.0
        for c in j.components:
            serial += self.lat.text_encode(m, c, 1, j.tokens)
            d = self._rows(m, TEXT_ENCODE)
            d = d[d["component"] == c]
            d = d[d["num_tokens"] == _nearest(d["num_tokens"], j.tokens)]
            g = d.groupby("batch_size")["latency_ms_median"].median() / 1e3
            ratio = float((g / g.index).min() / g.iloc[0]) if len(g) else 1.0
            batched += self.lat.text_encode(m, c, 1, j.tokens) * min(1.0, ratio)
            if len(g) > 1:
                self.batching[f"text_encode:{c}"] = fit_batch_overhead(g.index, g.values)
        self._add(TEXT_ENCODE, serial, batched, None)

    def _dit_step(self, j) -> None:
        m = j.model
        one = self.lat.dit_step(m, j.weight, j.seq_len)
        serial = j.steps * one
        d = self._rows(m, DIT_STEP)
        seq = _nearest(d["seq_len"], j.seq_len)
        at_all = d[d["seq_len"] == seq].groupby("batch_size")["latency_ms_median"].median() / 1e3
        at = at_all[at_all.index >= j.weight] if (at_all.index >= j.weight).any() else at_all
        per_item = at / at.index.values                      # seconds per transformer-batch item
        b_best = int(per_item.idxmin())
        scale = one / float(at.loc[at.index.min()]) if at.index.min() == j.weight else 1.0
        batched = j.steps * j.weight * float(per_item.min()) * scale
        self._add(DIT_STEP, serial, min(serial, batched),
                  {"batch_size": b_best, "seq_len": int(seq), "cfg_weight": j.weight})
        if len(at_all) > 1:
            self.batching[DIT_STEP] = fit_batch_overhead(at_all.index.values, at_all.values)
            self.batching[DIT_STEP]["seq_len"] = int(seq)
        self.detail.update(dit_seq_len=j.seq_len, steps=j.steps, cfg_weight=j.weight,
                           dit_step_ms=one * 1e3)

    def _vae(self, j, stage: str) -> None:
        m = j.model
        serial = self.lat.vae(m, stage, 1, j.height, j.width)
        d = self._rows(m, stage).copy()
        d["pixels"] = d["height"] * d["width"]
        px = _nearest(d["pixels"], j.height * j.width)
        at = d[d["pixels"] == px].groupby("batch_size")["latency_ms_median"].median() / 1e3
        per = at / at.index.values
        ratio = float(per.min() / at.iloc[0]) if len(at) else 1.0
        self._add(stage, serial, serial * min(1.0, ratio), {"batch_size": int(per.idxmin())})
        if len(at) > 1:
            self.batching[stage] = fit_batch_overhead(at.index.values, at.values)

    def _vae_encode(self, j) -> None:
        self._vae(j, VAE_ENCODE)

    def _vae_decode(self, j) -> None:
        self._vae(j, VAE_DECODE)


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------

def llm_activation_bytes(spec: ModelSpec, tokens: int) -> int:
    """Live activations of one LLM layer step over `tokens` tokens (documented rule of thumb:
    ACT_TENSORS_LLM hidden-sized + ACT_TENSORS_MLP intermediate-sized tensors per token, plus the
    fp32 logits of the sampled rows)."""
    c = spec.llm
    if c is None:
        return 0
    b = spec.dtype_bytes
    return int(tokens * (ACT_TENSORS_LLM * c["hidden_size"] + ACT_TENSORS_MLP * c["intermediate_size"]) * b)


def dit_state_bytes(batch_items: int, seq_len: int) -> int:
    """Diffusion state + step activations per the simulator's memory model (sim/engines/memory.py)."""
    return int(batch_items * seq_len * DIFFUSION_STATE_BYTES_PER_TOKEN)


def memory_report(spec: ModelSpec, req, stages: _Stages, lat, gpu: str, util: float = 0.9,
                  max_num_batched_tokens: int = 8192) -> dict[str, Any]:
    mem = GPU_MEM_GIB.get(gpu.replace("-analytic", ""), 80.0) * GIB
    weights = model_weights_bytes(spec)
    out: dict[str, Any] = {"gpu_mem_bytes": int(mem), "gpu_memory_utilization": util,
                           "weights_bytes": weights,
                           "framework_overhead_bytes": FRAMEWORK_OVERHEAD_BYTES}
    llm_name = spec.name if spec.family in ("llm", "vlm") else spec.condition_encoder
    if llm_name:
        lspec = load_model(llm_name)
        kvpt = lspec.kv_bytes_per_token()
        ar = next(j for j in stages.hops if j.stage == AR)
        per_req_tokens = ar.tokens + ar.out_tokens
        act = llm_activation_bytes(lspec, max_num_batched_tokens)
        fixed = weights + act + FRAMEWORK_OVERHEAD_BYTES
        free = mem * util - fixed
        out.update(kv_bytes_per_token=kvpt, kv_bytes_per_request=kvpt * per_req_tokens,
                   activation_bytes=act, kv_capacity_tokens_est=max(0, int(free // kvpt)),
                   tokens_per_request=per_req_tokens)
        conc = max_concurrency(mem * util, fixed, kvpt * per_req_tokens)
        out["max_concurrency"] = conc
        out["max_concurrency_note"] = ("AR requests whose KV cache fits at once "
                                       "(before max_num_seqs caps it)")
        settings = {}
        try:
            settings = lat.engine_settings(llm_name)
        except Exception:
            pass
        meas = settings.get("kv_capacity_tokens") or (
            settings.get("num_gpu_blocks") and settings.get("block_size")
            and settings["num_gpu_blocks"] * settings["block_size"])
        if meas:
            # the estimate for the measured engine: its own GPU (LLM weights only)
            own = lspec.weights_bytes()
            mu = float(settings.get("gpu_memory_utilization", util))
            est = max(0, int((mem * mu - own - act - FRAMEWORK_OVERHEAD_BYTES) // kvpt))
            out["kv_capacity_vs_vllm"] = {"estimate_tokens": est, "vllm_tokens": int(meas),
                                          "rel_error": rel_err(est, meas),
                                          "gpu_memory_utilization": mu}
        else:
            out["kv_capacity_vs_vllm"] = {"estimate_tokens": out["kv_capacity_tokens_est"],
                                          "vllm_tokens": None, "rel_error": None,
                                          "note": "table has no vLLM engine_settings (not measured)"}
    if spec.family in ("ar_dit", "dit"):
        seq = stages.detail["dit_seq_len"]
        w = stages.detail["cfg_weight"]
        per_req = dit_state_bytes(w, seq)
        out["diffusion_state_bytes_per_request"] = per_req
        fixed = weights + FRAMEWORK_OVERHEAD_BYTES
        out["max_concurrency_dit"] = max_concurrency(mem, fixed, per_req)
        if llm_name:
            out["max_concurrency_ar"] = out["max_concurrency"]
        out["max_concurrency"] = out["max_concurrency_dit"]
        out["max_concurrency_note"] = ("DiT requests (CFG-doubled state) whose diffusion state "
                                       "fits beside all weights on one GPU")
        out["total_bytes_at_max_concurrency"] = fixed + per_req * out["max_concurrency"]
    else:
        out["total_bytes_at_max_concurrency"] = (
            weights + out["activation_bytes"] + FRAMEWORK_OVERHEAD_BYTES
            + out["kv_bytes_per_request"] * out["max_concurrency"])
    out["peak_mem_vs_profiler"] = peak_memory_checks(spec, lat)
    return out


def _est_peak(spec: ModelSpec, row, kv_alloc: int) -> int | None:
    """Estimated peak allocation of the process that measured `row` (component weights + the
    KV allocation of a vLLM engine + activations at that point)."""
    st = row.stage
    b = int(row.batch_size) if row.batch_size == row.batch_size and row.batch_size else 1
    if st in (PREFILL, DECODE, VISION_ENCODE):
        tokens = int(row.num_tokens) if row.num_tokens == row.num_tokens and row.num_tokens else b
        return spec.weights_bytes() + kv_alloc + llm_activation_bytes(spec, tokens)
    if st == DIT_STEP:
        return spec.weights_bytes(("transformer",)) + dit_state_bytes(b, int(row.seq_len))
    if st in (VAE_ENCODE, VAE_DECODE):
        c = spec.components.get("vae", {})
        ch = (c.get("block_out_channels") or [c.get("base_dim", 128)])[0]
        act = b * int(row.height) * int(row.width) * ch * spec.dtype_bytes * 4
        return spec.weights_bytes(("vae",)) + act
    if st == TEXT_ENCODE and row.component in spec.components:
        c = spec.components[row.component]
        d = c.get("d_model", c.get("hidden_size", 0))
        return spec.weights_bytes((row.component,)) + b * int(row.num_tokens) * d * spec.dtype_bytes * 8
    return None


def peak_memory_checks(spec: ModelSpec, lat) -> dict[str, Any]:
    """Per stage: median relative error of the estimated peak vs the profiler's peak_mem_bytes."""
    df = lat.frame_df(spec.name)
    df = df[df["peak_mem_bytes"].fillna(0) > 0]
    if df.empty:
        return {"note": "no peak_mem_bytes in the table (roofline or unmeasured)"}
    kv_alloc = 0
    if spec.llm is not None:
        try:
            s = lat.engine_settings(spec.name)
            if s.get("num_gpu_blocks") and s.get("block_size"):
                kv_alloc = int(s["num_gpu_blocks"]) * int(s["block_size"]) * spec.kv_bytes_per_token()
        except Exception:
            pass
    out: dict[str, Any] = {}
    for st, g in df.groupby("stage"):
        errs, pairs = [], []
        for r in g.itertuples():
            est = _est_peak(spec, r, kv_alloc)
            if est is None:
                continue
            e = rel_err(est, r.peak_mem_bytes)
            errs.append(e)
            pairs.append((int(est), int(r.peak_mem_bytes)))
        if errs:
            i = int(np.argmax(np.asarray([p[1] for p in pairs])))
            out[st] = {"points": len(errs), "median_rel_error": float(np.median(errs)),
                       "max_abs_rel_error": float(np.max(np.abs(errs))),
                       "largest_point": {"estimate_bytes": pairs[i][0], "measured_bytes": pairs[i][1]}}
    return out


# ------------------------------------------------------------------------------------------
# Parallelism
# ------------------------------------------------------------------------------------------

def parallel_report(spec: ModelSpec, stages: _Stages, bw_gb_s: float = DEFAULT_NVLINK_GB_S) -> dict:
    """TP/PP efficiency of the bottleneck-relevant stages (prefill, decode at batch 32, DiT step)."""
    out: dict[str, Any] = {"model": "TP: t1/p + layers*2 ring all-reduces (2(p-1)/p*bytes/bw + "
                                    f"{NVLINK_LATENCY_S * 1e6:.0f}us); PP: m/(m+p-1) * hop factor",
                           "nvlink_gb_s": bw_gb_s}
    cases = []
    llm_name = spec.name if spec.family in ("llm", "vlm") else spec.condition_encoder
    if llm_name and PREFILL in stages.serial:
        c = load_model(llm_name).llm
        cases.append((PREFILL, stages.serial[PREFILL], c["num_hidden_layers"],
                      stages.detail["prefill_tokens"], c["hidden_size"]))
        if DECODE in stages.serial:
            b = DECODE_BATCH_FOR_BOUND
            t = stages.lat.decode(llm_name, b, stages.detail["prefill_tokens"])
            cases.append((f"decode_step_b{b}", t, c["num_hidden_layers"], b, c["hidden_size"]))
    if DIT_STEP in stages.serial:
        inner, layers = denoiser_width_layers(spec.components["transformer"])
        text = int(spec.request_defaults.get("text_tokens", 64))
        tokens = stages.detail["cfg_weight"] * (stages.detail["dit_seq_len"] + text)
        cases.append((DIT_STEP, stages.detail["dit_step_ms"] / 1e3, layers, tokens, inner))
    for name, t1, layers, tokens, hidden in cases:
        hop = tokens * hidden * spec.dtype_bytes
        out[name] = {
            "t1_ms": t1 * 1e3,
            "tp_efficiency": {p: tp_efficiency(t1, layers, tokens, hidden, spec.dtype_bytes, p, bw_gb_s)
                              for p in (2, 4, 8)},
            "pp_efficiency_m4": {p: pp_efficiency(p, 4, t1, hop, bw_gb_s) for p in (2, 4, 8)},
            "pp_efficiency_m16": {p: pp_efficiency(p, 16, t1, hop, bw_gb_s) for p in (2, 4, 8)},
        }
    return out


# ------------------------------------------------------------------------------------------
# Simulation check
# ------------------------------------------------------------------------------------------

def saturation_config(spec: ModelSpec, req, root: Path, folder: str, rate: float,
                      num_requests: int, seed: int = 0) -> SimConfig:
    """One GPU, baseline policy, every request the typical one, arrivals far above capacity.
    Diffusion models run on the step-level engine (diffusion.engine=step_level_same_shape): the
    batched bound is that engine's rule (hops at their best batch), not vLLM-Omni's."""
    cfg = SimConfig()
    cfg.diffusion.engine = "step_level_same_shape"
    cfg.seed = seed
    cfg.profiles_dir = str(root)
    cfg.output.progress = "off"
    cfg.output.write_requests = False
    cfg.cluster.gpu = folder
    cfg.cluster.name = f"{folder}x1"
    cfg.cluster.num_gpus = 1
    cfg.cost.usd_per_gpu_hour[folder] = usd_per_gpu_hour(folder)
    cfg.latency.out_of_range = "clamp"
    w = cfg.workload
    w.name = f"typical_{spec.name}"
    w.num_requests = num_requests
    w.arrival.process, w.arrival.rate, w.arrival.shape = "gamma", rate, 1.0
    w.mix = {req.task: 1.0}
    w.task_models = {req.task: spec.name}
    side = req.input_images[0] if req.input_images else req.output_image
    if side:
        h, wd = side
        w.image.x_min = w.image.max = int(h)
        w.image.aspect_ratios = [wd / h]
    from sim.config import LengthDist
    w.prompt_tokens = LengthDist(dist="constant", mean=req.prompt_tokens, min=1, max=max(req.prompt_tokens, 1))
    w.image_prompt_tokens = LengthDist(dist="constant", mean=req.prompt_tokens, min=1, max=max(req.prompt_tokens, 1))
    w.output_tokens = LengthDist(dist="constant", mean=max(req.output_tokens, 1), min=1,
                                 max=max(req.output_tokens, 1))
    return cfg


def simulate_saturation(spec, req, root, folder, bound_batched: float, num_requests: int) -> dict:
    from sim.run.runner import Run
    cfg = saturation_config(spec, req, root, folder, rate=3.0 * bound_batched, num_requests=num_requests)
    s = Run(cfg, None, keep_rows=0).run()
    return {"request_throughput": s["request_throughput"], "num_requests": num_requests,
            "arrival_rate": cfg.workload.arrival.rate, "mean_gpu_utilization": s["utilization"]["mean_gpu"],
            "usd_per_1k_requests": s["usd_per_1k_requests"], "sim_wall_s": s["sim_wall_s"]}


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def report(model: str, gpu: str = "h100", profiles_dir: str | Path = "traces/profiles",
           simulate: bool = True, num_requests: int | None = None) -> dict[str, Any]:
    from sim.engines.latency import LatencyModel
    spec = load_model(model)
    root, folder = resolve_tables(profiles_dir, gpu, model)
    lat = LatencyModel(root, folder, "clamp")
    req = typical_request(spec)
    st = _Stages(lat, spec, req)
    serial = st.serial
    total = sum(serial.values())
    bottleneck = max(serial, key=serial.get)
    qps_serial = bound_qps(serial)
    qps_batched = bound_qps(st.batched)
    engines = lat.engines(model)
    price = usd_per_gpu_hour(folder)
    rep: dict[str, Any] = {
        "model": model, "gpu": gpu, "profiles": str(root / folder), "engines": engines,
        "measured": not folder.endswith("-analytic") and "analytic" not in engines,
        "typical_request": {"task": req.task, "prompt_tokens": req.prompt_tokens,
                            "output_tokens": req.output_tokens, "input_images": list(req.input_images),
                            "output_image": req.output_image, "steps": req.steps, "cfg": req.cfg,
                            "image_tokens_in": req.image_tokens_in,
                            "image_tokens_out": req.image_tokens_out},
        "weights_bytes": model_weights_bytes(spec),
        "kv_bytes_per_token": kv_bytes_per_token(load_model(spec.condition_encoder) if
                                                 spec.condition_encoder else spec),
        "serial_latency_ms_by_stage": {k: v * 1e3 for k, v in serial.items()},
        "serial_latency_ms": total * 1e3,
        "stage_share": {k: v / total for k, v in serial.items()},
        "bottleneck_stage": bottleneck,
        "bound_qps_serial": qps_serial,
        "batched_cost_ms_by_stage": {k: v * 1e3 for k, v in st.batched.items()},
        "best_batch_by_stage": st.best_batch,
        "bottleneck_stage_batched": max(st.batched, key=st.batched.get),
        "bound_qps_batched": qps_batched,
        "batching_gain": st.batching,
    }
    mem = memory_report(spec, req, st, lat, folder)
    rep["memory"] = mem
    rep["max_concurrency"] = mem.get("max_concurrency")
    rep["parallelism"] = parallel_report(spec, st)
    per_s = price / 3600.0
    rep["usd_per_gpu_hour"] = price
    rep["usd_per_1k_requests"] = {"serial_bound": 1000 * per_s / qps_serial,
                                  "batched_bound": 1000 * per_s / qps_batched}
    if simulate:
        n = num_requests or (400 if spec.family in ("llm", "vlm") else 120)
        sim = simulate_saturation(spec, req, root, folder, qps_batched, n)
        sim["utilization_vs_batched_bound"] = sim["request_throughput"] / qps_batched
        sim["utilization_vs_serial_bound"] = sim["request_throughput"] / qps_serial
        sim["bound_batched_rel_error"] = rel_err(qps_batched, sim["request_throughput"])
        rep["simulated"] = sim
        rep["usd_per_1k_requests"]["simulated"] = sim["usd_per_1k_requests"]
    imgs = max(len(req.input_images), 1 if req.output_image else 0)
    if imgs:
        rep["usd_per_1k_images"] = {k: v / imgs for k, v in rep["usd_per_1k_requests"].items()}
    rep["latency_model"] = lat.report()
    return rep


def parse_args(argv: list[str]) -> dict[str, str]:
    allowed = ("model", "gpu", "profiles_dir", "sim", "num_requests", "format")
    out: dict[str, str] = {}
    for tok in argv:
        if tok in ("-h", "--help"):
            raise AnalyticError(USAGE)
        if "=" not in tok:
            raise AnalyticError(f"argument {tok!r} is not key=value; allowed keys: {list(allowed)}")
        k, v = tok.split("=", 1)
        k = k.lstrip("+")
        if k not in allowed:
            raise AnalyticError(f"unknown key {k!r}; allowed keys: {list(allowed)}")
        out[k] = v
    if "model" not in out:
        raise AnalyticError(f"model= is required; allowed values: {list(available_models())}")
    if out.get("format", "table") not in ("table", "json"):
        raise AnalyticError(f"format={out['format']!r} is invalid; allowed: table, json")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
        if a["model"] not in available_models():
            raise AnalyticError(f"model={a['model']!r} is unknown; allowed values: "
                                f"{list(available_models())}")
        gpu = a.get("gpu", "h100")
        usd_per_gpu_hour(gpu)
        sim = a.get("sim", "true").lower() not in ("false", "0", "no", "off")
        n = int(a["num_requests"]) if "num_requests" in a else None
        rep = report(a["model"], gpu, a.get("profiles_dir", "traces/profiles"), sim, n)
    except (AnalyticError, ConfigError, UnknownModelError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.get("format", "table") == "json":
        print(json.dumps(rep, indent=2, default=_json_default))
    else:
        print_report(rep)
    return 0


def _ms(x: float) -> str:
    return f"{x:,.1f} ms" if x < 10_000 else f"{x / 1000:,.2f} s"


def print_report(rep: dict[str, Any]) -> None:
    """The report's headline numbers, each bound next to the check it has (format=json: all)."""
    from rich.console import Console
    from rich.table import Table

    from sim.run.output import latency_model_notes
    notes = latency_model_notes({"latency_model": rep.get("latency_model")})
    if not rep.get("measured"):
        notes.append(("", f"NOT MEASURED: analytic tables ({rep.get('profiles')})"))
    where = Path(str(rep.get("profiles")))
    if where.is_absolute() and where.is_relative_to(Path.cwd()):
        where = where.relative_to(Path.cwd())
    t = Table(title=f"analytic report: {rep['model']} on {rep['gpu']} ({where})",
              caption="\n".join(f"[bold red]{n}[/]" for _, n in notes) or None)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("check / note")
    req = rep["typical_request"]
    shape = (f"{req['prompt_tokens']} prompt + {req['output_tokens']} output tokens"
             + (f", {len(req['input_images'])} image(s) in" if req.get("input_images") else "")
             + (f", {req['output_image'][0]}x{req['output_image'][1]} out, {req['steps']} steps"
                f"{' CFG' if req.get('cfg') else ''}" if req.get("output_image") else ""))
    t.add_row("typical request", req["task"], shape)
    for st, ms in rep["serial_latency_ms_by_stage"].items():
        t.add_row(f"  {st}", _ms(ms), f"{100 * rep['stage_share'][st]:.1f}% of serial")
    t.add_row("serial latency", _ms(rep["serial_latency_ms"]), f"bottleneck {rep['bottleneck_stage']}")
    t.add_row("bound QPS, serial", f"{rep['bound_qps_serial']:.4g}", "1 / serial latency")
    t.add_row("bound QPS, batched", f"{rep['bound_qps_batched']:.4g}",
              f"bottleneck {rep['bottleneck_stage_batched']}; best batch: "
              + "; ".join(f"{k} " + " ".join(f"{kk}={vv:g}" for kk, vv in v.items())
                          if isinstance(v, dict) else f"{k} {v}"
                          for k, v in rep["best_batch_by_stage"].items()))
    sim = rep.get("simulated")
    if sim:
        t.add_row("simulated QPS (1 GPU, saturated)", f"{sim['request_throughput']:.4g}",
                  f"batched bound error {100 * sim['bound_batched_rel_error']:+.1f}%")
    for st, g in rep.get("batching_gain", {}).items():
        t.add_row(f"batching overhead a, {st}", f"{g['overhead']:.3g}",
                  f"gain {g['gain_measured'][-1]:.3g} at b={g['batch'][-1]}; fit error <= "
                  f"{100 * g['max_abs_rel_error']:.1f}%")
    mem = rep["memory"]
    t.add_row("weights", f"{mem['weights_bytes'] / 1e9:,.1f} GB", "")
    if mem.get("max_concurrency") is not None:
        t.add_row("max concurrency", f"{mem['max_concurrency']:,}", mem.get("max_concurrency_note", ""))
    kv = mem.get("kv_capacity_vs_vllm")
    if kv and kv.get("estimate_tokens") is not None:
        t.add_row("KV capacity estimate", f"{kv['estimate_tokens']:,} tokens",
                  f"vLLM measured {kv['vllm_tokens']:,}: {100 * kv['rel_error']:+.1f}%"
                  if kv.get("vllm_tokens") else "no vLLM measurement in the table")
    par = {k: v for k, v in rep.get("parallelism", {}).items() if isinstance(v, dict) and "tp_efficiency" in v}
    for st, p in par.items():
        t.add_row(f"TP efficiency, {st}", " / ".join(f"{v:.2f}" for v in p["tp_efficiency"].values()),
                  "at TP " + " / ".join(map(str, p["tp_efficiency"])))
    cost = rep["usd_per_1k_requests"]
    t.add_row("$ / 1k requests", " / ".join(f"{cost[k]:.3g}" for k in cost), " / ".join(cost)
              + f" (${rep['usd_per_gpu_hour']}/GPU-h)")
    Console(width=None if sys.stdout.isatty() else 130).print(t)
    print("all numbers: format=json")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
