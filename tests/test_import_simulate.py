"""Imported models simulate at once on roofline tables, say so, and agree with the analytic
layer's own memory and bound figures; the GPU builders accept imported entries (CPU stand-ins);
`python -m profiler analytic-error` reports the roofline's error against measured tables."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiler import models as pm  # noqa: E402
from profiler import schema  # noqa: E402
from profiler.__main__ import compose  # noqa: E402
from profiler.__main__ import main as profiler_main  # noqa: E402
from profiler.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "data" / "hf"
GIB = 1024 ** 3
# three public architectures not in the hand-written registry: an LLM, a VLM, a UNet diffusion
# model (and a DiT one, FLUX.1-schnell), imported under fresh names
CASES = {
    "my_llama": ("llama3_1_8b", []),
    "my_vl": ("qwen2_5_vl_3b", []),
    "my_sdxl": ("sdxl_base", []),
    "my_schnell": ("flux1_schnell", ["--steps", "4", "--max-sequence-length", "256"]),
}


def _clear_caches():
    pm.load_model.cache_clear()
    pm.available_models.cache_clear()
    import sim.engines.pipeline
    sim.engines.pipeline._PER_UNIT.clear()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry folder = conf/model + the imported entries, and a profiles folder whose
    measured set is the shipped h100 one and whose roofline set holds the imported tables."""
    base = tmp_path_factory.mktemp("imported")
    conf = base / "model"
    shutil.copytree(ROOT / "conf" / "model", conf)
    prof = base / "profiles"
    prof.mkdir()
    (prof / "h100").symlink_to(ROOT / "traces" / "profiles" / "h100")
    mp = pytest.MonkeyPatch()
    mp.setattr(pm, "CONF_DIR", conf)
    _clear_caches()
    outputs = {}
    for name, (folder, extra) in CASES.items():
        import io
        from contextlib import redirect_stdout
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = profiler_main(["import-model", str(HF / folder), "--name", name,
                                "--conf-dir", str(conf), "--profiles-dir", str(prof), *extra])
        assert rc == 0, buf.getvalue()
        outputs[name] = buf.getvalue()
    yield {"conf": conf, "prof": prof, "out": outputs}
    mp.undo()
    _clear_caches()


def test_import_cli_writes_entry_and_roofline_tables(registry):
    for name in CASES:
        assert (registry["conf"] / f"{name}.yaml").exists()
        t = schema.read_table(registry["prof"] / "h100-analytic" / f"{name}.parquet")
        assert (t["engine"] == "analytic").all() and (t["status"] == "ok").all()
        assert schema.validate_rows(t) == []
        out = registry["out"][name]
        assert "engine=analytic, not measured" in out and f"profiler sweep model={name}" in out
    assert "KV cache 131,072 B/token" in registry["out"]["my_llama"]


