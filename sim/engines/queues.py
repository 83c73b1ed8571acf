"""A job is one hop of a request's pipeline, waiting for or running on an engine."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from heapq import heappop, heappush
from itertools import chain
from typing import Any, Callable, Iterator, Optional

from sim.core.mypyc_compat import mypyc_attr
from sim.core.records import Request, StageRecord

PRIORITY = {"interactive": 0, "standard": 1, "batch": 2}

# what a StageQueue holds: Jobs, or an AR engine's Seqs (sim.engines.ar: duck-typed priority,
# work and enqueued)
Queued = Any


@dataclass(slots=True, eq=False)
class Job:
    req: Request
    stage: str                 # ar | vision_encode | text_encode | vae_encode | dit_step | vae_decode
    model: str
    on_done: Optional[Callable[["Job", float], None]] = None
    # payload (meaning depends on stage)
    tokens: int = 0            # AR prompt tokens (text + image); encoder tokens; DiT text tokens
    vision_tokens: int = 0     # image tokens encoded inside the AR step (baseline) / by an encoder
    out_tokens: int = 0        # AR tokens to generate (0 = prefill only, e.g. a condition encoder)
    height: int = 0
    width: int = 0
    seq_len: int = 0           # DiT image-sequence tokens
    steps: int = 0
    weight: int = 1            # DiT transformer batch share (2 with CFG)
    components: tuple = ()
    priority: int = 1
    record: Optional[StageRecord] = None
    server: str = ""
    work: float = 0.0          # estimated service seconds (load balancing)
    enqueued: float = 0.0
    out_delay: float = 0.0     # from its last output leaving the engine to the client seeing it

    # written out (the dataclass still gives repr): compiled, a native __init__ instead of the
    # dataclass-generated Python one (one Job per hop)
    def __init__(self, req: Request, stage: str, model: str,
                 on_done: Optional[Callable[["Job", float], None]] = None, tokens: int = 0,
                 vision_tokens: int = 0, out_tokens: int = 0, height: int = 0, width: int = 0,
                 seq_len: int = 0, steps: int = 0, weight: int = 1, components: tuple = (),
                 priority: int = 1, record: Optional[StageRecord] = None, server: str = "",
                 work: float = 0.0, enqueued: float = 0.0, out_delay: float = 0.0) -> None:
        self.req = req
        self.stage = stage
        self.model = model
        self.on_done = on_done
        self.tokens = tokens
        self.vision_tokens = vision_tokens
        self.out_tokens = out_tokens
        self.height = height
        self.width = width
        self.seq_len = seq_len
        self.steps = steps
        self.weight = weight
        self.components = components
        self.priority = priority
        self.record = record
        self.server = server
        self.work = work
        self.enqueued = enqueued
        self.out_delay = out_delay

    def shape(self, buckets: list[int] | None = None) -> tuple:
        if self.stage == "dit_step":
            return (_bucket(self.seq_len, buckets) if buckets else self.seq_len,)
        if self.stage in ("vae_encode", "vae_decode"):
            return (self.height, self.width)
        return ()


def _bucket(x: int, buckets: list[int]) -> int:
    for b in buckets:
        if x <= b:
            return b
    return x


class StageQueue:
    """Waiting jobs of one stage, shared by the engines that subscribe to it (a pool's central
    queue) or private to one engine. FCFS, or by priority class then arrival when `priority`."""

    # sjf order = highest response ratio next, (wait + work) / work: short jobs go first, and a
    # long job's ratio grows while it waits, so nothing starves (a job that has waited as long as
    # its own work outranks every fresh job)

    def __init__(self, name: str, priority: bool = False, order: str = "fifo", clock=None):
        self.name = name
        self.order = order              # fifo | sjf (shortest estimated work first, HRRN aging)
        self.clock = clock
        self.levels: list[deque[Queued]] = [deque(), deque(), deque()] if priority else [deque()]
        self.priority = priority
        self.engines: list = []         # engines that take from this queue (append to add)
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
            e.gpu.kick()
            return
        for e in self.engines:          # else cut (at the next step) every busy GPU where it
            g = e.gpu                   # could join the batch or another engine's unit runs
            if g is not None and g.available and (e.can_join(job) or g.cur.engine is not e):
                g.kick()

    def unsubscribe(self, engine) -> None:
        """Take an engine off this queue (its GPU changes pool)."""
        self.engines.remove(engine)
        self.free.stale()

    def __iter__(self) -> Iterator[Queued]:
        if self.order != "sjf":
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
                if self.order != "sjf" or len(lvl) == 1:
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
        if self.order == "sjf":
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
    """Sort key of the sjf order: minus the response ratio (wait + work) / work."""
    return lambda j: -(now - j.enqueued + j.work) / max(j.work, 1e-9)


@mypyc_attr(native_class=False)  # (compiled: a plain class; tests put a scan in for `first`)
class FreeEngines:
    """The first engine, in `engines` order, whose GPU is free (no unit running, available): what
    a scan of the engines finds, from a heap of positions instead of a scan of a large pool.

    A GPU becomes free only when one of its units ends; GPUs that report that (`reports_unit_end`,
    see sim.policies.policy.PoolGPU) hint their engines back into the heap then, and a lookup drops
    the busy entries it meets on top. Queues whose GPUs do not report are scanned. Membership
    changes (an append to `engines`, or StageQueue.unsubscribe) re-index."""

    def __init__(self, engines: list):
        self.engines = engines
        self.known = -1                 # len(engines) when indexed; -1: index at next lookup

    def stale(self) -> None:
        self.known = -1

    def _index(self) -> None:
        n = len(self.engines)
        self.pos = {id(e): i for i, e in enumerate(self.engines)}
        self.heap = list(range(n))      # positions whose GPU may be free (a heap: sorted)
        self.queued = [True] * n
        self.hinted = all(getattr(e.gpu, "reports_unit_end", False) for e in self.engines)
        self.known = n

    def hint(self, engine) -> None:
        """`engine`'s GPU may have become free."""
        if self.known == len(self.engines):
            i = self.pos.get(id(engine))
            if i is not None and not self.queued[i]:
                self.queued[i] = True
                heappush(self.heap, i)

    def first(self):
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


def _free(g) -> bool:
    return g is not None and g.cur is None and g.available


def start_record(job: Job, server: str, now: float) -> None:
    rec = StageRecord(job.stage if job.stage != "ar" else "prefill", server, job.enqueued, now)
    job.record = rec
    job.server = server
    job.req.stages.append(rec)
