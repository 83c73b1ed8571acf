"""Placements and their pool sizing (sim/policies/placement.py) on small runs: pools split in
proportion to offered work by largest remainder (fixed sizes kept, user keys matched); replicas
(each family's stages on one GPU, the KV cache sharing the GPU with the DiT's weights, a replica's
books balance after a run, the router picks the replica); stage pools (every hand-off pays
bytes / bandwidth + latency, hand-computed from the model specs; every pool its own GPUs;
understanding requests through the encoder pool); co-located pools (light pools ride on their
heavy pool below LIGHT_SHARE of a GPU, heavy pools never do, fused encoding)."""
from __future__ import annotations

import math

import pytest

from conftest import make_cfg
from profiler.models import load_model
from sim.config import ConfigError, LengthDist
from sim.policies.placement import LIGHT_SHARE, SHARED, match_fixed, pool_key, size_pools
from sim.run.runner import Run


# --- pool sizing ------------------------------------------------------------------------------------

def test_size_pools_splits_by_largest_remainder():
    # 10 GPUs, one each first, the other 7 by work 6:3:1 -> shares 1 + 4.2, 1 + 2.1, 1 + 0.7
    assert size_pools({"a": 6.0, "b": 3.0, "c": 1.0}, 10) == {"a": 5, "b": 3, "c": 2}
    # ties in the remainder go to the first key in work order (a stable sort)
    assert size_pools({"a": 1.0, "b": 1.0}, 3) == {"a": 2, "b": 1}
    # 5 GPUs, 2 spare by work 1:1:2 -> shares 1.5, 1.5, 2.0: the one left over goes to "a"
    assert size_pools({"a": 1.0, "b": 1.0, "c": 2.0}, 5) == {"a": 2, "b": 1, "c": 2}
    # pools without work get nothing unless fixed; fixed sizes are taken as given
    assert size_pools({"a": 2.0, "b": 0.0}, 4) == {"a": 4}
    # 4 left for a and c (2:1): shares 2.33 and 1.67, the spare GPU to the larger remainder
    assert size_pools({"a": 2.0, "b": 0.0, "c": 1.0}, 6, {"b": 2}) == {"b": 2, "a": 2, "c": 2}
    assert size_pools({"a": 3.0, "b": 0.0, "c": 1.0}, 6, {"b": 2}) == {"b": 2, "a": 3, "c": 1}
    assert size_pools({"a": 2.0, "b": 1.0}, 3, {"a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert sum(size_pools({"a": 0.3, "b": 0.3, "c": 0.4}, 64).values()) == 64


def test_size_pools_refuses_too_few_gpus():
    assert size_pools({"a": 1.0, "b": 1.0}, 2) == {"a": 1, "b": 1}        # exactly one each
    with pytest.raises(ConfigError, match=r"cluster.pools: 1 GPUs cannot host 2 pools.*>= 2"):
        size_pools({"a": 1.0, "b": 1.0}, 1)
    with pytest.raises(ConfigError, match=r"cluster.replicas: 3 GPUs cannot host 2 .*>= 4"):
        size_pools({"a": 1.0, "b": 1.0}, 3, {"a": 3}, "cluster.replicas")


def test_match_fixed_maps_roles_and_models_onto_pools():
    keys = ["llm:qwen2_5_vl_7b", "dit:qwen_image", "vae:qwen_image"]
    assert match_fixed({"llm": 2}, keys, "cluster.pools") == {"llm:qwen2_5_vl_7b": 2}
    assert match_fixed({"qwen_image": 3}, keys, "cluster.pools") == {"dit:qwen_image": 3,
                                                                     "vae:qwen_image": 3}
    assert match_fixed({"dit:qwen_image": 1}, keys, "cluster.pools") == {"dit:qwen_image": 1}
    with pytest.raises(ConfigError, match="cluster.pools.encoder matches no pool"):
        match_fixed({"encoder": 1}, keys, "cluster.pools")


# --- replicas ---------------------------------------------------------------------------------------

P, O = 100, 8


def _servers(r: Run) -> list[str]:
    return [q.stages[0].server for q in sorted(r.requests, key=lambda q: q.arrival)]


def _text_run(profiles, n: int, rate: float, **over) -> Run:
    cfg = make_cfg(profiles, {
        "policy.name": "baseline", "workload.num_requests": n, "workload.mix": {"text": 1.0},
        "cluster.num_gpus": 3, "workload.arrival.rate": rate, "workload.arrival.shape": 100.0,
        "workload.prompt_tokens": LengthDist(dist="constant", mean=P, min=1, max=8192),
        "workload.output_tokens": LengthDist(dist="constant", mean=O, min=1, max=8192), **over})
    r = Run(cfg)
    r.run()
    return r


def test_round_robin_cycles_through_the_replicas(synthetic_profiles):
    r = _text_run(synthetic_profiles, 9, 0.5, **{"policy.router": "round_robin"})
    assert _servers(r) == ["gpu0", "gpu1", "gpu2"] * 3


def test_least_loaded_reuses_an_idle_replica_and_spreads_a_burst(synthetic_profiles):
    # far apart: each request is done before the next, so the first replica is always least loaded
    r = _text_run(synthetic_profiles, 6, 0.5)
    assert _servers(r) == ["gpu0"] * 6
    # a burst of equal requests: one per replica in turn
    r = _text_run(synthetic_profiles, 6, 2000.0)
    assert _servers(r) == ["gpu0", "gpu1", "gpu2"] * 2


def test_replica_books_balance_after_a_run(synthetic_profiles):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 80,
                                        "workload.arrival.rate": 20.0, "cluster.num_gpus": 4})
    r = Run(cfg)
    s = r.run()
    place = r.policy.placement
    reps = [x for v in place.replicas.values() for x in v]
    assert len(reps) == 4 and s["layout"]["replicas"] == {m: len(v) for m, v in place.replicas.items()}
    for rep in reps:
        assert rep.requests == 0
        assert abs(rep.outstanding) <= 1e-9 * max(1.0, sum(q.e2el for q in r.requests))
        assert [q.index for q in place.replicas[rep.model]] == list(range(len(place.replicas[rep.model])))


