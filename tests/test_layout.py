"""Pinned deployment layouts (cluster.layout): pool sizes and GPU placement come from the config,
never from offered work; each check has an oracle (which GPU ran which stage, the exact transfer
time of a measured connector, the link a node boundary selects) or a one-line refusal."""
from __future__ import annotations

import math

import pytest

from sim.config import ConfigError, HandoffLink, LayoutConfig
from sim.engines.pipeline import handoff_bytes
from sim.names import TRANSFER, VISION_ENCODE
from sim.run.runner import Run

VL = "qwen2_5_vl_7b"
VLM_MIX = {"text": 0.25, "understand": 0.75, "generate": 0.0, "edit": 0.0, "inpaint": 0.0,
           "outpaint": 0.0}


def vlm_cfg(cfg_factory, pools, num_gpus, policy="disaggregated", handoff=None, n=120, rate=4.0,
            gpus_per_node=8, **kw):
    cfg = cfg_factory()
    cfg.policy.name = policy
    cfg.cluster.num_gpus = num_gpus
    cfg.cluster.gpus_per_node = gpus_per_node
    cfg.cluster.layout = LayoutConfig(name="t", pools=pools, handoff=handoff or {})
    cfg.workload.mix = dict(VLM_MIX)
    cfg.workload.num_requests = n
    cfg.workload.arrival.rate = rate
    cfg.workload.arrival.shape = 1.0
    for k, v in kw.items():
        setattr(cfg.policy, k, v)
    return cfg


def gpu_of(run, gid):
    return next(g for g in run.policy.gpus if g.gid == gid)


def test_1e1pd_pins_pools_and_stages_to_their_gpus(cfg_factory):
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": [1]}, 2)
    run = Run(cfg)
    s = run.run()
    assert s["completed"] == 120
    assert [g.gid for g in run.policy.gpus] == [0, 1]
    g0, g1 = gpu_of(run, 0), gpu_of(run, 1)
    assert g0.role == f"encoder:{VL}" and g1.role == f"llm:{VL}"
    # the encoder GPU ran vision encoding only, the LLM GPU never encoded an image
    assert set(g0.busy_by_stage) == {VISION_ENCODE} and g0.busy_time > 0
    assert VISION_ENCODE not in g1.busy_by_stage and g1.busy_time > 0
    assert s["utilization"]["gpus_per_pool"] == {f"encoder:{VL}": 1, f"llm:{VL}": 1}
    # every image request crossed the link once; text requests never did
    for r in run.requests:
        crossed = [st for st in r.stages if st.stage == TRANSFER]
        assert len(crossed) == (1 if r.input_images else 0)


def test_measured_handoff_replaces_nvlink_exactly(cfg_factory):
    link = HandoffLink(gb_s=1.5, latency_us=2500.0, source="test")
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": [1]}, 2, handoff={"encoder": link})
    run = Run(cfg)
    run.run()
    # the link's figures as they are (bytes over GB/s, microseconds), for this hand-off only
    assert run.policy.link_delay(10**9, True, "encoder") == 10**9 / (1.5 * 1e9) + 2500.0 * 1e-6
    assert run.policy.link_delay(10**9, True, "kv") == run.policy.link_delay(10**9, True)
    checked = 0
    for r in run.requests:
        if not r.input_images:
            continue
        enc = next(st for st in r.stages if st.stage == VISION_ENCODE)
        xfer = next(st for st in r.stages if st.stage == TRANSFER)
        job_bytes = sum(handoff_bytes(j) for j in [_vision_job(r)])
        assert math.isclose(xfer.end - xfer.start, job_bytes / 1.5e9 + 2.5e-3, rel_tol=1e-9)
        assert math.isclose(xfer.start, enc.end, abs_tol=1e-12)
        checked += 1
    assert checked > 50


def _vision_job(req):
    from sim.engines.pipeline import plan_hops
    return next(j for j in plan_hops(req, False) if j.stage == VISION_ENCODE)


