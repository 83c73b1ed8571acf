"""A finished request leaves no reference cycle behind: with the cyclic GC off, no Flow, Job or
Request outlives the run (the cyclic GC cost a quarter of a 1,000-GPU run when every request
left a Flow <-> Job cycle and the workload kept each chunk's finished requests alive)."""
from __future__ import annotations

import gc
import sys

import pytest

from conftest import make_cfg
from sim.config import WorkloadConfig
from sim.policies.parts import Flow
from sim.core.records import Job, Request
from sim.run.runner import Run
from sim.workloads import request_source


def _alive(types: tuple[type, ...]) -> int:
    return sum(isinstance(o, types) for o in gc.get_objects())


@pytest.mark.parametrize("policy", ["baseline", "disaggregated", "modality_aware"])
def test_finished_requests_are_freed_without_the_cyclic_gc(synthetic_profiles, policy):
    cfg = make_cfg(synthetic_profiles, {"policy.name": policy, "workload.num_requests": 300,
                                        "workload.arrival.rate": 20.0, "seed": 3})
    gc.collect()
    before = {t: _alive(t) for t in (Flow, Job, Request)}
    gc.disable()
    try:
        r = Run(cfg, keep_rows=0)
        s = r.run()
        left = {t.__name__: _alive(t) - before[t] for t in (Flow, Job, Request)}
        left["Request"] -= len(r.ctx.pilot)          # the sizing pilot lives with the run
    finally:
        gc.enable()
    assert s["completed"] == 300
    # engines may still hold their last step's jobs (an AR engine's last schedule): a few
    assert left["Flow"] == 0 and left["Job"] <= 30 and left["Request"] <= 30, (
        f"outlive the run without the GC: {left}")


def test_workload_does_not_keep_handed_out_requests():
    """Only the consumer holds a request the workload has handed out (its chunk does not)."""
    it = iter(request_source(WorkloadConfig(num_requests=100), seed=0))
    req = next(it)
    assert sys.getrefcount(req) == 2            # `req` and getrefcount's argument


def test_run_restores_the_gc_settings(synthetic_profiles):
    before = (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled())
    Run(make_cfg(synthetic_profiles, {"workload.num_requests": 20})).run()
    assert (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled()) == before
