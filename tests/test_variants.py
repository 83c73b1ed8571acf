"""Precision variants (model@fp8 / @fp8kv), the memory model that follows them, the analytic
backend's FP8 / H200 rooflines and its `scaled` estimates, and the latency model's fallback table
set (estimated tables are served, and reported as not measured)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from profiler.backends.analytic import GPU_SPECS, roofline_ms, scaled_engine_settings
from profiler.models import UnknownModelError, load_model, param_count, with_precision
from profiler.schema import read_table, write_table
from sim.config import ConfigError, SimConfig
from sim.engines.latency import LatencyModel, MissingProfileError
from sim.engines.memory import GIB, FRAMEWORK_OVERHEAD_BYTES, GPUContents, kv_capacity_tokens


def test_variant_names_and_condition_encoder():
    s = load_model("qwen_image@fp8")
    assert s.name == "qwen_image@fp8" and s.base == "qwen_image" and s.precision == "fp8"
    assert s.condition_encoder == "qwen2_5_vl_7b@fp8"
    assert load_model("qwen_image@bf16") == load_model("qwen_image")
    assert with_precision("qwen_image", "fp8") == "qwen_image@fp8"
    assert with_precision("qwen_image@fp8kv", "fp8") == "qwen_image@fp8kv"    # explicit wins
    assert with_precision("qwen_image", "bf16") == "qwen_image"
    with pytest.raises(UnknownModelError, match="allowed"):
        load_model("qwen_image@fp4")


def test_fp8_weight_bytes_keep_embeddings_in_bf16():
    """fp8: the LLM body at 1 byte, token embeddings + LM head (untied) at 2; vision tower fp8."""
    b, q = load_model("qwen2_5_vl_7b"), load_model("qwen2_5_vl_7b@fp8")
    c = b.components["llm"]
    emb = c["vocab_size"] * c["hidden_size"] * 2                    # untied: embed + lm_head
    n_llm, n_vis = param_count(c), param_count(b.components["vision"])
    assert b.weights_bytes() == 2 * (n_llm + n_vis)
    assert q.component_bytes("llm") == (n_llm - emb) + 2 * emb
    assert q.component_bytes("vision") == n_vis
    # a DiT variant: only the transformer is quantized, the VAE stays bf16
    d, dq = load_model("qwen_image"), load_model("qwen_image@fp8")
    assert dq.component_bytes("transformer") * 2 == d.component_bytes("transformer")
    assert dq.component_bytes("vae") == d.component_bytes("vae")


def test_kv_bytes_follow_kv_dtype():
    b = load_model("qwen2_5_vl_7b")
    c = b.llm
    want = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 2
    assert b.kv_bytes_per_token() == want == load_model("qwen2_5_vl_7b@fp8").kv_bytes_per_token()
    assert load_model("qwen2_5_vl_7b@fp8kv").kv_bytes_per_token() * 2 == want


def test_memory_model_follows_dtype():
    """KV capacity from the memory model: (mem x util - weights - overhead) / KV bytes per token."""
    for m in ("qwen2_5_7b", "qwen2_5_7b@fp8", "qwen2_5_7b@fp8kv"):
        s = load_model(m)
        own = GPUContents(tuple((m, c) for c in s.components))
        got = kv_capacity_tokens(m, own, 80, 0.9)
        want = int((80 * GIB * 0.9 - s.weights_bytes() - FRAMEWORK_OVERHEAD_BYTES) // s.kv_bytes_per_token())
        assert got == want
    base, fp8, kv8 = (kv_capacity_tokens(m, GPUContents(tuple((m, c) for c in load_model(m).components)), 80, 0.9)
                      for m in ("qwen2_5_7b", "qwen2_5_7b@fp8", "qwen2_5_7b@fp8kv"))
    assert base < fp8 < kv8 and kv8 == pytest.approx(2 * fp8, rel=1e-6)


def test_precision_config_rewrites_task_models():
    cfg = SimConfig()
    cfg.precision = "fp8"
    cfg.check()
    assert set(cfg.workload.task_models.values()) == {"qwen2_5_vl_7b@fp8", "qwen_image@fp8"}
    bad = SimConfig()
    bad.precision = "int4"
    with pytest.raises(ConfigError, match="precision"):
        bad.check()


def test_roofline_fp8_and_h200():
    b, q = load_model("qwen2_5_7b"), load_model("qwen2_5_7b@fp8")
    dec = {"stage": "decode", "batch_size": 1, "context_len": 128}
    # decode at batch 1 is weight-read bound: time follows the weight bytes and the bandwidth
    t_b, _, by_b = roofline_ms(b, dec, "h100")
    t_q, _, by_q = roofline_ms(q, dec, "h100")
    assert t_b == pytest.approx(by_b / GPU_SPECS["h100"]["bw"] * 1e3)
    assert t_q / t_b == pytest.approx(by_q / by_b) and 0.45 < t_q / t_b < 0.6
    assert roofline_ms(b, dec, "h200")[0] == pytest.approx(t_b * 3.35 / 4.8)
    # a long prefill is compute bound: the GEMMs run at the FP8 peak, attention does not
    pre = {"stage": "prefill", "num_tokens": 8192, "context_len": 0, "batch_size": 1}
    r = roofline_ms(q, pre, "h100")[0] / roofline_ms(b, pre, "h100")[0]
    assert 0.5 < r < 0.6
    with pytest.raises(ValueError, match="allowed"):
        roofline_ms(b, dec, "a100")


def test_scaled_engine_settings_carry_kv_capacity():
    base, var = load_model("qwen2_5_7b"), load_model("qwen2_5_7b@fp8kv")
    st = {"num_gpu_blocks": 1000, "block_size": 16, "gpu_memory_utilization": 0.9}
    out = scaled_engine_settings(st, base, var, "h100", "h200")
    kv = 1000 * 16 * base.kv_bytes_per_token() + 0.9 * (GPU_SPECS["h200"]["mem"] - GPU_SPECS["h100"]["mem"]) \
        + base.weights_bytes() - var.weights_bytes()
    assert out["num_gpu_blocks"] == int(kv // (var.kv_bytes_per_token() * 16))
    assert out["base_num_gpu_blocks"] == 1000 and out["kv_cache_dtype"] == "fp8"


def test_scaled_sweep_is_measured_times_roofline_ratio(tmp_path):
    """analytic.method=scaled: each row = the measured row x roofline(variant)/roofline(base)."""
    from profiler.__main__ import compose
    from profiler.sweep import run_sweep
    rows = []
    for b, c in ((1, 128), (8, 1024)):
        rows.append(dict(model="qwen2_5_7b", stage="decode", engine="vllm", engine_version="x",
                         torch_version="x", gpu="H100", dtype="bfloat16", tp=1, batch_size=b,
                         num_tokens=b, context_len=c, height=None, width=None,
                         latency_ms_median=10.0 * b, latency_ms_p10=9.0, latency_ms_p90=11.0,
                         n_samples=5, peak_mem_bytes=0, measured_at="t", git_sha="g",
                         engine_settings=json.dumps({"num_gpu_blocks": 100, "block_size": 16})))
    write_table(pd.DataFrame(rows), tmp_path / "h100" / "qwen2_5_7b.parquet")
    cfg = compose(["backend=analytic", "analytic.method=scaled", "analytic.base=h100",
                   "gpu_spec=h200", "models=[qwen2_5_7b@fp8]", f"out_dir={tmp_path}", "progress=false"])
    run_sweep(cfg, log=lambda *_: None)
    est = read_table(tmp_path / "h200-est" / "qwen2_5_7b@fp8.parquet")
    assert len(est) == 2 and set(est["engine"]) == {"analytic"} and set(est["dtype"]) == {"fp8"}
    for r in est.itertuples():
        p = {"stage": "decode", "batch_size": r.batch_size, "context_len": r.context_len}
        ratio = roofline_ms(load_model("qwen2_5_7b@fp8"), p, "h200")[0] / roofline_ms(
            load_model("qwen2_5_7b"), p, "h100")[0]
        assert r.latency_ms_median == pytest.approx(10.0 * r.batch_size * ratio, rel=1e-12)
        s = json.loads(r.engine_settings)
        assert s["method"] == "scaled" and s["roofline_ratio"] == pytest.approx(ratio)


def test_latency_fallback_is_reported(tmp_path, synthetic_profiles):
    root = tmp_path
    df = read_table(synthetic_profiles / "h100" / "qwen2_5_vl_7b.parquet")
    write_table(df, root / "h100" / "qwen2_5_vl_7b.parquet")
    est = df.copy()
    est["engine"] = "analytic"
    est["latency_ms_median"] *= 0.5
    write_table(est, root / "h100-est" / "qwen2_5_vl_7b@fp8.parquet")
    lat = LatencyModel(root, "h100", "error", "h100-est")
    assert lat.prefill("qwen2_5_vl_7b@fp8", 1024) == pytest.approx(0.5 * lat.prefill("qwen2_5_vl_7b", 1024))
    rep = lat.report()
    assert {m: (t["table_set"], t["source"], t["measured"]) for m, t in rep["tables"].items()} == {
        "qwen2_5_vl_7b@fp8": ("h100-est", "estimated", False),
        "qwen2_5_vl_7b": ("h100", "measured", True)}
    assert rep["not_measured"] == ["qwen2_5_vl_7b@fp8"]
    with pytest.raises(MissingProfileError):
        LatencyModel(root, "h100", "error", None).prefill("qwen2_5_vl_7b@fp8", 1024)


def test_one_table_rule_measured_then_estimated_then_roofline(tmp_path, synthetic_profiles):
    """For one (gpu, model): <gpu>/ (measured) wins over <gpu>-est/ (estimated), which wins over
    <gpu>-analytic/ (roofline); each model reports the set it was read from, and a table of
    engine=analytic rows is never reported as measured, whatever folder holds it."""
    src = read_table(synthetic_profiles / "h100" / "qwen2_5_vl_7b.parquet")

    def put(folder, model, scale, engine=None):
        df = src.copy()
        df["latency_ms_median"] *= scale
        if engine:
            df["engine"] = engine
        write_table(df, tmp_path / folder / f"{model}.parquet")

    put("h100", "a", 1.0)
    put("h100-est", "a", 2.0, "analytic")
    put("h100-analytic", "a", 3.0, "analytic")
    put("h100-est", "b", 2.0, "analytic")
    put("h100-analytic", "b", 3.0, "analytic")
    put("h100-analytic", "c", 3.0, "analytic")
    put("h100", "d", 1.0, "analytic")            # computed rows in the measured folder
    lat = LatencyModel(tmp_path, "h100", "error")  # default: the estimated set is <gpu>-est
    t = {m: lat.prefill(m, 1024) for m in "abcd"}
    assert t["b"] == pytest.approx(2 * t["a"]) and t["c"] == pytest.approx(3 * t["a"])
    rep = lat.report()["tables"]
    assert {m: (d["table_set"], d["source"]) for m, d in rep.items()} == {
        "a": ("h100", "measured"), "b": ("h100-est", "estimated"),
        "c": ("h100-analytic", "analytic"), "d": ("h100", "analytic")}
    assert lat.not_measured() == ["b", "c", "d"]
    # without the estimated set, b falls through to the roofline
    assert LatencyModel(tmp_path, "h100", "error", None).source("b") == "analytic"
    # a set named with its suffix starts the chain there
    assert LatencyModel(tmp_path, "h100-est", "error").source("a") == "estimated"
    assert LatencyModel(tmp_path, "h100-est", "error").source("c") == "analytic"
    assert LatencyModel(tmp_path, "h100-analytic", "error").source("a") == "analytic"
    with pytest.raises(MissingProfileError, match=r"h100/ \(measured\), h100-est/ \(estimated\), "
                                                  r"h100-analytic/ \(analytic\)"):
        lat.frame("e")


def test_builtin_fp8_linear_matches_bf16_within_fp8_error():
    """The DiT FP8 path the profiler applies without torchao: every eligible nn.Linear swapped,
    outputs within FP8 (e4m3, per-row / per-token scales) error of the original."""
    torch = pytest.importorskip("torch")
    from profiler.backends.diffusers_backend import quantize_fp8
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32),
                            torch.nn.Linear(32, 7))            # 7 outputs: not eligible (%16)
    x = torch.randn(4, 10, 64) * 3
    ref = m(x)
    how = quantize_fp8(m, "builtin")
    assert "2 linear layers" in how
    assert [type(c).__name__ for c in m] == ["Fp8Linear", "GELU", "Fp8Linear", "Linear"]
    assert m[0].w.dtype == torch.float8_e4m3fn
    err = float((m(x) - ref).norm() / ref.norm())
    assert 1e-4 < err < 0.08
