"""Real-engine validation (sim.tools.validate) and its ground-truth driver (profiler.serve_bench).

- test_measured_h100_runs_within_targets: the committed `vllm bench serve` results under
  traces/validation/h100/ replayed against traces/profiles/h100/<model>.parquet; every finite-rate
  run must meet the targets (throughput 3 %, medians 10 %, p99 15 %). Skips when either is missing.
- test_validate_end_to_end_cpu: the pipeline (compose -> replay -> table/CSV/JSON/figure) on the
  synthetic example with whatever profile table set exists.
- tokenizer round trip and the --dry-run command list of serve_bench.
"""
from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from profiler.jsonfiles import read_json  # noqa: E402
from sim.tools import validate as V  # noqa: E402

H100_DIR = ROOT / "traces" / "validation" / "h100"
PROFILES = ROOT / "traces" / "profiles"
EXAMPLE = ROOT / "traces" / "workloads" / "example_vllm_bench.json"


def _measured_files():
    if not H100_DIR.exists():
        return []
    return V.find_bench_files(H100_DIR, exclude=H100_DIR / "report")


# Errors the model reaches today on the committed H100 runs (see traces/validation/README.md).
# Throughput meets its 3% target on every finite-rate run; the other bands are regression
# guards at the level reached, wider than the issue's targets where the model falls short.
REACHED = {
    "request_throughput": 0.03,
    "median_e2el_ms": 0.15,
    "p99_tpot_ms": 0.23, "p99_e2el_ms": 0.20,
    # qwen2_5_7b sharegpt g1 (a later host: its decode steps match r3's within 2%, but its
    # median TTFT is 54 ms against 33-40 ms on r1-r3, same arrivals) sets the TTFT and median TPOT
    # bands: -43.5% / -71% / -14%; before it, 0.37 (qwen poisson_low r2), 0.70 and 0.13
    "median_tpot_ms": 0.15,
    "median_ttft_ms": 0.45, "p99_ttft_ms": 0.72,
}
# The concurrency ladders (traces/validation/h100/ladder/, `--max-concurrency N` at rate inf)
# replayed closed loop, as the client ran them. They calibrated the host and API-CPU constants
# (sim.tools.calibrate), so this guards the closed loop and the prefill/mixed steps of their waves
# rather than proving the decode step; open-loop replays of them were off by up to 180%.
# Since a prefill step costs its chunks' own self-attention (sim.engines.latency.ar_step), the
# ladders' throughput, TPOT and E2EL bands tightened (max 7.6% -> 3.6%, 28.5% -> 21.5%, 7.8% ->
# 3.6%, p99 E2EL 22.4% -> 12.6%) and their TTFT bands widened (median 25.9% -> 32.7% on
# qwen lconc64, p99 11.2% -> 19.3% on qwen conc32): each wave's N requests reach the API server
# at once, and the model's front end has no queue for simultaneous arrivals; the too-slow
# prefill steps had hidden that.
LADDER_REACHED = {"request_throughput": 0.05, "median_ttft_ms": 0.34, "median_tpot_ms": 0.23,
                  "median_e2el_ms": 0.05, "p99_ttft_ms": 0.20, "p99_tpot_ms": 0.06,
                  "p99_e2el_ms": 0.14}


@pytest.fixture(scope="module")
def validation_rows(tmp_path_factory):
    files = _measured_files()
    if not files:
        pytest.skip(f"no measured `vllm bench serve` JSON under {H100_DIR} yet "
                    "(produce with profiler/serve_bench.py on an H100, see traces/validation/README.md)")
    need = {}
    for p in files:
        m = V.infer_model(p, read_json(p))
        need.setdefault(m, []).append(p)
    missing = [m for m in need if m is None or not (PROFILES / "h100" / f"{m}.parquet").exists()]
    usable = [p for m, ps in need.items() if m not in missing for p in ps]
    if not usable:
        pytest.skip(f"no measured profile table traces/profiles/h100/<model>.parquet for {sorted(map(str, need))}")
    rows = V.run_validation(H100_DIR, str(PROFILES), "h100", tmp_path_factory.mktemp("val"), files=usable)
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    return rows


@pytest.fixture(scope="module")
def measured_rows(validation_rows):
    return [r for r in validation_rows if r.get("held_to_targets")]


def test_measured_h100_runs_within_reached_bands(measured_rows):
    text = [r for r in measured_rows if r["modality"] == "text"]
    assert len(text) >= 10
    bad = [(r["run"], k, round(r[f"err_{k}"], 3)) for r in text for k, tol in REACHED.items()
           if not abs(r[f"err_{k}"]) <= tol]
    assert not bad, f"fidelity regressed beyond the reached bands: {bad}"


# Qwen2.5-VL-7B serving images (chat_bench, 75% image requests): where the model stands. The
# throughput holds; the decode-side times do not at a finite rate: the table's vision_encode rows
# carry a ~40-60 ms size-independent floor (448^2 at batch 1, 2, 4: 53, 44, 43 ms; the large
# images scale linearly at ~23 us per token) that every image prefill step pays in the model.
# Replaying qwen2_5_vl_7b__sat with the encoder at its linear compute cost alone gives TPOT -36%,
# with the table +35%: the served engine lies between, and a zero-load image probe
# (serve_bench --runs probe_img) is what measures it. These bands pin today's state.
IMAGE_REACHED = {"request_throughput": 0.05, "median_tpot_ms": 0.40, "median_e2el_ms": 0.40,
                 "p99_e2el_ms": 0.30, "median_ttft_ms": 0.25}


