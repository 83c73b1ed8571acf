"""A run's serving policy: the parts of a configuration (sim.policies.POLICIES) composed over the
run's context, with the helpers every part shares (GPUs, AR engines, hop costs, utilization)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sim.config import ConfigError, SimConfig
from sim.core.gpu import GPU
from sim.core.kernel import Kernel
from sim.core.mypyc_compat import mypyc_attr
from sim.core.records import Job, Request
from sim.engines.ar import AREngine, FrontEnd
from sim.engines.cost import hop_work
from sim.engines.latency import LatencyModel
from sim.engines.memory import GPUContents, kv_capacity_tokens
from sim.engines.pipeline import handoff_bytes, plan_hops
from sim.engines.queues import QUEUE_ORDERS
from sim.names import VISION_ENCODE
from sim.policies import (BATCHING, PLACEMENTS, POLICIES, REUSE, ROUTERS, SCALING, Parts, load_part,
                          with_pd_split)
from sim.policies.parts import BatchingRule, Flow, Placement, Scaling

PILOT_REQUESTS = 2000       # the first requests of the workload, by which pools are sized


@dataclass
class SimContext:
    """What a run gives its policy."""
    env: Kernel
    cfg: SimConfig
    lat: LatencyModel
    on_complete: Callable[[Request], None]
    itl_sink: Callable[..., None]            # (duration_s, weight) -> None
    done: Callable[[], bool] = lambda: False  # all requests completed?
    pilot: list[Request] = field(default_factory=list)


def parts_of(name: str, cfg: SimConfig) -> Parts:
    """The parts of policy `name` under the config's policy.* settings."""
    if name not in POLICIES:
        raise ConfigError(f"policy.name={name!r} is unknown; allowed: {sorted(POLICIES)}")
    parts = POLICIES[name](cfg.policy)
    if cfg.policy.pd_split:
        try:
            parts = with_pd_split(parts)
        except ValueError as e:
            raise ConfigError(f"policy.pd_split=true with policy.name={name!r}: {e}") from None
    return parts


