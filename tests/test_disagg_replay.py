"""Replays of disaggregated runs (issue 18): sim.tools.validate pins the layout a run recorded
(profiler.disagg_bench's provenance.layout), tags it `modality: disaggregated`, costs hand-offs
with separately measured links and holds it to the same targets. Synthetic results, CPU only."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from profiler import chat_requests as CR  # noqa: E402
from profiler.chat_bench import Outcome, build_result, expected_prompt_tokens  # noqa: E402
from profiler.vlm_model import vlm_shape  # noqa: E402
from sim.tools import validate as V  # noqa: E402

PROFILES = ROOT / "traces" / "profiles"
MODEL = "qwen2_5_vl_7b"
LAYOUTS = {
    "1e1pd": {f"encoder:{MODEL}": [0], f"llm:{MODEL}": [1]},
    "replicas": {f"replica:{MODEL}": [0, 1]},
    "1p1d": {f"prefill:{MODEL}": [0], f"decode:{MODEL}": [1]},
}
needs_tables = pytest.mark.skipif(not (PROFILES / "h100" / f"{MODEL}.parquet").exists(),
                                  reason="measured qwen2_5_vl_7b table not shipped")


def disagg_result(layout: str, n: int = 60, rate: float = 3.0, seed: int = 44, capacity: float = 6.0) -> dict:
    """A disagg_bench result without servers: drawn requests, made-up latencies (TTFT 80 ms +
    0.02 ms per prompt token, 12 ms per output token), the provenance disagg_bench writes."""
    plan = CR.ChatPlan(num_prompts=n, request_rate=rate, seed=seed, max_output=48)
    reqs = CR.draw_requests(plan)
    tok = vlm_shape(MODEL)["image_tokenizer"]
    outs = []
    for r in reqs:
        exp, _ = expected_prompt_tokens(r, tok)
        ttft = 0.08 + 2e-5 * exp
        itl = [0.012] * (r.output_tokens - 1)
        outs.append(Outcome(success=True, latency=ttft + sum(itl), output_tokens=r.output_tokens,
                            prompt_len=exp, ttft=ttft, itl=itl, start_time=50.0 + r.arrival_s))
    dur = max(o.start_time + o.latency for o in outs) - 50.0
    res = build_result(plan, reqs, outs, dur, [[1000] * len(r.images) for r in reqs], tok, "m", "m",
                       None, origin=50.0)
    res.pop("generated_texts")
    res["provenance"] = {"model": MODEL, "kv_cache_tokens": 400_000, "max_model_len": 32768,
                         "max_num_seqs": 256, "max_num_batched_tokens": 8192, "request_rate": rate,
                         "calibrated_capacity_rps": capacity, "server_metrics": {"num_preemptions_delta": 0.0},
                         "layout": {"name": layout, "pools": LAYOUTS[layout], "router": "round_robin"},
                         "handoff": {"ec": {"save": {"gb_s": 123.0}}}}
    return res


def write(tmp_path: Path, name: str, obj: dict) -> Path:
    p = tmp_path / f"{MODEL}__{name}.json"
    p.write_text(json.dumps(obj))
    return p


def test_modality_and_layout_columns():
    for layout, mod in (("1e1pd", "disaggregated"), ("1p1d", "disaggregated"), ("replicas", "image")):
        res = disagg_result(layout, n=8)
        assert V.modality(res) == mod
        cls = V.run_class(res, MODEL)
        assert cls["layout"] == layout and cls["modality"] == mod and cls["regime"] == "moderate"
    plain = disagg_result("1e1pd", n=8)
    plain["provenance"].pop("layout")
    assert V.modality(plain) == "image" and V.run_class(plain, MODEL)["layout"] is None


def test_layout_overrides():
    assert V.layout_overrides({"name": "1e1pd", "pools": LAYOUTS["1e1pd"]}) == [
        "cluster.num_gpus=2", "cluster.name=layout_1e1pd", "policy.name=disaggregated"]
    assert V.layout_overrides({"name": "replicas", "pools": LAYOUTS["replicas"]})[2:] == [
        "policy.name=baseline", "policy.router=round_robin"]
    one = V.layout_overrides({"name": "1e1pd", "pools": {f"encoder:{MODEL}": [0], f"llm:{MODEL}": [0]}})
    assert one[0] == "cluster.num_gpus=1"


def test_handoff_file_formats(tmp_path):
    j = tmp_path / "h.json"
    j.write_text(json.dumps({"links": {"encoder": {"gb_s": 2.5, "latency_us": 800, "source": "x"}}, "other": 1}))
    assert V.load_handoff(j) == {"encoder": {"gb_s": 2.5, "latency_us": 800, "source": "x"}}
    y = tmp_path / "h.yaml"
    y.write_text("kv: {gb_s: 9.0, latency_us: 100}\nnoise: 3\n")
    assert V.load_handoff(y) == {"kv": {"gb_s": 9.0, "latency_us": 100}}
    assert V.load_handoff(tmp_path / "missing.json") == {} and V.load_handoff(None) == {}


@needs_tables
def test_replay_pins_the_recorded_layout_and_measured_links(tmp_path):
    p = write(tmp_path, "1e1pd__poisson", disagg_result("1e1pd"))
    h = tmp_path / "handoff.json"
    h.write_text(json.dumps({"links": {"encoder": {"gb_s": 1.25, "latency_us": 4000, "source": "bench x"}}}))
    rows = V.run_validation(p, str(PROFILES), "h100", tmp_path / "rep", handoff=h)
    r = rows[0]
    assert "error" not in r, r.get("error")
    assert r["modality"] == "disaggregated" and r["layout"] == "1e1pd"
    assert r["layout_pools"] == LAYOUTS["1e1pd"]
    assert r["handoff_links"] == {"encoder": {"gb_s": 1.25, "latency_us": 4000.0, "source": "bench x"}}
    assert r["measured_handoff"] == {"ec": {"save": {"gb_s": 123.0}}}     # recorded, not used
    assert "policy.name=disaggregated" in r["overrides"] and "cluster.num_gpus=2" in r["overrides"]
    summ = json.loads((tmp_path / "rep" / "sim" / f"{MODEL}__1e1pd__poisson" / "summary.json").read_text())
    assert summ["utilization"]["gpus_per_pool"] == {f"encoder:{MODEL}": 1, f"llm:{MODEL}": 1}
    reqs = pd.read_parquet(tmp_path / "rep" / "sim" / f"{MODEL}__1e1pd__poisson" / "requests.parquet")
    img = reqs[reqs["num_input_images"] > 0]
    xfer = (img["transfer_end"] - img["transfer_start"]).to_numpy()
    # every image request crossed the measured link: 4 ms + bytes / 1.25 GB/s, so more than 4 ms
    assert len(img) > 30 and np.all(xfer >= 4e-3 - 1e-12) and reqs.loc[reqs["num_input_images"] == 0, "transfer_start"].isna().all()
    rep = json.loads((tmp_path / "rep" / "validation.json").read_text())
    assert [g["modality"] for g in rep["by_modality"]] == ["disaggregated"]


@needs_tables
def test_replay_reproduces_its_own_simulation(tmp_path):
    """Oracle: a 'measurement' made of the pinned replay's own per-request output replays with
    zero error on every target (same arrivals, same layout, deterministic)."""
    res = disagg_result("1e1pd")
    p = write(tmp_path, "1e1pd__self", res)
    V.run_validation(p, str(PROFILES), "h100", tmp_path / "a", handoff=tmp_path / "none.json")
    sim = pd.read_parquet(tmp_path / "a" / "sim" / f"{MODEL}__1e1pd__self" / "requests.parquet").sort_values("id")
    ttft = sim["ttft_ms"].to_numpy() / 1e3
    e2el = sim["e2el_ms"].to_numpy() / 1e3
    out = sim["output_tokens"].to_numpy()
    res["ttfts"] = ttft.tolist()
    res["itls"] = [[(e - t) / max(o - 1, 1)] * (o - 1) for t, e, o in zip(ttft, e2el, out)]
    for k in list(res):
        if k.startswith(("median_", "p99_", "mean_", "std_", "p90_", "p50_")):
            res.pop(k)
    res["request_throughput"] = None
    res["duration"] = None
    p2 = write(tmp_path, "1e1pd__self2", res)
    rows = V.run_validation(p2, str(PROFILES), "h100", tmp_path / "b", handoff=tmp_path / "none.json")
    r = rows[0]
    for k in ("median_ttft_ms", "median_e2el_ms", "p99_ttft_ms", "p99_e2el_ms", "median_tpot_ms", "p99_tpot_ms"):
        assert abs(r[f"err_{k}"]) < 1e-6, (k, r[f"err_{k}"])


@needs_tables
def test_replicas_replay_as_round_robin_baseline(tmp_path):
    p = write(tmp_path, "replicas__poisson", disagg_result("replicas"))
    r = V.run_validation(p, str(PROFILES), "h100", tmp_path / "rep")[0]
    assert "error" not in r and r["modality"] == "image" and r["layout"] == "replicas"
    assert "policy.router=round_robin" in r["overrides"] and "policy.name=baseline" in r["overrides"]
    summ = json.loads((tmp_path / "rep" / "sim" / f"{MODEL}__replicas__poisson" / "summary.json").read_text())
    assert summ["utilization"]["gpus_per_pool"] == {f"replica:{MODEL}": 2}


@needs_tables
def test_1p1d_replays_on_the_pd_split_with_the_measured_kv_link(tmp_path):
    """Prefill on GPU 0, decode on GPU 1 (policy.pd_split under the pinned layout); every text-out
    request's KV crosses the measured `kv` link: latency + kv bytes / bandwidth, exactly."""
    from sim.engines.pipeline import kv_handoff_bytes, plan_hops, split_prefill_decode
    from sim.run.runner import Run
    res = disagg_result("1p1d")
    p = write(tmp_path, "1p1d__poisson", res)
    h = tmp_path / "handoff.json"
    h.write_text(json.dumps({"links": {"kv": {"gb_s": 3.0, "latency_us": 1500, "source": "kv bench"}}}))
    r = V.run_validation(p, str(PROFILES), "h100", tmp_path / "rep", handoff=h)[0]
    assert "error" not in r, r.get("error")
    assert r["modality"] == "disaggregated" and "policy.pd_split=true" in r["overrides"]
    summ = json.loads((tmp_path / "rep" / "sim" / f"{MODEL}__1p1d__poisson" / "summary.json").read_text())
    assert summ["utilization"]["gpus_per_pool"] == {f"prefill:{MODEL}": 1, f"decode:{MODEL}": 1}
    cfg, _ = V.compose_replay(p, MODEL, str(PROFILES), "h100", None, res["provenance"], V.load_handoff(h))
    run = Run(cfg)
    run.run()
    checked = 0
    for req in run.requests:
        xs = [st for st in req.stages if st.stage == "transfer"]
        hops = split_prefill_decode(plan_hops(req, True))
        pre = next(j for j in hops if j.stage == "ar" and not j.pre_generated)
        assert len(xs) == 1
        assert xs[0].end - xs[0].start == pytest.approx(kv_handoff_bytes(pre) / 3e9 + 1.5e-3, rel=1e-9)
        checked += 1
    assert checked == len(run.requests) == 60


@needs_tables
def test_unreplayable_layout_is_a_row_error_not_a_crash(tmp_path):
    """1p1d needs a prefill/decode split placement; until the simulator has one the row says why."""
    from sim.config import PolicyConfig
    if "pd_split" in PolicyConfig.__dataclass_fields__:
        pytest.skip("prefill/decode split present: 1p1d replays")
    p = write(tmp_path, "1p1d__poisson", disagg_result("1p1d"))
    r = V.run_validation(p, str(PROFILES), "h100", tmp_path / "rep")[0]
    assert r["modality"] == "disaggregated" and "cluster.layout" in r["error"] and "llm:" in r["error"]
