"""The GPU executor: a simulated GPU runs one unit of work at a time from the engines on it.

A unit is a run of engine iterations whose batch does not change (`ends` = cumulative end
offsets of its steps). It is committed in one event, unless new work reaches the GPU while it
runs: then it is cut at the next step boundary and the engines re-plan, exactly as if every
step had been simulated (jump-ahead; tests/test_sim_properties.py checks it against runs with
one event per step). Engines on one GPU time-share it round-robin at step boundaries (baseline
replicas, co-located pools): a unit spans several steps only while no other engine there has
work."""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Sequence

from sim.core.kernel import NORMAL, Agenda, Call, Target
from sim.core.mypyc_compat import mypyc_attr

if TYPE_CHECKING:
    from sim.core.kernel import Kernel  # noqa: F401 (annotations)
    from sim.engines.queues import StageQueue  # noqa: F401 (annotations)


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests script their own engines)
class Engine:
    """What the GPU executor and the queues need of an engine: the base of sim/engines/'s
    AREngine, DiTEngine, BatchEngine and the vLLM-Omni engines (a class, not a Protocol, so the
    compiled executor calls `plan` and reads `gpu` natively). `gpu` is set when the engine is
    placed (GPU.add). `queue` is the shared queue the engine takes work from, or None for an
    engine with its own (an AR engine's waiting queue): a GPU that reports unit ends (PoolGPU)
    tells that queue its engine may be free. Each engine also has `load()`, its outstanding work
    (routers and the autoscaler compare it; an AR engine counts tokens, the others seconds)."""

    def __init__(self) -> None:
        self.gpu: GPU | None = None
        self.queue: Any = None          # a StageQueue, or None

    def placed(self) -> "GPU":
        """Its GPU (an engine plans, commits and times its work only once placed)."""
        g = self.gpu
        if g is None:
            raise RuntimeError(f"{type(self).__name__} is not placed on a GPU")
        return g

    def plan(self, now: float) -> Optional["Unit"]:
        """The next unit to run from `now`, or None when there is nothing runnable."""
        raise NotImplementedError

    def has_work(self) -> bool:
        """Anything queued or running."""
        raise NotImplementedError

    def can_join(self, job: Any) -> bool:
        """Could `job` join the running batch at the next step boundary?"""
        raise NotImplementedError


class Unit:
    __slots__ = ("ends", "commit", "stage", "engine")

    def __init__(self, ends: Sequence[float], commit: Callable[[int, float], None], stage: str,
                 engine: Any = None):
        self.ends = ends
        self.commit = commit
        self.stage = stage
        self.engine = engine


class Steps(Sequence[float]):
    """A unit's `ends` computed on demand (the list of cumulative end offsets it stands for):
    items, slices and len as that list, and bisection in closed form."""
    __slots__ = ()

    def bisect_left(self, x: float) -> int:
        """bisect.bisect_left(self, x)."""
        raise NotImplementedError

    def bisect_right(self, x: float) -> int:
        """bisect.bisect_right(self, x)."""
        raise NotImplementedError


class EqualSteps(Steps):
    """The `ends` of k steps of t seconds each (t * i, i = 1..k: the list it replaces), computed
    on demand: a stable DiT batch plans up to its next completion, dozens of steps, of which the
    GPU reads the last end, and a few more only when it cuts the unit."""
    __slots__ = ("t", "k")

    def __init__(self, t: float, k: int):
        self.t = t
        self.k = k

    def __len__(self) -> int:
        return self.k

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.t * j for j in range(1, self.k + 1)][i]
        if i < 0:
            i += self.k
        if not 0 <= i < self.k:
            raise IndexError(i)
        return self.t * (i + 1)

    def bisect_left(self, x: float) -> int:
        t, k = self.t, self.k
        lo, hi = 0, k
        while lo < hi:
            mid = (lo + hi) // 2
            if t * (mid + 1) < x:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def bisect_right(self, x: float) -> int:
        t, k = self.t, self.k
        lo, hi = 0, k
        while lo < hi:
            mid = (lo + hi) // 2
            if t * (mid + 1) <= x:
                lo = mid + 1
            else:
                hi = mid
        return lo


def steps_before(ends: Any, x: float) -> int:
    """bisect_left(ends, x) for a list or tuple of ends or a Steps (in closed form there)."""
    if type(ends) is tuple or type(ends) is list:
        return bisect_left(ends, x)
    return ends.bisect_left(x)


