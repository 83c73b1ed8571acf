"""analytic backend: roofline estimates (FLOPs and HBM bytes per stage vs a GPU spec table).

latency = max(FLOPs / peak, bytes / bandwidth). Runs on the CPU; rows carry engine=analytic and
the two terms in `flops` and `hbm_bytes`, so a reader sees which bound applies. It is an
optimistic floor: measured / analytic is the efficiency the engine reaches at that point.
Precision variants (profiler.models.PRECISIONS): the matrix products of quantized components run
at the FP8 peak and read FP8 weights; attention, embeddings, LM head, text encoders and VAE stay
at the bf16 peak; the KV cache is read in its own dtype.

Two methods (`analytic.method`):
- `roofline` (default): the roofline itself, written to <out_dir>/<gpu_spec>-analytic/.
- `scaled`: an ESTIMATE for a (GPU, precision) not measured yet, from a measured table of the
  base model: every status=ok row of <out_dir>/<analytic.base>/<base model>.parquet times
  roofline(this point, gpu_spec, this precision) / roofline(the point, the base table's GPU,
  the base precision) -- i.e. the measured engine's efficiency against its roofline is assumed
  to carry over. Written to <out_dir>/<gpu_spec>-est/ with engine=analytic and the method, base
  table and ratio in every row; vLLM's measured KV capacity is carried over with the memory and
  weight-byte differences (profiler.backends.analytic.scaled_engine_settings).
"""
from __future__ import annotations

from profiler.backends.base import Backend, RunContext
from profiler.models import (DTYPE_BYTES, ModelSpec, llm_params, moe_layer_flags, moe_shape,
                             param_count, unet_walk)

# dense bf16 and fp8 tensor-core peaks (FLOP/s), HBM bandwidth (B/s), memory (bytes) as
# nvidia-smi reports it (H100 81,559 MiB; H200 143,771 MiB)
GPU_SPECS = {
    "h100": {"name": "NVIDIA H100 80GB HBM3 (SXM, datasheet)", "flops": 989e12, "flops_fp8": 1979e12,
             "bw": 3.35e12, "mem": 81559 * 2**20},
    "h200": {"name": "NVIDIA H200 (SXM, datasheet)", "flops": 989e12, "flops_fp8": 1979e12,
             "bw": 4.8e12, "mem": 143771 * 2**20},
}
PEAK_KEY = {"bfloat16": "flops", "float16": "flops", "fp8": "flops_fp8"}


