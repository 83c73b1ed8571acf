"""Prefill/decode disaggregation (DistServe, Splitwise) as placements: stage pools whose LLM pool
is split into a prefill pool and a decode pool per model.

A text-out request's AR hop becomes two hops (sim.engines.pipeline.split_prefill_decode): the
prefill hop (prompt, images, first token) on a prefill GPU, then the decode hop on a decode GPU,
which it reaches after its prompt's KV cache has crossed the link: kv_bytes_per_token (2 x layers
x kv_heads x head_dim x the KV dtype's bytes, from the model shape) x prompt tokens over NVLink
(cluster.nvlink_gb_s) inside a node or the network (cluster.network_gb_s) across nodes, plus
cluster.transfer_latency_us. The decode GPU allocates KV blocks for the prompt on admission and
only decodes; a preempted decode recomputes its context there, as vLLM does. Prefill-only hops
(a DiT's condition encoder) stay on the prefill pool. Pools are sized in proportion to offered
work (prefill: chunked-prefill time; decode: decode steps at sim.engines.cost's typical batch),
like every stage pool; GPUs do not move between prefill and decode while the run goes on.

- `pd_pools`: the `stage_pools` placement (every pool on GPUs of its own) with the split.
- `pd_colocated_pools`: `colocated_pools` with the split (light pools ride on heavy ones; a light
  vision encoder rides on its model's prefill pool, inside the prefill step).
"""
from __future__ import annotations

from typing import Any, ClassVar

from profiler.models import load_model
from sim.core.mypyc_compat import mypyc_attr
from sim.core.records import Job, Request
from sim.engines.memory import GPUContents
from sim.engines.pipeline import kv_handoff_bytes, plan_hops, split_prefill_decode
from sim.names import AR
from sim.policies.parts import Flow, Router
from sim.policies.placement import ROLE_OF_STAGE, StagePools

PREFILL_ROLE, DECODE_ROLE = "prefill", "decode"


def pd_key(job: Job) -> str:
    if job.stage == AR:
        return f"{DECODE_ROLE if job.pre_generated else PREFILL_ROLE}:{job.model}"
    return f"{ROLE_OF_STAGE[job.stage]}:{job.model}"


@mypyc_attr(allow_interpreted_subclasses=True)
class PDPools(StagePools):
    llm_role: ClassVar[str] = PREFILL_ROLE

    def plan_hops(self, req: Request, fused: bool) -> list[Job]:
        return split_prefill_decode(plan_hops(req, fused))

    def key_of(self, job: Job) -> str:
        return pd_key(job)

    def add_gpu(self, key: str, gpu: Any = None, reset: bool = True) -> Any:
        role, model = key.split(":")
        if role not in (PREFILL_ROLE, DECODE_ROLE):
            return super().add_gpu(key, gpu, reset)
        g = gpu or self.policy.new_gpu(key)
        g.role = key
        if reset:
            g.engines = []
        spec = load_model(model)
        e = self.policy.make_ar(model, GPUContents(tuple((model, c) for c in spec.components)),
                                priority=self.policy.priority)
        g.add(e)
        self.llm.setdefault(key, []).append(e)      # keyed by pool ("prefill:m" / "decode:m")
        self._routers.pop(key, None)
        self.pools.setdefault(key, []).append(g)
        return g

    def dispatch(self, flow: Flow, job: Job, now: float) -> None:
        if job.stage == AR:
            e = flow.home = self.llm_router(pd_key(job)).pick(now)
            if self.reuse is not None:
                self.reuse.apply(job, e, 1, e)
            e.submit(job, now)
        else:
            super().dispatch(flow, job, now)

    def hop_done(self, flow: Flow, job: Job) -> None:
        if job.stage == AR:
            r: Router | None = self._routers.get(pd_key(job))
            if r is not None:
                r.changed(flow.home)

    def transfer_delay(self, done: Job, nxt: Job) -> float:
        if done.stage == AR and nxt.stage == AR:         # prefill -> decode: the KV cache
            # (a pinned layout's measured `kv` link when it has one)
            return self.policy.link_delay(kv_handoff_bytes(done), self.policy.same_node(done, nxt), "kv")
        return super().transfer_delay(done, nxt)


@mypyc_attr(allow_interpreted_subclasses=True)
class PDColocatedPools(PDPools):
    colocate_light: ClassVar[bool] = True