def steps_through(ends: Any, x: float) -> int:
    """bisect_right(ends, x) for a list or tuple of ends or a Steps (in closed form there)."""
    if type(ends) is tuple or type(ends) is list:
        return bisect_right(ends, x)
    return ends.bisect_right(x)


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests subclass it)
class GPU(Target):
    def __init__(self, env: "Kernel", gid: int, node: int, step_jump: bool = True):
        self.env = env
        self.gid = gid
        self.node = node
        self.name = f"gpu{gid}"
        self.engines: list[Engine] = []
        self.role = ""
        self.step_jump = step_jump
        self.cur: Unit | None = None
        self.start = 0.0
        self.planned = 0          # steps of cur that the pending event will commit
        self.token = 0
        self.rr = 0
        self.busy_time = 0.0
        self.busy_by_stage: dict[str, float] = defaultdict(float)
        self.events = 0
        self.available = True     # False while being re-provisioned by an autoscaler
        self.committing = False   # engines' state is mid-update: plan nothing until it is done
        self.agenda: Agenda = env.agenda   # the kernel's clock and heap (native reads)

    def add(self, engine: Engine) -> None:
        self.engines.append(engine)
        engine.gpu = self

    def has_work(self) -> bool:
        return self.cur is not None or any(e.has_work() for e in self.engines)

    def kick(self, lag: int = 0) -> None:
        """New work may be runnable here: start it if idle, else cut the running unit at its
        next step boundary so the batch can change -- or `lag` steps later, when the work
        cannot join before (an arrival under async scheduling, see AREngine._enter)."""
        if self.committing:
            return
        if self.cur is None:
            if self.available:
                self._start_next()
        elif len(self.cur.ends) > 1:
            self._cut(lag)

    def _start_next(self) -> None:
        engines = self.engines
        n = len(engines)
        now = self.agenda.now
        if n == 1:                      # most GPUs of a large cluster: no round robin to keep
            u = engines[0].plan(now)
            if u is None:
                self.cur = None
                return
            self.rr = 0
            if not self.step_jump and len(u.ends) > 1:
                u.ends = u.ends[:1]
            self._run(u, len(u.ends))
            return
        for i in range(n):
            e = engines[(self.rr + i) % n]
            u = e.plan(now)
            if u is not None:
                self.rr = (self.rr + i + 1) % n
                # one step when jumping is off, or when another engine here has work: engines
                # share the GPU round-robin at step boundaries, as if every step were simulated
                if len(u.ends) > 1 and (not self.step_jump or (n > 1 and any(
                        o is not e and o.has_work() for o in engines))):
                    u.ends = u.ends[:1]
                self._run(u, len(u.ends))
                return
        self.cur = None

    def _run(self, u: Unit, k: int) -> None:
        self.cur = u
        self.start = self.agenda.now
        self._schedule(k)

    def _schedule(self, k: int) -> None:
        self.token += 1
        self.planned = k
        a = self.agenda
        u = self.cur
        assert u is not None
        # the event's value is its token: a cut reschedules, and the stale event is ignored
        delay = self.start + u.ends[k - 1] - a.now
        if delay < 0:
            raise ValueError(f"Negative delay {delay}")
        a.push(delay, NORMAL, Call(self, self.token))

    def on_call(self, token: int) -> None:
        """A unit-end event (its value: the token of the schedule that made it)."""
        if token == self.token:         # else a cut rescheduled it: stale
            self._done(token)

    def _cut(self, lag: int = 0) -> None:
        u = self.cur
        assert u is not None
        el = self.agenda.now - self.start
        k = steps_before(u.ends, el - 1e-12) + 1 + lag  # first step that ends at or after now
        if k > len(u.ends):
            k = len(u.ends)
        if k < self.planned:
            self._schedule(k)

    def _done(self, tok: int) -> None:
        # (called only by on_call, and by PoolGPU._done from it, once tok == self.token)
        u, k = self.cur, self.planned
        assert u is not None
        dur = u.ends[k - 1]
        self.busy_time += dur
        self.busy_by_stage[u.stage] += dur
        self.events += 1
        self.cur = None
        self.committing = True
        try:
            u.commit(k, self.agenda.now)
        finally:
            self.committing = False
        if self.available:
            self._start_next()


class PoolGPU(GPU):
    """A GPU that, whenever one of its units ends (the only moment it can become free), tells the
    shared queues its engines take from, so each finds its first free GPU without scanning the
    pool (sim.engines.queues.FreeEngines)."""
    reports_unit_end: ClassVar[bool] = True

    def _done(self, tok: int) -> None:
        if tok == self.token:
            for e in self.engines:
                if e.queue is not None:
                    q: StageQueue = e.queue
                    q.free.hint(e)
        GPU._done(self, tok)
