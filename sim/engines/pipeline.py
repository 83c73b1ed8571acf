"""What a request needs: the hops (jobs) of its model's pipeline for its task, and the bytes
each hop hands to the next (for transfer costs between GPUs)."""
from __future__ import annotations

from typing import Any

from profiler.models import ModelSpec, load_model
from sim.core.records import Job, Request
from sim.engines.queues import PRIORITY
from sim.names import AR, DIT_STEP, EDIT, TEXT_ENCODE, VAE_DECODE, VAE_ENCODE, VISION_ENCODE


# model name -> (its spec, (h, w) -> tokens): a spec's image-token counts, read once per size
_LATENT: dict[str, tuple[Any, dict[tuple[int, int], int]]] = {}
_IMAGE_IN: dict[str, tuple[Any, dict[tuple[int, int], int]]] = {}


def _sized(memo: dict[str, tuple[Any, dict[tuple[int, int], int]]], spec: Any
           ) -> dict[tuple[int, int], int]:
    e = memo.get(spec.name)
    if e is None or e[0] is not spec:       # (a spec made again under its name: its own counts)
        e = memo[spec.name] = (spec, {})
    return e[1]


def latent_tokens(spec: Any, h: int, w: int) -> int:
    """spec.latent_tokens(h, w) (profiler.models.ModelSpec), computed once per model and size:
    the per-request callers are compiled, the spec's method is not."""
    d = _sized(_LATENT, spec)
    v = d.get((h, w))
    if v is None:
        v = d[(h, w)] = spec.latent_tokens(h, w)
    return v


def image_input_tokens(spec: Any, h: int, w: int) -> int:
    """spec.image_input_tokens(h, w), computed once per model and size (as latent_tokens)."""
    d = _sized(_IMAGE_IN, spec)
    v = d.get((h, w))
    if v is None:
        v = d[(h, w)] = spec.image_input_tokens(h, w)
    return v


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
            add(Job(req, VISION_ENCODE, spec.name, priority=prio, vision_tokens=img_in))
        add(Job(req, AR, spec.name, priority=prio, tokens=req.prompt_tokens + img_in,
                vision_tokens=img_in if fused else 0, out_tokens=req.output_tokens))
        return hops

    out_h, out_w = req.output_image or (spec.request_defaults["height"], spec.request_defaults["width"])
    seq = latent_tokens(spec, out_h, out_w)
    if spec.family == "ar_dit":
        cond = spec.condition_encoder
        assert cond is not None, f"{spec.name}: an ar_dit model names its condition encoder"
        if img_in and not fused:
            add(Job(req, VISION_ENCODE, cond, priority=prio, vision_tokens=img_in))
        add(Job(req, AR, cond, priority=prio, tokens=req.prompt_tokens + img_in,
                vision_tokens=img_in if fused else 0, out_tokens=0))
    else:
        add(Job(req, TEXT_ENCODE, spec.name, priority=prio,
                tokens=int(spec.request_defaults.get("text_tokens", req.prompt_tokens)),
                components=spec.text_encoders))
    for i, (in_h, in_w) in enumerate(req.input_images):   # each input image: its own VAE encode
        add(Job(req, VAE_ENCODE, spec.name, priority=prio, height=in_h, width=in_w, tokens=i))
        if req.task == EDIT:
            seq += latent_tokens(spec, in_h, in_w)     # condition latents join the sequence
    add(Job(req, DIT_STEP, spec.name, priority=prio, seq_len=seq,
            steps=req.steps or spec.request_defaults["steps"], weight=2 if req.cfg else 1,
            tokens=req.prompt_tokens))
    add(Job(req, VAE_DECODE, spec.name, priority=prio, height=out_h, width=out_w))
    return hops


def split_prefill_decode(hops: list[Job]) -> list[Job]:
    """Prefill/decode disaggregation (DistServe / Splitwise): an AR hop with more than one output
    token becomes a prefill hop (the prompt and the first token) and a decode hop that arrives
    holding the prompt's KV (pre_computed) and the first token (pre_generated)."""
    out: list[Job] = []
    for j in hops:
        if j.stage == AR and j.out_tokens > 1:
            out.append(j)
            out.append(Job(j.req, AR, j.model, priority=j.priority, tokens=j.tokens,
                           out_tokens=j.out_tokens, pre_computed=j.tokens, pre_generated=1))
            j.out_tokens = 1
        else:
            out.append(j)
    return out


def kv_handoff_bytes(job: Job) -> int:
    """KV-cache bytes a prefill hop hands to its decode hop: every prompt token's K and V in
    every layer (2 x layers x kv_heads x head_dim x the KV dtype's bytes per token)."""
    return job.tokens * load_model(job.model).kv_bytes_per_token()


# model -> bytes per unit of each stage's hand-off size (vision / prompt tokens, latent
# tokens): the products handoff_bytes multiplies by, where all are integers (so the same
# figures, exactly); -1 where not (or missing: _handoff_bytes_spec then)
_PER_UNIT: dict[str, tuple[int, int, int, int]] = {}


def _product(spec: ModelSpec, part: str, keys: tuple[str, ...], square: str = "") -> int:
    try:
        d = spec.latent if part == "latent" else spec.components[part]
        fs = [d[k] for k in keys] + [spec.dtype_bytes]
        if square:
            fs = [d[square], d[square]] + fs
    except (KeyError, TypeError):
        return -1
    out = 1
    for f in fs:
        if type(f) is not int:
            return -1
        out *= f
    return out


def _per_unit(model: str) -> tuple[int, int, int, int]:
    t = _PER_UNIT.get(model)
    if t is None:
        spec: ModelSpec = load_model(model)
        t = (_product(spec, "vision", ("out_hidden_size",)), _product(spec, "llm", ("hidden_size",)),
             _product(spec, "transformer", ("joint_attention_dim",)),
             _product(spec, "latent", ("channels",), "patch_size"))
        _PER_UNIT[model] = t
    return t


def handoff_bytes(job: Job) -> int:
    """Bytes the output of `job` carries to the next hop."""
    stage = job.stage
    if stage == VAE_ENCODE:
        return load_model(job.model).latent_bytes(job.height, job.width)
    i = _STAGE_INDEX.get(stage, -1)
    if i < 0:
        return 0
    per = _per_unit(job.model)[i]
    if per >= 0:
        return (job.seq_len if i == 3 else job.vision_tokens if i == 0 else job.tokens) * per
    return _handoff_bytes_spec(job)


_STAGE_INDEX = {VISION_ENCODE: 0, AR: 1, TEXT_ENCODE: 2, DIT_STEP: 3}


def _handoff_bytes_spec(job: Job) -> int:
    """handoff_bytes from the model spec's fields: for models whose per-unit products are not
    all integers (_PER_UNIT holds -1 there)."""
    spec: ModelSpec = load_model(job.model)
    if job.stage == VISION_ENCODE:
        return job.vision_tokens * spec.components["vision"]["out_hidden_size"] * spec.dtype_bytes
    if job.stage == AR:
        return job.tokens * spec.components["llm"]["hidden_size"] * spec.dtype_bytes
    if job.stage == TEXT_ENCODE:
        return job.tokens * spec.components["transformer"]["joint_attention_dim"] * spec.dtype_bytes
    if job.stage == VAE_ENCODE:
        return spec.latent_bytes(job.height, job.width)
    if job.stage == DIT_STEP:
        return job.seq_len * spec.latent["patch_size"] ** 2 * spec.latent["channels"] * spec.dtype_bytes
    return 0
