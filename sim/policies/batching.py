"""Batching rules (the `batching` part of a policy): how the engines of batched stages batch.
Registered by name in sim.policies.BATCHING.

- `same_shape`: DiT requests share a step when their shapes are compatible as
  diffusion.shape_compat says (exact sequence length by default); one-shot stages batch jobs of
  one shape up to diffusion.max_batch.
- `bucketed_if_faster`: DiT sequences are padded to policy.shape_buckets, and a job joins a
  running batch only where the joint step saves at least MIN_BATCH_GAIN over separate steps
  (sim.engines.dit), i.e. only where the profile says batching pays.
"""
from __future__ import annotations

from typing import Any

from sim.engines.batch import BatchEngine
from sim.engines.dit import DiTEngine
from sim.policies.parts import BatchingRule


class SameShape(BatchingRule):
    compat: str | None = None           # None: diffusion.shape_compat
    efficient_only = False

    def dit_engine(self, model: str, queue: Any, lat: Any) -> DiTEngine:
        d = self.cfg.diffusion
        return DiTEngine(model, queue, lat, d.max_batch, self.compat or d.shape_compat,
                         list(self.cfg.policy.shape_buckets), efficient_only=self.efficient_only)

    def pass_engine(self, stage: str, model: str, queue: Any, lat: Any) -> BatchEngine:
        return BatchEngine(stage, model, queue, lat, max_batch=self.cfg.diffusion.max_batch)


class BucketedIfFaster(SameShape):
    compat = "bucket"
    efficient_only = True
