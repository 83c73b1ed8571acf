"""The policy composition (sim/policies/policy.py) on small runs: each policy name gives its parts
(and pd_split its split placement), the config's engine settings reach every AR engine in the
right units (one-request runs against hand-computed times), the host-overhead settings on a
synchronously timed table, hand-off delays from bytes and bandwidth, the pilot work the pools are
sized by, and the utilization figures from the GPUs' busy times."""
from __future__ import annotations

import pytest

from conftest import decode_ms, make_cfg, prefill_ms
from sim.config import ConfigError, LengthDist
from sim.core.records import Job, Request
from sim.policies import Parts
from sim.policies.placement import pool_key
from sim.policies.policy import parts_of
from sim.run.runner import Run

P, O = 100, 8                       # prompt and output tokens of the one-request runs


def lengths(cfg_over: dict) -> dict:
    """Length laws given as dicts, as LengthDist."""
    out = dict(cfg_over)
    for k in ("workload.prompt_tokens", "workload.output_tokens"):
        if isinstance(out.get(k), dict):
            out[k] = LengthDist(**out[k])
    return out


def constant(n: int) -> dict:
    return {"dist": "constant", "mean": n, "min": 1, "max": 8192}


def run_one(profiles, **over):
    cfg = make_cfg(profiles, lengths({
        "policy.name": "baseline", "workload.num_requests": 1, "workload.mix": {"text": 1.0},
        "cluster.num_gpus": 1, "workload.prompt_tokens": constant(P),
        "workload.output_tokens": constant(O), **over}))
    r = Run(cfg)
    s = r.run()
    return r.requests[0], s


# --- parts ------------------------------------------------------------------------------------------

def test_each_policy_is_its_parts():
    cfg = make_cfg()
    assert parts_of("baseline", cfg) == Parts("replicas", "least_loaded", "fifo", False,
                                              "diffusion_engine", "static")
    assert parts_of("disaggregated", cfg) == Parts("stage_pools", "least_requests", "fifo", False,
                                                   "step_level_same_shape", "static")
    assert parts_of("modality_aware", cfg) == Parts("colocated_pools", "least_tokens", "hrrn", True,
                                                    "bucketed_if_faster", "pressure")
    cfg.policy.router = "round_robin"
    cfg.policy.image_token_aware_lb = False
    cfg.policy.priority = False
    assert parts_of("baseline", cfg).router == "round_robin"
    ma = parts_of("modality_aware", cfg)
    assert (ma.router, ma.queue_order, ma.priority) == ("least_requests", "hrrn", False)
    cfg.policy.pd_split = True
    assert parts_of("modality_aware", cfg).placement == "pd_colocated_pools"
    assert parts_of("modality_aware", cfg).scaling == "static"
    assert parts_of("disaggregated", cfg).placement == "pd_pools"
    with pytest.raises(ConfigError, match="pd_split=true with policy.name='baseline'"):
        parts_of("baseline", cfg)
    with pytest.raises(ConfigError, match="policy.name='fastest' is unknown"):
        parts_of("fastest", cfg)


# --- engine settings -------------------------------------------------------------------------------

def hand(first_extra_ms: float = 0.0, per_step_ms: float = 0.0, last_extra_ms: float = 0.0):
    """(ttft_ms, e2el_ms) of the one-request run: one prefill step, O - 1 decode steps."""
    ttft = first_extra_ms + prefill_ms(P) + per_step_ms
    e2el = ttft + sum(decode_ms(1, P + i) + per_step_ms for i in range(O - 1))
    return ttft, e2el + last_extra_ms


@pytest.mark.parametrize("over, first, step, last", [
    ({}, 0.0, 0.0, 0.0),
    ({"engine.step_overhead_ms": 5.0}, 0.0, 5.0, 0.0),
    ({"engine.frontend_ms": 3.0}, 3.0, 0.0, 0.0),
    ({"engine.frontend_ms_per_prompt_token": 0.01}, 0.01 * P, 0.0, 0.0),
    ({"engine.idle_wakeup_ms": 2.0}, 2.0, 0.0, 0.0),
    ({"engine.stream_ms_per_token": 0.5}, 0.5, 0.0, 0.0),
])
def test_engine_settings_reach_the_engine_in_milliseconds(synthetic_profiles, over, first, step,
                                                          last):
    req, s = run_one(synthetic_profiles, **over)
    ttft, e2el = hand(first, step, last)
    assert (req.prompt_tokens, req.output_tokens) == (P, O)
    assert s["mean_ttft_ms"] == pytest.approx(ttft, rel=1e-9)
    assert s["mean_e2el_ms"] == pytest.approx(e2el, rel=1e-9)
    assert s["mean_tpot_ms"] == pytest.approx((e2el - ttft) / (O - 1), rel=1e-9)


