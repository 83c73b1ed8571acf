"""Profiler backends on the CPU: diffusers on tiny random configs (the GPU code path with
device=cpu), the vllm backend's step logic against a fake engine, and the analytic roofline."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from profiler_tiny import tiny_spec  # noqa: E402

from profiler import schema  # noqa: E402
from profiler.__main__ import compose  # noqa: E402
from profiler.check import check_frame  # noqa: E402
from profiler.models import load_model  # noqa: E402
from profiler.sweep import run_sweep  # noqa: E402

pytest.importorskip("torch")


def cpu_cfg(tmp_path, *extra):
    return compose(["backend=diffusers", "grid=tiny", "device=cpu", "dtype=float32",
                    "warmup=0", "repeats=1", f"out_dir={tmp_path}", "gpu=cpu-test",
                    "progress=false", "grid.vae_resolutions=[[32,32]]", "grid.vae_batch=[1]",
                    "grid.text_batch=[1]", "grid.text_t5_tokens=[8]", *extra])


@pytest.mark.parametrize("model", ["flux1_dev", "qwen_image", "sd3_5_medium"])
def test_diffusers_tiny_on_cpu(tmp_path, model):
    pytest.importorskip("diffusers")
    cfg = cpu_cfg(tmp_path, f"models=[{model}]")
    out = run_sweep(cfg, log=lambda s: None, spec_loader=tiny_spec)[model]
    df = schema.read_table(out["path"])
    assert out["measured"] == len(df) == out["planned"] > 0
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"]["error"].tolist()
    stages = set(df["stage"])
    assert {"dit_step", "vae_encode", "vae_decode"} <= stages
    if model != "qwen_image":
        assert "text_encode" in stages
    assert (df["latency_ms_median"] > 0).all()
    assert df["engine"].eq("diffusers").all() and df["gpu"].eq("cpu").all()
    assert df["git_sha"].notna().all() and df["command"].notna().all()
    if model in ("flux1_dev", "qwen_image"):  # edit-shaped sequences: condition latents doubled
        dit = df[df["stage"] == "dit_step"]
        spec = tiny_spec(model)
        lat = dit.apply(lambda r: spec.latent_tokens(r["height"], r["width"]), axis=1)
        assert (dit["seq_len"] == 2 * lat).any() and (dit["seq_len"] == lat).any()
    assert schema.validate_rows(df) == []


def test_vllm_backend_against_fake_engine(tmp_path, monkeypatch):
    import fake_vllm
    fake_vllm.install(monkeypatch)
    fake_vllm.LLM.num_blocks = 40  # 640 tokens of KV: the big decode points must become oom
    cfg = compose(["backend=vllm", "models=[qwen2_5_7b]", "grid=tiny", f"out_dir={tmp_path}",
                   "device=cpu", "progress=false", "vllm.max_num_batched_tokens=64",
                   "vllm.decode_steps=3", "vllm.prefill_repeats=2",
                   "grid.decode_batch=[1,2,4,16]", "grid.decode_context=[32,64]"])
    out = run_sweep(cfg, log=lambda s: None)["qwen2_5_7b"]
    df = schema.read_table(out["path"])
    eng = fake_vllm.LLM.last.llm_engine
    assert set(df["stage"]) == {"prefill", "decode"}
    ok = df[df["status"] == "ok"]
    bad = df[df["status"] == "error"]
    assert bad.empty, bad["error"].tolist()
    # B=16 at C=64 needs 16 * 5 blocks > 0.95 * 40: recorded as oom with the bytes it needs
    oom = df[df["status"] == "oom"]
    assert len(oom) >= 1 and (oom["stage"] == "decode").all()
    assert (oom["mem_requested_bytes"] > 0).all()
    r = oom.iloc[0]
    assert r["mem_requested_bytes"] == r["batch_size"] * r["context_len"] * \
        load_model("qwen2_5_7b").kv_bytes_per_token()
    # every row carries the engine settings with the KV capacity
    import json
    es = [json.loads(x) for x in df["engine_settings"]]
    assert all(e["num_gpu_blocks"] == 40 and e["kv_capacity_tokens"] == 640 for e in es)
    assert all(e["enable_prefix_caching"] is False for e in es)
    # the fake scheduler saw pure decode steps of B sequences and mixed steps of B + N
    assert (2, 0) in eng.steps and (2, 16) in eng.steps
    mixed = ok[(ok["stage"] == "prefill") & (ok["num_decode_seqs"] > 0)]
    assert len(mixed) == 1 and mixed.iloc[0]["num_tokens"] == 16
    later = ok[(ok["stage"] == "prefill") & (ok["context_len"] > 0)]
    assert set(later["context_len"]) == {128}
    dec = ok[ok["stage"] == "decode"]
    assert set(dec["batch_size"]) >= {1, 2, 4}
    assert all(json.loads(x)["measured_mean_context"] >= 32 for x in dec["extra"])


def test_analytic_backend_and_first_principles(tmp_path):
    cfg = compose(["backend=analytic", "models=[qwen2_5_7b,flux1_dev]", f"out_dir={tmp_path}",
                   "device=cpu", "progress=false"])
    out = run_sweep(cfg, log=lambda s: None)
    df = schema.read_table(out["qwen2_5_7b"]["path"])
    assert Path(out["qwen2_5_7b"]["path"]).parent.name == "h100-analytic"
    assert check_frame(df) == []
    spec = load_model("qwen2_5_7b")
    d1 = df[(df["stage"] == "decode") & (df["batch_size"] == 1) & (df["context_len"] == 128)]
    # decode at batch 1 is weight-bandwidth bound: >= bytes of the weights a step reads (all
    # but the input embedding table, which is only gathered) / 3.35 TB/s
    c = spec.llm
    read = spec.weights_bytes() - c["vocab_size"] * c["hidden_size"] * spec.dtype_bytes
    floor_ms = read / 3.35e12 * 1e3
    assert d1["latency_ms_median"].iloc[0] >= floor_ms * 0.99
    assert math.isclose(d1["latency_ms_median"].iloc[0], floor_ms, rel_tol=0.1)
    fl = schema.read_table(out["flux1_dev"]["path"])
    assert check_frame(fl) == []


def test_time_callable_chain_times_back_to_back_calls():
    """chain=k: k calls per sample, per-call time reported (CPU clock here)."""
    import time as _t
    from profiler.backends.base import time_callable
    calls = []

    def fn():
        calls.append(1)
        _t.sleep(0.002)
    out = time_callable(fn, "cpu", warmup=1, repeats=3, chain=4)
    assert len(calls) == 1 + 3 * 4 and len(out) == 3
    assert all(1.5 <= x < 20 for x in out), out      # ~2 ms per call, not ~8 per sample
