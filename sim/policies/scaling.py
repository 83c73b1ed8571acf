"""modality_aware: disaggregated pools plus modality-aware routing and batching:
- image-token-aware load balancing: LLM GPUs are chosen by outstanding tokens (text + image),
  not request counts, so a few image-heavy prompts do not pile onto one engine;
- shape-bucketed step-level DiT batching (sequence lengths padded to policy.shape_buckets);
- SLO priority: interactive (text-out) work is scheduled first in every shared queue and in the
  LLM engines' waiting queues, protecting short requests from heavy-tailed image jobs;
- per-stage autoscaling: every policy.autoscale_interval_s the pool with the most queued work
  per GPU takes an idle GPU from the pool with the least (after a weight-reload delay)."""
from __future__ import annotations

from typing import ClassVar

from profiler.models import load_model
from sim.core.mypyc_compat import mypyc_attr
from sim.policies.placement import SHARED, Disaggregated
from sim.engines.ar import AREngine
from sim.engines.queues import Job

RELOAD_GB_S = 5.0          # host -> GPU weight load rate when a GPU changes pool


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: plug-ins and tests subclass it)
class ModalityAware(Disaggregated):
    name: ClassVar[str] = "modality_aware"
    fused: ClassVar[bool] = False
    colocate_light: ClassVar[bool] = True
    order: ClassVar[str] = "sjf"
    efficient_batching: ClassVar[bool] = True

    def build(self) -> None:
        p = self.cfg.policy
        self.priority = p.priority
        self.shape_compat = "bucket"
        super().build()
        self.moves: list[dict] = []
        if p.autoscale and len(self.pools) > 1:
            self.env.process(self._autoscaler())

    def pick_llm(self, model: str, job: Job) -> AREngine:
        if not self.cfg.policy.image_token_aware_lb:
            return super().pick_llm(model, job)
        # a scan: an engine's load also falls while it decodes, unreported (a heap keyed on a
        # lower bound was tried: the bounds are loose while engines jump, most of them do, and
        # it was slower than this loop)
        return AREngine.least_loaded(self.llm_engines(model), self.env.now)

    # --- autoscaling -----------------------------------------------------------------------
    def pressure(self, key: str) -> float:
        """Seconds of queued + running work per available GPU of the pool."""
        gpus = [g for g in self.pools[key] if g.available]
        if not gpus:
            return float("inf")
        role, model = key.split(":")
        if role == "llm":
            per_token = self.lat.prefill(model, 1024) / 1024
            work = sum(e.load() for e in self.llm.get(model, [])) * per_token
        else:
            queues = {id(e.queue): e.queue for g in gpus for e in g.engines}
            work = sum(q.work for q in queues.values()) + sum(e.busy_work() for g in gpus for e in g.engines)
        return work / len(gpus)

    def _autoscaler(self):
        interval = self.cfg.policy.autoscale_interval_s
        while True:
            yield self.env.timeout(interval)
            if self.ctx.done():
                return
            pr = {k: self.pressure(k) for k in self.pools if k not in self.colocated and k != SHARED
                  and self.pools[k]}
            hi = max(pr, key=pr.get)
            donors = [k for k in sorted(pr, key=pr.get) if k != hi
                      and sum(g.available for g in self.pools[k]) > 1]
            if not donors or pr[hi] < interval:
                continue
            lo = donors[0]
            if pr[hi] < 4 * pr[lo] + 1e-9:
                continue
            idle = [g for g in self.pools[lo] if g.available and not g.has_work()]
            if idle:
                self._move(idle[-1], lo, hi)

    def _move(self, g, src: str, dst: str) -> None:
        g.available = False
        for members in self.pools.values():
            if g in members:
                members.remove(g)
        for e in g.engines:
            if isinstance(e, AREngine):
                self.llm[e.model].remove(e)
                self._routers.pop(e.model, None)
            else:
                e.queue.unsubscribe(e)
        role, model = dst.split(":")
        spec = load_model(model)
        comps = {"llm": list(spec.components), "encoder": ["vision"], "text_encoder": list(spec.text_encoders),
                 "vae": ["vae"], "dit": ["transformer"]}[role]
        nbytes = sum(spec.component_params(c) for c in comps) * spec.dtype_bytes
        delay = nbytes / (RELOAD_GB_S * 1e9)
        self.moves.append({"t": round(self.env.now, 3), "gpu": g.name, "from": src, "to": dst,
                           "reload_s": round(delay, 2)})

        def ready(_e):
            self.provision(dst, g)
            g.available = True
            g.kick()
        self.env.timeout(delay).callbacks.append(ready)

    def utilization(self, duration: float) -> dict:
        u = super().utilization(duration)
        u["autoscale_moves"] = len(self.moves)
        return u
