"""What a request needs: the hops (jobs) of its model's pipeline for its task, and the bytes
each hop hands to the next (for transfer costs between GPUs)."""
from __future__ import annotations

from profiler.models import ModelSpec, load_model
from sim.request import Request
from sim.servers.jobs import PRIORITY, Job


def plan_hops(req: Request, fused: bool) -> list[Job]:
    """fused=True: vision encoding runs inside the AR step (vLLM-style, one engine does it all);
    fused=False: a separate encoder stage runs first (disaggregated)."""
    spec = load_model(req.model)
    prio = PRIORITY.get(req.slo_class, 1)
    hops: list[Job] = []

    def job(stage: str, model: str, **kw) -> Job:
        j = Job(req, stage, model, priority=prio, **kw)
        hops.append(j)
        return j

    img_in = req.image_tokens_in
    if spec.family in ("llm", "vlm"):
        if img_in and not fused:
            job("vision_encode", spec.name, vision_tokens=img_in)
        job("ar", spec.name, tokens=req.prompt_tokens + img_in,
            vision_tokens=img_in if fused else 0, out_tokens=req.output_tokens)
        return hops

    out_h, out_w = req.output_image or (spec.defaults["height"], spec.defaults["width"])
    seq = spec.latent_tokens(out_h, out_w)
    if spec.family == "ar_dit":
        cond = spec.condition_encoder
        assert cond is not None, f"{spec.name}: an ar_dit model names its condition encoder"
        if img_in and not fused:
            job("vision_encode", cond, vision_tokens=img_in)
        job("ar", cond, tokens=req.prompt_tokens + img_in, vision_tokens=img_in if fused else 0,
            out_tokens=0)
    else:
        job("text_encode", spec.name, tokens=int(spec.defaults.get("text_tokens", req.prompt_tokens)),
            components=spec.text_encoders)
    if req.input_images:
        in_h, in_w = req.input_images[0]
        job("vae_encode", spec.name, height=in_h, width=in_w)
        if req.task == "edit":
            seq += spec.latent_tokens(in_h, in_w)     # condition latents join the sequence
    job("dit_step", spec.name, seq_len=seq, steps=req.steps or spec.defaults["steps"],
        weight=2 if req.cfg else 1, tokens=req.prompt_tokens)
    job("vae_decode", spec.name, height=out_h, width=out_w)
    return hops


def handoff_bytes(job: Job) -> int:
    """Bytes the output of `job` carries to the next hop."""
    spec: ModelSpec = load_model(job.model)
    if job.stage == "vision_encode":
        return job.vision_tokens * spec.components["vision"]["out_hidden_size"] * spec.dtype_bytes
    if job.stage == "ar":
        return job.tokens * spec.components["llm"]["hidden_size"] * spec.dtype_bytes
    if job.stage == "text_encode":
        return job.tokens * spec.components["transformer"]["joint_attention_dim"] * spec.dtype_bytes
    if job.stage in ("vae_encode",):
        return spec.latent_bytes(job.height, job.width)
    if job.stage == "dit_step":
        return job.seq_len * spec.latent["patch_size"] ** 2 * spec.latent["channels"] * spec.dtype_bytes
    return 0
