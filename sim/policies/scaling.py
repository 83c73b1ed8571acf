"""Scaling parts of a policy: whether GPUs move between pools while the run goes on.
Registered by name in sim.policies.SCALING.

- `static`: the placement's GPUs stay where they are.
- `pressure` (stage pools only): every policy.autoscale_interval_s the pool with the most queued
  and running work per GPU takes an idle GPU from the pool with the least, when it has at least
  four times as much, after a weight-reload delay (policy.autoscale=false: no moves).
"""
from __future__ import annotations

from typing import Any

from profiler.models import load_model
from sim.policies.parts import Scaling
from sim.policies.placement import SHARED

RELOAD_GB_S = 5.0          # host -> GPU weight load rate when a GPU changes pool


class Static(Scaling):
    pass


class Pressure(Scaling):
    def start(self) -> None:
        pol = self.policy
        self.place: Any = pol.placement          # StagePools (pools, llm, provision)
        self.env = pol.env
        self.lat = pol.lat
        self.interval = pol.cfg.policy.autoscale_interval_s
        self.moves = []
        # a pinned layout (cluster.layout) is the deployment as it ran: its GPUs never move
        if pol.cfg.policy.autoscale and len(self.place.pools) > 1 and pol.cfg.cluster.layout is None:
            self.env.timer(self.interval, self._tick)

    def pressure(self, key: str) -> float:
        """Seconds of queued + running work per available GPU of the pool."""
        place = self.place
        gpus = [g for g in place.pools[key] if g.available]
        if not gpus:
            return float("inf")
        role, model = key.split(":")
        if role == "llm":
            per_token = self.lat.prefill(model, 1024) / 1024
            work = sum(e.load() for e in place.llm.get(model, [])) * per_token
        else:
            queues = {id(e.queue): e.queue for g in gpus for e in g.engines}
            work = sum(q.work for q in queues.values()) + sum(e.busy_work() for g in gpus for e in g.engines)
        return work / len(gpus)

    def _tick(self, _ev: Any) -> None:
        if self.policy.ctx.done():
            return
        self._rebalance()
        self.env.timer(self.interval, self._tick)

    def _rebalance(self) -> None:
        place, interval = self.place, self.interval
        pr = {k: self.pressure(k) for k in place.pools if k not in place.colocated and k != SHARED
              and place.pools[k]}
        hi = max(pr, key=pr.get)
        donors = [k for k in sorted(pr, key=pr.get) if k != hi
                  and sum(g.available for g in place.pools[k]) > 1]
        if not donors or pr[hi] < interval:
            return
        lo = donors[0]
        if pr[hi] < 4 * pr[lo] + 1e-9:
            return
        idle = [g for g in place.pools[lo] if g.available and not g.has_work()]
        if idle:
            self._move(idle[-1], lo, hi)

    def _move(self, g: Any, src: str, dst: str) -> None:
        place = self.place
        g.available = False
        for members in place.pools.values():
            if g in members:
                members.remove(g)
        for e in g.engines:
            if e.queue is None:             # an LLM engine (its own queue): leaves the router
                place.llm[e.model].remove(e)
                place._routers.pop(e.model, None)
            else:
                e.queue.unsubscribe(e)
        role, model = dst.split(":")
        spec = load_model(model)
        comps = {"llm": list(spec.components), "encoder": ["vision"], "text_encoder": list(spec.text_encoders),
                 "vae": ["vae"], "dit": ["transformer"]}[role]
        nbytes = sum(spec.component_bytes(c) for c in comps)
        delay = nbytes / (RELOAD_GB_S * 1e9)
        self.moves.append({"t": round(self.env.now, 3), "gpu": g.name, "from": src, "to": dst,
                           "reload_s": round(delay, 2)})

        def ready(_e: Any) -> None:
            place.provision(dst, g)
            g.available = True
            g.kick()
        self.env.timer(delay, ready)

    def report(self, utilization: dict) -> None:
        utilization["autoscale_moves"] = len(self.moves)
