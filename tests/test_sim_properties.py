"""Property tests of the serving simulator on small runs with the synthetic profile tables
(tests/conftest.py): causality and ordering of every request's stage records, conservation,
engine limits (AR max_num_seqs and KV blocks, DiT max_batch) checked after every event, forced
KV preemptions, and exactness of the GPU executor's jump-ahead (step_jump=True vs False).
"""
from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import make_cfg, rel_close
from sim.names import TEXT_OUT_TASKS
from sim.run.runner import Run
from sim.core.kernel import Kernel
from sim.engines.ar import AREngine
from sim.engines.dit import DiTEngine
from sim.policies import POLICIES as POLICY_CONFIGS

POLICIES = tuple(POLICY_CONFIGS)
EPS = 1e-9
SETTINGS = dict(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- instrumentation -------------------------------------------------------------------------

class Limits:
    """Checks the engine limits after every event of a run: Kernel.run_all is SimPy's own loop
    (env.step()) with a check of every engine on the run's GPUs after each step, for the
    duration of the run. Remembers every engine it saw."""

    def __init__(self) -> None:
        self.ar: dict[int, AREngine] = {}
        self.dit: dict[int, DiTEngine] = {}
        self.ar_busy = 0                    # checks that found an AR engine's unit running
        self.dit_busy = 0                   # checks that found a DiT batch
        self.max_running = 0
        self.max_dit_used = 0
        self.dit_keys: set[str] = set()     # shape_compat modes whose batches were checked

    @contextlib.contextmanager
    def installed(self, gpus):
        """`gpus()`: the run's GPUs now (an autoscaler may add some)."""
        lim, loop = self, Kernel.run_all

        def run_all(env) -> int:
            n = 0
            while env.peek() != math.inf:
                env.step()
                n += 1
                lim.check(gpus())
            return n

        Kernel.run_all = run_all
        try:
            yield self
        finally:
            Kernel.run_all = loop

    def check(self, gpus) -> None:
        for g in gpus:
            for eng in g.engines:
                if isinstance(eng, AREngine):
                    self._check_ar(eng, g.cur is not None and g.cur.engine is eng)
                elif isinstance(eng, DiTEngine):
                    self._check_dit(eng)

    def _check_ar(self, eng: AREngine, running: bool) -> None:
        self.ar[id(eng)] = eng
        self.ar_busy += running
        assert len(eng.running) <= eng.max_seqs, (
            f"AR engine runs {len(eng.running)} > max_num_seqs={eng.max_seqs}")
        assert 0 <= eng.free_blocks <= eng.total_blocks
        held = sum(s.blocks for s in eng.running)
        assert held == eng.total_blocks - eng.free_blocks, "KV block accounting drifted"
        assert held <= eng.total_blocks
        self.max_running = max(self.max_running, len(eng.running))

    def _check_dit(self, eng: DiTEngine) -> None:
        self.dit[id(eng)] = eng
        self.dit_busy += bool(eng.batch)
        used = sum(j.weight for j in eng.batch)
        # a single CFG request (weight 2) may run alone when max_batch=1: it cannot be split
        assert used <= eng.max_batch or len(eng.batch) == 1, (
            f"DiT batch weight {used} > diffusion.max_batch={eng.max_batch}")
        self.max_dit_used = max(self.max_dit_used, used)
        if eng.batch and eng.compat != "any":   # one shape key: a sequence length or bucket
            keys = {j.shape(eng.buckets) for j in eng.batch}
            assert len(keys) == 1, f"DiT batch mixes shapes {keys} ({eng.compat})"
            self.dit_keys.add(eng.compat)

    def check_after(self) -> None:
        for e in self.ar.values():
            assert e.peak_blocks_used <= e.total_blocks
            assert e.free_blocks == e.total_blocks, "KV blocks leaked after the run"
            assert not e.running and not len(e.waiting)
        for e in self.dit.values():
            assert not e.batch and not e.steps_done


def run_checked(cfg):
    lim = Limits()
    r = Run(cfg)
    with lim.installed(lambda: r.policy.gpus):
        s = r.run()
    lim.check_after()
    return r, s, lim


# --- request-level invariants ------------------------------------------------------------------

def group_hops(stages):
    """Splits a request's records into hops. One AR hop holds its prefill record plus the
    vision_encode records of its steps (fused encoding; repeated after a recompute
    preemption) and its decode record, all on the same server; they may nest. Every other
    record (encoder, DiT, VAE, transfer) is a hop of its own."""
    hops = []
    for rec in stages:
        cur = hops[-1] if hops else None
        if (cur is not None and cur[0].stage == "prefill" and rec.server == cur[0].server
                and rec.stage in ("vision_encode", "decode")):
            cur.append(rec)
        else:
            hops.append([rec])
    return hops


def check_requests(r: Run, s: dict, n: int) -> None:
    reqs = r.requests
    assert reqs is not None and len(reqs) == n, "requests not conserved"
    assert sorted(q.id for q in reqs) == list(range(n)), "a request completed twice or never"
    assert s["completed"] == n and r.completed == n
    assert s["failed"] == 0
    last = 0.0
    for q in reqs:
        assert q.stages, f"request {q.id} has no stage records"
        assert math.isfinite(q.finish)
        for rec in q.stages:
            assert rec.enqueue >= q.arrival - EPS, f"req {q.id}: {rec.stage} enqueued before arrival"
            assert rec.start >= rec.enqueue - EPS, f"req {q.id}: {rec.stage} started before enqueue"
            assert rec.end >= rec.start - EPS, f"req {q.id}: {rec.stage} ended before start"
            assert q.finish >= rec.end - EPS, f"req {q.id}: finish before the end of {rec.stage}"
        for a, b in zip(q.stages, q.stages[1:]):
            assert b.start >= a.start - EPS, f"req {q.id}: {b.stage} starts before {a.stage}"
        hops = group_hops(q.stages)
        for a, b in zip(hops, hops[1:]):
            a_end = max(x.end for x in a)
            assert b[0].enqueue >= a_end - EPS, (
                f"req {q.id}: {b[0].stage} enqueued at {b[0].enqueue} before the previous hop "
                f"({a[0].stage}) ended at {a_end}")
        if q.task in TEXT_OUT_TASKS:
            assert math.isfinite(q.first_token)
            assert q.arrival - EPS <= q.first_token <= q.finish + EPS
        last = max(last, q.finish)
    # the run's duration is the last completion (not a later periodic event)
    assert s["duration"] == pytest.approx(last, rel=1e-12)


# --- hypothesis: random small scenarios, every policy -----------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
@settings(**SETTINGS)
@given(seed=st.integers(0, 10_000),
       rate=st.sampled_from([0.5, 2.0, 8.0, 30.0]),
       shape=st.sampled_from([0.25, 0.5, 1.0, 4.0]),
       max_num_seqs=st.sampled_from([1, 2, 8, 256]),
       max_batch=st.sampled_from([1, 2, 3, 8]),
       shape_compat=st.sampled_from(["exact", "bucket", "any"]))
def test_invariants_random_scenarios(synthetic_profiles, policy, seed, rate, shape, max_num_seqs,
                                     max_batch, shape_compat):
    n = 40
    cfg = make_cfg(synthetic_profiles, {
        "policy.name": policy, "seed": seed, "workload.num_requests": n,
        "workload.arrival.rate": rate, "workload.arrival.shape": shape,
        "engine.max_num_seqs": max_num_seqs, "diffusion.max_batch": max_batch,
        "diffusion.shape_compat": shape_compat, "policy.autoscale_interval_s": 5.0})
    r, s, lim = run_checked(cfg)
    check_requests(r, s, n)
    assert lim.ar_busy > 0
    assert lim.max_running <= max_num_seqs


@pytest.mark.parametrize("policy", POLICIES)
@settings(**dict(SETTINGS, max_examples=8))
@given(seed=st.integers(0, 10_000), kv=st.sampled_from([4096, 6144]),
       max_num_seqs=st.sampled_from([16, 256]))
def test_small_kv_forces_preemptions_and_all_complete(synthetic_profiles, policy, seed, kv,
                                                      max_num_seqs):
    """A tiny KV cache (4-6k tokens) under a burst: preemptions must happen (recompute), blocks
    never exceed capacity, and every request still completes."""
    n = 60
    cfg = make_cfg(synthetic_profiles, {
        "policy.name": policy, "seed": seed, "workload.num_requests": n,
        "workload.arrival.rate": 50.0, "workload.arrival.shape": 0.5,
        "workload.mix": {"text": 0.8, "understand": 0.2},
        "workload.image.x_min": 256, "workload.image.max": 448,
        "workload.prompt_tokens.max": 1024, "workload.output_tokens.max": 1024,
        "workload.output_tokens.mean": 400.0,
        "engine.kv_capacity_tokens": kv, "engine.max_num_seqs": max_num_seqs,
        "cluster.num_gpus": 2})
    r, s, lim = run_checked(cfg)
    check_requests(r, s, n)
    pre = sum(q.preemptions for q in r.requests)
    assert pre > 0, "a 4-6k-token KV cache under a burst should preempt"
    assert s["preemptions"] == pre
    for e in lim.ar.values():
        assert e.total_blocks == kv // e.bs
        assert e.peak_blocks_used <= e.total_blocks


@pytest.mark.parametrize("policy", POLICIES)
def test_dit_batching_happens_and_respects_max_batch(synthetic_profiles, policy):
    """Image-only burst with max_batch=4: batches above one request form, never above 4 --
    except under modality_aware, which joins a batch only when the profile shows a gain: the
    synthetic DiT law is linear in batch (no gain), so it must keep running one at a time.
    (The baseline on its step-level engine: vLLM-Omni's is tests/test_omni_engine.py's.)"""
    cfg = make_cfg(synthetic_profiles, {
        "diffusion.engine": "step_level_same_shape",
        "policy.name": policy, "workload.num_requests": 60, "workload.arrival.rate": 40.0,
        "workload.mix": {"generate": 1.0}, "workload.image.aspect_ratios": [1.0],
        "workload.image.x_min": 512, "workload.image.max": 512, "workload.cfg": False,
        "diffusion.max_batch": 4, "cluster.num_gpus": 3})
    r, s, lim = run_checked(cfg)
    check_requests(r, s, 60)
    if policy == "modality_aware":
        assert lim.max_dit_used == 1
    else:
        assert lim.max_dit_used == 4            # a full batch is reached, never more


# --- exactness of the jump-ahead -----------------------------------------------------------------

SUMMARY_KEYS = ("duration", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "request_throughput")


def _jump_pair(cfg_kw: dict):
    out = []
    for jump in (True, False):
        cfg = make_cfg(None, dict(cfg_kw, **{"diffusion.step_jump": jump}))
        r = Run(cfg)
        s = r.run()
        out.append((r, s))
    return out


def _assert_same(pair, n):
    (r1, s1), (r2, s2) = pair
    a = {q.id: q for q in r1.requests}
    b = {q.id: q for q in r2.requests}
    assert len(a) == len(b) == n
    for i in a:
        for f in ("first_token", "finish"):
            x, y = getattr(a[i], f), getattr(b[i], f)
            assert rel_close(x, y, 1e-9), f"request {i} {f}: jump {x!r} vs step-by-step {y!r}"
        assert a[i].preemptions == b[i].preemptions
    for k in SUMMARY_KEYS:
        x, y = s1[k], s2[k]
        if x is None or y is None:
            assert x is y is None, k
        else:
            assert rel_close(x, y, 1e-9), f"summary {k}: {x!r} vs {y!r}"
    return s1, s2


@pytest.mark.parametrize("policy", POLICIES)
def test_jump_ahead_exact_text_only(synthetic_profiles, policy):
    n = 120
    pair = _jump_pair({"profiles_dir": str(synthetic_profiles), "policy.name": policy,
                       "workload.num_requests": n, "workload.mix": {"text": 1.0},
                       "workload.arrival.rate": 10.0, "seed": 3, "engine.max_num_seqs": 32})
    s1, s2 = _assert_same(pair, n)
    ev1 = s1["sim_events"]
    ev2 = s2["sim_events"]
    assert ev1 < ev2, "jump-ahead should commit fewer events than step-by-step"


@pytest.mark.parametrize("policy", POLICIES)
def test_jump_ahead_exact_image_heavy(synthetic_profiles, policy):
    n = 60
    pair = _jump_pair({"profiles_dir": str(synthetic_profiles), "policy.name": policy,
                       "workload.num_requests": n, "seed": 5, "workload.arrival.rate": 2.0,
                       "workload.mix": {"generate": 0.5, "edit": 0.3, "understand": 0.1,
                                        "text": 0.1},
                       "workload.image.max": 1024, "diffusion.max_batch": 4})
    s1, s2 = _assert_same(pair, n)
    assert s1["sim_events"] < s2["sim_events"]


def test_jump_ahead_exact_with_preemptions(synthetic_profiles):
    """Jump lengths are bounded by free KV blocks: exactness must survive preemptions."""
    n = 60
    pair = _jump_pair({"profiles_dir": str(synthetic_profiles), "policy.name": "baseline",
                       "workload.num_requests": n, "seed": 9, "workload.mix": {"text": 1.0},
                       "workload.arrival.rate": 50.0, "workload.prompt_tokens.max": 1024,
                       "workload.output_tokens.max": 1024, "workload.output_tokens.mean": 400.0,
                       "engine.kv_capacity_tokens": 4096, "cluster.num_gpus": 2})
    _assert_same(pair, n)
    assert sum(q.preemptions for q in pair[0][0].requests) > 0


def test_make_cfg_rejects_unknown_field(synthetic_profiles):
    with pytest.raises(AttributeError):
        make_cfg(synthetic_profiles, {"engine.no_such_knob": 1})


@pytest.mark.parametrize("policy", POLICIES)
def test_jump_ahead_exact_shared_gpus_under_load(synthetic_profiles, policy):
    """Engines sharing a GPU (baseline replicas: AR + DiT + VAE; modality_aware: VAE co-located
    with DiT, encoder with LLM) interleave at step boundaries: work reaching a busy GPU for
    another engine must cut the running multi-step unit, exactly as step-by-step simulation."""
    n = 150
    pair = _jump_pair({"profiles_dir": str(synthetic_profiles), "policy.name": policy,
                       "workload.num_requests": n, "seed": 5, "workload.arrival.rate": 8.0,
                       "workload.mix": {"generate": 0.5, "edit": 0.3, "understand": 0.1,
                                        "text": 0.1}})
    s1, s2 = _assert_same(pair, n)
    assert s1["sim_events"] < s2["sim_events"]


@pytest.mark.parametrize("policy", POLICIES)
@settings(**dict(SETTINGS, max_examples=10,   # no shrinking: a failing pair of runs is slow
                 phases=[Phase.explicit, Phase.reuse, Phase.generate]))
@given(seed=st.integers(0, 10_000), rate=st.sampled_from([1.0, 4.0, 16.0]),
       shape=st.sampled_from([0.3, 1.0]), max_num_seqs=st.sampled_from([4, 256]),
       max_batch=st.sampled_from([1, 2, 8]), compat=st.sampled_from(["exact", "bucket", "any"]),
       kv=st.sampled_from([None, 20000]), interval=st.sampled_from([2.0, 30.0]))
def test_jump_ahead_exact_random_scenarios(synthetic_profiles, policy, seed, rate, shape,
                                           max_num_seqs, max_batch, compat, kv, interval):
    n = 50
    pair = _jump_pair({"profiles_dir": str(synthetic_profiles), "policy.name": policy,
                       "workload.num_requests": n, "seed": seed, "workload.arrival.rate": rate,
                       "workload.arrival.shape": shape, "engine.max_num_seqs": max_num_seqs,
                       "diffusion.max_batch": max_batch, "diffusion.shape_compat": compat,
                       "engine.kv_capacity_tokens": kv, "policy.autoscale_interval_s": interval,
                       "cluster.num_gpus": 5})
    _assert_same(pair, n)
