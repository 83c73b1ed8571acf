"""disaggregated: ModServe-style stage pools (vision encoders, LLM, text encoders, DiT, VAE),
each sized on its own (cluster.pools, or in proportion to offered work). Requests flow only
through the stages they need; each hand-off between pools pays bytes / bandwidth + latency.
Encoder, DiT and VAE pools pull from one central queue per pool (work-conserving); LLM GPUs
are vLLM engines with their own queues behind a least-outstanding-requests router."""
from __future__ import annotations

from typing import ClassVar

from profiler.models import load_model
from sim.engines.memory import Placement
from sim.core.mypyc_compat import mypyc_attr
from sim.core.gpu import GPU
from sim.policies.policy import Flow, PoolGPU, match_fixed, size_pools
from sim.policies.baseline import Baseline
from sim.policies.routing import LeastLoaded
from sim.engines.ar import AREngine
from sim.engines.batch import BatchEngine
from sim.engines.dit import DiTEngine
from sim.engines.queues import Job, StageQueue

ROLE_OF_STAGE = {"ar": "llm", "vision_encode": "encoder", "text_encode": "text_encoder",
                 "vae_encode": "vae", "vae_decode": "vae", "dit_step": "dit"}


LIGHT_SHARE = 0.5       # a pool needing less than half a GPU shares one with the other light ones
SHARED = "shared:light"


