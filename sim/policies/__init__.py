"""Serving policies as configurations of named parts, and the registry of every part.

A policy is a `Parts` record: a placement (which GPUs hold which engines, how many of each: the
pool sizing), a router (which replica or LLM engine a request goes to), a queue order and
priority classes (how shared queues are served), a batching rule (how DiT and one-shot engines
batch) and a scaling part (whether GPUs move between pools while it runs). `POLICIES` maps each
policy name to a function of `policy.*` (PolicyConfig) giving its parts; a new policy is a new
entry, a new behaviour one new part registered below. `sim.policies.policy.Policy` composes a
configuration for a run.

This module is a leaf (it imports nothing of the simulator), so the config schema can check
names against it; the parts themselves live in sim/policies/{placement,routing,batching,
scaling}.py (queue orders: sim/engines/queues.py) and are imported when a run builds its policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable


@dataclass(frozen=True)
class Parts:
    placement: str          # PLACEMENTS
    router: str             # ROUTERS (over what the placement routes: replicas or LLM engines)
    queue_order: str        # sim.engines.queues.QUEUE_ORDERS, for the DiT and encoder queues
    priority: bool          # priority classes (interactive first) in shared and LLM queues
    batching: str           # BATCHING
    scaling: str            # SCALING
    reuse: str = "caches"   # REUSE (inert unless policy.feature_cache_gib > 0 or prefix caching)


# --- parts: name -> "module:Class" (imported on first use), or the class itself (a plug-in) -------
PLACEMENTS: dict[str, Any] = {
    "replicas": "sim.policies.placement:Replicas",              # one GPU = one model end to end
    "stage_pools": "sim.policies.placement:StagePools",         # a pool of GPUs per stage
    "colocated_pools": "sim.policies.placement:ColocatedPools",  # light pools ride on heavy ones
    "pd_pools": "sim.policies.pd:PDPools",                      # stage_pools, LLM split prefill/decode
    "pd_colocated_pools": "sim.policies.pd:PDColocatedPools",   # colocated_pools, split likewise
}
PD_SPLIT = {"stage_pools": "pd_pools", "colocated_pools": "pd_colocated_pools"}   # policy.pd_split
ROUTERS: dict[str, Any] = {
    "round_robin": "sim.policies.routing:RoundRobin",           # replicas
    "least_loaded": "sim.policies.routing:LeastOutstanding",    # replicas: least queued work
    "least_requests": "sim.policies.routing:LeastRequests",     # LLM engines: fewest requests
    "least_tokens": "sim.policies.routing:LeastTokens",         # LLM engines: fewest tokens
}
REPLICA_ROUTERS = ("round_robin", "least_loaded")              # policy.router's choices
BATCHING: dict[str, Any] = {
    # step-level DiT batching: requests join a running transformer batch between steps
    "step_level_same_shape": "sim.policies.batching:StepLevelSameShape",  # diffusion.shape_compat
    "bucketed_if_faster": "sim.policies.batching:BucketedIfFaster",
    # vLLM-Omni's engine: whole requests per replica (sim.engines.omni)
    "omni_request": "sim.policies.batching:OmniRequest",        # its default request scheduler
    "omni_step": "sim.policies.batching:OmniStep",              # its --step-execution
    "diffusion_engine": "sim.policies.batching:diffusion_engine",  # the one diffusion.engine names
}
DIFFUSION_ENGINES = ("omni_request", "omni_step", "step_level_same_shape")   # diffusion.engine
REUSE: dict[str, Any] = {
    "caches": "sim.policies.reuse:Caches",    # image-feature LRU per pool + vLLM prefix caching
}
SCALING: dict[str, Any] = {
    "static": "sim.policies.scaling:Static",
    "pressure": "sim.policies.scaling:Pressure",                # queued work per GPU
}

# --- policies: name -> parts, from the policy.* config ------------------------------------------
POLICIES: dict[str, Callable[[Any], Parts]] = {
    # native vLLM serving: replicas per model, each GPU holding every stage of its model; AR
    # models under vLLM's V1 engine, diffusion models under vLLM-Omni's (diffusion.engine)
    "baseline": lambda p: Parts("replicas", p.router, "fifo", False, "diffusion_engine", "static"),
    # ModServe-style stage pools sized by offered work, bytes/bandwidth between pools
    "disaggregated": lambda p: Parts("stage_pools", "least_requests", "fifo", False,
                                     "step_level_same_shape", "static"),
    # disaggregated + image-token-aware LLM routing, interactive-first queues, HRRN DiT and
    # encoder queues, bucketed DiT batching where it pays, co-located light pools, autoscaling
    "modality_aware": lambda p: Parts(
        "colocated_pools", "least_tokens" if p.image_token_aware_lb else "least_requests",
        "hrrn", p.priority, "bucketed_if_faster", "pressure"),
}
DEFAULT_POLICY = next(iter(POLICIES))      # baseline


def with_pd_split(parts: Parts) -> Parts:
    """`parts` with its LLM pools split into prefill and decode pools (policy.pd_split): stage
    placements only (a replica is one GPU); GPUs stay in their pools (static scaling)."""
    if parts.placement not in PD_SPLIT:
        raise ValueError(f"policy.pd_split=true needs a stage-pool placement; this policy places "
                         f"{parts.placement!r}; allowed: a policy whose placement is one of "
                         f"{sorted(PD_SPLIT)}")
    from dataclasses import replace
    return replace(parts, placement=PD_SPLIT[parts.placement], scaling="static")


def load_part(registry: dict[str, Any], name: str) -> Any:
    """The class registered as `name` in one of the part registries above."""
    entry = registry[name]
    if not isinstance(entry, str):
        return entry
    mod, cls = entry.split(":")
    return getattr(import_module(mod), cls)
