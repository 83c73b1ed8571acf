"""Queues of waiting jobs: the stage queue (its order: FIFO or highest response ratio next,
with optional priority classes) and the index of a shared queue's free engines."""
from __future__ import annotations

from collections import deque
from heapq import heappop, heappush
from itertools import chain
from typing import Any, Callable, Final, Iterator

from sim.core.gpu import GPU, Engine
from sim.core.records import Job, StageRecord
from sim.names import AR, DECODE, PREFILL

PRIORITY: Final = {"interactive": 0, "standard": 1, "batch": 2}   # SLO class -> priority level
QUEUE_ORDERS = ("fifo", "hrrn")     # first come first served | highest response ratio next
FIFO, HRRN = QUEUE_ORDERS

# what a StageQueue holds: Jobs, or an AR engine's Seqs (sim.engines.ar: duck-typed priority,
# work and enqueued)
Queued = Any


class StageQueue:
    """Waiting jobs of one stage, shared by the engines that subscribe to it (a pool's central
    queue) or private to one engine. In `order` (FIFO or HRRN), within priority classes when
    `priority` (interactive first: sim.engines.queues.PRIORITY)."""

    # hrrn order = highest response ratio next, (wait + work) / work: short jobs go first, and a
    # long job's ratio grows while it waits, so nothing starves (a job that has waited as long as
    # its own work outranks every fresh job)

    def __init__(self, name: str, priority: bool = False, order: str = FIFO, clock=None):
        self.name = name
        if order not in QUEUE_ORDERS:
            raise ValueError(f"queue order {order!r} is unknown; allowed: {list(QUEUE_ORDERS)}")
        self.order = order
        self.hrrn = order == HRRN
        self.clock = clock
        self.levels: list[deque[Queued]] = [deque(), deque(), deque()] if priority else [deque()]
        self.priority = priority
        self.engines: list[Engine] = []   # engines that take from this queue (append to add)
        self.free = FreeEngines(self.engines)
        self.work = 0.0                 # sum of queued job work (seconds)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def put(self, job: Queued, now: float) -> None:
        job.enqueued = now
        lvl = min(job.priority, len(self.levels) - 1) if self.priority else 0
        self.levels[lvl].append(job)
        self.n += 1
        self.work += job.work
        self._wake(job)

    def _wake(self, job: Queued) -> None:
        if not self.engines:
            return
        e = self.free.first()           # an idle GPU first
        if e is not None:
            e.placed().kick()
            return
        for e in self.engines:          # else cut (at the next step) every busy GPU where it
            g = e.gpu                   # could join the batch or another engine's unit runs
            if g is not None and g.available:
                u = g.cur
                if e.can_join(job) or (u is not None and u.engine is not e):
                    g.kick()

    def unsubscribe(self, engine: Engine) -> None:
        """Take an engine off this queue (its GPU changes pool)."""
        self.engines.remove(engine)
        self.free.stale()

    def __iter__(self) -> Iterator[Queued]:
        if not self.hrrn:
            levels = self.levels
            return iter(levels[0]) if len(levels) == 1 else chain.from_iterable(levels)
        key = _neg_ratio(self.clock())
        out: list[Queued] = []
        for lvl in self.levels:
            out += sorted(lvl, key=key) if len(lvl) > 1 else lvl
        return iter(out)

    def head(self) -> Queued:
        for lvl in self.levels:
            if lvl:
                if not self.hrrn or len(lvl) == 1:
                    return lvl[0]
                return min(lvl, key=_neg_ratio(self.clock()))   # first of the stable sort
        return None

    def remove(self, job: Queued) -> None:
        # a job sits in the level put() chose; look there first, and test membership before
        # deque.remove (whose "not in deque" ValueError formats the job's repr: slow)
        levels = self.levels
        first = levels[min(job.priority, len(levels) - 1)] if len(levels) > 1 else levels[0]
        for lvl in (first, *levels):
            if job in lvl:
                lvl.remove(job)
                self.n -= 1
                self.work -= job.work
                return

    def popleft(self) -> Queued:
        if self.hrrn:
            job = self.head()
            if job is None:
                raise IndexError("empty queue")
            self.remove(job)
            return job
        for lvl in self.levels:
            if lvl:
                job = lvl.popleft()
                self.n -= 1
                self.work -= job.work
                return job
        raise IndexError("empty queue")


def _neg_ratio(now: float) -> Callable[[Job], float]:
    """Sort key of the hrrn order: minus the response ratio (wait + work) / work."""
    return lambda j: -(now - j.enqueued + j.work) / max(j.work, 1e-9)


class FreeEngines:
    """The first engine, in `engines` order, whose GPU is free (no unit running, available): what
    a scan of the engines finds, from a heap of positions instead of a scan of a large pool.

    A GPU becomes free only when one of its units ends; GPUs that report that (`reports_unit_end`,
    see sim.core.gpu.PoolGPU) hint their engines back into the heap then, and a lookup drops
    the busy entries it meets on top. Queues whose GPUs do not report are scanned. Membership
    changes (an append to `engines`, or StageQueue.unsubscribe) re-index."""

    def __init__(self, engines: list[Engine]):
        self.engines = engines
        self.known = -1                 # len(engines) when indexed; -1: index at next lookup
        self.pos: dict[int, int] = {}
        self.heap: list[int] = []
        self.queued: list[bool] = []
        self.hinted = False

    def stale(self) -> None:
        self.known = -1

    def _index(self) -> None:
        n = len(self.engines)
        self.pos = {id(e): i for i, e in enumerate(self.engines)}
        self.heap = list(range(n))      # positions whose GPU may be free (a heap: sorted)
        self.queued = [True] * n
        self.hinted = all(getattr(e.gpu, "reports_unit_end", False) for e in self.engines)
        self.known = n

    def hint(self, engine: Engine) -> None:
        """`engine`'s GPU may have become free."""
        if self.known == len(self.engines):
            i = self.pos.get(id(engine))
            if i is not None and not self.queued[i]:
                self.queued[i] = True
                heappush(self.heap, i)

    def first(self) -> Engine | None:
        """The engine to kick, or None when every GPU of the queue is busy."""
        if len(self.engines) != self.known:
            self._index()
        engines = self.engines
        if not self.hinted:
            for e in engines:
                if _free(e.gpu):
                    return e
            return None
        heap, queued = self.heap, self.queued
        while heap:
            i = heap[0]
            if _free(engines[i].gpu):
                return engines[i]
            heappop(heap)
            queued[i] = False
        return None


def _free(g: GPU | None) -> bool:
    return g is not None and g.cur is None and g.available


def start_record(job: Job, server: str, now: float) -> None:
    rec = StageRecord(job.stage if job.stage != AR else DECODE if job.pre_generated else PREFILL,
                      server, job.enqueued, now)
    job.record = rec
    job.server = server
    job.req.stages.append(rec)