def test_replica_counts_follow_work_or_the_config(synthetic_profiles):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 40,
                                        "cluster.num_gpus": 5, "cluster.replicas": {"qwen_image": 1}})
    r = Run(cfg)
    assert r.policy.notes["replicas"] == {"qwen2_5_vl_7b": 4, "qwen_image": 1}
    with pytest.raises(KeyError, match="no replica serves model flux1_dev"):
        r.policy.placement.pick("flux1_dev", 0.0)


@pytest.mark.parametrize("engine", ["omni_request", "step_level_same_shape"])
@pytest.mark.parametrize("model, stages", [
    ("flux1_dev", ["text_encode", "dit_step", "vae_decode"]),
    ("qwen_image", ["prefill", "dit_step", "vae_decode"]),
])
def test_each_family_runs_its_own_stages_on_one_replica(synthetic_profiles, model, stages, engine):
    """On the vLLM-Omni engine and on the step-level engines (a DiT-only replica has a text
    encoder queue, an AR+DiT replica its condition encoder's AR engine instead)."""
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 3,
                                        "workload.mix": {"generate": 1.0}, "cluster.num_gpus": 1,
                                        "workload.task_models": {"generate": model},
                                        "diffusion.engine": engine})
    r = Run(cfg)
    s = r.run()
    assert s["layout"]["replicas"] == {model: 1}
    for q in r.requests:
        assert [x.stage for x in q.stages] == stages
        assert {x.server for x in q.stages} == {"gpu0"}
    assert math.isfinite(s["mean_e2el_ms"])