def test_node_boundary_selects_the_network(cfg_factory):
    """Encoder on GPU 0, LLM on GPU 2, two GPUs per node: the hand-off crosses nodes."""
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0, 1], f"llm:{VL}": [2]}, 3, gpus_per_node=2)
    run = Run(cfg)
    run.run()
    c = cfg.cluster
    r = next(r for r in run.requests if r.input_images)
    xfer = next(st for st in r.stages if st.stage == TRANSFER)
    want = handoff_bytes(_vision_job(r)) / (c.network_gb_s * 1e9) + c.transfer_latency_us * 1e-6
    assert math.isclose(xfer.end - xfer.start, want, rel_tol=1e-9)
    # the same layout inside one node goes over NVLink
    cfg2 = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0, 1], f"llm:{VL}": [2]}, 3, gpus_per_node=8)
    run2 = Run(cfg2)
    run2.run()
    r2 = next(r for r in run2.requests if r.input_images)
    x2 = next(st for st in r2.stages if st.stage == TRANSFER)
    want2 = handoff_bytes(_vision_job(r2)) / (c.nvlink_gb_s * 1e9) + c.transfer_latency_us * 1e-6
    assert math.isclose(x2.end - x2.start, want2, rel_tol=1e-9)


def test_one_gpu_holds_both_pools(cfg_factory):
    """1E1PD on one card (two vLLM processes on GPU 0): one simulated GPU with both engines."""
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": [0]}, 1,
                  handoff={"encoder": HandoffLink(gb_s=2.0, latency_us=1000.0)})
    run = Run(cfg)
    s = run.run()
    assert s["completed"] == 120 and len(run.policy.gpus) == 1
    g = run.policy.gpus[0]
    assert g.role == f"encoder:{VL}+llm:{VL}"
    assert VISION_ENCODE in g.busy_by_stage and len(g.busy_by_stage) >= 2
    # not fused: the encoder is its own engine, so image requests still cross the (measured) link
    assert any(st.stage == TRANSFER for r in run.requests for st in r.stages)


def test_replicas_pinned_round_robin(cfg_factory):
    cfg = vlm_cfg(cfg_factory, {f"replica:{VL}": [0, 1]}, 2, policy="baseline", router="round_robin")
    run = Run(cfg)
    s = run.run()
    reps = run.policy.placement.replicas[VL]
    assert [r.gpu.gid for r in reps] == [0, 1]
    assert s["utilization"]["gpus_per_pool"] == {f"replica:{VL}": 2}
    # vision encoding inside the step (no transfer), both replicas used
    assert not any(st.stage == TRANSFER for r in run.requests for st in r.stages)
    assert all(r.gpu.busy_time > 0 for r in reps)


def test_layout_sizes_ignore_offered_work(cfg_factory):
    """The same workload sized by work gives the LLM pool more GPUs; pinned, it keeps 1 + 3."""
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0, 1, 2], f"llm:{VL}": [3]}, 4)
    run = Run(cfg)
    assert run.policy.notes["pools"] == {f"encoder:{VL}": 3, f"llm:{VL}": 1}
    free = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": [1]}, 4)
    free.cluster.layout = None
    assert Run(free).policy.notes["pools"][f"llm:{VL}"] >= 2


def test_pinned_layout_never_autoscales(cfg_factory):
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0, 1, 2], f"llm:{VL}": [3]}, 4,
                  policy="modality_aware", n=400, rate=30.0, autoscale_interval_s=0.5)
    run = Run(cfg)
    run.run()
    assert run.policy.moves == []
    assert run.policy.notes["pools"] == {f"encoder:{VL}": 3, f"llm:{VL}": 1}