def build_policy(name: str, ctx: SimContext) -> "Policy":
    """Policy `name`, composed and built (GPUs placed, engines made)."""
    p = Policy(ctx, name, parts_of(name, ctx.cfg))
    p.build()
    return p


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests subclass it)
class Policy:
    """Composes a configuration's parts: the placement builds the GPUs and engines and sends
    each hop where it runs, asking the router which replica or LLM engine; shared queues follow
    the queue order and priority classes; the batching rule makes the batched engines; the
    scaling part may move GPUs between pools while the run goes on."""

    def __init__(self, ctx: SimContext, name: str, parts: Parts):
        self.ctx = ctx
        self.env = ctx.env
        self.cfg = ctx.cfg
        self.lat = ctx.lat
        self.name = name
        self.parts = parts
        self.gpus: list[GPU] = []
        self.notes: dict = {}
        if parts.queue_order not in QUEUE_ORDERS:
            raise ConfigError(f"policy {name}: queue order {parts.queue_order!r} is unknown; "
                              f"allowed: {list(QUEUE_ORDERS)}")
        self.queue_order = parts.queue_order
        self.priority = parts.priority
        # the cluster's links, read on every hop (native fields, not config lookups)
        c = self.cfg.cluster
        self._layout: Any = c.layout
        self._one_node: bool = c.num_gpus <= c.gpus_per_node
        self._per_node: int = c.gpus_per_node
        self._nvlink_bps: float = c.nvlink_gb_s * 1e9
        self._network_bps: float = c.network_gb_s * 1e9
        self._link_s: float = c.transfer_latency_us * 1e-6
        self.router_class: Any = load_part(ROUTERS, parts.router)
        self.batching: BatchingRule = load_part(BATCHING, parts.batching)(self.cfg)
        self.placement: Placement = load_part(PLACEMENTS, parts.placement)(self)
        self.scaling: Scaling = load_part(SCALING, parts.scaling)(self)
        self.reuse: Any = load_part(REUSE, parts.reuse)(self)

    def build(self) -> None:
        self.placement.build()
        self.scaling.start()
        if self.reuse.active:           # (else no hook on the dispatch path)
            self.placement.reuse = self.reuse

    @property
    def moves(self) -> list | None:
        """GPU moves between pools (the scaling part's), None when it never moves any."""
        return self.scaling.moves

    def admit(self, req: Request, now: float) -> None:
        """A request reaches the cluster: plan its hops, cost them, start its flow."""
        place = self.placement
        hops = place.plan_hops(req, place.is_fused(req))
        if not place.served_whole(req):     # (served whole: the engine costs it, not its hops)
            lat, budget = self.lat, self.cfg.engine.max_num_batched_tokens
            for j in hops:
                j.work = hop_work(lat, j, budget)
        Flow(req, hops, place).start(now)

    # --- helpers the parts share -------------------------------------------------------------
    def new_gpu(self, role: str) -> GPU:
        gid = len(self.gpus)
        g = self.placement.gpu_class(self.env, gid, gid // self.cfg.cluster.gpus_per_node,
                                     self.cfg.diffusion.step_jump)
        g.role = role
        self.gpus.append(g)
        return g

    def pinned_gpus(self) -> list[GPU]:
        """The GPUs of a pinned layout (cluster.layout), index i = GPU i (node i // gpus_per_node),
        made once, in index order."""
        if not self.gpus:
            for i in range(self.cfg.cluster.num_gpus):
                self.new_gpu("idle")
        return self.gpus

    def link_delay(self, nbytes: int, same_node: bool, kind: str | None = None) -> float:
        """Seconds to move nbytes between two GPUs: a pinned layout's measured connector for this
        hand-off kind (cluster.layout.handoff: "encoder", "kv") when it has one, else NVLink inside
        a node / the network across nodes, plus cluster.transfer_latency_us."""
        layout = self._layout
        if kind is not None and layout is not None:
            link = layout.handoff.get(kind)
            if link is not None:
                return nbytes / (link.gb_s * 1e9) + link.latency_us * 1e-6
        bw = self._nvlink_bps if same_node else self._network_bps
        return nbytes / bw + self._link_s

    def same_node(self, done: Job, nxt: Job) -> bool:
        """Do two hops' GPUs share a node? Without a pinned layout: when the cluster fits in one;
        under cluster.layout: when every GPU of the two hops' pools is on one node."""
        layout = self._layout
        if layout is None:
            return self._one_node
        key_of = getattr(self.placement, "key_of", None)
        pools = layout.pools
        ids = [i for j in (done, nxt) for i in (pools.get(key_of(j), ()) if key_of else ())]
        if not ids:
            return self._one_node
        per_node = self._per_node
        return len({i // per_node for i in ids}) == 1

    def hop_delay(self, done: Job, nxt: Job) -> float:
        """Transfer of a hop's output between two different GPUs (a vision encoder's embeddings
        are the `encoder` hand-off of a pinned layout's measured links)."""
        kind = "encoder" if done.stage == VISION_ENCODE else None
        return self.link_delay(handoff_bytes(done), self.same_node(done, nxt), kind)

    def pilot_work(self, key: Callable[[Job], str], fused: bool) -> dict[str, float]:
        """Offered work per key(job) over the pilot requests (for pool sizing)."""
        out: dict[str, float] = {}
        lat, budget = self.lat, self.cfg.engine.max_num_batched_tokens
        for req in self.ctx.pilot:
            for j in self.placement.plan_hops(req, fused):
                k = key(j)
                out[k] = out.get(k, 0.0) + hop_work(lat, j, budget)
        return out

    def make_ar(self, llm_model: str, contents: GPUContents, priority: bool) -> AREngine:
        """An AR engine for `llm_model` on a GPU holding `contents` (its KV capacity follows),
        with the config's vLLM engine settings."""
        e, c = self.cfg.engine, self.cfg.cluster
        cap = e.kv_capacity_tokens
        if cap is None:
            measured = self.lat.engine_settings(llm_model)
            cap = kv_capacity_tokens(llm_model, contents, c.gpu_mem_gib, e.gpu_memory_utilization, measured)
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
                        itl_sink=self.ctx.itl_sink, max_model_len=e.max_model_len,
                        reserve_full_isl=e.scheduler_reserve_full_isl)

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
        u = {"mean_gpu": sum(per_gpu.values()) / max(len(per_gpu), 1), "per_gpu": per_gpu,
             "per_stage": per_stage, "per_pool": per_role,
             "gpus_per_pool": {r: len(gs) for r, gs in roles.items()}}
        self.scaling.report(u)
        if self.reuse.active:
            self.notes["caches"] = self.reuse.report()
        return u