def test_image_runs_replayed_with_their_images(validation_rows):
    image = [r for r in validation_rows if r["modality"] == "image"]
    assert {r["run"] for r in image} >= {"qwen2_5_vl_7b__sat", "qwen2_5_vl_7b__inf"}
    assert all(r["model"] == "qwen2_5_vl_7b" and r["completed"] > 200 for r in image)
    assert {r["regime"] for r in image} == {"near_saturation", "overload"}
    bad = [(r["run"], k, round(r[f"err_{k}"], 3)) for r in image for k, tol in IMAGE_REACHED.items()
           if not abs(r[f"err_{k}"]) <= tol]
    assert not bad, f"image fidelity regressed beyond the reached bands: {bad}"


def test_closed_loop_ladders_within_reached_bands(validation_rows):
    ladders = [r for r in validation_rows if "conc" in r["run"]]
    assert len(ladders) >= 14
    assert all(r["max_concurrency"] in (8, 16, 32, 64, 128) for r in ladders)   # replayed closed
    bad = [(r["run"], k, round(r[f"err_{k}"], 3)) for r in ladders for k, tol in LADDER_REACHED.items()
           if not abs(r[f"err_{k}"]) <= tol]
    assert not bad, f"closed-loop replays regressed beyond the reached bands: {bad}"
    tpot = np.mean([abs(r["err_median_tpot_ms"]) for r in ladders])
    assert tpot < 0.08, tpot          # 5.7% now (44.6% replayed open loop)


def test_engine_ttft_matches_vllm_server_side_ttft(measured_rows):
    """Runs that recorded vLLM's /metrics histograms split the client's TTFT: for llama2_7b the
    simulated server-side TTFT (client/HTTP part and first-token streaming removed) matches vLLM's
    own mean TTFT within 8 ms on every finite-rate run; for qwen2_5_7b (8-24 req/s) the median gap
    is below 12 ms. The engine's own steps are not where the rest lies: with prefill attention per
    chunk the isolated prefill steps of qwen2_5_7b__sat__r3 match the server's step log within
    1.1% (python -m sim.tools.steplog_check), so the remaining ~11 ms median is host time between
    the API server and the engine core under load that the model does not hold (one replicate, poisson_low
    r2, has a server 22 ms slower than its twin r3 on the same arrivals)."""
    split = [r for r in measured_rows if np.isfinite(r.get("meas_server_mean_ttft_ms", np.nan))]
    assert len(split) >= 8
    for r in split:
        assert r["frontend_ms"] > 0
        assert r["frontend_ms"] <= r["sim_mean_ttft_ms"] - r["sim_engine_mean_ttft_ms"] < r["frontend_ms"] + 10
        assert r["meas_client_mean_ttft_ms"] > r["meas_server_mean_ttft_ms"] > 0, r["run"]
    llama = [r for r in split if r["model"] == "llama2_7b"]
    assert len(llama) >= 4
    bad = [(r["run"], round(r["meas_server_mean_ttft_ms"] - r["sim_engine_mean_ttft_ms"], 1)) for r in llama
           if abs(r["meas_server_mean_ttft_ms"] - r["sim_engine_mean_ttft_ms"]) > 8.0]
    assert not bad, bad
    qwen = {r["run"]: r["meas_server_mean_ttft_ms"] - r["sim_engine_mean_ttft_ms"] for r in split
            if r["model"] == "qwen2_5_7b"}
    # g1 (a later lease, run with the GC logger): its server is 25-33 ms slower than r3's on the
    # same arrivals while its decode steps match r3's within 2% (sim.tools.steplog_check): the host's CPU
    # path, not the engine; kept in the validation, held apart here
    first = [abs(v) for k, v in qwen.items() if not k.endswith("__g1")]
    assert len(first) >= 4 and np.median(first) < 12.0, qwen
    assert all(v > 20.0 for k, v in qwen.items() if k.endswith("__g1")), qwen


def test_replicates_measured_and_spread():
    rows = [{"run": "m__sat", **{f"meas_{k}": 10.0 for k in V.TARGETS}},
            {"run": "m__sat__r2", **{f"meas_{k}": 12.0 for k in V.TARGETS}},
            {"run": "m__low", **{f"meas_{k}": 1.0 for k in V.TARGETS}},
            {"run": "m__bad", "error": "x"}]
    reps = V.replicate_spread(rows)
    assert [r["run"] for r in reps] == ["m__sat"] and reps[0]["replicates"] == 2
    assert reps[0]["spread_median_ttft_ms"] == pytest.approx(2.0 / 11.0)
    # one prediction p errs by |p - v| / v on each replicate; the best p = 2 * 10 * 12 / 22 = 10.909
    # errs by 1/11 on both, and every other p by more on one of them
    assert reps[0]["floor_median_ttft_ms"] == pytest.approx(1.0 / 11.0)
    ps = np.linspace(8.0, 14.0, 6001)
    worst = np.maximum(abs(ps - 10.0) / 10.0, abs(ps - 12.0) / 12.0)
    assert worst.min() == pytest.approx(1.0 / 11.0, abs=1e-4)


