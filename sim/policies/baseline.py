"""baseline: plain vLLM-style serving. Identical replicas per model, each one GPU holding every
stage of its model; the GPU time-shares between AR iterations (continuous batching, chunked
prefill, vision encoding inside the step) and diffusion work (DiT steps, VAE), round-robin at
step granularity. Requests go to a replica of their model (least loaded or round-robin)."""
from __future__ import annotations

from operator import attrgetter
from typing import ClassVar

from profiler.models import load_model
from sim.engines.memory import Placement, kv_capacity_tokens
from sim.core.mypyc_compat import mypyc_attr
from sim.policies import routing
from sim.policies.policy import Flow, Policy, match_fixed, size_pools
from sim.engines.ar import AREngine, FrontEnd
from sim.engines.batch import BatchEngine
from sim.engines.dit import DiTEngine
from sim.engines.queues import Job, StageQueue


class Replica:
    """One GPU serving one model end to end."""

    def __init__(self, gpu, model: str, index: int = 0):
        self.gpu = gpu
        self.model = model
        self.index = index
        self.ar: AREngine | None = None
        self.queues: dict[str, StageQueue] = {}
        self.outstanding = 0.0
        self.requests = 0


class LeastLoaded(routing.LeastLoaded[Replica]):
    """Replicas by outstanding work (policy.router=least_loaded); every change is reported."""

    def __init__(self, replicas: list[Replica]):
        super().__init__(replicas, attrgetter("outstanding"), every_change=True)


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: plug-ins and tests subclass it)
class Baseline(Policy):
    name: ClassVar[str] = "baseline"
    fused: ClassVar[bool] = True

    def build(self) -> None:
        c = self.cfg.cluster
        work = self.pilot_work(lambda j: j.req.model)
        fixed = match_fixed(dict(c.replicas), list(work), "cluster.replicas")
        counts = size_pools(work, c.num_gpus, fixed, "cluster.replicas")
        self.replicas: dict[str, list[Replica]] = {}
        for model, n in sorted(counts.items()):
            self.replicas[model] = [self._replica(model, i) for i in range(n)]
        self.notes["replicas"] = {m: len(r) for m, r in self.replicas.items()}
        self._rr = {m: 0 for m in self.replicas}
        self._least = {m: LeastLoaded(r) for m, r in self.replicas.items()}

    def _replica(self, model: str, index: int) -> Replica:
        spec = load_model(model)
        g = self.new_gpu(f"replica:{model}")
        r = Replica(g, model, index)
        parts = [(model, comp) for comp in spec.components]
        llm_model = model if spec.family in ("llm", "vlm") else spec.condition_encoder
        if llm_model:
            parts += [(llm_model, comp) for comp in load_model(llm_model).components] if llm_model != model else []
            r.ar = self.make_ar(llm_model, Placement(tuple(parts)), priority=False)
            g.add(r.ar)
        if spec.family in ("ar_dit", "dit"):
            lat, d = self.lat, self.cfg.diffusion
            for stage in ("text_encode", "vae_encode", "dit_step", "vae_decode"):
                if stage == "text_encode" and spec.family != "dit":
                    continue
                q = StageQueue(f"{g.name}/{stage}")
                r.queues[stage] = q
                if stage == "dit_step":
                    g.add(DiTEngine(model, q, lat, d.max_batch, d.shape_compat, list(self.cfg.policy.shape_buckets)))
                else:
                    g.add(BatchEngine(stage, model, q, lat, max_batch=d.max_batch))
        return r

    def make_ar(self, llm_model: str, placement: Placement, priority: bool) -> AREngine:
        e, c = self.cfg.engine, self.cfg.cluster
        cap = e.kv_capacity_tokens
        if cap is None:
            measured = self.lat.engine_settings(llm_model)
            cap = kv_capacity_tokens(llm_model, placement, c.gpu_mem_gib, e.gpu_memory_utilization, measured)
        host = per_seq = 0.0
        if e.async_scheduling and self.lat.host_per_seq(llm_model) > 0:   # tables timed synchronously
            host = e.host_overhead_base_ms / 1e3
            per_seq = (e.host_overhead_per_seq_ms / 1e3 if e.host_overhead_per_seq_ms is not None
                       else self.lat.host_per_seq(llm_model))
            if llm_model in e.host_overhead_by_model:
                host, per_seq = (x / 1e3 for x in e.host_overhead_by_model[llm_model])
        self.notes.setdefault("ar_host_overhead_ms", {})[llm_model] = {
            "base": round(host * 1e3, 3), "per_seq": round(per_seq * 1e3, 4)}
        return AREngine(llm_model, self.lat, cap, max_num_batched_tokens=e.max_num_batched_tokens,
                        host_s=host, host_per_seq_s=per_seq, async_admit=e.async_scheduling,
                        frontend=FrontEnd(e.frontend_ms / 1e3, e.frontend_ms_per_prompt_token / 1e3,
                                          e.idle_wakeup_ms / 1e3, e.api_ingest_ms / 1e3,
                                          e.api_ingest_ms_per_running_seq / 1e3),
                        stream_s_per_token=e.stream_ms_per_token / 1e3,
                        max_num_seqs=e.max_num_seqs, block_size=e.block_size,
                        step_overhead_s=e.step_overhead_ms / 1e3, priority=priority,
                        itl_sink=self.ctx.itl_sink, max_model_len=e.max_model_len)

    def pick(self, model: str) -> Replica:
        reps = self.replicas.get(model)
        if not reps:
            raise KeyError(f"no replica serves model {model}")
        if self.cfg.policy.router == "round_robin":
            i = self._rr[model]
            self._rr[model] = (i + 1) % len(reps)
            return reps[i]
        return self._least[model].pick()

    def dispatch(self, flow: Flow, job: Job, now: float) -> None:
        if flow.home is None:
            flow.home = self.pick(flow.req.model)
            flow.work = sum(h.work for h in flow.hops)
            flow.home.outstanding += flow.work
            self._least[flow.home.model].changed(flow.home)
            flow.home.requests += 1
        r = flow.home
        if job.stage == "ar":
            r.ar.submit(job, now)
        else:
            r.queues[job.stage].put(job, now)

    def complete(self, flow: Flow, now: float) -> None:
        flow.home.outstanding -= flow.work
        self._least[flow.home.model].changed(flow.home)
        flow.home.requests -= 1
        super().complete(flow, now)