def pool_key(job: Job) -> str:
    return f"{ROLE_OF_STAGE[job.stage]}:{job.model}"


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: plug-ins and tests subclass it)
class Disaggregated(Baseline):
    # ClassVars: what subclasses override on the class (see Policy)
    name: ClassVar[str] = "disaggregated"
    fused: ClassVar[bool] = False
    order: ClassVar[str] = "fifo"                # shared-queue order for DiT / encoders
    efficient_batching: ClassVar[bool] = False
    colocate_light: ClassVar[bool] = False       # put pools needing < LIGHT_SHARE of a GPU on shared GPUs
    gpu_class: ClassVar[type[GPU]] = PoolGPU     # a pool's GPUs share one queue: it indexes the free ones
    # set per instance (modality_aware's build)
    priority: bool = False
    shape_compat: str | None = None      # None: diffusion.shape_compat

    def build(self) -> None:
        c = self.cfg.cluster
        work = self.pilot_work(pool_key)
        fixed = match_fixed(dict(c.pools), list(work), "cluster.pools")
        self.hosted: dict[str, list[str]] = {}     # host pool -> light pools riding on its GPUs
        self._fused_by_model: dict[str, bool] = {}
        self.colocated: list[str] = []
        if self.colocate_light and not fixed:
            work = self._colocate(work, c.num_gpus)
        counts = size_pools(work, c.num_gpus, fixed, "cluster.pools")
        self.pools: dict[str, list] = {}
        self.queues: dict[tuple[str, str], StageQueue] = {}
        self.llm: dict[str, list[AREngine]] = {}
        self._routers: dict[str, LeastLoaded[AREngine]] = {}
        for key, n in sorted(counts.items()):
            self.pools.setdefault(key, [])
            for _ in range(n):
                self.provision(key)
        self.notes["pools"] = {k: len(v) for k, v in self.pools.items()}
        if self.hosted:
            self.notes["colocated"] = dict(self.hosted)

    def _colocate(self, work: dict[str, float], n: int) -> dict[str, float]:
        """Pools that would need less than LIGHT_SHARE of a GPU ride on the GPUs of a related
        heavy pool (vision encoder with its LLM, VAE / text encoders with their DiT), else on
        a shared GPU; their work is added to the host's for sizing."""
        total = sum(work.values()) or 1.0
        light = sorted(k for k, w in work.items() if k.split(":")[0] not in ("llm", "dit")
                       and n * w / total < LIGHT_SHARE)
        out = {k: w for k, w in work.items() if k not in light}
        for k in light:
            role, model = k.split(":")
            host = f"llm:{model}" if role == "encoder" else f"dit:{model}"
            if host not in out:
                host = SHARED
                out.setdefault(SHARED, 0.0)
            out[host] += work[k]
            self.hosted.setdefault(host, []).append(k)
            self.colocated.append(k)
        return out

    def provision(self, key: str, gpu=None):
        """A GPU for pool `key`, with the engines of the light pools it hosts."""
        if key == SHARED:
            g = gpu or self.new_gpu(SHARED)
            g.engines = []
        else:
            g = self.add_gpu(key, gpu)
        for lk in self.hosted.get(key, []):
            self.add_gpu(lk, g, reset=False)
        g.role = key
        if key == SHARED:
            self.pools.setdefault(SHARED, []).append(g)
        return g

    def is_fused(self, req) -> bool:
        """A vision encoder hosted on its LLM's GPUs runs inside the AR step, as vLLM does."""
        f = self._fused_by_model.get(req.model)
        if f is None:       # (per model: `hosted` is set once, in build)
            spec = load_model(req.model)
            vl = spec.condition_encoder or req.model
            f = self._fused_by_model[req.model] = f"encoder:{vl}" in self.hosted.get(f"llm:{vl}", ())
        return f

    def queue(self, stage: str, model: str) -> StageQueue:
        k = (stage, model)
        if k not in self.queues:
            order = self.order if stage in ("dit_step", "vision_encode") else "fifo"
            self.queues[k] = StageQueue(f"{stage}:{model}", self.priority, order, lambda: self.env.now)
        return self.queues[k]

    def add_gpu(self, key: str, gpu=None, reset: bool = True):
        role, model = key.split(":")
        g = gpu or self.new_gpu(key)
        g.role = key
        if reset:
            g.engines = []
        lat, d = self.lat, self.cfg.diffusion
        compat = self.shape_compat or d.shape_compat
        spec = load_model(model)
        if role == "llm":
            e = self.make_ar(model, Placement(tuple((model, comp) for comp in spec.components)),
                             priority=self.priority)
            g.add(e)
            self.llm.setdefault(model, []).append(e)
            self._routers.pop(model, None)
        elif role == "encoder":
            g.add(BatchEngine("vision_encode", model, self.queue("vision_encode", model), lat, d.max_batch))
        elif role == "text_encoder":
            g.add(BatchEngine("text_encode", model, self.queue("text_encode", model), lat, d.max_batch))
        elif role == "vae":
            for st in ("vae_encode", "vae_decode"):
                g.add(BatchEngine(st, model, self.queue(st, model), lat, d.max_batch))
        elif role == "dit":
            g.add(DiTEngine(model, self.queue("dit_step", model), lat, d.max_batch, compat,
                            list(self.cfg.policy.shape_buckets), efficient_only=self.efficient_batching))
        self.pools.setdefault(key, []).append(g)
        return g

    def llm_engines(self, model: str) -> list[AREngine]:
        engines = self.llm.get(model)
        if not engines:
            raise KeyError(f"no LLM pool serves model {model}")
        return engines

    def llm_router(self, model: str) -> LeastLoaded[AREngine]:
        """Least-outstanding-requests router over the model's LLM engines, built again whenever
        the pool changes. An engine's count falls only when a request leaves it (hop_done)."""
        r = self._routers.get(model)
        if r is None:
            r = self._routers[model] = LeastLoaded(self.llm_engines(model), AREngine.num_requests)
        return r

    def pick_llm(self, model: str, job: Job) -> AREngine:
        return self.llm_router(model).pick()

    def dispatch(self, flow: Flow, job: Job, now: float) -> None:
        if job.stage == "ar":
            flow.home = self.pick_llm(job.model, job)
            flow.home.submit(job, now)
        else:
            self.queue(job.stage, job.model).put(job, now)

    def hop_done(self, flow: Flow, job: Job) -> None:
        if job.stage == "ar":
            r = self._routers.get(job.model)
            if r is not None:
                r.changed(flow.home)

    def transfer_delay(self, done: Job, nxt: Job) -> float:
        if done.model == nxt.model and ROLE_OF_STAGE[done.stage] == ROLE_OF_STAGE[nxt.stage]:
            return 0.0                   # e.g. vae_encode -> ... stays on the VAE GPU
        return self.hop_delay(done, nxt)

    def complete(self, flow: Flow, now: float) -> None:
        self.ctx.on_complete(flow.req)