def test_no_model_can_meet_every_target_on_every_replicate(validation_rows):
    """Why issue 4's targets cannot all be met on every finite-rate run: the real engine, replayed
    on the same arrivals on a fresh server, moves by more than the targets allow. For six of the
    nine run configurations with replicates, no single prediction is within the target of every
    replicate (median TTFT: qwen sat / sharegpt / poisson_low; p99 TTFT: all three of each model
    but qwen's bursty ones)."""
    reps = [r for r in V.replicate_spread(validation_rows) if r["held_to_targets"]]
    assert len(reps) >= 9
    blocked = sorted(r["run"] for r in reps if any(r[f"floor_{k}"] > V.TARGETS[k] for k in V.TARGETS))
    assert blocked == ["llama2_7b__poisson_low", "llama2_7b__sat", "llama2_7b__sharegpt",
                       "qwen2_5_7b__poisson_low", "qwen2_5_7b__sat", "qwen2_5_7b__sharegpt"]
    runs = [r for r in validation_rows if r.get("held_to_targets")
            and V.REPLICATE_SUFFIX.sub("", r["run"]) in blocked]
    assert len(runs) == 20           # of the 27 finite-rate runs


def test_frontend_constants_are_the_probe_calibration():
    """conf/experiment/replay_vllm_bench.yaml's engine.frontend_ms, frontend_ms_per_prompt_token
    and idle_wakeup_ms are what `python -m sim.tools.calibrate` computes from the committed zero-load
    probes and their server-side histograms (not numbers fitted to the validation runs)."""
    import yaml
    from sim.tools import calibrate as C
    rows = C.probe_offsets(H100_DIR, str(PROFILES), "h100")
    if len(rows) < 2:
        pytest.skip("no zero-load probe runs with a measured profile table committed")
    assert {r["model"] for r in rows} >= {"qwen2_5_7b", "llama2_7b"}
    for r in rows:           # an idle engine every time: the simulated TTFT is one prefill step
        assert 0 < r["sim_zero_load_ttft_ms"] < r["measured_ttft_ms"], r
        assert r["client_ms"] > 0 and r["idle_ms"] > 0, r   # both parts are real time
    c = C.split_constants(rows)
    assert c is not None and c["probes"] == len(rows)
    eng = yaml.safe_load((ROOT / "conf" / "experiment" / "replay_vllm_bench.yaml").read_text())["engine"]
    assert eng["frontend_ms"] == pytest.approx(c["frontend_ms"], abs=0.05)
    assert eng["frontend_ms_per_prompt_token"] == pytest.approx(c["frontend_ms_per_prompt_token"], abs=5e-5)
    assert eng["idle_wakeup_ms"] == pytest.approx(c["idle_wakeup_ms"], abs=0.05)
    # busy-engine constants: probe step logs + the concurrency ladder's CPU series
    lc = C.loaded_constants(H100_DIR)
    assert lc is not None and lc["runs"] >= 8 and lc["intervals"] >= 100
    assert 0 < lc["api_ingest_ms_per_running_seq"] < lc["stream_ms_per_token"] < 0.5   # ms per token
    for k, tol in (("api_ingest_ms", 0.05), ("api_ingest_ms_per_running_seq", 5e-4), ("stream_ms_per_token", 5e-4)):
        assert eng[k] == pytest.approx(lc[k], abs=tol), k
    # host time hidden by async scheduling, per model, from the ladder's served decode steps
    hosts = C.ladder_host_overlap(H100_DIR, str(PROFILES), "h100")
    assert set(hosts) == set(eng["host_overhead_by_model"]) == {"qwen2_5_7b", "llama2_7b"}
    for m, h in hosts.items():
        assert len(h["points"]) >= 5 and all(srv < sync for _, sync, srv in h["points"]), h  # hides host time
        by_b: dict = {}
        for n, sync, srv in h["points"]:      # the same batch at 576- and 1,600-token contexts
            by_b.setdefault(n, []).append(sync - srv)
        assert all(max(v) - min(v) < 0.3 for v in by_b.values() if len(v) > 1), by_b
        base, per_seq = eng["host_overhead_by_model"][m]
        assert base == pytest.approx(h["base_ms"], abs=2e-3) and per_seq == pytest.approx(h["per_seq_ms"], abs=2e-4)
    assert hosts["llama2_7b"]["skipped_oom_points"]     # its table's OOM holes are not fitted on
    # the split adds up to the whole zero-load offset
    whole = np.mean([r["offset_ms"] for r in rows])
    parts = c["frontend_ms"] + c["frontend_ms_per_prompt_token"] * np.mean([r["prompt_tokens"] for r in rows]) \
        + c["idle_wakeup_ms"]
    assert parts == pytest.approx(whole, abs=0.05)


