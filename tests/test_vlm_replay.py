"""Replay of image + text serving runs (issue 20): profiler.chat_bench results load as understanding
requests with their recorded images; sim.tools.validate tags every run with its modality and load
regime and reports the errors per modality and per regime. Synthetic results, CPU only."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from profiler import chat_requests as CR  # noqa: E402
from profiler.chat_bench import Outcome, build_result  # noqa: E402
from profiler.vlm_model import vlm_shape  # noqa: E402
from sim.tools import validate as V  # noqa: E402
from sim.config import ConfigError  # noqa: E402

PROFILES = ROOT / "traces" / "profiles"
EXAMPLE = ROOT / "traces" / "workloads" / "example_vllm_bench.json"
MODEL = "qwen2_5_vl_7b"


def synthetic_image_result(n: int, rate, seed: int, capacity=None, fail=(), image_law="workload",
                           max_concurrency=None) -> dict:
    """A chat_bench result without a server: the drawn requests, served with made-up latencies
    (TTFT 60 ms + 0.02 ms per prompt token, 15 ms per output token), what the real client writes."""
    plan = CR.ChatPlan(num_prompts=n, request_rate=rate, seed=seed, max_output=64, image_law=image_law)
    reqs = CR.draw_requests(plan)
    tok = vlm_shape(MODEL)["image_tokenizer"]
    from profiler.chat_bench import expected_prompt_tokens
    outs = []
    for r in reqs:
        exp, _ = expected_prompt_tokens(r, tok)
        ttft = 0.06 + 2e-5 * exp
        itl = [0.015] * r.output_tokens
        o = Outcome(success=r.index not in fail, latency=ttft + sum(itl), output_tokens=r.output_tokens,
                    prompt_len=exp, ttft=ttft, itl=itl, start_time=100.0 + r.arrival_s)
        if not o.success:
            o.error, o.ttft, o.itl = "HTTP 500: boom", 0.0, []
        outs.append(o)
    dur = max(o.start_time + o.latency for o in outs) - 100.0
    res = build_result(plan, reqs, outs, dur, [[1000] * len(r.images) for r in reqs], tok, "m", "m",
                       max_concurrency, origin=100.0)
    res.pop("generated_texts")
    res["provenance"] = {"model": MODEL, "kv_cache_tokens": 900_000, "max_model_len": 32768,
                         "max_num_seqs": 256, "max_num_batched_tokens": 8192,
                         "request_rate": "inf" if rate is None else rate,
                         "server_metrics": {"num_preemptions_delta": 0.0}}
    if capacity:
        res["provenance"]["calibrated_capacity_rps"] = capacity
    return res


# ----------------------------------------------------------------------------- regime

@pytest.mark.parametrize("offered,cap,conc,meas,want", [
    ("inf", 10.0, 1, 3.0, "low"),                  # zero-load probe: one request at a time
    ("inf", 10.0, None, 9.0, "overload"),          # open loop, everything at once
    (3.5, 10.0, None, None, "low"), (4.999, 10.0, None, None, "low"),
    (5.0, 10.0, None, None, "moderate"), (6.0, 10.0, None, None, "moderate"),
    (8.0, 10.0, None, None, "near_saturation"), (9.0, 10.0, None, None, "near_saturation"),
    (10.00011, 10.0, None, None, "near_saturation"),   # a run "at C" with its rate rounded
    (10.5, 10.0, None, None, "near_saturation"), (10.51, 10.0, None, None, "overload"),
    (12.0, 10.0, None, None, "overload"), (13.0, 10.0, None, None, "overload"),
    ("inf", 10.0, 64, 9.5, "near_saturation"),     # closed loop: offers what it is served
    ("inf", 10.0, 128, 14.0, "near_saturation"),   # ... and never overloads
    ("inf", 10.0, 8, 3.0, "low"),
    (5.0, None, None, None, "unknown"),
])
def test_regime_definition(offered, cap, conc, meas, want):
    got, rho = V.regime(offered, cap, conc, meas)
    assert got == want
    assert got in V.REGIMES + ("unknown",)
    if want == "unknown":
        assert math.isnan(rho)
    elif conc is None and offered != "inf":
        assert rho == pytest.approx(offered / cap)


def test_regime_is_monotone_in_the_load_ratio():
    rhos = np.linspace(0.0, 2.0, 2001)
    idx = [V.REGIMES.index(V.regime(r * 7.0, 7.0)[0]) for r in rhos]
    assert idx == sorted(idx) and set(idx) == {0, 1, 2, 3}


def test_modality_and_run_class():
    img = synthetic_image_result(8, 2.0, seed=1, capacity=5.0)
    assert V.modality(img) == "image" and V.modality(json.loads(EXAMPLE.read_text())) == "text"
    c = V.run_class(img, MODEL)
    assert c == {"modality": "image", "regime": "low", "load_ratio": pytest.approx(0.4),
                 "capacity_rps": 5.0, "capacity_source": "provenance", "layout": None}
    img["provenance"].pop("calibrated_capacity_rps")
    assert V.run_class(img, MODEL)["regime"] == "unknown"
    c = V.run_class(img, MODEL, {(MODEL, "image"): 2.5})
    assert (c["regime"], c["capacity_source"]) == ("near_saturation", "inf run")
    assert V.run_class(img, MODEL, {(MODEL, "text"): 2.5})["regime"] == "unknown"   # not the text C


# ----------------------------------------------------------------------------- loader

def test_image_result_loads_as_understanding_requests(tmp_path):
    from sim.workloads.trace import load_trace
    res = synthetic_image_result(30, 5.0, seed=2, fail=(3,))
    p = tmp_path / f"{MODEL}__x.json"
    p.write_text(json.dumps(res))
    with pytest.warns(UserWarning, match="dropped 1 failed"):
        df = load_trace(p)
    keep = [i for i in range(30) if i != 3]
    assert len(df) == 29
    assert df["task"].tolist() == ["understand" if res["images"][i] else "text" for i in keep]
    assert [list(map(list, x)) for x in df["images"]] == [res["images"][i] for i in keep]
    # text prompt = the server's prompt tokens minus the image tokens
    assert df["prompt_tokens"].tolist() == [res["input_lens"][i] - res["image_tokens"][i] for i in keep]
    st = np.array(res["start_times"])
    assert np.allclose(df["arrival"], st[keep] - st.min())          # send times, from the first


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r.pop("image_tokens"), "'image_tokens' None"),
    (lambda r: r["images"].pop(), "field 'images' has 11 rows"),
    (lambda r: r["images"].__setitem__(0, [[0, 5]]), "row 0 field 'images'"),
    (lambda r: r["images"].__setitem__(1, [["a"]]), "row 1 field 'images'"),
])
def test_bad_image_fields_name_file_row_and_field(tmp_path, mutate, match):
    from sim.workloads.trace import load_trace
    res = synthetic_image_result(12, 5.0, seed=4)
    res["images"][0] = res["images"][0] or [[64, 64]]
    mutate(res)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(res))
    with pytest.raises(ConfigError, match=match) as e:
        load_trace(p)
    assert "bad.json" in str(e.value)


def test_replay_uses_the_recorded_images_exactly(tmp_path):
    """The replayed requests carry every recorded image (several per request too) and their
    prefill is exactly the server's prompt (text + the model's image tokens)."""
    if not (PROFILES / "h100" / f"{MODEL}.parquet").exists():
        pytest.skip("no qwen2_5_vl_7b table")
    from sim.run.runner import Run
    res = synthetic_image_result(40, 6.0, seed=5, capacity=10.0)
    p = tmp_path / f"{MODEL}__low.json"
    p.write_text(json.dumps(res))
    cfg, ov = V.compose_replay(p, MODEL, str(PROFILES), "h100", None, res["provenance"])
    assert "engine.kv_capacity_tokens=900000" in ov
    Run(cfg, tmp_path / "run").run()
    df = pd.read_parquet(tmp_path / "run" / "requests.parquet").sort_values("id")
    assert df["image_tokens_in"].tolist() == res["image_tokens"]
    assert (df["prompt_tokens"] + df["image_tokens_in"]).tolist() == res["input_lens"]
    assert df["num_input_images"].tolist() == [len(x) for x in res["images"]]
    assert df["task"].tolist() == res["tasks"]
    assert (df["output_tokens"]).tolist() == res["output_lens"]
    assert sum(len(x) > 1 for x in res["images"]) >= 2


# ----------------------------------------------------------------------------- validate

def test_validate_reports_per_modality_and_regime(tmp_path, capsys):
    if not (PROFILES / "h100" / f"{MODEL}.parquet").exists() or not (PROFILES / "h100" / "qwen2_5_7b.parquet").exists():
        pytest.skip("no h100 tables")
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / f"{MODEL}__low.json").write_text(json.dumps(synthetic_image_result(30, 2.0, seed=6, capacity=8.0)))
    (bench / f"{MODEL}__sat.json").write_text(json.dumps(synthetic_image_result(30, 7.2, seed=7, capacity=8.0)))
    inf = synthetic_image_result(30, None, seed=8)                # no capacity of its own: overload
    (bench / f"{MODEL}__inf.json").write_text(json.dumps(inf))
    noc = synthetic_image_result(30, 4.0, seed=9)                 # capacity from the inf run above
    (bench / f"{MODEL}__mid.json").write_text(json.dumps(noc))
    txt = json.loads(EXAMPLE.read_text())
    txt["provenance"] = {"model": "qwen2_5_7b", "kv_cache_tokens": 200_000, "max_model_len": 4096,
                         "calibrated_capacity_rps": float(txt["request_rate"]) / 0.35}
    (bench / "qwen2_5_7b__low.json").write_text(json.dumps(txt))
    out = tmp_path / "report"
    assert V.main([str(bench), "--profiles-dir", str(PROFILES), "--gpu", "h100", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for title in ("error by modality", "error by load regime", "error by modality and regime"):
        assert title in text
    rep = json.loads((out / "validation.json").read_text())
    runs = {r["run"]: r for r in rep["runs"]}
    assert not [r for r in runs.values() if "error" in r]
    want = {f"{MODEL}__low": ("image", "low"), f"{MODEL}__sat": ("image", "near_saturation"),
            f"{MODEL}__inf": ("image", "overload"), "qwen2_5_7b__low": ("text", "low")}
    for run, (mod, reg) in want.items():
        assert (runs[run]["modality"], runs[run]["regime"]) == (mod, reg), run
    mid = runs[f"{MODEL}__mid"]
    assert mid["capacity_source"] == "inf run" and mid["capacity_rps"] == pytest.approx(inf["request_throughput"])
    assert mid["regime"] == V.regime(4.0, inf["request_throughput"])[0]
    by_mod = {r["modality"]: r for r in rep["by_modality"]}
    assert by_mod["image"]["runs"] == 4 and by_mod["text"]["runs"] == 1
    by_reg = {r["regime"]: r for r in rep["by_regime"]}
    from collections import Counter
    assert {g: r["runs"] for g, r in by_reg.items()} == Counter(r["regime"] for r in runs.values())
    assert by_reg["overload"]["runs"] == 1 and by_reg["low"]["runs"] >= 2
    assert [r["regime"] for r in rep["by_regime"]] == [g for g in V.REGIMES + ("unknown",) if g in by_reg]
    # the tables are the rows' own errors
    img = [r for r in runs.values() if r["modality"] == "image"]
    assert by_mod["image"]["mean_abs_err_median_ttft_ms"] == pytest.approx(
        np.mean([abs(r["err_median_ttft_ms"]) for r in img]))
    assert by_mod["image"]["within_request_throughput"] == sum(abs(r["err_request_throughput"]) <= 0.03 for r in img)
    combo = {(r["modality"], r["regime"]) for r in rep["by_modality_regime"]}
    assert ("text", "low") in combo and ("image", "overload") in combo
    assert rep["regimes"]["names"] == list(V.REGIMES)
    csv = pd.read_csv(out / "validation.csv")
    assert {"modality", "regime", "load_ratio"} <= set(csv.columns)


def test_image_probes_stay_out_of_the_text_front_end_calibration():
    """sim.calibrate fits the text front end on zero-load probes; an image probe (chat template,
    image decode and processing) is another front end and is not one of them."""
    from sim.tools import calibrate as C
    probe = synthetic_image_result(8, None, seed=3, image_law="probe", max_concurrency=1)
    probe["provenance"]["max_concurrency"] = 1
    assert probe["max_concurrency"] == 1 and not C.is_probe(probe)
    assert C.is_probe({"provenance": {"max_concurrency": 1}, "ttfts": [0.1]})
