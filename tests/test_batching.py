"""Batching rules (sim/policies/batching.py): `step_level_same_shape` makes DiT engines with the config's
shape compatibility, batch size and buckets and no efficiency test, and one-shot engines with the
config's batch size; `bucketed_if_faster` pads to policy.shape_buckets and joins only where the
profile says batching pays. On a run: disaggregated batches DiT work of one shape even where the
(linear) synthetic law gives no gain; modality_aware does not."""
from __future__ import annotations

import pytest

from conftest import make_cfg
from sim.engines.queues import StageQueue
from sim.policies.batching import BucketedIfFaster, StepLevelSameShape
from sim.run.runner import Run


@pytest.mark.parametrize("compat", ["exact", "bucket", "any"])
def test_step_level_same_shape_follows_the_diffusion_config(compat):
    cfg = make_cfg(None, {"diffusion.max_batch": 5, "diffusion.shape_compat": compat,
                          "policy.shape_buckets": [256, 1024]})
    rule = StepLevelSameShape(cfg)
    e = rule.dit_engine("qwen_image", StageQueue("q"), None)
    assert (e.model, e.max_batch, e.compat, e.efficient_only) == ("qwen_image", 5, compat, False)
    assert e.buckets == ([256, 1024] if compat == "bucket" else None)
    p = rule.pass_engine("vae_decode", "qwen_image", StageQueue("v"), None)
    assert (p.stage, p.model, p.max_batch) == ("vae_decode", "qwen_image", 5)


def test_bucketed_if_faster_pads_to_buckets_and_tests_the_gain():
    cfg = make_cfg(None, {"diffusion.max_batch": 6, "diffusion.shape_compat": "exact",
                          "policy.shape_buckets": [512, 2048]})
    e = BucketedIfFaster(cfg).dit_engine("flux1_dev", StageQueue("q"), None)
    assert (e.max_batch, e.compat, e.buckets, e.efficient_only) == (6, "bucket", [512, 2048], True)
    assert BucketedIfFaster(cfg).pass_engine("text_encode", "flux1_dev", StageQueue("t"),
                                             None).max_batch == 6


def dit_run(profiles, policy: str):
    cfg = make_cfg(profiles, {"policy.name": policy, "workload.num_requests": 12,
                              "workload.arrival.rate": 200.0, "workload.mix": {"generate": 1.0},
                              "workload.image.aspect_ratios": [1.0], "workload.image.x_min": 512,
                              "workload.image.max": 512, "workload.cfg": False,
                              "diffusion.max_batch": 4, "cluster.num_gpus": 3,
                              "cluster.pools": {"llm": 1, "dit": 1, "vae": 1},
                              "policy.autoscale": False})
    r = Run(cfg)
    r.run()
    return r


def _dit_records(r):
    return [x for q in r.requests for x in q.stages if x.stage == "dit_step"]


def test_step_level_same_shape_batches_any_work_of_one_shape(synthetic_profiles):
    """disaggregated batches DiT work without asking whether batching pays (the synthetic law is
    linear: it does not): jobs run together, up to four at a time."""
    r = dit_run(synthetic_profiles, "disaggregated")
    recs = _dit_records(r)
    assert len(recs) == 12
    ends = sorted(x.end for x in recs)
    assert any(b - a < 1e-12 for a, b in zip(ends, ends[1:]))      # finished together: batched
    # jobs join at step boundaries: at most, and at some instant exactly, 4 run at once
    assert max(sum(1 for y in recs if y.start <= x.start < y.end) for x in recs) == 4


def test_bucketed_if_faster_never_joins_on_a_linear_law(synthetic_profiles):
    """modality_aware on the same requests: the linear law gives no gain, so every DiT job runs
    alone (no two overlap on the one DiT GPU)."""
    r = dit_run(synthetic_profiles, "modality_aware")
    recs = sorted(_dit_records(r), key=lambda x: x.start)
    assert len(recs) == 12
    assert all(b.start >= a.end - 1e-12 for a, b in zip(recs, recs[1:]))