def test_edits_encode_their_input_image_on_the_replica(synthetic_profiles):
    # (replicas of stage engines: diffusion.engine=step_level_same_shape; the vLLM-Omni engines
    # are tests/test_omni_engine.py's)
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 3,
                                        "workload.mix": {"edit": 1.0}, "cluster.num_gpus": 1,
                                        "diffusion.engine": "step_level_same_shape"})
    r = Run(cfg)
    r.run()
    for q in r.requests:
        # fused: the condition encoder's step records its vision encoding after the prefill
        assert [x.stage for x in q.stages] == ["prefill", "vision_encode", "vae_encode", "dit_step",
                                               "vae_decode"]
        assert {x.server for x in q.stages} == {"gpu0"} and len(q.input_images) == 1


def test_kv_cache_shares_the_gpu_with_every_model_on_the_replica(synthetic_profiles):
    """A Qwen-Image replica holds the DiT and its condition encoder: the encoder's KV cache gets
    what their weights leave; a VLM replica holds only the VLM."""
    from sim.engines.memory import GPUContents, kv_capacity_tokens
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 4,
                                        "cluster.num_gpus": 2,
                                        "diffusion.engine": "step_level_same_shape"})
    r = Run(cfg)
    vl, qi = load_model("qwen2_5_vl_7b"), load_model("qwen_image")
    own = GPUContents(tuple(("qwen2_5_vl_7b", c) for c in vl.components))
    both = GPUContents(tuple([("qwen_image", c) for c in qi.components] + list(own.parts)))
    c = cfg.cluster
    measured = r.lat.engine_settings("qwen2_5_vl_7b")
    cap_own = kv_capacity_tokens("qwen2_5_vl_7b", own, c.gpu_mem_gib, cfg.engine.gpu_memory_utilization, measured)
    cap_both = kv_capacity_tokens("qwen2_5_vl_7b", both, c.gpu_mem_gib, cfg.engine.gpu_memory_utilization, measured)
    assert 0 < cap_both < cap_own
    reps = r.policy.placement.replicas
    assert reps["qwen2_5_vl_7b"][0].ar.total_blocks == cap_own // 16
    assert reps["qwen_image"][0].ar.total_blocks == cap_both // 16


# --- stage pools ----------------------------------------------------------------------------------

def one_generate(profiles, **over):
    cfg = make_cfg(profiles, {"policy.name": "disaggregated", "workload.num_requests": 1,
                              "workload.mix": {"generate": 1.0}, "cluster.num_gpus": 3,
                              "cluster.pools": {"llm": 1, "dit": 1, "vae": 1},
                              "workload.image_prompt_tokens": LengthDist(dist="constant", mean=77),
                              **over})
    r = Run(cfg)
    s = r.run()
    return r.requests[0], s


@pytest.mark.parametrize("per_node, gb_s", [(8, 450.0), (1, 50.0)])
def test_hand_offs_pay_bytes_over_bandwidth_plus_latency(synthetic_profiles, per_node, gb_s):
    q, s = one_generate(synthetic_profiles, **{"cluster.gpus_per_node": per_node})
    assert s["layout"]["pools"] == {"dit:qwen_image": 1, "llm:qwen2_5_vl_7b": 1, "vae:qwen_image": 1}
    assert [x.stage for x in q.stages] == ["prefill", "transfer", "dit_step", "transfer", "vae_decode"]
    vl, qi = load_model("qwen2_5_vl_7b"), load_model("qwen_image")
    h, w = q.output_image
    lat = 20e-6
    # AR -> DiT: the condition encoder's hidden states of the prompt
    b1 = 77 * vl.components["llm"]["hidden_size"] * vl.dtype_bytes
    # DiT -> VAE: the latents of the output image
    b2 = qi.latent_tokens(h, w) * qi.latent["patch_size"] ** 2 * qi.latent["channels"] * qi.dtype_bytes
    t1, t2 = q.stages[1], q.stages[3]
    assert t1.end - t1.start == pytest.approx(b1 / (gb_s * 1e9) + lat, rel=1e-9)
    assert t2.end - t2.start == pytest.approx(b2 / (gb_s * 1e9) + lat, rel=1e-9)
    assert t1.start == q.stages[0].end and q.stages[2].enqueue == t1.end
    assert t2.start == q.stages[2].end and q.stages[4].enqueue == t2.end
    assert len({q.stages[0].server, q.stages[2].server, q.stages[4].server}) == 3