def test_api_ingest_delays_a_request_that_finds_the_engine_busy(synthetic_profiles):
    """Two requests 5 ms apart: the second finds the engine busy and pays the ingest time,
    base + per running sequence (2 s + 1 s x 1), so long that the first is done by then: its
    TTFT is exactly that delay plus its own prefill."""
    cfg = make_cfg(synthetic_profiles, lengths({
        "policy.name": "baseline", "workload.mix": {"text": 1.0}, "cluster.num_gpus": 1,
        "engine.api_ingest_ms": 2000.0, "engine.api_ingest_ms_per_running_seq": 1000.0,
        "workload.prompt_tokens": constant(P), "workload.output_tokens": constant(200),
        "workload.num_requests": 2, "workload.arrival.rate": 200.0, "workload.arrival.shape": 50.0}))
    r = Run(cfg)
    r.run()
    a, b = sorted(r.requests, key=lambda q: q.arrival)
    assert a.first_token - a.arrival == pytest.approx(prefill_ms(P) / 1e3, rel=1e-9)   # idle
    assert a.finish < b.arrival + 3.0
    assert b.first_token - b.arrival == pytest.approx(3.0 + prefill_ms(P) / 1e3, rel=1e-9)


def json_key(d: dict) -> str:
    return repr(sorted(d.items()))


def test_host_overhead_settings_on_a_synchronously_timed_table():
    """The shipped H100 table of qwen2_5_vl_7b was timed synchronously, so async scheduling
    takes host(B) = base + per_seq B off each step: the layout reports the values in ms; the
    synthetic tables (no host term measured) get none."""
    from sim.engines.latency import LatencyModel
    lat = LatencyModel("traces/profiles", "h100")
    slope_ms = lat.host_per_seq("qwen2_5_vl_7b") * 1e3
    assert slope_ms > 0
    cases = [({}, {"base": 1.15, "per_seq": round(slope_ms, 4)}),
             ({"engine.host_overhead_per_seq_ms": 0.02}, {"base": 1.15, "per_seq": 0.02}),
             ({"engine.host_overhead_base_ms": 1.23456}, {"base": 1.235, "per_seq": round(slope_ms, 4)}),
             ({"engine.host_overhead_by_model": {"qwen2_5_vl_7b": [2.0, 0.05]}},
              {"base": 2.0, "per_seq": 0.05}),
             ({"engine.host_overhead_by_model": {"qwen2_5_7b": [2.0, 0.05]}},
              {"base": 1.15, "per_seq": round(slope_ms, 4)}),
             ({"engine.async_scheduling": False}, {"base": 0.0, "per_seq": 0.0})]
    steps = {}
    for over, want in cases:
        cfg = make_cfg(None, lengths({
            "policy.name": "baseline", "workload.num_requests": 1, "workload.mix": {"text": 1.0},
            "cluster.num_gpus": 1, **over}))
        cfg.profiles_dir = "traces/profiles"
        s = Run(cfg).run()
        assert s["layout"]["ar_host_overhead_ms"] == {"qwen2_5_vl_7b": want}, over
        steps[json_key(over)] = s["mean_e2el_ms"]
    # hiding host time under the GPU step makes the request faster than synchronous steps
    assert steps[json_key({})] < steps[json_key({"engine.async_scheduling": False})]


def test_no_host_overhead_on_a_table_without_a_host_term(synthetic_profiles):
    _, s = run_one(synthetic_profiles)
    assert s["layout"]["ar_host_overhead_ms"] == {"qwen2_5_vl_7b": {"base": 0.0, "per_seq": 0.0}}


def test_kv_capacity_setting_overrides_the_memory_model(synthetic_profiles):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 1,
                                        "workload.mix": {"text": 1.0}, "cluster.num_gpus": 1,
                                        "engine.kv_capacity_tokens": 1600, "engine.block_size": 32})
    r = Run(cfg)
    ar = r.policy.placement.replicas["qwen2_5_vl_7b"][0].ar
    assert (ar.total_blocks, ar.bs) == (50, 32)


def test_a_context_is_not_done_unless_it_says_so(synthetic_profiles):
    """SimContext.done defaults to "never done" (the autoscaler of a policy built without it
    keeps ticking: tests/test_scaling.py); pilot requests default to none."""
    from sim.policies.policy import SimContext
    r = Run(make_cfg(synthetic_profiles, {"workload.num_requests": 1}))
    ctx = SimContext(r.env, r.cfg, r.lat, lambda req: None, lambda d, w: None)
    assert ctx.done() is False and ctx.pilot == []
    assert r.ctx.done() is False                # a run's context: not before its requests are done
    r.run()
    assert r.ctx.done() is True


