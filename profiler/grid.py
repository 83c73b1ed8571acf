"""Grid planning: which points each backend measures for a model (pure Python, no torch)."""
from __future__ import annotations

from typing import Any

from profiler.models import ModelSpec


def _g(grid: Any, key: str, default=None):
    try:
        v = grid[key]
    except (KeyError, TypeError):
        v = getattr(grid, key, default)
    if v is None:
        return default
    return [list(x) if isinstance(x, (list, tuple)) or hasattr(x, "__len__") and not isinstance(x, str)
            else x for x in v] if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and not isinstance(v, str) else v


def point(model: str, stage: str, **axes) -> dict:
    p = {"model": model, "stage": stage, "component": None, "tp": 1, "batch_size": None,
         "num_tokens": None, "context_len": None, "num_decode_seqs": None, "height": None,
         "width": None, "seq_len": None}
    p.update(axes)
    return p


def dit_components(spec: ModelSpec) -> list[str]:
    return [c for c, v in spec.components.items() if v["kind"].endswith("dit")]


def vae_component(spec: ModelSpec) -> str | None:
    for c, v in spec.components.items():
        if v["kind"] in ("autoencoder_kl", "qwen_image_vae"):
            return c
    return None


def has_edit(spec: ModelSpec) -> bool:
    """Edit = condition latents concatenated to the sequence (Qwen-Image-Edit, FLUX Kontext)."""
    return bool(spec.edit_hf_id) and spec.components.get("transformer", {}).get("kind") in (
        "qwen_image_mmdit", "flux_dit")


def plan_diffusers(spec: ModelSpec, grid: Any) -> list[dict]:
    pts: list[dict] = []
    m = spec.name
    # text encoders
    for comp in spec.text_encoders:
        kind = spec.components[comp]["kind"]
        lens = _g(grid, "text_t5_tokens") if kind == "t5_encoder" else _g(grid, "text_clip_tokens")
        maxlen = spec.components[comp].get("max_length") or spec.components[comp].get(
            "max_position_embeddings", 10**9)
        for T in lens:
            if kind == "clip_text":
                T = min(T, maxlen)
            for B in _g(grid, "text_batch"):
                pts.append(point(m, "text_encode", component=comp, batch_size=B, num_tokens=T))
    # VAE
    vae = vae_component(spec)
    if vae:
        for stage in ("vae_decode", "vae_encode"):
            for H, W in _g(grid, "vae_resolutions"):
                for B in _g(grid, "vae_batch"):
                    if B * H * W > _g(grid, "vae_max_pixels"):
                        continue
                    pts.append(point(m, stage, component=vae, batch_size=B, height=H, width=W))
    # DiT steps
    if "transformer" in spec.components:
        T0 = int(spec.request_defaults.get("text_tokens", 256))
        dit: list[dict] = []
        for H, W in _g(grid, "dit_resolutions"):
            S = spec.latent_tokens(H, W)
            for B in _g(grid, "dit_batch"):
                if B * S > _g(grid, "dit_max_tokens") and B > 1:
                    continue
                dit.append(point(m, "dit_step", component="transformer", batch_size=B,
                                 num_tokens=T0, height=H, width=W, seq_len=S))
        for T in _g(grid, "dit_text_extra", []):
            if T != T0:
                dit.append(point(m, "dit_step", component="transformer", batch_size=1,
                                 num_tokens=T, height=1024, width=1024,
                                 seq_len=spec.latent_tokens(1024, 1024)))
        if has_edit(spec):
            for H, W in _g(grid, "edit_resolutions"):
                S = 2 * spec.latent_tokens(H, W)
                for B in _g(grid, "edit_batch"):
                    if B * S > _g(grid, "dit_max_tokens") and B > 1:
                        continue
                    dit.append(point(m, "dit_step", component="transformer", batch_size=B,
                                     num_tokens=T0, height=H, width=W, seq_len=S))
        dit.sort(key=lambda p: p["batch_size"] * (p["seq_len"] + p["num_tokens"]))
        pts.extend(dit)
    return pts


def vllm_max_model_len(spec: ModelSpec) -> int:
    return int(spec.llm["max_position_embeddings"])


def plan_vllm(spec: ModelSpec, grid: Any, max_num_batched_tokens: int = 8192,
              max_num_seqs: int = 256) -> list[dict]:
    """AR points: pure prefill, prefill at context>0, decode (B, C), mixed, vision_encode."""
    m = spec.name
    L = vllm_max_model_len(spec)
    pts: list[dict] = []
    if spec.image_tokenizer and "vision" in spec.components:
        for H, W in _g(grid, "vision_sizes"):
            rh, rw = spec.resized_input(H, W)
            tok = spec.image_input_tokens(H, W)
            for n in _g(grid, "vision_counts"):
                if n * tok > _g(grid, "vision_max_tokens") and n > 1:
                    continue
                pts.append(point(m, "vision_encode", component="vision", batch_size=n,
                                 num_tokens=tok, height=rh, width=rw))
    for N in _g(grid, "prefill_tokens"):
        if N > max_num_batched_tokens:
            continue
        nseq = max(1, -(-N // (L - 1)))  # prompts longer than the model holds: split in seqs
        pts.append(point(m, "prefill", batch_size=nseq, num_tokens=N, context_len=0,
                         num_decode_seqs=0))
    for C in _g(grid, "prefill_context"):
        for N in _g(grid, "prefill_context_chunks"):
            if C + N <= L and N <= max_num_batched_tokens:
                pts.append(point(m, "prefill", batch_size=1, num_tokens=N, context_len=C,
                                 num_decode_seqs=0))
    for C in _g(grid, "decode_context"):
        C = min(C, L - 256)
        for B in _g(grid, "decode_batch"):
            if B <= max_num_seqs:
                pts.append(point(m, "decode", batch_size=B, num_tokens=B, context_len=C))
    for C in _g(grid, "mixed_context"):
        C = min(C, L - 256)
        for B in _g(grid, "mixed_decode_batch"):
            for N in _g(grid, "mixed_chunk"):
                if B + N <= max_num_batched_tokens and B < max_num_seqs and N < L:
                    pts.append(point(m, "prefill", batch_size=1, num_tokens=N, context_len=0,
                                     num_decode_seqs=B))
                    pts[-1]["decode_context"] = C
    # de-duplicate (capped contexts can collide)
    seen, out = set(), []
    for p in pts:
        k = tuple(sorted((a, b) for a, b in p.items()))
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def plan_analytic(spec: ModelSpec, grid: Any) -> list[dict]:
    """The union of what the GPU backends measure for this model."""
    pts: list[dict] = []
    if spec.llm is not None:
        pts += plan_vllm(spec, grid)
    if spec.family in ("dit", "ar_dit"):
        pts += plan_diffusers(spec, grid)
    return pts
