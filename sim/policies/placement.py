"""Placements (with their pool sizing): which GPUs hold which engines, and where each hop runs.

- `replicas`: identical replicas per model, each one GPU holding every stage of its model (the
  GPU time-shares between AR iterations and diffusion work, round-robin at step granularity);
  replicas per model in proportion to the model's offered work (or cluster.replicas); a request
  goes to a replica of its model chosen by the router.
- `stage_pools`: ModServe-style stage pools (vision encoders, LLM, text encoders, DiT, VAE),
  each sized in proportion to its offered work (or cluster.pools). Requests flow only through
  the stages they need; each hand-off between pools pays bytes / bandwidth + latency. Encoder,
  DiT and VAE pools pull from one central queue per pool (work-conserving); LLM GPUs are vLLM
  engines with their own queues, chosen by the router.
- `colocated_pools`: stage pools whose light pools (needing less than LIGHT_SHARE of a GPU)
  ride on the GPUs of a related heavy pool instead of idling GPUs of their own.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

from profiler.models import load_model
from sim.config import ConfigError
from sim.core.gpu import GPU, PoolGPU
from sim.core.mypyc_compat import mypyc_attr
from sim.core.records import Job, Request
from sim.engines.ar import AREngine
from sim.engines.memory import GPUContents
from sim.engines.queues import FIFO, StageQueue
from sim.names import (AR, DIT_STEP, TEXT_ENCODE, VAE_DECODE, VAE_ENCODE, VISION_ENCODE)
from sim.policies.parts import Flow, Placement, Router

# --- pool sizing ---------------------------------------------------------------------------------


def size_pools(work: dict[str, float], n: int, fixed: dict[str, int] | None = None,
               field_name: str = "cluster.pools") -> dict[str, int]:
    """Split n GPUs across keys in proportion to offered work (largest remainder), at least one
    each; entries in `fixed` are taken as given."""
    fixed = dict(fixed or {})
    keys = [k for k in work if work[k] > 0 or k in fixed]
    rest = [k for k in keys if k not in fixed]
    left = n - sum(fixed.get(k, 0) for k in keys)
    if left < len(rest):
        raise ConfigError(
            f"{field_name}: {n} GPUs cannot host {len(keys)} pools/replica groups {sorted(keys)} "
            f"(at least one GPU each); allowed: cluster.num_gpus >= {len(keys) - len(fixed) + sum(fixed.values())}")
    out = {k: fixed[k] for k in keys if k in fixed}
    if rest:
        tot = sum(work[k] for k in rest) or 1.0
        share = {k: 1 + (left - len(rest)) * work[k] / tot for k in rest}
        base = {k: int(math.floor(v)) for k, v in share.items()}
        spare = left - sum(base.values())
        for k in sorted(rest, key=lambda k: share[k] - base[k], reverse=True)[:spare]:
            base[k] += 1
        out.update(base)
    return out


def match_fixed(fixed: dict[str, int], keys: list[str], field_name: str) -> dict[str, int]:
    """Map user keys (full 'role:model' or bare role / model) onto pool keys."""
    out: dict[str, int] = {}
    for k, v in fixed.items():
        hits = [p for p in keys if p == k or p.split(":")[0] == k or p.split(":")[-1] == k]
        if not hits:
            raise ConfigError(f"{field_name}.{k} matches no pool this workload needs; allowed: {sorted(keys)}")
        for p in hits:
            out[p] = v
    return out


# --- replicas ------------------------------------------------------------------------------------


class Replica:
    """One GPU serving one model end to end."""

    def __init__(self, gpu: Any, model: str, index: int = 0):
        self.gpu = gpu
        self.model = model
        self.index = index
        self.ar: AREngine | None = None
        self.whole: Any = None      # an engine serving the model's requests whole (BatchingRule.whole_engine)
        self.queues: dict[str, StageQueue] = {}
        self.outstanding = 0.0      # work of the requests routed here and not finished (s)
        self.requests = 0


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests subclass it)
class Replicas(Placement):
    fused: ClassVar[bool] = True
    gpu_class: ClassVar[type[GPU]] = GPU

    def build(self) -> None:
        c = self.cfg.cluster
        work = self.policy.pilot_work(_request_model, self.fused)
        self._whole_work(work)
        self.replicas: dict[str, list[Replica]] = {}
        if c.layout is not None:                       # pinned: replica:<model> -> GPU indices
            pinned = pinned_pools(c.layout, list(work), "replica", key_of=lambda m: f"replica:{m}")
            gpus = self.policy.pinned_gpus()
            for key, ids in sorted(pinned.items()):
                model = key.split(":", 1)[1]
                self.replicas[model] = [self._replica(model, i, gpus[g]) for i, g in enumerate(ids)]
        else:
            fixed = match_fixed(dict(c.replicas), list(work), "cluster.replicas")
            counts = size_pools(work, c.num_gpus, fixed, "cluster.replicas")
            for model, n in sorted(counts.items()):
                self.replicas[model] = [self._replica(model, i) for i in range(n)]
        self.notes["replicas"] = {m: len(r) for m, r in self.replicas.items()}
        self.routers: dict[str, Router] = {m: self.policy.router_class(r)
                                           for m, r in self.replicas.items()}
        # (a model's replicas are all made by one rule: every one serves it whole, or none)
        self._whole: set[str] = {m for m, r in self.replicas.items() if r and r[0].whole is not None}
        desc = self.policy.batching.describe()
        if desc:
            self.notes["diffusion_engine"] = desc

    def _whole_work(self, work: dict[str, float]) -> None:
        """Offered work of the models whose requests an engine serves whole: that engine's own
        estimate (each pilot request alone), not the sum of its stage hops."""
        rule = self.policy.batching
        whole: dict[str, float] = {}
        for req in self.policy.ctx.pilot:
            w = rule.whole_work(req, self.lat)
            if w is not None:
                whole[req.model] = whole.get(req.model, 0.0) + w
        work.update(whole)

    def _replica(self, model: str, index: int, gpu: Any = None) -> Replica:
        spec = load_model(model)
        g = gpu if gpu is not None else self.policy.new_gpu(f"replica:{model}")
        g.role = f"replica:{model}"
        r = Replica(g, model, index)
        if spec.family in ("ar_dit", "dit"):
            r.whole = self.policy.batching.whole_engine(model, self.lat)
            if r.whole is not None:
                g.add(r.whole)
                return r
        parts = [(model, comp) for comp in spec.components]
        llm_model = model if spec.family in ("llm", "vlm") else spec.condition_encoder
        if llm_model:
            parts += [(llm_model, comp) for comp in load_model(llm_model).components] if llm_model != model else []
            r.ar = self.policy.make_ar(llm_model, GPUContents(tuple(parts)), priority=False)
            g.add(r.ar)
        if spec.family in ("ar_dit", "dit"):
            lat, batching = self.lat, self.policy.batching
            for stage in (TEXT_ENCODE, VAE_ENCODE, DIT_STEP, VAE_DECODE):
                if stage == TEXT_ENCODE and spec.family != "dit":
                    continue
                q = StageQueue(f"{g.name}/{stage}")
                r.queues[stage] = q
                if stage == DIT_STEP:
                    g.add(batching.dit_engine(model, q, lat))
                else:
                    g.add(batching.pass_engine(stage, model, q, lat))
        return r

    def served_whole(self, req: Request) -> bool:
        return req.model in self._whole

    def pick(self, model: str, now: float) -> Replica:
        router = self.routers.get(model)
        if router is None:
            raise KeyError(f"no replica serves model {model}")
        return router.pick(now)

    def dispatch(self, flow: Flow, job: Job, now: float) -> None:
        if flow.home is None:
            home = flow.home = self.pick(flow.req.model, now)
            flow.work = (sum(h.work for h in flow.hops) if home.whole is None
                         else home.whole.work(flow.req))
            home.outstanding += flow.work
            self.routers[home.model].changed(home)
            home.requests += 1
        r = flow.home
        if r.whole is not None:         # the whole request, at its first hop
            r.whole.submit(flow, now)
            return
        if self.reuse is not None and self.reuse.apply(job, r, 1, r.ar if job.stage == AR else None):
            job.on_done(job, now)           # type: ignore[misc]  # served from the replica's caches
            return
        if job.stage == AR:
            r.ar.submit(job, now)
        else:
            r.queues[job.stage].put(job, now)

    def complete(self, flow: Flow, now: float) -> None:
        home = flow.home
        home.outstanding -= flow.work
        self.routers[home.model].changed(home)
        home.requests -= 1
        self.on_complete(flow.req)


def _request_model(job: Job) -> str:
    return job.req.model


def pinned_pools(layout: Any, needed: list[str], kind: str, key_of=lambda k: k) -> dict[str, list[int]]:
    """The pools of a pinned layout (cluster.layout) for a placement whose workload needs the
    pool keys `needed` (key_of maps them to layout keys). Every needed pool must be pinned (a
    pinned pool the workload does not use stays idle, as in the real deployment), and the keys
    must be of the placement's kind (`replica:` for replicas), else one line naming both sets."""
    want = {key_of(k) for k in needed}
    have = {str(k): list(v) for k, v in layout.pools.items()}
    if kind == "replica":
        bad = sorted(k for k in have if not k.startswith("replica:"))
    else:
        bad = sorted(k for k in have if k.startswith("replica:"))
    missing = sorted(want - set(have))
    if bad or missing:
        raise ConfigError(
            f"cluster.layout.pools {sorted(have)} does not fit this policy's placement "
            f"({'replicas: replica:<model> keys' if kind == 'replica' else 'stage pools: <role>:<model> keys'}); "
            f"allowed: keys covering {sorted(want)}"
            + (f" (missing {missing})" if missing else "") + (f" (wrong kind {bad})" if bad else ""))
    return have