def _llm_dims(c: dict) -> tuple[int, int, int, int, int]:
    h, L = c["hidden_size"], c["num_hidden_layers"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    return h, L, c["num_attention_heads"], c["num_key_value_heads"], hd


def experts_touched(E: int, k: int, tokens: float) -> float:
    """Expected distinct experts of one MoE layer that `tokens` tokens route to, each picking k
    of E uniformly: E (1 - (1 - k/E)^tokens). A decode step reads only these experts' weights."""
    if E <= 0 or tokens <= 0:
        return 0.0
    return E * (1.0 - (1.0 - k / E) ** tokens)


def llm_step_cost(spec: ModelSpec, new_tokens: int, attn_pairs: float, kv_read_tokens: int,
                  seqs: int) -> tuple[float, float, float]:
    """One engine step: `new_tokens` through the weights, `attn_pairs` query-key pairs,
    `kv_read_tokens` cached tokens read, `seqs` sequences sampled (lm_head).

    Dense models: every token meets every body weight. MoE models: a token meets the dense part
    (attention, norms, routers, shared experts) and k routed experts per sparse layer (FLOPs);
    the step reads the dense part and the experts its tokens touch (bytes). Returns (FLOPs at
    the weights' precision, FLOPs at bf16, HBM bytes), as every cost function here."""
    c = spec.llm
    h, L, nq, nkv, hd = _llm_dims(c)
    b = spec.dtype_bytes
    p = llm_params(c)
    emb = c["vocab_size"] * h
    E, k, pe, _shared = moe_shape(c)
    n_sparse = sum(moe_layer_flags(c))
    gemm = 2 * p["active_per_token"] * new_tokens                  # at the weights' precision
    flops = 2 * emb * seqs + 4 * L * nq * hd * attn_pairs          # bf16 (LM head, attention)
    kvb = spec.kv_bytes_per_token()
    read_experts = n_sparse * experts_touched(E, k, new_tokens) * pe
    # the body (dense part + the experts the step's tokens touch) in the weights' dtype; the
    # lm_head read once in the model's dtype; embeddings gathered (small)
    weight_bytes = (p["dense"] + read_experts) * DTYPE_BYTES[spec.weight_dtype("llm")] + emb * b
    act = 2 * new_tokens * h * b * L * 4
    bytes_ = weight_bytes + kvb * (kv_read_tokens + new_tokens) + act
    return _q(spec, "llm", gemm, flops, bytes_)


def _q(spec: ModelSpec, comp: str, gemm: float, other: float, bytes_: float) -> tuple[float, float, float]:
    """(FLOPs at the component's weight precision, FLOPs at bf16, HBM bytes)."""
    return float(gemm), float(other), float(bytes_)


def vision_cost(spec: ModelSpec, n_images: int, h: int, w: int) -> tuple[float, float, float]:
    c = spec.components["vision"]
    patches = (h // c["patch_size"]) * (w // c["patch_size"])
    P = param_count(c)
    win = (c["window_size"] // c["patch_size"]) ** 2
    full = len(c.get("fullatt_block_indexes", []))
    d = c["depth"]
    hid = c["hidden_size"]
    attn = n_images * (full * patches * patches + (d - full) * patches * min(win, patches))
    bytes_ = (P * DTYPE_BYTES[spec.weight_dtype("vision")]
              + 2 * patches * n_images * hid * spec.dtype_bytes * d * 6)
    return _q(spec, "vision", 2 * P * patches * n_images, 4 * hid * attn, bytes_)


def text_encoder_cost(spec: ModelSpec, comp: str, B: int, T: int) -> tuple[float, float, float]:
    c = spec.components[comp]
    P = param_count(c)
    if c["kind"] == "t5_encoder":
        emb, d, L, inner = c["vocab_size"] * c["d_model"], c["d_model"], c["num_layers"], \
            c["num_heads"] * c["d_kv"]
    else:
        emb = (c["vocab_size"] + c["max_position_embeddings"]) * c["hidden_size"]
        d, L, inner = c["hidden_size"], c["num_hidden_layers"], c["hidden_size"]
    flops = 2 * (P - emb) * B * T + 4 * L * inner * B * T * T
    bytes_ = (P - emb) * spec.dtype_bytes + B * T * d * spec.dtype_bytes * L * 8
    return 0.0, float(flops), float(bytes_)


def dit_token_params(c: dict) -> float:
    """Weights each token is multiplied by per DiT pass (the FLOP-relevant parameters).

    A dual-stream (MMDiT) block sends image tokens through the image stream and text tokens
    through the text stream, so a token meets one stream: qkv+o (4 inner^2) + 4x MLP
    (8 inner^2). A Flux single block: qkv (3) + MLP in (4) + proj_out (5). AdaLN modulation
    weights act on the timestep vector once per sample, not per token, so they are excluded."""
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    per = 12 * inner * inner * (c.get("num_layers", 0) + c.get("num_single_layers", 0))
    per += 4 * inner * inner * len(c.get("dual_attention_layers", []) or [])  # SD3.5 extra attn
    return float(per)


def unet_cost(spec: ModelSpec, B: int, H: int, W: int, T: int) -> tuple[float, float, float]:
    """A UNet step: the block walk's MACs (profiler.models.unet_walk) on the (H/8, W/8) latent,
    weights read once, activations read and written per batch item."""
    c = spec.components["transformer"]
    d = spec.latent["downsample"]
    P, macs, act = unet_walk(c, H // d, W // d, T)
    # every MAC at the bf16 peak and weights in the model's dtype, also for a precision variant:
    # FP8 (profiler.backends.diffusers_backend) replaces linear layers only, and a UNet's
    # convolutions, which the walk does not separate from them, stay bf16 (an upper bound)
    return 0.0, float(2 * macs * B), float(P * spec.dtype_bytes + act * B * spec.dtype_bytes)


def dit_cost(spec: ModelSpec, B: int, S_img: int, T: int) -> tuple[float, float, float]:
    c = spec.components["transformer"]
    P = param_count(c)
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    layers = c.get("num_layers", 0) + c.get("num_single_layers", 0) + len(
        c.get("dual_attention_layers", []) or [])
    S = S_img + T
    bytes_ = (P * DTYPE_BYTES[spec.weight_dtype("transformer")]
              + B * S * inner * spec.dtype_bytes * layers * 12)
    return _q(spec, "transformer", 2 * dit_token_params(c) * B * S,
              4 * layers * inner * B * S * S, bytes_)


def vae_cost(spec: ModelSpec, comp: str, stage: str, B: int, H: int, W: int) -> tuple[float, float, float]:
    """3x3 conv FLOPs of the ResNet pyramid (encoder: lpb resnets/level; decoder: lpb+1)."""
    c = spec.components[comp]
    ch = c.get("block_out_channels") or [c["base_dim"] * m for m in c["dim_mult"]]
    lpb = c.get("layers_per_block", c.get("num_res_blocks", 2))
    taps = 9 * (3 if c["kind"] == "qwen_image_vae" else 1)  # causal 3D convs: 3 time taps
    flops = 0.0
    act = 0.0
    n_res = lpb + (1 if stage == "vae_decode" else 0)
    for i, x in enumerate(ch):
        pix = B * (H >> i) * (W >> i)
        flops += 2 * taps * x * x * pix * 2 * n_res  # two convs per resnet
        act += pix * x * spec.dtype_bytes * 2 * n_res * 4
    mid = ch[-1]
    pix = B * (H >> (len(ch) - 1)) * (W >> (len(ch) - 1))
    flops += 2 * taps * mid * mid * pix * 4
    weights = param_count(c) / 2 * spec.dtype_bytes
    return 0.0, float(flops), float(act + weights)


def point_cost(spec: ModelSpec, p: dict) -> tuple[float, float, float]:
    """(FLOPs at the weights' precision, FLOPs at bf16, HBM bytes) of one grid point."""
    st = p["stage"]
    if st == "prefill":
        N, C, B = p["num_tokens"], p["context_len"] or 0, p["batch_size"] or 1
        D = p.get("num_decode_seqs") or 0
        Cd = p.get("decode_context") or 1024
        per = N / B
        pairs = B * (per * C + per * per / 2) + D * Cd
        return llm_step_cost(spec, N + D, pairs, B * C + D * Cd, B + D)
    if st == "decode":
        B, C = p["batch_size"], p["context_len"]
        return llm_step_cost(spec, B, B * C, B * C, B)
    if st == "vision_encode":
        return vision_cost(spec, p["batch_size"], p["height"], p["width"])
    if st == "text_encode":
        return text_encoder_cost(spec, p["component"], p["batch_size"], p["num_tokens"])
    if st == "dit_step":
        if spec.components["transformer"]["kind"] == "unet2d_condition":
            return unet_cost(spec, p["batch_size"], p["height"], p["width"], p["num_tokens"])
        return dit_cost(spec, p["batch_size"], p["seq_len"], p["num_tokens"])
    if st in ("vae_encode", "vae_decode"):
        return vae_cost(spec, p["component"], st, p["batch_size"], p["height"], p["width"])
    raise ValueError(f"analytic backend has no cost model for stage {st!r}")


def roofline_ms(spec: ModelSpec, p: dict, gpu: str = "h100") -> tuple[float, float, float]:
    """(roofline ms, FLOPs, bytes) of point p on `gpu` (a GPU_SPECS key)."""
    if gpu not in GPU_SPECS:
        raise ValueError(f"gpu_spec={gpu!r} is unknown; allowed: {sorted(GPU_SPECS)}")
    g = GPU_SPECS[gpu]
    fq, fo, b = point_cost(spec, p)
    peak_q = g[PEAK_KEY[spec.quant_dtype or spec.dtype]]
    t = max(fq / peak_q + fo / g["flops"], b / g["bw"])
    return t * 1e3, fq + fo, b


METHODS = ("roofline", "scaled")
SCALED_KEEP = ("component", "tp", "batch_size", "num_tokens", "context_len", "num_decode_seqs",
               "height", "width", "seq_len", "extra")


def scaled_engine_settings(base: dict, base_spec: ModelSpec, spec: ModelSpec, base_gpu: str,
                           gpu: str) -> dict:
    """A measured vLLM engine's settings carried to another GPU / precision: its KV capacity
    (num_gpu_blocks) moved by the memory the engine may use (gpu_memory_utilization x the GPU
    memory difference) and the weight bytes the variant saves, in the variant's KV bytes per
    token. Other keys are kept; the measured ones are kept under `base_*`."""
    out = dict(base)
    nb, bs = base.get("num_gpu_blocks"), base.get("block_size")
    if spec.llm is not None and nb and bs:
        util = float(base.get("gpu_memory_utilization", 0.9))
        kv_bytes = int(nb) * int(bs) * base_spec.kv_bytes_per_token()
        kv_bytes += util * (GPU_SPECS[gpu]["mem"] - GPU_SPECS[base_gpu]["mem"])
        kv_bytes += base_spec.weights_bytes() - spec.weights_bytes()
        kvpt = spec.kv_bytes_per_token()
        blocks = max(0, int(kv_bytes // (kvpt * int(bs))))
        out.update(base_num_gpu_blocks=nb, base_kv_capacity_tokens=base.get("kv_capacity_tokens"),
                   num_gpu_blocks=blocks, kv_capacity_tokens=blocks * int(bs), kv_bytes_per_token=kvpt)
    out.update(kv_cache_dtype=spec.kv_dtype or spec.dtype, weight_dtype=spec.quant_dtype or spec.dtype)
    return out


class AnalyticBackend(Backend):
    name = "analytic"
    flush_every = 100000  # microseconds per point: write the table once at the end

    def __init__(self) -> None:
        self.method = "roofline"
        self.base_dir = None        # scaled: the measured table set the estimate starts from
        self.base_gpu = "h100"
        self._base: dict = {}

    def configure(self, cfg) -> None:
        """The sweep's config: analytic.method / analytic.base (see the module doc)."""
        a = cfg.get("analytic") or {}
        self.method = str(a.get("method", "roofline"))
        if self.method not in METHODS:
            raise ValueError(f"analytic.method={self.method!r} is invalid; allowed: {list(METHODS)}")
        if self.method == "scaled":
            from pathlib import Path
            base = a.get("base")
            if not base:
                raise ValueError("analytic.base=None is invalid for analytic.method=scaled; allowed: "
                                 "a measured table set under out_dir, e.g. h100")
            self.base_dir = Path(str(cfg.out_dir)) / str(base)
            self.base_gpu = str(a.get("base_gpu_spec") or base)
            if self.base_gpu not in GPU_SPECS:
                raise ValueError(f"analytic.base_gpu_spec={self.base_gpu!r} is invalid; allowed: "
                                 f"{sorted(GPU_SPECS)}")

    def engine_version(self) -> str:
        return "roofline-1" if self.method == "roofline" else "roofline-1-scaled"

    def gpu_name(self, device: str) -> str:
        return "analytic"

    def base_table(self, spec):
        """The measured base-precision table of `spec`'s base model (scaled method)."""
        from profiler.models import load_model
        from profiler.schema import read_table
        base = load_model(spec.base)
        if base.name not in self._base:
            path = self.base_dir / f"{base.name}.parquet"
            if not path.exists():
                raise FileNotFoundError(f"analytic.method=scaled: base table {path} is missing "
                                        f"(measure it: python -m profiler sweep model={base.name})")
            df = read_table(path)
            df = df[(df["status"] == "ok") & (df["engine"] != "analytic")]
            if df.empty:
                raise ValueError(f"analytic.method=scaled: {path} has no measured status=ok rows")
            self._base[base.name] = df
        return base, self._base[base.name]

    def plan(self, spec, grid) -> list[dict]:
        if self.method == "scaled":
            _, df = self.base_table(spec)
            out = []
            for r in df.to_dict("records"):
                p = {k: (None if v is None or (isinstance(v, float) and v != v) else v)
                     for k, v in r.items() if k in SCALED_KEEP}
                for k in ("tp", "batch_size", "num_tokens", "context_len", "num_decode_seqs",
                          "height", "width", "seq_len"):
                    if p.get(k) is not None:
                        p[k] = int(p[k])
                p.update(model=spec.name, stage=r["stage"], _base=r)
                out.append(p)
            return out
        from profiler.grid import plan_analytic
        return plan_analytic(spec, grid)

    def measure_point(self, spec, p: dict, ctx: RunContext) -> dict:
        gpu = str(getattr(ctx.cfg, "gpu_spec", "h100"))
        base_row = p.get("_base")
        p = {k: v for k, v in p.items() if k != "_base"}
        cost_p = dict(p)
        if base_row is not None and p["stage"] == "prefill" and p.get("num_decode_seqs"):
            import json
            e = json.loads(base_row.get("extra") or "{}")
            cost_p["decode_context"] = e.get("measured_mean_context", e.get("decode_context"))
        ms, f, b = roofline_ms(spec, cost_p, gpu)
        g = GPU_SPECS[gpu]
        row = dict(p)
        settings = {"gpu_spec": gpu, **g, "bound": "compute" if f / g["flops"] > b / g["bw"]
                    else "memory", "method": self.method}
        if base_row is None:
            row.update(latency_ms_median=ms, latency_ms_p10=ms, latency_ms_p90=ms, n_samples=1)
        else:
            from profiler.models import load_model
            import json
            base = load_model(spec.base)
            ms0 = roofline_ms(base, cost_p, self.base_gpu)[0]
            ratio = ms / ms0
            row.update({k: base_row[k] * ratio for k in
                        ("latency_ms_median", "latency_ms_p10", "latency_ms_p90")
                        if base_row.get(k) == base_row.get(k) and base_row.get(k) is not None})
            row["n_samples"] = int(base_row.get("n_samples") or 1)
            measured = json.loads(base_row["engine_settings"]) if base_row.get("engine_settings") else {}
            settings = {**scaled_engine_settings(measured, base, spec, self.base_gpu, gpu),
                        **settings, "base_table": str(self.base_dir / f"{base.name}.parquet"),
                        "base_engine": base_row.get("engine"), "base_gpu": base_row.get("gpu"),
                        "base_dtype": base_row.get("dtype"), "base_git_sha": base_row.get("git_sha"),
                        "roofline_ratio": ratio,
                        "rule": f"measured {base.name} on {self.base_gpu} x roofline({spec.name}, "
                                f"{gpu}) / roofline({base.name}, {self.base_gpu})"}
        row.update(status="ok", flops=f, hbm_bytes=b, gpu=g["name"],
                   dtype=spec.quant_dtype or spec.dtype, engine_settings=settings)
        return row
