"""DiT server with step-level batching: requests join and leave the running batch at step
boundaries; CFG doubles a request's share of the transformer batch; which shapes may share a
batch is configurable (exact sequence length, padded to a bucket, or any, padded to the max).
A batch that does not change is advanced to its next completion in one unit (jump-ahead)."""
from __future__ import annotations

from typing import Any, Protocol

from sim.core.gpu import Engine, EqualSteps, Unit
from sim.core.records import Job
from sim.engines.queues import StageQueue, start_record
from sim.names import DIT_STEP


MIN_BATCH_GAIN = 0.05   # efficient_only: join only if the joint step saves >= 5% over separate steps


class DiTStepLaw(Protocol):
    """What the engine needs of the latency model (sim.engines.latency.LatencyModel in runs; a
    law given as a function in tests): one transformer step's seconds for a batch."""

    def dit_step(self, model: str, batch: float, seq: float) -> float: ...


class DiTEngine(Engine):
    def __init__(self, model: str, queue: StageQueue, lat: DiTStepLaw, max_batch: int = 8,
                 shape_compat: str = "exact", buckets: list[int] | None = None, lookahead: int = 64,
                 efficient_only: bool = False):
        super().__init__()
        self.model = model
        self.queue = queue
        queue.engines.append(self)
        self.lat = lat
        self.max_batch = max_batch
        self.compat = shape_compat
        self.buckets = buckets if shape_compat == "bucket" else None
        self.lookahead = lookahead
        self.efficient_only = efficient_only   # join a batch only if that beats running alone
        self.batch: list[Job] = []
        self.used = 0                   # transformer batch slots the batch takes (sum of weights)
        self.steps_done: dict[int, int] = {}

    def has_work(self) -> bool:
        return bool(self.batch) or len(self.queue) > 0

    def busy_work(self) -> float:
        return sum(j.work * (j.steps - self.steps_done.get(id(j), 0)) / max(j.steps, 1) for j in self.batch)

    def load(self) -> float:
        return self.queue.work + self.busy_work()

    def _key(self, job: Job):
        return () if self.compat == "any" else job.shape(self.buckets)

    def can_join(self, job: Job) -> bool:
        if not self.batch:
            return False
        return self._key(job) == self._key(self.batch[0]) and self.used + job.weight <= self.max_batch

    def _admit(self, now: float) -> None:
        """Fill the batch with jobs of the batch's shape, in queue order, while the queue's
        head has that shape (a head of another shape closes the batch so it cannot starve)."""
        head = self.queue.head()
        if head is None:
            return
        key = self._key(self.batch[0]) if self.batch else self._key(head)
        if self._key(head) != key:
            return
        used = self.used
        taken: list[Job] = []
        for i, job in enumerate(self.queue):
            if i >= self.lookahead:
                break
            if self._key(job) != key:
                continue
            if used + job.weight > self.max_batch and (self.batch or taken):
                break
            if self.efficient_only and (self.batch or taken):
                seq = max([j.seq_len for j in self.batch] + [j.seq_len for j in taken])
                joint = self.lat.dit_step(self.model, used + job.weight, max(seq, job.seq_len))
                apart = self.lat.dit_step(self.model, used, seq) + self.lat.dit_step(self.model, job.weight, job.seq_len)
                if joint > (1.0 - MIN_BATCH_GAIN) * apart:
                    continue            # no real gain: a joined job would only wait for the batch
            taken.append(job)
            used += job.weight
        for job in taken:
            self.queue.remove(job)
            start_record(job, self.placed().name, now)
            self.steps_done[id(job)] = 0
            self.batch.append(job)
        self.used = used
        nxt = self.queue.head() if taken else None
        if nxt is not None:     # a new head: other busy engines that could take it re-plan now
            for e in self.queue.engines:
                g = e.gpu
                if e is not self and g is not None and g.cur is not None and g.available and e.can_join(nxt):
                    g.kick()

    def plan(self, now: float) -> Unit | None:
        self._admit(now)
        if not self.batch:
            return None
        seq = max(self._seq(j) for j in self.batch)
        t = self.lat.dit_step(self.model, self.used, seq)
        k = min(j.steps - self.steps_done[id(j)] for j in self.batch)
        return Unit(EqualSteps(t, k), self._commit, DIT_STEP, self)

    def _seq(self, job: Job) -> int:
        """Sequences in a batch are padded to the longest one present (not to the bucket bound)."""
        return job.seq_len

    def _commit(self, k: int, now: float) -> None:
        done = []
        for j in self.batch:
            self.steps_done[id(j)] += k
            if self.steps_done[id(j)] >= j.steps:
                done.append(j)
        for j in done:
            self.batch.remove(j)
            self.used -= j.weight
            del self.steps_done[id(j)]
            j.record.end = now              # type: ignore[union-attr]
            j.on_done(j, now)               # type: ignore[misc]