def _replay_three(tmp_path, knobs: list[str]):
    """Three requests (idle engine, mid-decode of the first one, idle again) replayed with the
    given engine knobs; their records in arrival order."""
    from sim.run.runner import Run
    found = _any_table()
    if found is None:
        pytest.skip("no profile table")
    gpu, model = found
    arrivals = [0.0, 0.2, 5.0]
    n = len(arrivals)
    obj = dict(start_times=arrivals, input_lens=[256] * n, output_lens=[200] * n, ttfts=[0.05] * n,
               itls=[[0.01] * 199] * n, errors=[""] * n, num_prompts=n, completed=n,
               request_rate=1.0, burstiness=1.0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{model}__t.json"
    path.write_text(json.dumps(obj))
    off = ["engine.frontend_ms=0", "engine.frontend_ms_per_prompt_token=0", "engine.idle_wakeup_ms=0",
           "engine.api_ingest_ms=0", "engine.api_ingest_ms_per_running_seq=0", "engine.stream_ms_per_token=0"]
    cfg, _ = V.compose_replay(path, model, str(PROFILES), gpu, off + knobs, {"kv_cache_tokens": 200_000})
    Run(cfg, tmp_path / "run").run()
    import pandas as pd
    df = pd.read_parquet(tmp_path / "run" / "requests.parquet").sort_values("arrival")
    assert df["finish"].iloc[0] > arrivals[1] + 0.05      # the second one really finds it busy
    assert df["finish"].iloc[1] < arrivals[2]             # and the third an idle engine
    return df


def test_idle_wakeup_and_busy_ingest(tmp_path):
    """The engine's entry delay (prefill_enqueue - arrival): engine.idle_wakeup_ms for a request
    that finds its engine idle; engine.api_ingest_ms + api_ingest_ms_per_running_seq x running
    sequences for one that finds it decoding (one running here)."""
    df = _replay_three(tmp_path, ["engine.idle_wakeup_ms=7", "engine.api_ingest_ms=3",
                                  "engine.api_ingest_ms_per_running_seq=0.5"])
    wait_ms = ((df["prefill_enqueue"] - df["arrival"]) * 1e3).to_numpy()
    assert wait_ms == pytest.approx([7.0, 3.5, 7.0], abs=1e-6)


@pytest.mark.parametrize("aggregate", [True, False])
def test_stream_delay_per_token_of_the_step(tmp_path, monkeypatch, aggregate):
    """engine.stream_ms_per_token: the client sees a first / last token B x that after the step
    that made it ends (B = tokens that step produced); engine records are unchanged. The second
    request's first token comes in a step with the first one's decode token (B = 2), the first
    one's last token in a step with the second one's (B = 2); the rest run alone (B = 1). With
    the decode aggregate off every step commits singly (no jumps): both commit paths."""
    from sim.engines.ar import AREngine
    monkeypatch.setattr(AREngine, "aggregate", aggregate)
    base = _replay_three(tmp_path / "a", [])
    df = _replay_three(tmp_path / "b", ["engine.stream_ms_per_token=1"])
    for col in ("prefill_end", "decode_end"):               # the engine's own timeline is unchanged
        assert df[col].to_numpy() == pytest.approx(base[col].to_numpy(), abs=1e-12)
    assert ((df["first_token"] - df["prefill_end"]) * 1e3).to_numpy() == pytest.approx([1, 2, 1], abs=1e-6)
    assert ((df["finish"] - df["decode_end"]) * 1e3).to_numpy() == pytest.approx([2, 1, 1], abs=1e-6)


def test_spread_out_probe():
    from sim.tools import calibrate as C
    obj = {"start_times": [5.0, 5.1, 5.3], "provenance": {"max_concurrency": 1}}
    assert C.is_probe(obj) and not C.is_probe({"provenance": {"max_concurrency": None}})
    assert C.spread_out(obj, 2.0)["start_times"] == [5.0, 7.0, 9.0]
    assert obj["start_times"] == [5.0, 5.1, 5.3]


@pytest.mark.xfail(strict=True, reason="issue 4 targets not all met, and not all meetable: median TTFT "
                   "within 10% on 16 of 27 runs, p99 TTFT 12 of 27, median TPOT 23 of 27; for 6 of the 9 "
                   "run configurations with replicates the real engine's own run-to-run spread puts a "
                   "target out of reach of any prediction (test_no_model_can_meet_every_target_on_every_"
                   "replicate); see traces/validation/README.md")
def test_measured_h100_runs_within_targets(measured_rows):
    bad = [(r["run"], {k: round(r[f"err_{k}"], 3) for k in V.TARGETS if not r[f"ok_{k}"]})
           for r in measured_rows if not r["pass"]]
    assert not bad, f"runs outside the targets: {bad}"


def _any_table():
    for gpu in ("h100", "h100-analytic"):
        for m in ("qwen2_5_7b", "llama2_7b", "qwen2_5_vl_7b"):
            if (PROFILES / gpu / f"{m}.parquet").exists():
                return gpu, m
    return None


def test_validate_end_to_end_cpu(tmp_path):
    found = _any_table()
    if found is None:
        pytest.skip("no profile table under traces/profiles/h100-analytic/ or traces/profiles/h100/")
    gpu, model = found
    bench = tmp_path / "bench"
    bench.mkdir()
    obj = json.loads(EXAMPLE.read_text())
    obj["provenance"] = {"model": model, "kv_cache_tokens": 200_000, "max_model_len": 4096,
                         "max_num_seqs": 256, "max_num_batched_tokens": 8192,
                         "server_metrics": {"num_preemptions_delta": 0.0}}
    (bench / f"{model}__bursty.json").write_text(json.dumps(obj))
    inf = dict(obj, request_rate="inf")
    inf["provenance"] = dict(obj["provenance"], request_rate="inf")
    (bench / "sub").mkdir()
    (bench / "sub" / f"{model}__inf.json").write_text(json.dumps(inf))
    (bench / "serve_bench_summary.json").write_text(json.dumps({"runs": []}))   # not a bench JSON
    out = tmp_path / "report"
    rc = V.main([str(bench), "--profiles-dir", str(PROFILES), "--gpu", gpu, "--out", str(out)])
    assert rc == 0
    for f in ("validation.csv", "validation.json", "validation_cdfs.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    rep = json.loads((out / "validation.json").read_text())
    runs = {r["run"]: r for r in rep["runs"]}
    assert set(runs) == {f"{model}__bursty", f"{model}__inf"}, runs.keys()
    b = runs[f"{model}__bursty"]
    assert "error" not in b, b
    assert b["held_to_targets"] in (True, "True")
    assert runs[f"{model}__inf"]["held_to_targets"] in (False, "False")
    assert "engine.kv_capacity_tokens=200000" in b["overrides"] and f"+model={model}" in b["overrides"]
    for k in V.TARGETS:
        assert f"meas_{k}" in b and f"sim_{k}" in b
    assert b["meas_median_ttft_ms"] == pytest.approx(obj.get("median_ttft_ms") or b["meas_median_ttft_ms"])
    # --strict on a folder whose runs miss the targets (made-up numbers) returns 1
    assert V.main([str(bench), "--profiles-dir", str(PROFILES), "--gpu", gpu, "--out", str(out),
                   "--strict"]) in (0, 1)


def test_infer_model_and_bench_detection(tmp_path):
    obj = json.loads(EXAMPLE.read_text())
    assert V.is_bench_json(obj)
    assert not V.is_bench_json({"runs": []})
    assert V.infer_model(Path("llama2_7b__sat.json"), {}) == "llama2_7b"
    assert V.infer_model(Path("x.json"), {"provenance": {"model": "qwen2_5_7b"}}) == "qwen2_5_7b"
    assert V.infer_model(Path("x.json"), {"model_id": "Qwen/Qwen2.5-7B-Instruct"}) == "qwen2_5_7b"
    assert V.is_inf_rate({"request_rate": "inf"}) and not V.is_inf_rate({"request_rate": 3.0})


# ----------------------------------------------------------------------------- serve_bench

sb = pytest.importorskip("profiler.serve_bench")


@pytest.mark.parametrize("model", ["llama2_7b", "qwen2_5_7b"])
def test_model_dir_and_tokenizer_round_trip(tmp_path, model):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    d = tmp_path / model
    cfg = sb.write_model_dir(model, d)
    shape = sb.llm_shape(model)
    assert cfg["vocab_size"] == shape["vocab_size"]
    assert cfg["max_position_embeddings"] == shape["max_position_embeddings"]
    assert cfg["dtype"] == "bfloat16" and cfg["torch_dtype"] == "bfloat16"
    assert cfg["num_key_value_heads"] == shape["num_key_value_heads"]
    assert cfg["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[shape["kind"]]]
    if model == "llama2_7b":
        assert cfg["max_position_embeddings"] == 4096
    # raises on any mismatch; what vLLM's RandomDataset does with consecutive ids
    sb.check_tokenizer(sb.tokenizer_dir(d), cfg["vocab_size"])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(sb.tokenizer_dir(d)))
    V_ = cfg["vocab_size"]
    assert tok.vocab_size == V_ and len(tok) == V_
    assert set(tok.all_special_ids) == {V_ - 3, V_ - 2, V_ - 1}
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>" and tok.unk_token == "[UNK]"
    ids = [0, 1, 17, V_ - 4, 5]
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    # ShareGPT text: one id per whitespace/punctuation piece, all inside the vocabulary
    enc = tok("Hello, world! How's it going?").input_ids
    assert len(enc) > 4 and max(enc) < V_


def test_dry_run_command_list(capsys):
    assert sb.main(["--model", "llama2_7b", "--out", "/tmp/never_written", "--dry-run"]) == 0
    text = capsys.readouterr().out
    lines = [l for l in text.splitlines() if not l.startswith("#")]
    serve = [l for l in lines if " serve " in l and " bench " not in l]
    bench = [l for l in lines if " bench serve " in l]
    assert len(serve) == 1 and len(bench) == len(sb.DEFAULT_RUNS)
    s = serve[0]
    for flag in ("--load-format dummy", "--no-enable-prefix-caching", "--max-num-batched-tokens 8192",
                 "--max-num-seqs 256", "--gpu-memory-utilization 0.9", "--port 8000",
                 "--max-model-len 4096", "--tokenizer"):
        assert flag in s, flag
    for b in bench:
        for flag in ("--save-detailed", "--save-result", "--ignore-eos", "--backend vllm",
                     "--base-url http://127.0.0.1:8000", "--result-filename", "--percentile-metrics"):
            assert flag in b, (flag, b)
    assert any("--request-rate inf" in b for b in bench)
    assert any("--burstiness 0.5" in b for b in bench)
    assert any("--burstiness 0.25" in b for b in bench)
    assert any("--dataset-name sharegpt" in b and "--dataset-path" in b for b in bench)
    assert sum("--dataset-name random" in b and "--random-range-ratio 0.5" in b for b in bench) == 5
    assert not any(" bench " in l for l in lines if "--request-rate inf" in l and "--burstiness" in l)


def test_sizing_fits_budget():
    """With the assumed capacity the planned runs (+ ~210 s first engine start) fit in 9 minutes."""
    for model, st in sb.MODEL_SETTINGS.items():
        c = st["assumed_capacity"]
        total = 210.0 + 25.0 + 20.0
        for name in sb.DEFAULT_RUNS:
            total += sb.est_seconds(sb.size_run(sb.RUN_CATALOG[name], c, st["n_inf"], 28.0), c)
        assert total < 9.5 * 60, (model, total)


def test_parsers():
    log = ("INFO ... GPU KV cache size: 1,234,560 tokens\n"
           "INFO ... Maximum concurrency for 32,768 tokens per request: 37.68x\n")
    kv = sb.parse_kv_log(log)
    assert kv["kv_cache_tokens"] == 1234560 and kv["max_model_len"] == 32768
    met = sb.parse_metrics('# HELP x\nvllm:num_preemptions_total{engine="0",model_name="m"} 7.0\n'
                           'vllm:num_preemptions_created{engine="0"} 1.7e9\n'
                           'vllm:cache_config_info{block_size="16",num_gpu_blocks="7716"} 1.0\n')
    assert met["vllm:num_preemptions"] == 7.0
    assert met["cache_config.num_gpu_blocks"] == "7716"
    h = 'vllm:time_to_first_token_seconds_{}{{engine="0"{}}} {}\n'
    before = sb.parse_metrics(h.format("sum", "", 1.0) + h.format("count", "", 10) +
                              h.format("bucket", ',le="0.05"', 8) + h.format("bucket", ',le="+Inf"', 10))
    after = sb.parse_metrics(h.format("sum", "", 1.6) + h.format("count", "", 20) +
                             h.format("bucket", ',le="0.05"', 15) + h.format("bucket", ',le="+Inf"', 20))
    d = sb.histogram_deltas(before, after)["time_to_first_token_seconds"]
    assert d["count"] == 10 and d["mean"] == pytest.approx(0.06)
    assert d["buckets"] == {"0.05": 7.0, "+Inf": 10.0}


def test_sharegpt_subset_format():
    p = ROOT / "traces" / "validation" / "sharegpt_subset.json.gz"
    if not p.exists():
        pytest.skip("sharegpt subset not built")
    assert p.stat().st_size < 3_000_000
    data = json.loads(gzip.decompress(p.read_bytes()))
    assert len(data) >= 1000
    assert all(len(e["conversations"]) >= 2 and e["conversations"][0]["value"] for e in data)


FAKE_VLLM = r'''
import json, sys, time, http.server, threading
args = sys.argv[1:]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
if args[0] == "serve":
    print("INFO GPU KV cache size: 123,456 tokens", flush=True)
    print("INFO Maximum concurrency for 4,096 tokens per request: 30.14x", flush=True)
    n = {"p": 0}
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            n["p"] += 3
            body = ("ok" if self.path == "/health" else
                    'vllm:num_preemptions_total{engine="0"} %d\nvllm:cache_config_info{block_size="16",num_gpu_blocks="7716"} 1.0\n'
                    'vllm:time_to_first_token_seconds_sum{engine="0"} %.3f\nvllm:time_to_first_token_seconds_count{engine="0"} %d\n'
                    % (n["p"], 0.02 * n["p"], n["p"]))
            self.send_response(200); self.end_headers(); self.wfile.write(body.encode())
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(opt("--port"))), H).serve_forever()
elif args[:2] == ["bench", "serve"]:
    src = json.load(open(sys.argv[0].replace("fake_vllm.py", "example.json")))
    rate = opt("--request-rate")
    src.update(request_rate=rate if rate == "inf" else float(rate), num_prompts=int(opt("--num-prompts")),
               burstiness=float(opt("--burstiness", 1.0)), request_throughput=9.5)
    if opt("--dataset-name") == "sharegpt":
        json.load(open(opt("--dataset-path")))
    time.sleep(0.2)
    json.dump(src, open(opt("--result-dir") + "/" + opt("--result-filename"), "w"))
'''


def _fake_serve_bench(tmp_path, model: str, args: list[str]):
    """serve_bench.main against the fake `vllm` CLI on a free port; returns (rc, out dir)."""
    pytest.importorskip("transformers")
    import socket
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE_VLLM)
    shutil.copy(EXAMPLE, tmp_path / "example.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    rc = sb.main(["--model", model, "--out", str(out), "--port", str(port),
                  "--model-dir", str(tmp_path / "m"), "--vllm-cli", f"{sys.executable} {fake}",
                  "--health-timeout", "60"] + args)
    return rc, out


