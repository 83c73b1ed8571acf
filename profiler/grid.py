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


# --- vllm_omni: requests through vLLM-Omni's server, stages timed by its pipeline profiler ------

QWEN_TEMPLATE_TOKENS = 34 + 5     # generate template around the prompt (profiler/omni_models.py)
QWEN_EDIT_TEMPLATE_TOKENS = 67 - 1 + 5   # edit template, its one <|image_pad|> excluded
QWEN_EDIT_DROP = 64               # tokens vLLM-Omni drops from the edit encoder output
QWEN_EDIT_CONDITION_PIXELS = 1024 * 1024   # pipeline_qwen_image_edit.py:101 calculate_dimensions


def qwen_edit_condition(height: int, width: int) -> tuple[int, int]:
    """(h, w) of Qwen-Image-Edit's condition image in vLLM-Omni 0.26.0: the input resized to
    about 1 MP at its aspect ratio, sides rounded to 32 (pipeline_qwen_image_edit.py:101, 156-165;
    the same copy feeds the VAE encoder and the Qwen2.5-VL encoder)."""
    import math
    ratio = width / height
    w = math.sqrt(QWEN_EDIT_CONDITION_PIXELS * ratio)
    h = w / ratio
    return int(round(h / 32) * 32), int(round(w / 32) * 32)


def plan_vllm_omni(spec: ModelSpec, grid: Any) -> list[dict]:
    """Points the vllm_omni backend measures. Each point names the request shape that measures it
    (`served` server, `batch` requests, output `height` x `width`, `words` prompt words), so
    points of one shape share their requests:
    - dit_step (transformer, B, H, W): one transformer forward at batch B, no CFG (the slope of
      vLLM-Omni's `diffuse` time over two step counts); seq_len = image tokens (+ condition
      tokens for edits), num_tokens = text tokens the transformer sees;
    - vae_decode (B, H, W), vae_encode (the edit condition), text_encode (the condition encoder:
      Qwen2.5-VL text-only for generate, with the condition image for edits; CLIP-L and T5 for FLUX).
    Qwen-Image points come from two servers (QwenImagePipeline, QwenImageEditPipeline); edits run
    one at a time (the edit pipeline has no request batching)."""
    from profiler.models import load_model, qwen2vl_smart_resize
    m = spec.name
    kind = spec.components.get("transformer", {}).get("kind")
    if kind not in ("qwen_image_mmdit", "flux_dit"):
        raise ValueError(f"backend=vllm_omni serves qwen_image and flux1_dev; model={m!r} is not one")
    qwen = kind == "qwen_image_mmdit"
    served = "qwen_image" if qwen else "flux1_dev"
    words0 = int(spec.request_defaults.get("text_tokens", 64)) - 5 if qwen else 16
    t_dit = words0 + 5 if qwen else int(spec.components["t5_xxl"].get("max_length", 512))
    cap = _g(grid, "dit_max_tokens")
    pts: list[dict] = []
    for H, W in _g(grid, "omni_resolutions"):
        S = spec.latent_tokens(H, W)
        for B in _g(grid, "omni_batch"):
            if B * S > cap and B > 1:
                continue
            shape = dict(served=served, batch=B, req_height=H, req_width=W, words=words0)
            pts.append(point(m, "dit_step", component="transformer", batch_size=B, num_tokens=t_dit,
                             height=H, width=W, seq_len=S, **shape))
            pts.append(point(m, "vae_decode", component=vae_component(spec), batch_size=B,
                             height=H, width=W, **shape))
    for B in _g(grid, "omni_text_batch"):
        if qwen:
            for words in _g(grid, "omni_text_words"):
                pts.append(point(m, "text_encode", component="text_encoder", batch_size=B,
                                 num_tokens=QWEN_TEMPLATE_TOKENS + words,
                                 served=served, batch=B, req_height=256, req_width=256, words=words))
        else:
            shape = dict(served=served, batch=B, req_height=256, req_width=256, words=words0)
            pts.append(point(m, "text_encode", component="clip_l", batch_size=B, num_tokens=77, **shape))
            pts.append(point(m, "text_encode", component="t5_xxl", batch_size=B, num_tokens=t_dit, **shape))
    if qwen:
        enc = load_model(spec.condition_encoder or "qwen2_5_vl_7b")
        tok = enc.image_tokenizer
        for H, W in _g(grid, "omni_edit_resolutions"):
            ch, cw = qwen_edit_condition(H, W)
            rh, rw = qwen2vl_smart_resize(ch, cw, tok["patch_size"] * tok["merge_size"],
                                          tok["min_pixels"], tok["max_pixels"])
            n_img = (rh // tok["patch_size"]) * (rw // tok["patch_size"]) // tok["merge_size"] ** 2
            vl_len = QWEN_EDIT_TEMPLATE_TOKENS + n_img + words0
            shape = dict(served="qwen_image_edit", batch=1, req_height=H, req_width=W, words=words0,
                         condition_height=ch, condition_width=cw, condition_image_tokens=n_img)
            pts.append(point(m, "dit_step", component="transformer", batch_size=1,
                             num_tokens=vl_len - QWEN_EDIT_DROP, height=H, width=W,
                             seq_len=spec.latent_tokens(H, W) + spec.latent_tokens(ch, cw), **shape))
            pts.append(point(m, "vae_encode", component=vae_component(spec), batch_size=1,
                             height=ch, width=cw, **shape))
            pts.append(point(m, "text_encode", component="text_encoder_vl", batch_size=1,
                             num_tokens=vl_len, height=ch, width=cw, **shape))
    # de-duplicate on the point key (an edit condition can repeat across output sizes)
    from profiler.schema import point_key
    seen: set = set()
    out = []
    for p in pts:
        k = point_key(p)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


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
