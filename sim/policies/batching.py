"""Batching rules (the `batching` part of a policy): how the engines of batched stages batch.
Registered by name in sim.policies.BATCHING.

- `step_level_same_shape`: step-level DiT batching; DiT requests share a step when their shapes
  are compatible as diffusion.shape_compat says (exact sequence length by default); one-shot
  stages batch jobs of one shape up to diffusion.max_batch.
- `bucketed_if_faster`: DiT sequences are padded to policy.shape_buckets, and a job joins a
  running batch only where the joint step saves at least MIN_BATCH_GAIN over separate steps
  (sim.engines.dit), i.e. only where the profile says batching pays.
- `omni_request`, `omni_step`: vLLM-Omni 0.26.0's diffusion engine on replicas (sim.engines.omni):
  a replica of a diffusion model serves whole requests, in request batches (its default) or
  step by step (`--step-execution`), with diffusion.max_num_seqs and
  diffusion.request_batch_max_wait_ms.
- `diffusion_engine`: the rule diffusion.engine names (the baseline's part).
"""
from __future__ import annotations

from typing import Any

from profiler.models import load_model
from sim.config import ConfigError
from sim.engines.batch import BatchEngine
from sim.engines.dit import DiTEngine
from sim.policies.parts import BatchingRule


class StepLevelSameShape(BatchingRule):
    compat: str | None = None           # None: diffusion.shape_compat
    efficient_only = False

    def dit_engine(self, model: str, queue: Any, lat: Any) -> DiTEngine:
        d = self.cfg.diffusion
        return DiTEngine(model, queue, lat, d.max_batch, self.compat or d.shape_compat,
                         list(self.cfg.policy.shape_buckets), efficient_only=self.efficient_only)

    def pass_engine(self, stage: str, model: str, queue: Any, lat: Any) -> BatchEngine:
        return BatchEngine(stage, model, queue, lat, max_batch=self.cfg.diffusion.max_batch)


class BucketedIfFaster(StepLevelSameShape):
    compat = "bucket"
    efficient_only = True


class OmniRequest(BatchingRule):
    """vLLM-Omni's request scheduler serves each diffusion replica (sim.engines.omni)."""
    engine = "omni_request"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.costs: dict[str, Any] = {}
        self.omni_lat: Any = None

    def whole_engine(self, model: str, lat: Any) -> Any:
        from sim.engines.omni import ENGINES
        d = self.cfg.diffusion
        kw: dict[str, Any] = {"max_wait_s": d.request_batch_max_wait_ms / 1e3} if self.engine == "omni_request" else {}
        return ENGINES[self.engine](self.costs_of(model, lat), d.max_num_seqs, api_delays=d.omni_api_delays,
                                    warm_sizes=[tuple(x) for x in d.omni_warm_sizes], **kw)

    def whole_work(self, req: Any, lat: Any) -> float | None:
        if load_model(req.model).family not in ("ar_dit", "dit"):
            return None
        return self.costs_of(req.model, lat).job(req).work

    def costs_of(self, model: str, lat: Any) -> Any:
        """The stage costs of `model`'s vLLM-Omni pipelines (one per model and run)."""
        c = self.costs.get(model)
        if c is None:
            from sim.engines.omni import OmniCosts
            c = self.costs[model] = OmniCosts(model, lat, self._omni_tables(lat),
                                              self.cfg.diffusion.omni_work)
            self._check(c)
        return c

    def _check(self, costs: Any) -> None:
        """Settings vLLM-Omni refuses at start for this model's pipelines."""

    def _omni_tables(self, lat: Any) -> Any:
        """The LatencyModel over the vLLM-Omni table set (diffusion.omni_tables) when it exists."""
        if self.omni_lat is None:
            name = self.cfg.diffusion.omni_tables.replace("{gpu}", lat.gpu)
            if name and (lat.root / name).is_dir():
                from sim.engines.latency import LatencyModel
                self.omni_lat = LatencyModel(lat.root, name, lat.mode)
            else:
                self.omni_lat = False
        return self.omni_lat or None

    def describe(self) -> dict:
        d = self.cfg.diffusion
        out: dict[str, Any] = {"engine": self.engine, "max_num_seqs": d.max_num_seqs,
                               "work": d.omni_work, "api_delays": d.omni_api_delays,
                               "warm_sizes": [list(x) for x in d.omni_warm_sizes]}
        if self.engine == "omni_request":
            out["request_batch_max_wait_ms"] = d.request_batch_max_wait_ms
        out["stage_costs"] = {m: c.sources() for m, c in sorted(self.costs.items())}
        if self.omni_lat:               # (live counters: read when the summary is written)
            out["omni_latency_model"] = {"out_of_grid_lookups": self.omni_lat.outside,
                                         "oom_hole_lookups": self.omni_lat.hole_hits}
        return out

    # a replica built from stage engines is never asked for them
    def dit_engine(self, *args: Any) -> Any:
        raise ConfigError(f"batching {self.engine!r} serves whole requests on replicas; the "
                          "placement asked for a stage engine; allowed: a replicas placement "
                          "(policy baseline)")

    def pass_engine(self, *args: Any) -> Any:
        return self.dit_engine()


class OmniStep(OmniRequest):
    """vLLM-Omni's step scheduler (`--step-execution`) serves each diffusion replica."""
    engine = "omni_step"

    def _check(self, costs: Any) -> None:
        from sim.engines.omni import PIPELINES
        pipe = PIPELINES.get((costs.kind, False))
        if pipe is None or not pipe.step_execution:
            name = pipe.name if pipe else costs.kind
            raise ConfigError(f"diffusion.engine=omni_step: model {costs.model} ({name}) cannot "
                              "step-execute in vLLM-Omni 0.26.0 (diffusion_model_runner.py:252-257); "
                              "allowed: diffusion.engine=omni_request for it")


def diffusion_engine(cfg: Any) -> BatchingRule:
    """The baseline's rule: the one diffusion.engine names."""
    from sim.policies import BATCHING, load_part
    return load_part(BATCHING, cfg.diffusion.engine)(cfg)