def test_serve_bench_orchestration_with_fake_vllm(tmp_path):
    """The whole driver (model dir, server start/health/KV log, runs, provenance, stop) against a
    fake `vllm` CLI: a tiny HTTP server and a bench that copies the example result."""
    rc, out = _fake_serve_bench(tmp_path, "llama2_7b", ["--runs", "inf,bursty_k0.25,sharegpt"])
    assert rc == 0
    files = sorted(p.name for p in out.glob("llama2_7b__*.json"))
    assert files == ["llama2_7b__bursty_k0.25.json", "llama2_7b__inf.json", "llama2_7b__sharegpt.json"]
    r = json.loads((out / "llama2_7b__bursty_k0.25.json").read_text())
    assert "generated_texts" not in r
    p = r["provenance"]
    assert p["model"] == "llama2_7b" and p["kv_cache_tokens"] == 123456 and p["burstiness"] == 0.25
    assert p["calibrated_capacity_rps"] == 9.5                      # from the inf run
    assert p["request_rate"] == pytest.approx(0.6 * 9.5)
    assert p["server_metrics"]["num_preemptions_delta"] > 0
    assert "--no-enable-prefix-caching" in p["server_command"] and "--save-detailed" in p["bench_command"]
    assert V.infer_model(out / "llama2_7b__inf.json", json.loads((out / "llama2_7b__inf.json").read_text())) == "llama2_7b"
    assert (out / "server_llama2_7b.log").exists() and (out / "serve_bench_llama2_7b.json").exists()
    summ = json.loads((out / "serve_bench_llama2_7b.json").read_text())
    assert [x["run"] for x in summ["runs"]] == ["inf", "bursty_k0.25", "sharegpt"] and not summ["skipped"]