@pytest.mark.parametrize("pools,n,msg", [
    ({f"encoder:{VL}": [0]}, 2, "every GPU 0..1"),
    ({f"encoder:{VL}": [0], f"llm:{VL}": [2]}, 2, "GPU indices 0..1"),
    ({f"encoder:{VL}": [0, 0], f"llm:{VL}": [1]}, 2, "each GPU once per pool"),
    ({f"replica:{VL}": [0], f"llm:{VL}": [1]}, 2, "not both"),
    ({f"replica:{VL}": [0, 1], f"replica:qwen2_5_7b": [1]}, 2, "one replica per GPU"),
    ({f"gpu:{VL}": [0, 1]}, 2, "'<role>:<model>' keys"),
    ({VL: [0, 1]}, 2, "'<role>:<model>' keys"),
    ({}, 2, "at least one pool"),
])
def test_bad_layouts_are_refused_in_one_line(cfg_factory, pools, n, msg):
    cfg = vlm_cfg(cfg_factory, pools, n)
    with pytest.raises(ConfigError) as e:
        cfg.check()
    assert "cluster.layout" in str(e.value) and msg in str(e.value) and "\n" not in str(e.value)


def test_handoff_and_conflicts_are_checked(cfg_factory):
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": [1]}, 2,
                  handoff={"vae": HandoffLink(gb_s=1.0)})
    with pytest.raises(ConfigError, match=r"cluster.layout.handoff.*\['encoder', 'kv'\]"):
        cfg.check()
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": [1]}, 2,
                  handoff={"encoder": HandoffLink(gb_s=0.0)})
    with pytest.raises(ConfigError, match=r"cluster.layout.handoff.encoder.gb_s"):
        cfg.check()
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": [1]}, 2)
    cfg.cluster.pools = {"llm": 1}
    with pytest.raises(ConfigError, match=r"cluster.layout.*leave cluster.replicas and cluster.pools empty"):
        cfg.check()


def test_layout_must_cover_the_pools_the_workload_needs(cfg_factory):
    # stage pools without an encoder pool: images are encoded inside the LLM step (fine) ...
    ok = vlm_cfg(cfg_factory, {f"llm:{VL}": [0, 1]}, 2)
    run = Run(ok)
    run.run()
    assert not any(st.stage == TRANSFER for r in run.requests for st in r.stages)
    assert run.policy.notes["pools"] == {f"llm:{VL}": 2}
    # ... but a replica layout under a stage-pool policy, or a missing model, is refused
    bad = vlm_cfg(cfg_factory, {f"replica:{VL}": [0, 1]}, 2)
    with pytest.raises(ConfigError, match=r"cluster.layout.pools .*stage pools.*wrong kind"):
        Run(bad)
    mixed = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": [1]}, 2)
    mixed.workload.mix = {"text": 0.5, "generate": 0.5}
    with pytest.raises(ConfigError, match=r"missing \['dit:qwen_image'"):
        Run(mixed)


@pytest.mark.parametrize("num_gpus, per_node, same", [(2, 2, True), (3, 2, False), (2, 8, True)])
def test_hops_of_pools_the_layout_does_not_pin_use_the_cluster_size(cfg_factory, num_gpus, per_node, same):
    """Policy.same_node under a layout, for two hops whose pools are not pinned (no GPU ids to
    compare): they share a node when the whole cluster fits in one, as without a layout."""
    from sim.core.records import Job, Request
    from sim.names import DIT_STEP, VAE_DECODE
    cfg = vlm_cfg(cfg_factory, {f"encoder:{VL}": [0], f"llm:{VL}": list(range(1, num_gpus))},
                  num_gpus, gpus_per_node=per_node, n=4)
    run = Run(cfg)
    run.run()
    req = Request(0, 0.0, "generate", "qwen_image", 8, 0)
    a, b = Job(req, DIT_STEP, "qwen_image"), Job(req, VAE_DECODE, "qwen_image")
    assert run.policy.same_node(a, b) is same
    # pinned pools: one node iff every GPU of both pools is on one (here: all of the cluster's)
    enc = Job(Request(1, 0.0, "understand", VL, 8, 4), VISION_ENCODE, VL)
    llm = Job(enc.req, "ar", VL)
    assert run.policy.same_node(enc, llm) is same
