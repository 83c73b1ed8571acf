"""Machinery every policy shares: request flows through hops, transfers between GPUs, work
estimates for load balancing and sizing, and the per-stage sizing rule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import simpy

from sim.config import ConfigError, SimConfig
from sim.core.kernel import Timer, timeout
from sim.core.gpu import GPU
from sim.engines.latency import LatencyModel
from sim.core.mypyc_compat import mypyc_attr
from sim.engines.pipeline import handoff_bytes, plan_hops
from sim.core.records import Request, StageRecord
from sim.engines.ar import AREngine
from sim.engines.queues import Job

PILOT_REQUESTS = 2000
DECODE_BATCH_FOR_ESTIMATES = 32


@dataclass
class SimContext:
    env: simpy.Environment
    cfg: SimConfig
    lat: LatencyModel
    on_complete: Callable[[Request], None]
    itl_sink: Callable[..., None]            # (duration_s, weight) -> None
    done: Callable[[], bool] = lambda: False  # all requests completed?
    pilot: list[Request] = field(default_factory=list)


class Flow:
    """Moves one request through its hops; the policy picks where each hop runs."""
    __slots__ = ("req", "hops", "i", "policy", "home", "work")

    def __init__(self, req: Request, hops: list[Job], policy: "Policy"):
        self.req = req
        self.hops = hops
        self.i = 0
        self.policy = policy
        self.home: Any = None           # where it was routed: its replica (baseline) or LLM engine
        self.work = 0.0                 # its hops' work, as counted on `home` (baseline)

    def start(self, now: float) -> None:
        job = self.hops[0]
        job.on_done = self._done
        self.policy.dispatch(self, job, now)

    def _done(self, job: Job, now: float) -> None:
        job.on_done = None              # no Job -> Flow reference left: refcounting frees a
        self.policy.hop_done(self, job)  # finished request, no cyclic GC needed
        self.i += 1
        if self.i == len(self.hops):
            self.req.finish = now + job.out_delay      # as the client sees the last output
            self.policy.complete(self, now)
            return
        nxt = self.hops[self.i]
        nxt.on_done = self._done
        delay = self.policy.transfer_delay(job, nxt)
        if delay > 0:
            self.req.stages.append(StageRecord("transfer", "net", now, now, now + delay))
            timeout(self.policy.env, delay, self._arrived, nxt)
        else:
            self.policy.dispatch(self, nxt, now)

    def _arrived(self, ev: Timer) -> None:
        """A transfer has ended: the next hop (the event's value) starts."""
        self.policy.dispatch(self, ev._value, self.policy.env._now)


class PoolGPU(GPU):
    """A GPU that, whenever one of its units ends (the only moment it can become free), tells the
    queues its engines take from, so each finds its first free GPU without scanning the pool
    (sim.engines.queues.FreeEngines)."""
    reports_unit_end: ClassVar[bool] = True

    def _done(self, tok: int) -> None:
        if tok == self.token:
            for e in self.engines:
                if isinstance(e, AREngine):     # own queue, none shared (and no failing getattr)
                    continue
                q = getattr(e, "queue", None)
                if q is not None:
                    q.free.hint(e)
        GPU._done(self, tok)


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: the policies subclass it)
class Policy:
    # ClassVars: subclasses override them on the class, which compiled code (sim.tools.compile) reads
    # only for a ClassVar (an instance attribute with a default would keep the default)
    name: ClassVar[str] = "base"
    fused: ClassVar[bool] = True              # vision encoding inside the AR step
    gpu_class: ClassVar[type[GPU]] = GPU      # PoolGPU where large pools share a queue

    def __init__(self, ctx: SimContext):
        self.ctx = ctx
        self.env = ctx.env
        self.cfg = ctx.cfg
        self.lat = ctx.lat
        self.gpus: list[GPU] = []
        self.role_of: dict[int, str] = {}
        self.notes: dict = {}

    # --- hooks ----------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError

    def dispatch(self, flow: Flow, job: Job, now: float) -> None:
        raise NotImplementedError

    def transfer_delay(self, done: Job, nxt: Job) -> float:
        return 0.0

    def hop_done(self, flow: Flow, job: Job) -> None:
        """A hop has finished (before the next one starts): routers learn that load fell."""

    def is_fused(self, req: Request) -> bool:
        return self.fused

    def admit(self, req: Request, now: float) -> None:
        hops = plan_hops(req, self.is_fused(req))
        for j in hops:
            j.work = self.work(j)
        Flow(req, hops, self).start(now)

    def complete(self, flow: Flow, now: float) -> None:
        self.ctx.on_complete(flow.req)

    # --- shared helpers ----------------------------------------------------------------------
    def new_gpu(self, role: str) -> GPU:
        gid = len(self.gpus)
        g = self.gpu_class(self.env, gid, gid // self.cfg.cluster.gpus_per_node, self.cfg.diffusion.step_jump)
        g.role = role
        self.gpus.append(g)
        return g

    def link_delay(self, nbytes: int, same_node: bool) -> float:
        c = self.cfg.cluster
        bw = (c.nvlink_gb_s if same_node else c.network_gb_s) * 1e9
        return nbytes / bw + c.transfer_latency_us * 1e-6

    def hop_delay(self, done: Job, nxt: Job) -> float:
        """Transfer between two different GPUs; same node when the cluster fits in one."""
        same_node = self.cfg.cluster.num_gpus <= self.cfg.cluster.gpus_per_node
        return self.link_delay(handoff_bytes(done), same_node)

    def work(self, job: Job) -> float:
        """Serial GPU-seconds a hop costs at typical batching (load balancing and sizing)."""
        lat, m = self.lat, job.model
        if job.stage == "ar":
            budget = self.cfg.engine.max_num_batched_tokens
            full, rest = divmod(max(job.tokens, 1), budget)   # chunked prefill
            t = full * lat.prefill(m, budget) + (lat.prefill(m, rest) if rest else 0.0)
            if job.vision_tokens:
                t += lat.vision_encode(m, job.vision_tokens)
            if job.out_tokens > 1:
                b = DECODE_BATCH_FOR_ESTIMATES
                t += (job.out_tokens - 1) * lat.decode(m, b, job.tokens + job.out_tokens / 2) / b
            return t
        if job.stage == "vision_encode":
            return lat.vision_encode(m, job.vision_tokens)
        if job.stage == "text_encode":
            return sum(lat.text_encode(m, c, 1, job.tokens) for c in job.components)
        if job.stage in ("vae_encode", "vae_decode"):
            return lat.vae(m, job.stage, 1, job.height, job.width)
        if job.stage == "dit_step":
            return job.steps * lat.dit_step(m, job.weight, job.seq_len)
        raise ValueError(f"unknown stage {job.stage}")

    def pilot_work(self, key) -> dict[str, float]:
        """Offered work per key(job) over the pilot requests (for the sizing rule)."""
        out: dict[str, float] = {}
        for req in self.ctx.pilot:
            for j in plan_hops(req, self.fused):
                k = key(j)
                out[k] = out.get(k, 0.0) + self.work(j)
        return out

    def utilization(self, duration: float) -> dict:
        per_gpu = {g.name: (g.busy_time / duration if duration > 0 else 0.0) for g in self.gpus}
        roles: dict[str, list[GPU]] = {}
        for g in self.gpus:
            roles.setdefault(g.role, []).append(g)
        stage_busy: dict[str, float] = {}
        stage_gpus: dict[str, set] = {}
        for g in self.gpus:
            for st, b in g.busy_by_stage.items():
                stage_busy[st] = stage_busy.get(st, 0.0) + b
                stage_gpus.setdefault(st, set()).add(g.gid)
        per_stage = {st: b / (duration * len(stage_gpus[st])) if duration > 0 else 0.0
                     for st, b in stage_busy.items()}
        per_role = {r: sum(g.busy_time for g in gs) / (duration * len(gs)) if duration > 0 else 0.0
                    for r, gs in roles.items()}
        return {"mean_gpu": sum(per_gpu.values()) / max(len(per_gpu), 1), "per_gpu": per_gpu,
                "per_stage": per_stage, "per_pool": per_role,
                "gpus_per_pool": {r: len(gs) for r, gs in roles.items()}}


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


