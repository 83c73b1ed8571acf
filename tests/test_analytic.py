"""sim.studies.analytic: closed forms, report contents on synthetic tables, CLI behaviour."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, decode_ms, prefill_ms, vision_ms
from profiler.models import load_model
from sim.studies import analytic as A

REPORT_KEYS = {"weights_bytes", "kv_bytes_per_token", "max_concurrency", "serial_latency_ms_by_stage",
               "bottleneck_stage", "bound_qps_serial", "bound_qps_batched", "usd_per_1k_requests",
               "batching_gain", "memory", "parallelism", "simulated"}


def test_kv_bytes_per_token_llama2():
    assert A.kv_bytes_per_token(load_model("llama2_7b")) == 2 * 32 * 32 * 128 * 2 == 524288
    # GQA: qwen2.5-vl-7b has 4 KV heads of 128
    assert A.kv_bytes_per_token(load_model("qwen2_5_vl_7b")) == 2 * 28 * 4 * 128 * 2


def test_weights():
    llama = load_model("llama2_7b")
    assert A.model_weights_bytes(llama) == pytest.approx(6.74e9 * 2, rel=0.01)
    qi, vl = load_model("qwen_image"), load_model("qwen2_5_vl_7b")
    assert A.model_weights_bytes(qi) == qi.weights_bytes() + vl.weights_bytes()
    assert qi.weights_bytes(("transformer",)) == pytest.approx(20.4e9 * 2, rel=0.05)


def test_max_concurrency_monotone_in_memory():
    vals = [A.max_concurrency(m * 2**30, 20 * 2**30, 100 * 2**20) for m in range(0, 200, 5)]
    assert vals[0] == 0 and all(b >= a for a, b in zip(vals, vals[1:]))
    assert A.max_concurrency(80 * 2**30, 20 * 2**30, 2**30) == 60
    assert A.max_concurrency(10, 0, 0) == 0


def test_bound_qps_serial_is_inverse_sum():
    assert A.bound_qps({"a": 0.5, "b": 1.5}) == pytest.approx(0.5)
    assert A.bound_qps({}) == float("inf")


def test_batch_overhead_fit_recovers_known_overhead():
    b = np.array([1, 2, 4, 8, 16])
    fit = A.fit_batch_overhead(b, 10.0 * (1 + 0.25 * (b - 1)))
    assert fit["overhead"] == pytest.approx(0.25)
    assert fit["max_abs_rel_error"] < 1e-12
    assert fit["gain_measured"][-1] == pytest.approx(16 / (1 + 0.25 * 15))
    assert A.fit_batch_overhead([2, 4], [1, 2])["overhead"] is None      # no batch-1 point


def test_tp_pp_efficiency():
    effs = [A.tp_efficiency(0.01, 28, 2048, 3584, 2, p) for p in (1, 2, 4, 8)]
    assert effs[0] == 1.0 and all(0 < e <= 1 for e in effs)
    assert all(b < a for a, b in zip(effs, effs[1:]))
    assert A.pp_efficiency(4, 8) == pytest.approx(8 / 11)
    assert A.pp_efficiency(1, 8) == 1.0
    assert A.pp_efficiency(4, 8, 0.01, 1e9) < A.pp_efficiency(4, 8)


def test_report_vlm_matches_closed_forms(synthetic_profiles):
    r = A.report("qwen2_5_vl_7b", "h100", synthetic_profiles, simulate=True, num_requests=60)
    assert REPORT_KEYS <= set(r)
    img = r["typical_request"]["image_tokens_in"]
    assert img == load_model("qwen2_5_vl_7b").image_input_tokens(1024, 1024)
    st = r["serial_latency_ms_by_stage"]
    assert st["vision_encode"] == pytest.approx(vision_ms(img))
    assert st["prefill"] == pytest.approx(prefill_ms(600 + img))
    ctx0 = 600 + img + 1
    assert st["decode"] == pytest.approx(sum(decode_ms(1, ctx0 + i) for i in range(249)), rel=1e-6)
    assert r["bottleneck_stage"] == "decode"
    assert r["bound_qps_serial"] == pytest.approx(1000.0 / sum(st.values()))
    assert r["bound_qps_batched"] >= r["bound_qps_serial"]
    sim = r["simulated"]
    assert 0 < sim["utilization_vs_batched_bound"] <= 1.05
    assert r["usd_per_1k_requests"]["serial_bound"] == pytest.approx(
        1000 * 2.99 / 3600 / r["bound_qps_serial"])
    assert r["memory"]["max_concurrency"] > 0


def test_report_dit_bottleneck(synthetic_profiles):
    r = A.report("qwen_image", "h100", synthetic_profiles, simulate=False)
    assert r["bottleneck_stage"] == "dit_step"
    seq = load_model("qwen_image").latent_tokens(1328, 1328)
    # dit(b, s) = 20 ms * b * s / 4096, CFG -> b = 2, 50 steps (bilinear between grid points)
    assert r["serial_latency_ms_by_stage"]["dit_step"] == pytest.approx(50 * 20 * 2 * seq / 4096, rel=1e-6)
    assert r["batching_gain"]["dit_step"]["overhead"] == pytest.approx(1.0)   # linear in b: no gain
    assert r["max_concurrency"] >= 1
    assert "usd_per_1k_images" in r


def test_cli_unknown_model_exit_2():
    p = subprocess.run([sys.executable, "-m", "sim.studies.analytic", "model=nope", "gpu=h100"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "allowed values" in p.stderr and "qwen_image" in p.stderr
    assert "Traceback" not in p.stderr


def test_cli_bad_key_and_json(synthetic_profiles, capsys):
    assert A.main(["model=qwen2_5_vl_7b", "colour=red"]) == 2
    assert "allowed keys" in capsys.readouterr().err
    assert A.main(["model=llama2_7b", f"profiles_dir={synthetic_profiles}"]) == 2   # no table
    assert "no profile tables" in capsys.readouterr().err
    assert A.main(["model=qwen_image", "gpu=h100", f"profiles_dir={synthetic_profiles}",
                   "sim=false", "format=json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bottleneck_stage"] == "dit_step" and "simulated" not in out
    assert A.main(["model=qwen_image", "gpu=h100", f"profiles_dir={synthetic_profiles}"]) == 0
    table = capsys.readouterr().out
    assert "analytic report: qwen_image" in table and "bound QPS, batched" in table
    assert "simulated QPS" in table and len(table.splitlines()) < 50
    assert A.main(["model=qwen_image", "format=yaml"]) == 2
    assert "format='yaml' is invalid" in capsys.readouterr().err
