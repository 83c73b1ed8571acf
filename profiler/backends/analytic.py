"""analytic backend: roofline estimates (FLOPs and HBM bytes per stage vs a GPU spec table).

latency = max(FLOPs / peak, bytes / bandwidth). Runs on the CPU; rows carry engine=analytic and
the two terms in `flops` and `hbm_bytes`, so a reader sees which bound applies. It is an
optimistic floor: measured / analytic is the efficiency the engine reaches at that point.
"""
from __future__ import annotations

from profiler.backends.base import Backend, RunContext
from profiler.models import ModelSpec, llm_params, moe_layer_flags, moe_shape, param_count, unet_walk

# dense bf16 tensor-core peak (FLOP/s), HBM bandwidth (B/s), memory (bytes)
GPU_SPECS = {
    "h100": {"name": "NVIDIA H100 80GB HBM3 (SXM, datasheet)", "flops": 989e12, "bw": 3.35e12,
             "mem": 80e9},
    "h200": {"name": "NVIDIA H200 (SXM, datasheet)", "flops": 989e12, "bw": 4.8e12, "mem": 141e9},
}


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
                  seqs: int) -> tuple[float, float]:
    """One engine step: `new_tokens` through the weights, `attn_pairs` query-key pairs,
    `kv_read_tokens` cached tokens read, `seqs` sequences sampled (lm_head).

    Dense models: every token meets every body weight. MoE models: a token meets the dense part
    (attention, norms, routers, shared experts) and k routed experts per sparse layer (FLOPs);
    the step reads the dense part and the experts its tokens touch (bytes)."""
    c = spec.llm
    h, L, nq, nkv, hd = _llm_dims(c)
    b = spec.dtype_bytes
    p = llm_params(c)
    emb = c["vocab_size"] * h
    E, k, pe, _shared = moe_shape(c)
    n_sparse = sum(moe_layer_flags(c))
    flops = 2 * p["active_per_token"] * new_tokens + 2 * emb * seqs + 4 * L * nq * hd * attn_pairs
    kvb = spec.kv_bytes_per_token()
    read_experts = n_sparse * experts_touched(E, k, new_tokens) * pe
    weight_bytes = (p["dense"] + read_experts + emb) * b  # lm_head read once; embeddings gathered
    act = 2 * new_tokens * h * b * L * 4
    bytes_ = weight_bytes + kvb * (kv_read_tokens + new_tokens) + act
    return float(flops), float(bytes_)


def vision_cost(spec: ModelSpec, n_images: int, h: int, w: int) -> tuple[float, float]:
    c = spec.components["vision"]
    patches = (h // c["patch_size"]) * (w // c["patch_size"])
    P = param_count(c)
    win = (c["window_size"] // c["patch_size"]) ** 2
    full = len(c.get("fullatt_block_indexes", []))
    d = c["depth"]
    hid = c["hidden_size"]
    attn = n_images * (full * patches * patches + (d - full) * patches * min(win, patches))
    flops = 2 * P * patches * n_images + 4 * hid * attn
    bytes_ = P * spec.dtype_bytes + 2 * patches * n_images * hid * spec.dtype_bytes * d * 6
    return float(flops), float(bytes_)


def text_encoder_cost(spec: ModelSpec, comp: str, B: int, T: int) -> tuple[float, float]:
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
    return float(flops), float(bytes_)


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


def unet_cost(spec: ModelSpec, B: int, H: int, W: int, T: int) -> tuple[float, float]:
    """A UNet step: the block walk's MACs (profiler.models.unet_walk) on the (H/8, W/8) latent,
    weights read once, activations read and written per batch item."""
    c = spec.components["transformer"]
    d = spec.latent["downsample"]
    P, macs, act = unet_walk(c, H // d, W // d, T)
    return float(2 * macs * B), float(P * spec.dtype_bytes + act * B * spec.dtype_bytes)


def dit_cost(spec: ModelSpec, B: int, S_img: int, T: int) -> tuple[float, float]:
    c = spec.components["transformer"]
    P = param_count(c)
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    layers = c.get("num_layers", 0) + c.get("num_single_layers", 0) + len(
        c.get("dual_attention_layers", []) or [])
    S = S_img + T
    flops = 2 * dit_token_params(c) * B * S + 4 * layers * inner * B * S * S
    bytes_ = P * spec.dtype_bytes + B * S * inner * spec.dtype_bytes * layers * 12
    return float(flops), float(bytes_)


def vae_cost(spec: ModelSpec, comp: str, stage: str, B: int, H: int, W: int) -> tuple[float, float]:
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
    return float(flops), float(act + weights)


def point_cost(spec: ModelSpec, p: dict) -> tuple[float, float]:
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
    g = GPU_SPECS[gpu]
    f, b = point_cost(spec, p)
    return max(f / g["flops"], b / g["bw"]) * 1e3, f, b


class AnalyticBackend(Backend):
    name = "analytic"
    flush_every = 100000  # microseconds per point: write the table once at the end

    def engine_version(self) -> str:
        return "roofline-1"

    def gpu_name(self, device: str) -> str:
        return "analytic"

    def plan(self, spec, grid) -> list[dict]:
        from profiler.grid import plan_analytic
        return plan_analytic(spec, grid)

    def measure_point(self, spec, p: dict, ctx: RunContext) -> dict:
        gpu = str(getattr(ctx.cfg, "gpu_spec", "h100"))
        ms, f, b = roofline_ms(spec, p, gpu)
        row = dict(p)
        row.update(latency_ms_median=ms, latency_ms_p10=ms, latency_ms_p90=ms, n_samples=1,
                   status="ok", flops=f, hbm_bytes=b, gpu=GPU_SPECS[gpu]["name"],
                   engine_settings={"gpu_spec": gpu, **GPU_SPECS[gpu],
                                    "bound": "compute" if f / GPU_SPECS[gpu]["flops"] >
                                    b / GPU_SPECS[gpu]["bw"] else "memory"})
        return row