def test_an_edit_stays_on_the_vae_gpu_between_its_vae_hops(synthetic_profiles):
    """vae_encode -> dit_step pays a transfer, but only hops of another pool do: two hops of one
    pool (the VAE's) hand over nothing."""
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 1,
                                        "workload.mix": {"edit": 1.0}, "cluster.num_gpus": 4,
                                        "cluster.pools": {"encoder": 1, "llm": 1, "dit": 1, "vae": 1}})
    r = Run(cfg)
    r.run()
    stages = [x.stage for x in r.requests[0].stages]
    assert stages == ["vision_encode", "transfer", "prefill", "transfer", "vae_encode", "transfer",
                      "dit_step", "transfer", "vae_decode"]
    pol = r.policy.placement
    from sim.core.records import Job
    req = r.requests[0]
    enc, dec = Job(req, "vae_encode", "qwen_image"), Job(req, "vae_decode", "qwen_image")
    assert pol.transfer_delay(enc, dec) == 0.0
    assert pol.transfer_delay(Job(req, "dit_step", "qwen_image"), dec) > 0.0


def test_default_sizing_gives_every_pool_its_own_gpus(synthetic_profiles):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 40})
    s = Run(cfg).run()
    pools = s["layout"]["pools"]
    assert set(pools) == {"dit:qwen_image", "encoder:qwen2_5_vl_7b", "llm:qwen2_5_vl_7b",
                          "vae:qwen_image"}
    assert sum(pools.values()) == 8 and min(pools.values()) == 1
    assert pools["dit:qwen_image"] == max(pools.values())
    assert "colocated" not in s["layout"]
    assert s["utilization"]["gpus_per_pool"] == pools


def test_understanding_requests_use_the_encoder_pool(synthetic_profiles):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 4,
                                        "workload.mix": {"understand": 1.0}, "cluster.num_gpus": 2,
                                        "cluster.pools": {"encoder": 1, "llm": 1}})
    r = Run(cfg)
    r.run()
    for q in r.requests:
        assert [x.stage for x in q.stages[:3]] == ["vision_encode", "transfer", "prefill"]
        assert q.stages[0].server == "gpu0" and q.stages[2].server == "gpu1"


def test_a_model_without_an_llm_pool_is_refused(synthetic_profiles):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 4,
                                        "workload.mix": {"generate": 1.0}, "cluster.num_gpus": 3})
    place = Run(cfg).policy.placement
    with pytest.raises(KeyError, match="no LLM pool serves model qwen2_5_7b"):
        place.llm_engines("qwen2_5_7b")
    assert place.llm_router("qwen2_5_vl_7b") is place.llm_router("qwen2_5_vl_7b")   # built once


# --- co-located pools -----------------------------------------------------------------------------