def test_serve_bench_probes_and_replicate_tag_with_fake_vllm(tmp_path):
    """Zero-load probes (one request at a time, fixed lengths) and a tagged replicate at a given
    capacity: file names carry the tag, probe commands their flags, runs their server histograms."""
    rc, out = _fake_serve_bench(tmp_path, "qwen2_5_7b", ["--runs", "probe_in32,poisson_low",
                                                         "--capacity", "20", "--tag", "r2"])
    assert rc == 0
    assert sorted(p.name for p in out.glob("qwen2_5_7b__*.json")) == [
        "qwen2_5_7b__poisson_low__r2.json", "qwen2_5_7b__probe_in32__r2.json"]
    probe = json.loads((out / "qwen2_5_7b__probe_in32__r2.json").read_text())["provenance"]
    for flag in ("--max-concurrency 1", "--random-input-len 32", "--random-output-len 16",
                 "--random-range-ratio 0.0", "--num-prompts 24", "--request-rate inf"):
        assert flag in probe["bench_command"], flag
    assert probe["max_concurrency"] == 1 and probe["random_input_len"] == 32
    low = json.loads((out / "qwen2_5_7b__poisson_low__r2.json").read_text())["provenance"]
    assert low["request_rate"] == pytest.approx(0.35 * 20) and low["calibrated_capacity_rps"] == 20
    hist = low["server_metrics"]["histograms"]["time_to_first_token_seconds"]
    assert hist["count"] > 0 and hist["mean"] == pytest.approx(0.02)
    assert (out / "server_qwen2_5_7b__r2.log").exists() and (out / "serve_bench_qwen2_5_7b__r2.json").exists()


