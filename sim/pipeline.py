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
    add = hops.append       # (Job called directly: compiled, a native call, no **kwargs parsing)

    img_in = req.image_tokens_in
    if spec.family in ("llm", "vlm"):
        if img_in and not fused:
            add(Job(req, "vision_encode", spec.name, priority=prio, vision_tokens=img_in))
        add(Job(req, "ar", spec.name, priority=prio, tokens=req.prompt_tokens + img_in,
                vision_tokens=img_in if fused else 0, out_tokens=req.output_tokens))
        return hops

    out_h, out_w = req.output_image or (spec.defaults["height"], spec.defaults["width"])
    seq = spec.latent_tokens(out_h, out_w)
    if spec.family == "ar_dit":
        cond = spec.condition_encoder
        assert cond is not None, f"{spec.name}: an ar_dit model names its condition encoder"
        if img_in and not fused:
            add(Job(req, "vision_encode", cond, priority=prio, vision_tokens=img_in))
        add(Job(req, "ar", cond, priority=prio, tokens=req.prompt_tokens + img_in,
                vision_tokens=img_in if fused else 0, out_tokens=0))
    else:
        add(Job(req, "text_encode", spec.name, priority=prio,
                tokens=int(spec.defaults.get("text_tokens", req.prompt_tokens)),
                components=spec.text_encoders))
    if req.input_images:
        in_h, in_w = req.input_images[0]
        add(Job(req, "vae_encode", spec.name, priority=prio, height=in_h, width=in_w))
        if req.task == "edit":
            seq += spec.latent_tokens(in_h, in_w)     # condition latents join the sequence
    add(Job(req, "dit_step", spec.name, priority=prio, seq_len=seq,
            steps=req.steps or spec.defaults["steps"], weight=2 if req.cfg else 1,
            tokens=req.prompt_tokens))
    add(Job(req, "vae_decode", spec.name, priority=prio, height=out_h, width=out_w))
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