def test_light_pools_ride_on_their_heavy_pool(synthetic_profiles):
    """Default sizing on 4 GPUs: the vision encoder (a few % of a GPU) runs on the LLM's GPUs,
    fused into its steps as vLLM does, and the VAE on the DiT's; no GPU idles for them."""
    cfg = make_cfg(synthetic_profiles, {"policy.name": "modality_aware", "workload.num_requests": 60,
                                        "cluster.num_gpus": 4})
    r = Run(cfg)
    s = r.run()
    lay = s["layout"]
    assert lay["colocated"] == {"dit:qwen_image": ["vae:qwen_image"],
                                "llm:qwen2_5_vl_7b": ["encoder:qwen2_5_vl_7b"]}
    # light pools are listed with their hosts' GPUs; only the heavy pools hold GPUs
    assert lay["pools"] == {"dit:qwen_image": 2, "vae:qwen_image": 2, "llm:qwen2_5_vl_7b": 2,
                            "encoder:qwen2_5_vl_7b": 2}
    assert s["utilization"]["gpus_per_pool"] == {"dit:qwen_image": 2, "llm:qwen2_5_vl_7b": 2}
    stages = {x.stage for q in r.requests for x in q.stages}
    assert "transfer" in stages
    seen = set()
    dit_gpus = {g.name for g in r.policy.placement.pools["dit:qwen_image"]}
    for q in r.requests:
        if q.task in ("understand", "edit"):    # fused encoding: inside the AR hop, same GPU
            enc = [x for x in q.stages if x.stage == "vision_encode"]
            pre = [x for x in q.stages if x.stage == "prefill"]
            assert enc and pre and enc[0].server == pre[0].server
            seen.add(q.task)
        if q.task == "generate":                # the VAE on the DiT pool's GPUs
            vae = [x for x in q.stages if x.stage == "vae_decode"][0]
            assert vae.server in dit_gpus
            seen.add(q.task)
    assert seen == {"understand", "edit", "generate"}


def test_a_light_pool_above_half_a_gpu_keeps_its_own_gpus(synthetic_profiles):
    """On 64 GPUs the default mix needs ~0.64 GPU of vision encoding (not co-located, below
    LIGHT_SHARE = 0.5 it would be) and ~0.16 GPU of VAE (co-located with the DiT pool)."""
    cfg = make_cfg(synthetic_profiles, {"policy.name": "modality_aware", "workload.num_requests": 10,
                                        "cluster.num_gpus": 64})
    r = Run(cfg)
    work = r.policy.pilot_work(pool_key, False)
    share = {k: 64 * w / sum(work.values()) for k, w in work.items()}
    assert LIGHT_SHARE == 0.5
    assert 0.5 < share["encoder:qwen2_5_vl_7b"] < 1.0 and share["vae:qwen_image"] < 0.5
    s = r.run()
    assert s["layout"]["colocated"] == {"dit:qwen_image": ["vae:qwen_image"]}
    assert s["utilization"]["gpus_per_pool"]["encoder:qwen2_5_vl_7b"] >= 1
    # the encoder has GPUs of its own: encoding is a hop of its own, not fused
    understand = [q for q in r.requests if q.task == "understand"]
    assert understand and all(q.stages[0].stage == "vision_encode" and q.stages[1].stage == "transfer"
                              for q in understand)


def test_an_image_only_load_keeps_a_light_llm_pool_of_its_own(synthetic_profiles):
    """Heavy roles (LLM, DiT) are never co-located, however little work they get: here the
    condition encoder's prefills need a fraction of a GPU."""
    cfg = make_cfg(synthetic_profiles, {"policy.name": "modality_aware", "workload.num_requests": 10,
                                        "workload.mix": {"generate": 1.0}, "cluster.num_gpus": 4})
    r = Run(cfg)
    work = r.policy.pilot_work(pool_key, False)
    assert 4 * work["llm:qwen2_5_vl_7b"] / sum(work.values()) < 0.5
    s = r.run()
    assert s["utilization"]["gpus_per_pool"]["llm:qwen2_5_vl_7b"] >= 1
    assert s["layout"]["colocated"] == {"dit:qwen_image": ["vae:qwen_image"]}