def test_diffusers_pipeline_vs_sum_of_stages():
    """Issue 4 item 4: a real FluxPipeline run vs steps x dit_step + vae_decode from the table,
    target 5% on every point (short dit steps are profiled back to back, as a denoising loop runs
    them: timed one by one from an idle GPU the 512x512 batch-1 step was 92 ms instead of 73)."""
    e2e = H100_DIR / "diffusers_flux_e2e.json.gz"
    if not e2e.exists() or not (PROFILES / "h100" / "flux1_dev.parquet").exists():
        pytest.skip("no measured FluxPipeline run or flux1_dev table")
    rows = V.validate_diffusion(e2e, str(PROFILES), "h100")
    assert len(rows) == 6
    assert all(r["ok"] for r in rows), [(r["run"], round(r["err"], 3)) for r in rows]


def test_steplog_plugin_discovery_and_lines(tmp_path, monkeypatch):
    """The stat-logger plugin that `serve_bench --steplog` installs is found through the entry-point
    group vLLM reads, and writes one parseable line per recorded step."""
    import subprocess
    from types import SimpleNamespace
    from profiler import vllm_steplog as S
    plug = S.install_plugin(tmp_path / "plug")
    code = ("from importlib.metadata import entry_points; "
            f"print([e.value for e in entry_points(group={S.ENTRY_GROUP!r})])")
    env = dict(__import__("os").environ, PYTHONPATH=f"{plug}:{ROOT}")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "profiler.vllm_steplog:StepLogger" in out.stdout
    log = tmp_path / "steps.jsonl"
    monkeypatch.setenv("MMSIM_STEPLOG", str(log))
    lg = S.StepLogger(None, 0)
    it = SimpleNamespace(num_generation_tokens=3, num_prompt_tokens=1024, num_preempted_reqs=0,
                         time_to_first_tokens_iter=[0.031], finished_requests=[SimpleNamespace(
                             num_prompt_tokens=10, num_generation_tokens=5, queued_time=0.0,
                             prefill_time=0.02, decode_time=0.05, e2e_latency=0.08)])
    sch = SimpleNamespace(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.25)
    lg.record(sch, it)
    lg.record(sch, None)
    lg.log()
    recs = S.read_steplog(log)
    assert len(recs) == 2 and recs[0]["gen"] == 3 and recs[0]["prompt"] == 1024 and recs[0]["run"] == 3
    assert recs[0]["ttft"] == [0.031] and recs[0]["fin"] == [[10, 5, 0.0, 0.02, 0.05, 0.08]]
    assert "gen" not in recs[1] and recs[1]["wait"] == 1
    assert len(S.read_steplog(log, t0=recs[1]["t"])) == 1


