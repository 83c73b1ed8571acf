"""Prefill/decode disaggregation (sim/policies/pd.py), image-feature and prefix caches
(sim/policies/reuse.py), multi-image requests and the image-reuse law, on the synthetic tables of
tests/conftest.py (closed-form latencies, so the oracles are exact)."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from conftest import decode_ms, make_cfg, prefill_ms, vision_ms
from profiler.models import load_model
from sim.config import ConfigError, LengthDist
from sim.core.records import Request
from sim.engines.pipeline import plan_hops, split_prefill_decode
from sim.names import AR, DECODE, PREFILL, VAE_ENCODE, VISION_ENCODE
from sim.policies.reuse import LRU
from sim.run.runner import Run
from sim.workloads import request_source
from sim.workloads.laws import zipf_ints

VL = "qwen2_5_vl_7b"


def _trace(tmp_path, rows: list[str], name: str = "t.csv") -> str:
    p = tmp_path / name
    p.write_text("arrival,task,prompt_tokens,output_tokens,image_height,image_width,image_ids\n"
                 + "\n".join(rows) + "\n")
    return str(p)


def _run(profiles, trace: str, **over) -> Run:
    cfg = make_cfg(profiles, {"workload.path": trace, "latency.fallback": None, **over})
    r = Run(cfg)
    r.run()
    return r


# --- prefill/decode split ----------------------------------------------------------------------

def test_split_hops():
    req = Request(0, 0.0, "text", VL, 300, 20)
    a, b = split_prefill_decode(plan_hops(req, True))
    assert (a.stage, a.out_tokens, a.pre_computed, a.pre_generated) == (AR, 1, 0, 0)
    assert (b.stage, b.tokens, b.out_tokens, b.pre_computed, b.pre_generated) == (AR, 300, 20, 300, 1)
    one = Request(1, 0.0, "text", VL, 300, 1)
    assert len(split_prefill_decode(plan_hops(one, True))) == 1     # nothing to decode


@pytest.mark.parametrize("nodes", [1, 2])
def test_pd_costs_exactly_the_kv_transfer(synthetic_profiles, tmp_path, nodes):
    """One request: the split serves it as the unsplit pool does, plus the KV transfer
    (prompt x KV bytes per token over NVLink in a node, the network across nodes, + latency)."""
    P, O = 1000, 40
    tr = _trace(tmp_path, [f"0.0,text,{P},{O},,,"])
    over = {"policy.name": "disaggregated", "cluster.num_gpus": 2,
            "cluster.gpus_per_node": 2 if nodes == 1 else 1}
    plain = _run(synthetic_profiles, tr, **over).requests[0]
    r = _run(synthetic_profiles, tr, **over, **{"policy.pd_split": True})
    split = r.requests[0]
    c = r.cfg.cluster
    bw = (c.nvlink_gb_s if nodes == 1 else c.network_gb_s) * 1e9
    xfer = P * load_model(VL).kv_bytes_per_token() / bw + c.transfer_latency_us * 1e-6
    assert split.ttft == pytest.approx(plain.ttft, rel=1e-12)
    assert split.ttft == pytest.approx(prefill_ms(P) / 1e3, rel=1e-9)
    assert split.e2el - plain.e2el == pytest.approx(xfer, rel=1e-9, abs=1e-12)
    # the decode GPU only decodes: O - 1 steps from context P
    dec = sum(decode_ms(1, P + i) for i in range(O - 1)) / 1e3
    assert split.e2el == pytest.approx(prefill_ms(P) / 1e3 + xfer + dec, rel=1e-9)
    servers = {s.stage: s.server for s in split.stages if s.stage in (PREFILL, DECODE)}
    assert servers[PREFILL] != servers[DECODE]
    assert r.policy.notes["pools"] == {f"prefill:{VL}": 1, f"decode:{VL}": 1}


def test_pd_pools_sized_from_offered_work(cfg_factory):
    cfg = cfg_factory({"policy.name": "disaggregated", "policy.pd_split": True,
                       "workload.mix": {"text": 1.0}, "cluster.num_gpus": 8,
                       "workload.num_requests": 300, "workload.output_tokens.mean": 800})
    r = Run(cfg)
    s = r.run()
    pools = r.policy.notes["pools"]
    work = r.policy.pilot_work(r.policy.placement.key_of, False)
    from sim.policies.placement import size_pools
    assert pools == size_pools(work, 8)
    assert pools[f"decode:{VL}"] > pools[f"prefill:{VL}"]     # long outputs: decode-heavy
    assert s["completed"] == 300


def test_pd_split_refuses_replicas(cfg_factory):
    with pytest.raises(ConfigError, match="pd_split"):
        Run(cfg_factory({"policy.name": "baseline", "policy.pd_split": True}))


# --- caches ------------------------------------------------------------------------------------

def test_lru_evicts_least_recent():
    c = LRU(10)
    c.put("a", 4)
    c.put("b", 4)
    assert c.hit("a")
    c.put("c", 4)                   # evicts b, the least recently used
    assert c.hit("a") and c.hit("c") and not c.hit("b") and c.evictions == 1
    c.put("huge", 11)               # larger than the cache: not stored
    assert not c.hit("huge") and c.used == 8


def test_feature_cache_skips_the_encoder(synthetic_profiles, tmp_path):
    """Stage pools: the second request with image 7 skips its vision-encoder hop; image 8 is new."""
    rows = ["0.0,understand,100,5,448,448,7", "10.0,understand,100,5,448,448,7",
            "20.0,understand,100,5,448,448,8"]
    over = {"policy.name": "disaggregated", "cluster.num_gpus": 2}
    off = _run(synthetic_profiles, _trace(tmp_path, rows), **over)
    on = _run(synthetic_profiles, _trace(tmp_path, rows, "u.csv"), **over, **{"policy.feature_cache_gib": 1.0})
    enc = [[s.stage for s in q.stages].count(VISION_ENCODE) for q in on.requests]
    assert enc == [1, 0, 1]
    assert [[s.stage for s in q.stages].count(VISION_ENCODE) for q in off.requests] == [1, 1, 1]
    tok = load_model(VL).image_input_tokens(448, 448)
    saved = off.requests[1].e2el - on.requests[1].e2el
    assert saved == pytest.approx(vision_ms(tok) / 1e3, rel=1e-9)
    st = on.policy.notes["caches"]
    assert (st["feature_hits"], st["feature_misses"], st["skipped_hops"]) == (1, 2, 1)


def test_prefix_cache_hits_block_aligned(synthetic_profiles, tmp_path):
    """Replicas with vLLM prefix caching: the second prompt holding image 7 arrives with the
    text before it and the image's KV (block-aligned) computed, and does not encode it again."""
    P = 100
    rows = [f"0.0,understand,{P},5,448,448,7", f"10.0,understand,{P},5,448,448,7"]
    r = _run(synthetic_profiles, _trace(tmp_path, rows), **{"cluster.num_gpus": 1,
             "workload.mix": {"understand": 1.0}, "engine.enable_prefix_caching": True})
    a, b = r.requests
    tok = load_model(VL).image_input_tokens(448, 448)
    cached = ((P + tok) // 16) * 16          # prompt_tokens here is the text before the image
    assert r.policy.notes["caches"]["prefix_hit_tokens"] == cached
    assert a.ttft == pytest.approx((prefill_ms(P + tok) + vision_ms(tok)) / 1e3, rel=1e-9)
    assert b.ttft < a.ttft
    assert VISION_ENCODE not in [s.stage for s in b.stages]


# --- multi-image requests and image reuse ----------------------------------------------------------

def test_zipf_count_law():
    u = np.random.default_rng(0).random(200_000)
    k = zipf_ints(1, 16, 2.0, u)
    assert k.min() == 1 and k.max() == 16
    p1 = 1 / sum(i ** -2.0 for i in range(1, 17))
    assert (k == 1).mean() == pytest.approx(p1, abs=0.005)


def test_multi_image_workload_and_reuse(cfg_factory):
    cfg = cfg_factory({"workload.num_requests": 3000,
                       "workload.image_count": LengthDist(dist="zipf", alpha=2.0, min=1, max=16),
                       "workload.image_reuse.prob": 0.4, "workload.image_reuse.catalog": 50})
    cfg.check()
    reqs = list(request_source(cfg.workload, 0))
    counts = collections.Counter(len(r.input_images) for r in reqs if r.task in ("understand", "edit"))
    assert max(counts) > 4 and min(counts) == 1
    assert all(len(r.input_images) == 1 for r in reqs if r.task in ("inpaint", "outpaint"))
    ids = [i for r in reqs for i in r.image_ids]
    reused = sum(1 for i in ids if i < 50)
    assert reused / len(ids) == pytest.approx(0.4, abs=0.03)
    size = {}
    for r in reqs:
        for i, hw in zip(r.image_ids, r.input_images):
            assert size.setdefault(i, hw) == hw          # one picture, one size
    # image tokens add up over the images
    vl = load_model(VL)
    r = next(r for r in reqs if r.task == "understand" and len(r.input_images) > 2)
    assert r.image_tokens_in == sum(vl.image_input_tokens(h, w) for h, w in r.input_images)
    # every policy serves them
    for pol in ("baseline", "disaggregated", "modality_aware"):
        c = cfg_factory({"policy.name": pol, "workload.num_requests": 200,
                         "workload.image_count": LengthDist(dist="zipf", alpha=1.5, min=1, max=16)})
        assert Run(c).run()["completed"] == 200


def test_multi_image_edit_hops():
    spec = load_model("qwen_image")
    req = Request(0, 0.0, "edit", "qwen_image", 60, 0, ((512, 512), (1024, 768)), (512, 512), 50, True)
    hops = plan_hops(req, True)
    vae = [j for j in hops if j.stage == VAE_ENCODE]
    assert [(j.height, j.width, j.tokens) for j in vae] == [(512, 512, 0), (1024, 768, 1)]
    dit = hops[-2]
    assert dit.seq_len == (spec.latent_tokens(512, 512) * 2 + spec.latent_tokens(1024, 768))


def test_default_workload_draws_unchanged(cfg_factory):
    """Without a count law or reuse, requests carry one image and no ids (the old draws)."""
    cfg = cfg_factory({"workload.num_requests": 500})
    cfg.check()
    for r in request_source(cfg.workload, 0):
        assert r.image_ids == () and len(r.input_images) <= 1


@pytest.mark.parametrize("policy", ["disaggregated", "baseline"])
def test_feature_cache_of_an_llm_engine_holds_one_gpus_worth(synthetic_profiles, tmp_path, policy):
    """A pinned layout without an encoder pool (stage pools), or a replica, encodes images inside
    the LLM step; the engine's (the replica's) feature cache holds feature_cache_gib of one GPU:
    room for 1.5 images' features, images 7, 8, 7 all miss (8 evicts 7, 7 evicts 8); room for
    2.5 images, the second 7 hits."""
    from sim.config import LayoutConfig
    spec = load_model(VL)
    tok = spec.image_input_tokens(448, 448)
    one = tok * spec.components["vision"]["out_hidden_size"] * spec.dtype_bytes / 2 ** 30
    rows = ["0.0,understand,100,5,448,448,7", "10.0,understand,100,5,448,448,8",
            "20.0,understand,100,5,448,448,7"]
    got = {}
    for room in (1.5, 2.5):
        cfg = make_cfg(synthetic_profiles, {"workload.path": _trace(tmp_path, rows, f"f{room}.csv"),
                                            "latency.fallback": None, "policy.name": policy,
                                            "cluster.num_gpus": 1, "policy.feature_cache_gib": room * one})
        if policy == "disaggregated":
            cfg.cluster.layout = LayoutConfig(name="llm_only", pools={f"llm:{VL}": [0]})
        r = Run(cfg)
        r.run()
        st = r.policy.notes["caches"]
        got[room] = (st["feature_hits"], st["feature_misses"], st["feature_evictions"])
    assert got == {1.5: (0, 3, 2), 2.5: (1, 2, 0)}


def test_replicas_skip_the_vae_encode_of_a_cached_input_image(synthetic_profiles, tmp_path):
    """Baseline replicas on the step-level engines with a feature cache: the second edit of
    image 7 takes its condition latents from the cache (no VAE encode), the first does not."""
    rows = ["0.0,edit,50,0,512,512,7", "30.0,edit,50,0,512,512,7"]
    r = _run(synthetic_profiles, _trace(tmp_path, rows), **{
        "policy.name": "baseline", "cluster.num_gpus": 2, "diffusion.engine": "step_level_same_shape",
        "policy.feature_cache_gib": 1.0, "workload.mix": {"understand": 0.5, "edit": 0.5}})
    a, b = sorted(r.requests, key=lambda q: q.arrival)
    assert [s.stage for s in a.stages].count(VAE_ENCODE) == 1
    assert [s.stage for s in b.stages].count(VAE_ENCODE) == 0
    assert r.policy.notes["caches"]["skipped_hops"] == 1
    assert b.finish > b.arrival and a.finish > a.arrival
