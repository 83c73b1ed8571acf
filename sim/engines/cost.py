"""The cost of a stage, one rule for engines and policies: what a pass of a one-shot stage takes
(the engines run it), and what a hop is expected to take at typical batching (the policies
route and size pools by it). Times come from the latency model (profile tables)."""
from __future__ import annotations

from typing import Any, Final, Sequence

from sim.core.records import Job
from sim.engines.latency import LatencyModel
from sim.names import AR, DIT_STEP, TEXT_ENCODE, VAE_DECODE, VAE_ENCODE, VISION_ENCODE

DECODE_BATCH_FOR_ESTIMATES: Final = 32     # an AR hop's decode steps are costed at this batch


def pass_time(lat: Any, stage: str, model: str, batch: Sequence[Job]) -> float:
    """Seconds of one forward pass of a one-shot stage (vision / text encoder, VAE) over `batch`
    (jobs of one shape)."""
    j = batch[0]
    n = len(batch)
    if stage == VISION_ENCODE:          # (pre_computed: tokens whose features were cached)
        return lat.vision_encode(model, sum(x.vision_tokens - x.pre_computed for x in batch))
    if stage == TEXT_ENCODE:
        toks = max(x.tokens for x in batch)
        return sum(lat.text_encode(model, c, n, toks) for c in j.components)
    return lat.vae(model, stage, n, j.height, j.width)


def hop_work(lat: LatencyModel, job: Job, token_budget: int) -> float:
    """Serial GPU-seconds a hop costs at typical batching: an AR hop's chunked prefill (chunks
    of `token_budget` tokens) plus its decode steps at DECODE_BATCH_FOR_ESTIMATES sequences,
    a DiT hop's steps alone, a one-shot stage's pass alone."""
    m, stage = job.model, job.stage
    if stage == AR:
        todo = job.tokens - job.pre_computed          # (KV already held: not computed again)
        t = 0.0
        if todo > 0 or not job.pre_computed:
            full, rest = divmod(max(todo, 1), token_budget)   # chunked prefill
            t = full * lat.prefill(m, token_budget) + (lat.prefill(m, rest) if rest else 0.0)
        if job.vision_tokens:
            t += lat.vision_encode(m, job.vision_tokens)
        steps = job.out_tokens - max(job.pre_generated, 1)    # decode steps after the first token
        if steps > 0:
            b = DECODE_BATCH_FOR_ESTIMATES
            t += steps * lat.decode(m, b, job.tokens + job.out_tokens / 2) / b
        return t
    if stage == DIT_STEP:
        return job.steps * lat.dit_step(m, job.weight, job.seq_len)
    if stage == VISION_ENCODE or stage == TEXT_ENCODE or stage == VAE_ENCODE or stage == VAE_DECODE:
        return pass_time(lat, stage, m, (job,))
    raise ValueError(f"unknown stage {stage}")
