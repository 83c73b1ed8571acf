"""The AR engine's decode aggregate (sim/engines/ar.py) is an exact shortcut: runs with it give
the same per-request outcomes as the plain per-sequence loop (`AREngine.aggregate = False`,
which also turns jump-ahead off, so this also checks jump-ahead) on random small scenarios
that stress the token budget, KV blocks (preemptions), block sizes, async admission and
max_num_seqs."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import make_cfg, rel_close
from reference import decode_series_ref, ends_ref
from sim.run.runner import Run
from sim.engines.ar import AREngine

SETTINGS = dict(max_examples=12, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _outcomes(cfg_kw: dict, aggregate: bool):
    saved = AREngine.aggregate
    AREngine.aggregate = aggregate
    try:
        r = Run(make_cfg(None, cfg_kw))
        r.run()
    finally:
        AREngine.aggregate = saved
    return {q.id: q for q in r.requests}


def _assert_same(kw: dict) -> int:
    a, b = _outcomes(kw, True), _outcomes(kw, False)
    assert a.keys() == b.keys()
    for i, x in a.items():
        y = b[i]
        assert x.preemptions == y.preemptions, f"request {i}: preemptions"
        for f in ("first_token", "finish"):
            assert rel_close(getattr(x, f), getattr(y, f), 1e-9), f"request {i} {f}"
        assert [(s.stage, s.server) for s in x.stages] == [(s.stage, s.server) for s in y.stages]
        for s, t in zip(x.stages, y.stages):
            for f in ("enqueue", "start", "end"):
                assert rel_close(getattr(s, f), getattr(t, f), 1e-9), f"request {i} {s.stage}.{f}"
    return sum(q.preemptions for q in a.values())


@pytest.mark.parametrize("policy", ("baseline", "modality_aware"))
@settings(**SETTINGS)
@given(seed=st.integers(0, 10_000), rate=st.sampled_from([2.0, 20.0, 80.0]),
       budget=st.sampled_from([8, 100, 512, 8192]), block=st.sampled_from([1, 16, 64]),
       max_num_seqs=st.sampled_from([3, 256]), kv=st.sampled_from([None, 3000, 20000]),
       async_sched=st.booleans(), text=st.booleans())
def test_aggregate_matches_plain_loop(synthetic_profiles, policy, seed, rate, budget, block,
                                      max_num_seqs, kv, async_sched, text):
    kw = {"profiles_dir": str(synthetic_profiles), "policy.name": policy,
          "workload.num_requests": 60, "seed": seed, "workload.arrival.rate": rate,
          "engine.max_num_batched_tokens": budget, "engine.block_size": block,
          "engine.max_num_seqs": max_num_seqs, "engine.kv_capacity_tokens": kv,
          "engine.async_scheduling": async_sched, "workload.prompt_tokens.max": 1024,
          "workload.output_tokens.max": 512, "workload.image.max": 512,
          "cluster.num_gpus": 2 if policy == "baseline" else 5}
    if text:
        kw["workload.mix"] = {"text": 1.0}
    _assert_same(kw)


def test_aggregate_matches_plain_loop_with_preemptions(synthetic_profiles):
    n = _assert_same({"profiles_dir": str(synthetic_profiles), "policy.name": "baseline",
                      "workload.num_requests": 80, "seed": 9, "workload.mix": {"text": 1.0},
                      "workload.arrival.rate": 50.0, "workload.prompt_tokens.max": 1024,
                      "workload.output_tokens.max": 1024, "workload.output_tokens.mean": 400.0,
                      "engine.kv_capacity_tokens": 4096, "cluster.num_gpus": 1})
    assert n > 0, "the scenario should preempt"


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(bs=st.sampled_from([1, 2, 3, 16, 64]), g=st.integers(0, 10_000),
       contexts=st.lists(st.integers(1, 5000), max_size=30), j=st.integers(1, 600))
def test_extra_blocks_closed_form(bs, g, contexts, j):
    """Blocks the aggregate needs for j more steps (O(1) from the phase histogram) equal the
    per-sequence sum the plain loop allocates."""
    e = AREngine("m", None, 10**9, block_size=bs)
    e.G, e.nd = g, len(contexts)
    for c in contexts:
        e.phase[(c - g) % bs] += 1
    want = sum(-(-(c + j) // bs) - -(-(c + 1) // bs) for c in contexts)
    assert e._extra_blocks(j) == want


@settings(max_examples=80, deadline=None, database=None)
@given(batch=st.integers(1, 300), ctx=st.floats(1.0, 40_000.0), k=st.integers(1, 200),
       start_lookups=st.sampled_from([1, 2]), overhead=st.sampled_from([0.0, 2e-4]),
       host=st.sampled_from([(0.0, 0.0), (4e-3, 1e-5), (1.3e-3, 0.0), (2e-2, 0.0)]),
       mode=st.sampled_from(["clamp", "extrapolate"]))
def test_jump_ends_equal_the_numpy_series(synthetic_profiles, batch, ctx, k, start_lookups,
                                          overhead, host, mode):
    """A jump's step ends (AREngine._decode_run, closed form) equal the numpy reference
    (tests/reference.py: per-step values, a running sum) to rounding across grid cells,
    overhead and async host time included, with the same lookup counts."""
    import numpy as np

    from sim.engines.latency import LatencyModel
    lats = [LatencyModel(synthetic_profiles, "h100", mode) for _ in range(2)]
    eng = AREngine("qwen2_5_vl_7b", lats[0], 1 << 20, step_overhead_s=overhead, host_s=host[0],
                   host_per_seq_s=host[1])
    h = host[0] + host[1] * batch if host[0] or host[1] else None
    want = ends_ref(decode_series_ref(lats[1], "qwen2_5_vl_7b", batch, ctx, k, start_lookups), overhead, h)
    run = eng._decode_run(batch, ctx, k, start_lookups)
    np.testing.assert_allclose([run[i] for i in range(k)], want, rtol=1e-12, atol=0)
    assert lats[0].report() == lats[1].report()
