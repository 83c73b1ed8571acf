"""End-to-end diffusers FluxPipeline latency (FLUX.1-dev shapes, random weights) for validation.

Builds the real `diffusers.FluxPipeline` from the yaml shapes (transformer + VAE with random
weights; text encoders and tokenizers left out: precomputed random prompt embeddings are passed,
as a serving system with a separate encoder pool would do), then times whole requests
(`pipe(...)` wall clock, CUDA-synchronised) at each (resolution, batch). Writes JSON with
provenance so `sim` can compare its sum-of-stages prediction with a real pipeline run.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def build_flux_pipeline(spec, device: str, dtype_name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from profiler.backends.diffusers_backend import build_component
    transformer = build_component(spec, "transformer", device, dtype_name)
    vae = build_component(spec, "vae", device, dtype_name)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_flux_e2e(cfg) -> dict:
    import torch

    from profiler.backends.diffusers_backend import torch_dtype
    from profiler.models import load_model
    from profiler.sweep import command_line, git_sha, now_iso
    e = cfg.e2e
    spec = load_model(str(e.model))
    dev = str(cfg.device)
    dtype = torch_dtype(str(cfg.dtype))
    pipe = build_flux_pipeline(spec, dev, str(cfg.dtype))
    c = spec.components["transformer"]
    T = int(spec.request_defaults.get("text_tokens", 512))
    results = []
    cuda = dev.startswith("cuda")

    def call(H, W, B, steps):
        g = torch.Generator(device="cpu").manual_seed(0)
        pe = torch.randn(B, T, c["joint_attention_dim"], generator=g).to(dev, dtype)
        pp = torch.randn(B, c["pooled_projection_dim"], generator=g).to(dev, dtype)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, height=H, width=W,
                   num_inference_steps=steps, guidance_scale=3.5, output_type="pil",
                   max_sequence_length=T)
        if cuda:
            torch.cuda.synchronize()
        assert len(out.images) == B
        return (time.perf_counter() - t0) * 1e3

    call(int(e.resolutions[0]), int(e.resolutions[0]), 1, 2)  # warm-up
    for R in e.resolutions:
        for B in e.batches:
            R, B = int(R), int(B)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                lat = [call(R, R, B, int(e.steps)) for _ in range(int(e.repeats))]
                rec = {"height": R, "width": R, "batch_size": B, "steps": int(e.steps),
                       "guidance_scale": 3.5, "cfg": False, "text_tokens": T,
                       "latency_ms": lat, "latency_ms_median": statistics.median(lat),
                       "peak_mem_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
                       "status": "ok"}
            except torch.cuda.OutOfMemoryError as ex:
                rec = {"height": R, "width": R, "batch_size": B, "steps": int(e.steps),
                       "status": "oom", "error": str(ex)[:200]}
                torch.cuda.empty_cache()
            print(f"[e2e] {R}x{R} B={B}: {rec.get('latency_ms_median')} ms", flush=True)
            results.append(rec)
    import diffusers
    doc = {
        "what": "diffusers FluxPipeline end-to-end request latency (FLUX.1-dev shapes, random "
                "weights, precomputed prompt embeddings; includes denoising loop, VAE decode, "
                "PIL post-processing; excludes text encoders)",
        "model": spec.name, "pipeline": "diffusers.FluxPipeline",
        "provenance": {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
                       "engine": "diffusers", "engine_version": diffusers.__version__,
                       "torch_version": torch.__version__, "dtype": str(cfg.dtype),
                       "git_sha": git_sha(cfg.git_sha), "measured_at": now_iso(),
                       "command": command_line()},
        "results": results,
    }
    out = Path(str(e.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"[e2e] wrote {out}")
    return doc
