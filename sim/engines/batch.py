"""Batching server for one-shot stages (vision/text encoders, VAE encode/decode): takes up to
max_batch compatible jobs from its queue and runs them as one forward pass."""
from __future__ import annotations

from typing import Any

from sim.core.gpu import Engine, Unit
from sim.core.records import Job
from sim.engines.cost import pass_time
from sim.engines.latency import LatencyModel
from sim.engines.queues import StageQueue, start_record


class BatchEngine(Engine):
    def __init__(self, stage: str, model: str, queue: StageQueue, lat: Any, max_batch: int = 8,
                 service=None, max_batch_tokens: int = 16384):
        super().__init__()
        self.stage = stage
        self.model = model
        self.queue = queue
        queue.engines.append(self)
        # the stage's latency lookups: a LatencyModel, or any object with the same methods (a
        # test's closed-form law); None with a synthetic `service` (sim.studies.queueing)
        self.lat: Any = lat
        self.max_batch = max_batch
        self.service = service          # optional callable(jobs) -> seconds (synthetic laws)
        self.max_batch_tokens = max_batch_tokens   # vision encoder: image tokens per pass
        self.running: list[Job] = []

    def has_work(self) -> bool:
        return len(self.queue) > 0

    def can_join(self, job: Job) -> bool:
        return False                    # one-shot passes: no joining mid-flight

    def busy_work(self) -> float:
        return sum(j.work for j in self.running)

    def load(self) -> float:
        return self.queue.work + self.busy_work()

    def plan(self, now: float) -> Unit | None:
        head = self.queue.head()
        if head is None:
            return None
        shape = head.shape()
        batch = [head]
        toks = head.vision_tokens
        for job in self.queue:
            if len(batch) >= self.max_batch:
                break
            if job is head or job.shape() != shape:
                continue
            if toks + job.vision_tokens > self.max_batch_tokens:
                break
            batch.append(job)
            toks += job.vision_tokens
        for job in batch:
            self.queue.remove(job)
            start_record(job, self.placed().name, now)
        self.running = batch
        dur = self.service(batch) if self.service else self.duration(batch)
        return Unit((dur,), self._commit, self.stage, self)

    def duration(self, batch: list[Job]) -> float:
        return pass_time(self.lat, self.stage, self.model, batch)

    def _commit(self, k: int, now: float) -> None:
        batch, self.running = self.running, []
        for job in batch:
            job.record.end = now            # type: ignore[union-attr]
            job.on_done(job, now)           # type: ignore[misc]