def test_import_cli_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert profiler_main(["import-model", str(tmp_path), "--conf-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model_type=\"bert\" is not supported" in err
    assert not (tmp_path / "bert.yaml").exists()


def _cfg(registry, task_models: dict, mix: dict, n: int, rate: float, gpus: int = 1):
    from sim.config import SimConfig
    cfg = SimConfig()
    cfg.profiles_dir = str(registry["prof"])
    cfg.output.progress = "off"
    cfg.cluster.name, cfg.cluster.num_gpus = f"h100x{gpus}", gpus
    w = cfg.workload
    w.num_requests, w.mix, w.task_models = n, mix, task_models
    w.arrival.rate = rate
    w.image.max = 1024
    return cfg.check()


@pytest.mark.parametrize("name,task", [("my_llama", "text"), ("my_vl", "understand"),
                                       ("my_sdxl", "generate"), ("my_schnell", "generate")])
def test_imported_model_runs_on_analytic_tables_and_says_so(registry, name, task, tmp_path, capsys):
    from sim.cli import execute
    cfg = _cfg(registry, {task: name}, {task: 1.0}, 60, 2.0)
    s = execute(cfg, tmp_path, multirun=False)
    out = capsys.readouterr().out
    assert f"ANALYTIC: {name} simulated on roofline tables" in out
    assert "ANALYTIC: roofline, not measured" in out
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for summ in (s, on_disk):
        assert summ["analytic_tables"] == [name]
        assert summ["profile_tables"][name].startswith("analytic (roofline, not measured): ")
        assert summ["profile_tables"][name].endswith(f"h100-analytic/{name}.parquet")
        assert summ["completed"] == 60


def test_measured_and_analytic_models_in_one_run_are_told_apart(registry, tmp_path):
    from sim.run.runner import Run
    cfg = _cfg(registry, {"text": "qwen2_5_vl_7b", "generate": "my_schnell"},
               {"text": 0.5, "generate": 0.5}, 80, 1.0, gpus=2)
    s = Run(cfg, None).run()
    assert s["analytic_tables"] == ["my_schnell"]
    assert s["profile_tables"]["qwen2_5_vl_7b"].startswith("measured (vllm): ")
    assert s["latency_model"]["tables"]["qwen2_5_vl_7b"]["measured"] is True


def _config(folder):
    return json.loads((HF / folder / "config.json").read_text())


@pytest.mark.parametrize("name", ["my_llama", "my_vl"])
def test_ar_import_against_analytic_memory_and_bound(registry, name):
    """sim.studies.analytic on an imported AR model: weights, KV bytes per token and the KV capacity
    recomputed here from the public config.json alone; the one-GPU saturation run stays at or
    below the batched bound and within a factor 2 of it."""
    from sim.studies import analytic
    from sim.engines.memory import FRAMEWORK_OVERHEAD_BYTES, GPUContents, kv_capacity_tokens
    folder = CASES[name][0]
    rep = analytic.report(name, "h100", registry["prof"], simulate=True, num_requests=150)
    assert rep["measured"] is False and rep["engines"] == ["analytic"]
    assert rep["profiles"].endswith("h100-analytic")
    c = _config(folder)
    hd = c["hidden_size"] // c["num_attention_heads"]
    kvpt = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * hd * 2
    assert rep["kv_bytes_per_token"] == kvpt
    spec = pm.load_model(name)
    public = {"my_llama": 8_030_261_248}.get(name)      # Llama-3.1-8B's published count
    if public:
        assert rep["weights_bytes"] == 2 * public
    assert rep["weights_bytes"] == spec.weights_bytes()
    mem = rep["memory"]
    act = 8192 * (6 * c["hidden_size"] + 2 * c["intermediate_size"]) * 2
    free = 80 * GIB * 0.9 - rep["weights_bytes"] - act - FRAMEWORK_OVERHEAD_BYTES
    assert mem["kv_capacity_tokens_est"] == int(free // kvpt)
    assert mem["kv_capacity_vs_vllm"]["vllm_tokens"] is None       # nothing measured
    sim_kv = kv_capacity_tokens(name, GPUContents(tuple((name, k) for k in spec.components)), 80, 0.9)
    assert sim_kv == int((80 * GIB * 0.9 - rep["weights_bytes"] - FRAMEWORK_OVERHEAD_BYTES) // kvpt)
    sim = rep["simulated"]
    assert sim["request_throughput"] <= rep["bound_qps_batched"] * 1.02
    assert sim["request_throughput"] >= 0.5 * rep["bound_qps_batched"]
    assert rep["bottleneck_stage"] == "decode"


@pytest.mark.parametrize("name", ["my_sdxl", "my_schnell"])
def test_diffusion_import_against_analytic_bound(registry, name):
    """Diffusion: the DiT/UNet step dominates; the saturation run reaches the bound within 2%
    (roofline steps batch almost linearly, so serial and batched bounds nearly coincide), and
    the bound equals 1 / (steps x step + encoders + VAE) from the table itself."""
    from sim.studies import analytic
    from sim.engines.latency import LatencyModel
    rep = analytic.report(name, "h100", registry["prof"], simulate=True, num_requests=60)
    assert rep["measured"] is False and rep["bottleneck_stage"] == "dit_step"
    spec = pm.load_model(name)
    d = spec.request_defaults
    lat = LatencyModel(registry["prof"], "h100-analytic", "clamp")
    step = lat.dit_step(name, 2 if d["cfg"] else 1, spec.latent_tokens(d["height"], d["width"]))
    assert math.isclose(rep["serial_latency_ms_by_stage"]["dit_step"], d["steps"] * step * 1e3,
                        rel_tol=1e-9)
    assert abs(rep["simulated"]["bound_batched_rel_error"]) < 0.02
    assert rep["memory"]["weights_bytes"] == spec.weights_bytes()


def test_moe_roofline_reads_touched_experts_only(registry):
    from profiler.backends.analytic import experts_touched, llm_step_cost
    spec = pm.load_model("qwen3_30b_a3b")
    c = spec.llm
    p = pm.llm_params(c)
    assert abs((p["active_per_token"] + p["embed"] + p["lm_head"]) / 3.3e9 - 1) < 0.05  # "A3B"
    assert experts_touched(128, 8, 1) == pytest.approx(8)
    assert experts_touched(128, 8, 8192) == pytest.approx(128)
    pe = 3 * c["hidden_size"] * c["moe_intermediate_size"]
    fq1, fo1, b1 = llm_step_cost(spec, 1, 16, 16, 1)     # FLOPs at the weights' dtype, at bf16
    f1 = fq1 + fo1
    assert fq1 == pytest.approx(2 * p["active_per_token"])
    kvpt = spec.kv_bytes_per_token()
    act = 2 * 1 * c["hidden_size"] * 2 * c["num_hidden_layers"] * 4
    want = (p["dense"] + 48 * 8 * pe + p["embed"]) * 2 + kvpt * 17 + act
    assert b1 == pytest.approx(want)
    _, _, bb = llm_step_cost(spec, 8192, 8192 * 4096, 0, 1)
    assert bb > (p["dense"] + 0.99 * p["experts"]) * 2     # a long prefill touches every expert
    assert f1 == pytest.approx(2 * p["active_per_token"] + 2 * p["embed"]
                               + 4 * 48 * 32 * 128 * 16)


# ------------------------------------------------------------------------------------------
# the sweep's builders accept imported entries (CPU stand-ins for the GPU engines)
# ------------------------------------------------------------------------------------------

def test_sweep_backend_auto_picks_the_engine_by_family(tmp_path):
    logs = []
    cfg = compose(["models=[llama3_1_8b,sdxl_base]", "dry_run=true", "progress=false",
                   f"out_dir={tmp_path}"])
    assert cfg.backend == "auto"
    out = run_sweep(cfg, log=logs.append)
    assert any("llama3_1_8b: backend=vllm" in m for m in logs)
    assert any("sdxl_base: backend=diffusers" in m for m in logs)
    assert out["sdxl_base"]["planned"] > 0 and not list(tmp_path.rglob("*.parquet"))


def test_diffusers_builder_runs_an_imported_unet_pipeline_on_cpu(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import dataclasses
    spec = pm.load_model("sdxl_base")
    comps = {k: dict(v) for k, v in spec.components.items()}
    comps["transformer"].update(block_out_channels=[32, 64, 128], attention_head_dim=[2, 4, 8],
                                transformer_layers_per_block=[1, 1, 1], cross_attention_dim=32,
                                joint_attention_dim=32, addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 16,
                                norm_num_groups=8, layers_per_block=1)
    for k in ("clip_l", "clip_g"):
        comps[k].update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, vocab_size=100, projection_dim=16)
    comps["vae"].update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    tiny = dataclasses.replace(spec, components=comps,
                               request_defaults={**spec.request_defaults, "text_tokens": 8})
    cfg = compose(["backend=diffusers", "models=[sdxl_base]", "grid=tiny", "device=cpu",
                   "dtype=float32", "warmup=0", "repeats=1", f"out_dir={tmp_path}", "gpu=cpu-test",
                   "progress=false", "grid.vae_resolutions=[[64,64]]", "grid.vae_batch=[1]",
                   "grid.text_batch=[1]"])
    out = run_sweep(cfg, log=lambda s: None, spec_loader=lambda n: tiny)["sdxl_base"]
    df = schema.read_table(out["path"])
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"]["error"].tolist()
    assert {"dit_step", "text_encode", "vae_decode", "vae_encode"} <= set(df["stage"])
    assert out["measured"] == out["planned"] == len(df)
    assert set(df[df["stage"] == "text_encode"]["component"]) == {"clip_l", "clip_g"}


def test_vllm_backend_runs_an_imported_llm_against_the_fake_engine(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import fake_vllm
    fake_vllm.install(monkeypatch)
    fake_vllm.LLM.num_blocks = 400
    cfg = compose(["backend=vllm", "models=[llama3_1_8b]", "grid=tiny", f"out_dir={tmp_path}",
                   "device=cpu", "progress=false", "vllm.max_num_batched_tokens=64",
                   "vllm.decode_steps=2", "vllm.prefill_repeats=1"])
    out = run_sweep(cfg, log=lambda s: None)["llama3_1_8b"]
    df = schema.read_table(out["path"])
    assert (df["status"] == "ok").all(), df["error"].dropna().tolist()
    assert {"prefill", "decode"} <= set(df["stage"])
    es = json.loads(df["engine_settings"].iloc[0])
    assert es["kv_bytes_per_token"] == 131072 and es["max_model_len"] == 131072


# ------------------------------------------------------------------------------------------
# analytic-error
# ------------------------------------------------------------------------------------------

def test_analytic_error_reports_per_stage_median_and_max(tmp_path, capsys):
    from profiler.analytic_error import model_report
    src = ROOT / "traces" / "profiles" / "h100-analytic" / "sdxl_base.parquet"
    (tmp_path / "h100-analytic").mkdir()
    (tmp_path / "h100").mkdir()
    shutil.copy(src, tmp_path / "h100-analytic" / "sdxl_base.parquet")
    m = schema.read_table(src)
    m["engine"] = "diffusers"
    factor = pd.Series(2.0, index=m.index)
    factor[(m["stage"] == "dit_step") & (m["batch_size"] == 1)] = 4.0   # analytic = 1/4 of it
    m["latency_ms_median"] = m["latency_ms_median"] * factor
    m = m.drop(index=m.index[m["stage"] == "vae_encode"][:3])         # points only one side has
    schema.write_table(m, tmp_path / "h100" / "sdxl_base.parquet")
    rep = model_report("sdxl_base", "h100", tmp_path)
    st = {s["stage"]: s for s in rep["stages"]}
    assert st["vae_decode:vae"]["median_rel_error"] == pytest.approx(-0.5)
    assert st["vae_decode:vae"]["max_abs_rel_error"] == pytest.approx(0.5)
    assert st["dit_step"]["max_rel_error_signed"] == pytest.approx(-0.75)
    assert st["vae_encode:vae"]["points"] == (schema.read_table(src)["stage"] == "vae_encode").sum() - 3
    assert set(st) == {"dit_step", "text_encode:clip_l", "text_encode:clip_g", "vae_decode:vae",
                       "vae_encode:vae"}
    assert profiler_main(["analytic-error", "sdxl_base", "--profiles-dir", str(tmp_path),
                          "--json", str(tmp_path / "e.json")]) == 0
    assert "dit_step" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())[0]["points_matched"] == rep["points_matched"]
    assert profiler_main(["analytic-error", "llama3_1_8b", "--profiles-dir", str(tmp_path)]) == 2
    assert "no measured table" in capsys.readouterr().err