def test_cpu_sampler_reads_this_process():
    """The API-server / client CPU series: seconds of CPU grow with work done and a finished
    process reads as null, not as an error."""
    import os
    s = sb.CpuSampler({"me": os.getpid(), "gone": 2 ** 22 + 12345}, period=0.01)
    s.start()
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    out = s.stop()
    assert out["columns"] == ["t_s", "me_cpu_s", "gone_cpu_s"]
    me = [r[1] for r in out["rows"]]
    assert len(me) >= 3 and me[-1] - me[0] >= 0.1 and all(b >= a for a, b in zip(me, me[1:]))
    assert all(r[2] is None for r in out["rows"])


def test_steplog_gzip_and_resolve(tmp_path):
    """serve_bench gzips the step log after the server stops; a run's provenance still names the
    plain .jsonl and readers find the .gz."""
    from profiler.vllm_steplog import gzip_steplog, read_steplog, resolve_steplog
    log = tmp_path / "steplog_m.jsonl"
    log.write_text('{"t": 1.0, "m": 1.0, "gen": 3}\n{"t": 2.0, "m": 2.0, "gen": 4}\n')
    assert resolve_steplog(tmp_path, "steplog_m.jsonl") == log
    gz = gzip_steplog(log)
    assert gz is not None and not log.exists() and gz.exists()
    assert resolve_steplog(tmp_path, "steplog_m.jsonl") == gz
    assert [r["gen"] for r in read_steplog(gz, 1.5)] == [4]
    assert resolve_steplog(tmp_path, "missing.jsonl") is None and resolve_steplog(tmp_path, None) is None


def test_host_overhead_by_model_used_and_checked(tmp_path):
    """engine.host_overhead_by_model replaces base / per-sequence host time for its model (the
    run's layout notes say which values an engine ran with); a malformed entry names the field."""
    from sim.config import ConfigError, EngineConfig
    found = _any_table()
    if found is None:
        pytest.skip("no profile table")
    _, model = found
    with pytest.raises(ConfigError, match=r"engine.host_overhead_by_model.m=.*\[base_ms, per_seq_ms\]"):
        EngineConfig(host_overhead_by_model={"m": [1.0]}).check()
    _replay_three(tmp_path, [f"+engine.host_overhead_by_model.{model}=[3.5,0.01]"])
    notes = json.loads((tmp_path / "run" / "summary.json").read_text())["layout"]["ar_host_overhead_ms"]
    assert notes[model] in ({"base": 3.5, "per_seq": 0.01}, {"base": 0.0, "per_seq": 0.0})
    if notes[model]["base"] == 0.0:      # a table not timed synchronously: no host time to hide
        pytest.skip(f"{model}'s table has no synchronous host time")


def test_steplogs_hold_no_stalls_only_early_logged_prefill_steps():
    """The r3 step logs: the long step of a prefill is logged one record before the record that
    counts its prompt; once steps next to a prompt record are left out, decode steps run within
    15 ms of their batch's median in > 99% of cases (the model needs no stall process)."""
    from profiler.vllm_steplog import run_steplog
    runs = sorted(H100_DIR.glob("*__r3.json.gz"))
    runs = [p for p in runs if run_steplog(p, read_json(p))]
    assert len(runs) >= 9
    for p in runs:
        obj = read_json(p)
        if "probe" in p.name:       # zero load: a prefill runs alone and is logged in its own record
            continue
        st = V.steplog_step_stats(run_steplog(p, obj))
        assert st["stall_share"] < 0.01 and abs(st["mean_excess_ms"]) < 0.5, (p.name, st)
        g = st["gaps_around_prefill"]
        assert g is not None and st["isolated_prefills"] >= 40, (p.name, st)
        assert g[1] == max(g) and g[1] > 1.3 * g[0], (p.name, g)   # record j-1 holds the long step
        naive = V.steplog_step_stats(run_steplog(p, obj), before=0, after=0)
        assert naive["stall_share"] > st["stall_share"], (p.name, naive, st)


def test_model_steps_match_the_step_logs():
    """python -m sim.tools.steplog_check on the loaded r3 runs: clean decode steps within 8% of the
    logged medians at every batch bin, and a prefill with the three decode steps after it within
    10% (reached: -7.0..+6.6% and -4.5..+9.3%)."""
    from sim.engines.latency import LatencyModel
    from sim.tools.steplog_check import check_run, host_constants
    lat = LatencyModel(PROFILES, "h100", "clamp")
    hosts = host_constants()
    rows = [check_run(p, lat, hosts) for p in sorted(H100_DIR.glob("*__r3.json.gz"))
            if "probe" not in p.name]
    rows = [r for r in rows if r is not None]
    assert len(rows) == 6
    decode = [d["error"] for r in rows for d in r["decode"]]
    assert len(decode) >= 25 and max(abs(e) for e in decode) < 0.08, decode
    windows = [r["windows"]["error"] for r in rows]
    assert max(abs(e) for e in windows) < 0.10, windows