# --- shared helpers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_gpus, per_node, gb_s", [(8, 8, 450.0), (8, 4, 50.0), (4, 4, 450.0)])
def test_hop_delay_is_bytes_over_the_link_plus_latency(synthetic_profiles, num_gpus, per_node, gb_s):
    """Same node (NVLink) when the whole cluster fits in one node, else the network."""
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 1,
                                        "cluster.num_gpus": num_gpus, "cluster.gpus_per_node": per_node,
                                        "cluster.nvlink_gb_s": 450.0, "cluster.network_gb_s": 50.0,
                                        "cluster.transfer_latency_us": 30.0})
    pol = Run(cfg).policy
    assert pol.link_delay(9 * 10**9, True) == pytest.approx(9e9 / 450e9 + 30e-6, rel=1e-12)
    assert pol.link_delay(9 * 10**9, False) == pytest.approx(9e9 / 50e9 + 30e-6, rel=1e-12)
    req = Request(0, 0.0, "generate", "qwen_image", 77, output_image=(512, 512), steps=4)
    done = Job(req, "dit_step", "qwen_image", height=512, width=512, seq_len=1024)
    from sim.engines.pipeline import handoff_bytes
    nbytes = handoff_bytes(done)
    assert nbytes > 0
    nxt = Job(req, "vae_decode", "qwen_image", height=512, width=512)
    assert pol.hop_delay(done, nxt) == pytest.approx(nbytes / (gb_s * 1e9) + 30e-6, rel=1e-12)


def test_pilot_work_is_the_offered_work_per_pool(synthetic_profiles):
    """Pools are sized by the work of the first requests: the sum of their hops' work."""
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 30})
    r = Run(cfg)
    pol = r.policy
    work = pol.pilot_work(pool_key, False)
    by_hand: dict[str, float] = {}
    from sim.engines.cost import hop_work
    for req in pol.ctx.pilot:
        for j in pol.placement.plan_hops(req, False):
            by_hand[pool_key(j)] = by_hand.get(pool_key(j), 0.0) + hop_work(
                r.lat, j, cfg.engine.max_num_batched_tokens)
    assert work == pytest.approx(by_hand, rel=1e-12)
    assert set(work) == {"dit:qwen_image", "encoder:qwen2_5_vl_7b", "llm:qwen2_5_vl_7b",
                         "vae:qwen_image"}
    assert all(w > 0 for w in work.values())
    # fused: vision encoding inside the LLM's hop, no encoder pool
    assert "encoder:qwen2_5_vl_7b" not in pol.pilot_work(pool_key, True)


def test_utilization_is_busy_time_over_duration(synthetic_profiles):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 40})
    r = Run(cfg)
    s = r.run()
    u, gpus = s["utilization"], r.policy.gpus
    d = s["duration"]
    assert u["per_gpu"] == {g.name: pytest.approx(g.busy_time / d, rel=1e-12) for g in gpus}
    assert u["mean_gpu"] == pytest.approx(sum(g.busy_time for g in gpus) / d / len(gpus), rel=1e-12)
    for role in {g.role for g in gpus}:
        mine = [g for g in gpus if g.role == role]
        assert u["gpus_per_pool"][role] == len(mine)
        assert u["per_pool"][role] == pytest.approx(
            sum(g.busy_time for g in mine) / (d * len(mine)), rel=1e-12)
    busy = {}
    on = {}
    for g in gpus:
        for st, b in g.busy_by_stage.items():
            busy[st] = busy.get(st, 0.0) + b
            on.setdefault(st, set()).add(g.gid)
    assert u["per_stage"] == {st: pytest.approx(b / (d * len(on[st])), rel=1e-12)
                              for st, b in busy.items()}
    assert 0 < u["mean_gpu"] < 1
    assert "autoscale_moves" not in u         # static scaling adds nothing


def test_utilization_of_a_short_run_and_of_no_time(synthetic_profiles):
    """Utilization is busy time over the duration however short the run; a zero duration gives
    zeros, not a division error."""
    r = Run(make_cfg(synthetic_profiles, lengths({
        "policy.name": "baseline", "workload.num_requests": 1, "workload.mix": {"text": 1.0},
        "cluster.num_gpus": 1, "workload.arrival.rate": 1000.0,
        "workload.prompt_tokens": constant(P), "workload.output_tokens": constant(O)})))
    s = r.run()
    g = r.policy.gpus[0]
    assert 0 < g.busy_time <= s["duration"] < 1.0
    u = r.policy.utilization(0.5)
    assert u["per_gpu"] == {"gpu0": pytest.approx(g.busy_time / 0.5)}
    assert u["per_pool"] == {"replica:qwen2_5_vl_7b": pytest.approx(g.busy_time / 0.5)}
    assert all(v > 0 for v in u["per_stage"].values())
    z = r.policy.utilization(0.0)
    assert z["per_gpu"] == {"gpu0": 0.0} and z["mean_gpu"] == 0.0
    assert set(z["per_stage"].values()) == {0.0} and z["per_pool"] == {"replica:qwen2_5_vl_7b": 0.0}
