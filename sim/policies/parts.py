"""The interfaces of a policy's parts (sim.policies: named, registered, composed by Policy), and
the flow that carries one request through its hops.

A part gets the run's `Policy` (sim.policies.policy) when it is built: the shared context
(environment, config, latency model), the GPUs and the helpers to make them and their engines.
"""
from __future__ import annotations

from typing import Any, ClassVar

from sim.core.gpu import GPU
from sim.core.kernel import Timer, clock
from sim.core.mypyc_compat import mypyc_attr
from sim.core.records import Job, Request, StageRecord
from sim.engines.pipeline import plan_hops
from sim.names import TRANSFER


class Flow:
    """Moves one request through its hops; the placement picks where each hop runs."""
    __slots__ = ("req", "hops", "i", "placement", "home", "work")

    def __init__(self, req: Request, hops: list[Job], placement: "Placement"):
        self.req = req
        self.hops = hops
        self.i = 0
        self.placement = placement
        self.home: Any = None           # where it was routed: its replica or LLM engine
        self.work = 0.0                 # its hops' work, as counted on `home` (replicas)

    def start(self, now: float) -> None:
        job = self.hops[0]
        job.on_done = self._done
        self.placement.dispatch(self, job, now)

    def _done(self, job: Job, now: float) -> None:
        job.on_done = None              # no Job -> Flow reference left: refcounting frees a
        place = self.placement          # finished request, no cyclic GC needed
        place.hop_done(self, job)
        self.i += 1
        if self.i == len(self.hops):
            self.req.finish = now + job.out_delay      # as the client sees the last output
            place.complete(self, now)
            return
        nxt = self.hops[self.i]
        nxt.on_done = self._done
        delay = place.transfer_delay(job, nxt)
        if delay > 0:
            self.req.stages.append(StageRecord(TRANSFER, "net", now, now, now + delay))
            place.env.timer(delay, self._arrived, nxt)
        else:
            place.dispatch(self, nxt, now)

    def finish(self, now: float) -> None:
        """The request has been served whole by one engine (BatchingRule.whole_engine), which
        ran every hop itself: no Job -> Flow reference is left, the placement completes it."""
        self.hops[self.i].on_done = None
        self.req.finish = now
        self.placement.complete(self, now)

    def _arrived(self, ev: Timer) -> None:
        """A transfer has ended: the next hop (the event's value) starts."""
        self.placement.dispatch(self, ev.value, clock(self.placement.env))


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests add placements)
class Placement:
    """Which GPUs hold which engines, how many of each (pool sizing), and where each hop of a
    request runs. `fused`: vision encoding inside the AR step for the pilot sizing (and for
    every request unless is_fused says otherwise); `gpu_class`: the GPUs it makes."""
    fused: ClassVar[bool] = True
    gpu_class: ClassVar[type[GPU]] = GPU

    def __init__(self, policy: Any):
        self.policy = policy
        self.env = policy.env
        self.cfg = policy.cfg
        self.lat = policy.lat
        self.notes: dict = policy.notes
        self.on_complete = policy.ctx.on_complete

    def build(self) -> None:
        """Make the GPUs and their engines (Policy.new_gpu), sized for the pilot requests."""
        raise NotImplementedError

    reuse: Any = None           # the policy's cache part when a cache is on (sim.policies.reuse)

    def is_fused(self, req: Request) -> bool:
        """Does the AR engine encode this request's images inside its step?"""
        return self.fused

    def plan_hops(self, req: Request, fused: bool) -> list[Job]:
        """The hops of a request under this placement (sim.engines.pipeline.plan_hops)."""
        return plan_hops(req, fused)

    def served_whole(self, req: Request) -> bool:
        """Is the request served whole by one engine (BatchingRule.whole_engine)? Its hops are
        then not run one by one, and their work is never read."""
        return False

    def dispatch(self, flow: Flow, job: Job, now: float) -> None:
        """Send a hop to the engine or queue that serves it."""
        raise NotImplementedError

    def hop_done(self, flow: Flow, job: Job) -> None:
        """A hop has finished (before the next one starts): routers learn that load fell."""

    def transfer_delay(self, done: Job, nxt: Job) -> float:
        """Seconds to hand `done`'s output to the GPU of `nxt` (0: the same GPU)."""
        return 0.0

    def complete(self, flow: Flow, now: float) -> None:
        self.on_complete(flow.req)


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests add routers)
class Router:
    """Picks one of `items` (replicas or LLM engines of one model) for each request; told of
    load changes with changed(item)."""

    def __init__(self, items: list):
        self.items = items

    def pick(self, now: float) -> Any:
        raise NotImplementedError

    def changed(self, item: Any) -> None:
        """`item`'s load changed (items not routed here are ignored)."""


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: sim/policies/batching.py)
class BatchingRule:
    """Makes the engines of the batched stages: DiT engines (step-level batching) and one-shot
    engines (encoders, VAE)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def dit_engine(self, model: str, queue: Any, lat: Any) -> Any:
        raise NotImplementedError

    def pass_engine(self, stage: str, model: str, queue: Any, lat: Any) -> Any:
        raise NotImplementedError

    def whole_engine(self, model: str, lat: Any) -> Any:
        """An engine that serves a diffusion model's requests whole on a replica (every stage,
        one FIFO queue: submit(flow, now), work(req)), or None: the replica is built from
        stage engines (an AR engine for the condition encoder, dit_engine, pass_engine)."""
        return None

    def whole_work(self, req: Any, lat: Any) -> float | None:
        """Seconds `req` takes alone on the engine whole_engine makes for its model (replica
        sizing), or None when no such engine serves it."""
        return None

    def describe(self) -> dict:
        """What the run's summary should say of this rule's engines (empty: nothing)."""
        return {}


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: sim/policies/scaling.py)
class Scaling:
    """Moves GPUs between pools while the run goes on (or not). `moves` lists the moves made
    (None: this part never moves any); report() adds to the utilization summary."""
    moves: list | None = None

    def __init__(self, policy: Any):
        self.policy = policy

    def start(self) -> None:
        """Called once the placement is built."""

    def report(self, utilization: dict) -> None:
        """Add this part's figures to the utilization summary."""