def test_light_pools_without_their_host_share_one_gpu(synthetic_profiles):
    """On scripted work: a VAE rides on its model's DiT pool; a vision encoder whose LLM has no
    pool, and text encoders whose DiT has none, share one GPU (SHARED); heavy pools stay."""
    r = Run(make_cfg(synthetic_profiles, {"policy.name": "modality_aware",
                                          "workload.num_requests": 10, "cluster.num_gpus": 8}))
    place = r.policy.placement
    place.hosted, place.colocated = {}, []
    out = place._colocate({"llm:a": 10.0, "encoder:b": 0.1, "vae:c": 0.1, "dit:c": 10.0,
                           "text_encoder:d": 0.1}, 8)
    assert place.hosted == {SHARED: ["encoder:b", "text_encoder:d"], "dit:c": ["vae:c"]}
    assert out == {"llm:a": 10.0, "dit:c": pytest.approx(10.1), SHARED: pytest.approx(0.2)}
    assert sorted(place.colocated) == ["encoder:b", "text_encoder:d", "vae:c"]
    # the shared GPU: a new one, holding the engines of every light pool it hosts
    place.hosted = {SHARED: ["encoder:qwen2_5_vl_7b", "text_encoder:flux1_dev"]}
    n = len(r.policy.gpus)
    g = place.provision(SHARED)
    assert g is r.policy.gpus[n] and g.role == SHARED and place.pools[SHARED][-1] is g
    assert [(e.stage, e.model) for e in g.engines] == [("vision_encode", "qwen2_5_vl_7b"),
                                                       ("text_encode", "flux1_dev")]
    h = place.provision(SHARED, g)                    # a given GPU is reused (the autoscaler's)
    assert h is g and len(g.engines) == 2 and len(r.policy.gpus) == n + 1


def test_replicas_serve_vllm_requests_first_come_first_served(synthetic_profiles, tmp_path):
    """vLLM's scheduler has no priority classes: on a baseline replica with one seat, a batch-class
    request that arrived first is served before a later interactive one."""
    p = tmp_path / "t.csv"
    p.write_text("arrival,task,prompt_tokens,output_tokens,slo_class\n0.0,text,100,50,standard\n"
                 "0.001,text,100,50,batch\n0.002,text,100,50,interactive\n")
    cfg = make_cfg(synthetic_profiles, {"workload.path": str(p), "latency.fallback": None,
                                        "policy.name": "baseline", "cluster.num_gpus": 1,
                                        "engine.max_num_seqs": 1})
    r = Run(cfg)
    r.run()
    a, b, c = sorted(r.requests, key=lambda q: q.arrival)
    assert (b.slo_class, c.slo_class) == ("batch", "interactive")
    assert a.finish < b.first_token < b.finish < c.first_token



def test_a_whole_served_models_offered_work_is_the_sum_of_its_pilot_requests_alone(synthetic_profiles):
    """Replicas size a model served whole (the vLLM-Omni request engine) by that engine's own
    estimate: the sum over the pilot's requests of each one's work alone, from zero."""
    from sim.engines.omni import OmniCosts
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 40,
                                        "cluster.num_gpus": 5})
    r = Run(cfg)
    place = r.policy.placement
    costs = OmniCosts("qwen_image", place.lat)
    pilot = [q for q in r.policy.ctx.pilot if q.model == "qwen_image"]
    assert pilot
    work: dict[str, float] = {}
    place._whole_work(work)
    assert work == {"qwen_image": pytest.approx(sum(costs.job(q).work for q in pilot), rel=1e-12)}


def test_a_request_is_served_whole_where_its_replicas_run_the_request_engine(synthetic_profiles):
    """A baseline replica of qwen_image runs the vLLM-Omni engine (the whole request): its
    requests are served whole (Policy.admit then leaves their hops uncosted; the engine costs
    them), a text request is not (its hops are costed for the AR engine's queue)."""
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 40,
                                        "cluster.num_gpus": 5})
    r = Run(cfg)
    place = r.policy.placement
    image = next(q for q in r.policy.ctx.pilot if q.model == "qwen_image")
    text = next(q for q in r.policy.ctx.pilot if q.model != "qwen_image")
    assert place.served_whole(image) is True and place.served_whole(text) is False
    r.run()
    assert r.completed == 40