# --- stage pools ---------------------------------------------------------------------------------

ROLE_OF_STAGE = {AR: "llm", VISION_ENCODE: "encoder", TEXT_ENCODE: "text_encoder",
                 VAE_ENCODE: "vae", VAE_DECODE: "vae", DIT_STEP: "dit"}
LIGHT_SHARE = 0.5       # colocated_pools: a pool needing less than half a GPU shares one
SHARED = "shared:light"


def pool_key(job: Job) -> str:
    return f"{ROLE_OF_STAGE[job.stage]}:{job.model}"


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests subclass it)
class StagePools(Placement):
    fused: ClassVar[bool] = False
    gpu_class: ClassVar[type[GPU]] = PoolGPU     # a pool's GPUs share one queue: it indexes the free ones
    colocate_light: ClassVar[bool] = False       # pools needing < LIGHT_SHARE of a GPU ride on others
    llm_role: ClassVar[str] = "llm"              # the pool a light vision-encoder pool rides on

    def build(self) -> None:
        c = self.cfg.cluster
        work = self.policy.pilot_work(self.key_of, self.fused)
        self.hosted: dict[str, list[str]] = {}     # host pool -> light pools riding on its GPUs
        self._fused_by_model: dict[str, bool] = {}
        self.colocated: list[str] = []
        self.pools: dict[str, list] = {}
        self.queues: dict[tuple[str, str], StageQueue] = {}
        self.llm: dict[str, list[AREngine]] = {}
        self._routers: dict[str, Router] = {}
        self._pinned_fused: dict[str, bool] | None = None     # per model, under a pinned layout
        if c.layout is not None:
            self._build_pinned(c.layout, work)
            return
        fixed = match_fixed(dict(c.pools), list(work), "cluster.pools")
        if self.colocate_light and not fixed:
            work = self._colocate(work, c.num_gpus)
        counts = size_pools(work, c.num_gpus, fixed, "cluster.pools")
        for key, n in sorted(counts.items()):
            self.pools.setdefault(key, [])
            for _ in range(n):
                self.provision(key)
        self.notes["pools"] = {k: len(v) for k, v in self.pools.items()}
        if self.hosted:
            self.notes["colocated"] = dict(self.hosted)

    def key_of(self, job: Job) -> str:
        """The pool a hop runs in ("role:model")."""
        return pool_key(job)

    def _build_pinned(self, layout: Any, work: dict[str, float]) -> None:
        """Pools exactly as the layout pins them (`work`: the pilot's pools, to check that every
        pool the workload needs is pinned). A model whose layout has no encoder pool encodes its
        images inside its LLM step (vLLM's own path); a GPU in several pools holds every one of
        their engines."""
        models = {str(k).split(":", 1)[1] for k in layout.pools}
        self._pinned_fused = {m: f"encoder:{m}" not in layout.pools for m in models}
        needed = [k for k in work if not (k.startswith("encoder:")
                                           and self._pinned_fused.get(k.split(":", 1)[1], True))]
        pinned = pinned_pools(layout, needed, "stage")
        gpus = self.policy.pinned_gpus()
        roles: dict[int, list[str]] = {}
        for key, ids in sorted(pinned.items()):
            self.pools.setdefault(key, [])
            for i in ids:
                first = i not in roles
                roles.setdefault(i, []).append(key)
                g = self.add_gpu(key, gpus[i], reset=first)
                g.role = "+".join(roles[i])
        self.notes["pools"] = {k: len(v) for k, v in self.pools.items()}
        self.notes["layout"] = {"name": layout.name, "pools": {k: list(v) for k, v in pinned.items()}}

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
            host = f"{self.llm_role}:{model}" if role == "encoder" else f"dit:{model}"
            if host not in out:
                host = SHARED
                out.setdefault(SHARED, 0.0)
            out[host] += work[k]
            self.hosted.setdefault(host, []).append(k)
            self.colocated.append(k)
        return out

    def provision(self, key: str, gpu: Any = None) -> Any:
        """A GPU for pool `key`, with the engines of the light pools it hosts."""
        if key == SHARED:
            g = gpu or self.policy.new_gpu(SHARED)
            g.engines = []
        else:
            g = self.add_gpu(key, gpu)
        for lk in self.hosted.get(key, []):
            self.add_gpu(lk, g, reset=False)
        g.role = key
        if key == SHARED:
            self.pools.setdefault(SHARED, []).append(g)
        return g

    def is_fused(self, req: Request) -> bool:
        """A vision encoder hosted on its LLM's GPUs runs inside the AR step, as vLLM does."""
        f = self._fused_by_model.get(req.model)
        if f is None:       # (per model: `hosted` is set once, in build)
            spec = load_model(req.model)
            vl = spec.condition_encoder or req.model
            if self._pinned_fused is not None:
                f = self._fused_by_model[req.model] = self._pinned_fused.get(vl, True)
            else:
                f = self._fused_by_model[req.model] = (
                    f"encoder:{vl}" in self.hosted.get(f"{self.llm_role}:{vl}", ()))
        return f

    def queue(self, stage: str, model: str) -> StageQueue:
        k = (stage, model)
        if k not in self.queues:
            p = self.policy
            order = p.queue_order if stage in (DIT_STEP, VISION_ENCODE) else FIFO
            self.queues[k] = StageQueue(f"{stage}:{model}", p.priority, order, lambda: self.env.now)
        return self.queues[k]

    def add_gpu(self, key: str, gpu: Any = None, reset: bool = True) -> Any:
        role, model = key.split(":")
        g = gpu or self.policy.new_gpu(key)
        g.role = key
        if reset:
            g.engines = []
        lat, batching = self.lat, self.policy.batching
        spec = load_model(model)
        if role == "llm":
            e = self.policy.make_ar(model, GPUContents(tuple((model, comp) for comp in spec.components)),
                                    priority=self.policy.priority)
            g.add(e)
            self.llm.setdefault(model, []).append(e)
            self._routers.pop(model, None)
        elif role == "encoder":
            g.add(batching.pass_engine(VISION_ENCODE, model, self.queue(VISION_ENCODE, model), lat))
        elif role == "text_encoder":
            g.add(batching.pass_engine(TEXT_ENCODE, model, self.queue(TEXT_ENCODE, model), lat))
        elif role == "vae":
            for st in (VAE_ENCODE, VAE_DECODE):
                g.add(batching.pass_engine(st, model, self.queue(st, model), lat))
        elif role == "dit":
            g.add(batching.dit_engine(model, self.queue(DIT_STEP, model), lat))
        self.pools.setdefault(key, []).append(g)
        return g

    def llm_engines(self, model: str) -> list[AREngine]:
        engines = self.llm.get(model)
        if not engines:
            raise KeyError(f"no LLM pool serves model {model}")
        return engines

    def llm_router(self, model: str) -> Router:
        """The router over the model's LLM engines, built again whenever the pool changes."""
        r = self._routers.get(model)
        if r is None:
            r = self._routers[model] = self.policy.router_class(self.llm_engines(model))
        return r

    def dispatch(self, flow: Flow, job: Job, now: float) -> None:
        if job.stage == AR:
            e = flow.home = self.llm_router(job.model).pick(now)
            if self.reuse is not None:
                self.reuse.apply(job, e, 1, e)
            e.submit(job, now)
        else:
            q = self.queue(job.stage, job.model)
            if self.reuse is not None and self.reuse.apply(job, q, len(q.engines)):
                job.on_done(job, now)       # type: ignore[misc]  # served from the pool's feature cache
                return
            q.put(job, now)

    def hop_done(self, flow: Flow, job: Job) -> None:
        if job.stage == AR:
            r = self._routers.get(job.model)
            if r is not None:
                r.changed(flow.home)

    def transfer_delay(self, done: Job, nxt: Job) -> float:
        if done.model == nxt.model and ROLE_OF_STAGE[done.stage] == ROLE_OF_STAGE[nxt.stage]:
            return 0.0                   # e.g. vae_encode -> ... stays on the VAE GPU
        return self.policy.hop_delay(done, nxt)


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests subclass it)
class ColocatedPools(StagePools):
    colocate_light: ClassVar[bool] = True
