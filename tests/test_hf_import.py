"""profiler.hf_import / `python -m profiler import-model`: public configs -> registry entries.

Oracles: the six hand-written entries (conf/model) reproduced field by field from their public
configs; parameter counts against the real transformers / diffusers modules built on the meta
device from the *original* config.json; refusals name the file and field in one line.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from profiler import hf_import
from profiler.hf_import import ConfigImportError, entry_fields, import_model
from profiler.models import CONF_DIR, load_model, param_count

HF = Path(__file__).resolve().parent / "data" / "hf"

# (fixture folder, import options) reproducing each hand-written entry
SIX = {
    "llama2_7b": {"hf_id": "meta-llama/Llama-2-7b-hf"},
    "qwen2_5_7b": {"hf_id": "Qwen/Qwen2.5-7B-Instruct"},
    # the public config says 128000; the entry was profiled at vLLM --max-model-len 32768
    "qwen2_5_vl_7b": {"hf_id": "Qwen/Qwen2.5-VL-7B-Instruct", "max_model_len": 32768},
    "flux1_dev": {"hf_id": "black-forest-labs/FLUX.1-dev",
                  "edit_hf_id": "black-forest-labs/FLUX.1-Kontext-dev"},
    "sd3_5_medium": {"hf_id": "stabilityai/stable-diffusion-3.5-medium", "steps": 40},
    "qwen_image": {"hf_id": "Qwen/Qwen-Image", "edit_hf_id": "Qwen/Qwen-Image-Edit",
                   "height": 1328, "width": 1328},
}
# entries committed from an import (conf/model/<name>.yaml): fixture folder, options
IMPORTED = {
    "llama3_1_8b": {"hf_id": "meta-llama/Llama-3.1-8B"},
    "qwen2_5_vl_3b": {"hf_id": "Qwen/Qwen2.5-VL-3B-Instruct"},
    "qwen3_30b_a3b": {"hf_id": "Qwen/Qwen3-30B-A3B"},
    "flux1_schnell": {"hf_id": "black-forest-labs/FLUX.1-schnell", "steps": 4,
                      "max_sequence_length": 256},
    "sdxl_base": {"hf_id": "stabilityai/stable-diffusion-xl-base-1.0"},
}


def diff(a, b, path=""):
    """Field-by-field differences between two nested dicts/lists (path, a, b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}")
        return out
    if isinstance(a, float) or isinstance(b, float):
        return [] if a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                and math.isclose(a, b, rel_tol=1e-12)) else [(path, a, b)]
    return [] if a == b else [(path, a, b)]


def imp(folder: str, **kw):
    return import_model(HF / folder, folder, **kw)


# ------------------------------------------------------------------------------------------
# entries
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", sorted(SIX))
def test_import_reproduces_hand_written_entry(model):
    hand = yaml.safe_load((CONF_DIR / f"{model}.yaml").read_text())
    got = entry_fields(imp(model, **SIX[model]).entry)
    assert diff(hand, got) == []


def test_diff_sees_a_changed_field():
    """The oracle above can fail: one shape changed in the source shows up as one difference."""
    hand = yaml.safe_load((CONF_DIR / "llama2_7b.yaml").read_text())
    got = entry_fields(imp("llama2_7b", **SIX["llama2_7b"]).entry)
    got["components"]["llm"]["intermediate_size"] += 1
    assert diff(hand, got) == [(".components.llm.intermediate_size", 11008, 11009)]


@pytest.mark.parametrize("model", sorted(IMPORTED))
def test_committed_imported_entries_equal_a_fresh_import(model):
    committed = yaml.safe_load((CONF_DIR / f"{model}.yaml").read_text())
    res = imp(model, **IMPORTED[model])
    assert diff(entry_fields(committed), entry_fields(res.entry)) == []
    src = committed["source"]
    assert src["importer"] == hf_import.IMPORTER_VERSION
    for rel, digest in src["files"].items():      # provenance: the files and their digests
        assert hf_import._sha256(HF / model / rel) == digest


def test_condition_encoder_found_by_shapes_and_defaults_recorded():
    res = imp("qwen_image", **SIX["qwen_image"])
    assert res.entry["condition_encoder"] == "qwen2_5_vl_7b"
    assert res.entry["condition_image_pixels"] == 384 * 384
    assert any(d.startswith("request_defaults.steps = 50 (QwenImagePipeline") for d in res.defaults)
    fl = imp("flux1_dev")
    # a field absent from the public config takes the class default, and says so
    assert any("axes_dims_rope = [16, 56, 56] (FluxTransformer2DModel default)" in d
               for d in fl.defaults)
    assert fl.entry["latent"] == {"downsample": 8, "patch_size": 2, "channels": 16}


def test_written_entry_loads_and_is_atomic(tmp_path):
    res = imp("llama3_1_8b")
    out = hf_import.write_entry(res, tmp_path, "test")
    assert [p.name for p in tmp_path.iterdir()] == ["llama3_1_8b.yaml"]
    spec = load_model("llama3_1_8b", str(tmp_path))
    c = json.loads((HF / "llama3_1_8b" / "config.json").read_text())
    assert spec.kv_bytes_per_token() == 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (
        c["hidden_size"] // c["num_attention_heads"]) * 2
    with pytest.raises(ConfigImportError, match="exists; pass --force"):
        hf_import.write_entry(res, tmp_path, "test")
    assert out.read_text().startswith("# llama3_1_8b: imported")


def _models():
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


@pytest.mark.parametrize("model", _models())
def test_every_entry_is_a_hydra_group_option_of_the_simulator(model):
    """`python -m sim model=NAME` selects conf/model/NAME.yaml as a Hydra group: the entry must
    compose (a top-level `defaults:` key is read as Hydra's defaults list and fails), and the
    run's config reduces it to the name."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sim.__main__ import normalize_argv
    from sim.cli import CONF_DIR as SIM_CONF, register_schema, to_config
    register_schema()
    with initialize_config_dir(config_dir=SIM_CONF, version_base=None):
        cfg = compose(config_name="config", overrides=normalize_argv([f"model={model}"]))
    assert OmegaConf.select(cfg, "model.name") == model
    spec = load_model(model)
    assert to_config(cfg).model == model
    assert spec.family not in ("dit", "ar_dit") or spec.request_defaults["steps"] >= 1


def test_stale_defaults_key_is_refused_in_one_line(tmp_path):
    raw = yaml.safe_load((CONF_DIR / "sdxl_base.yaml").read_text())
    raw["defaults"] = raw.pop("request_defaults")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError) as e:
        load_model("old", str(tmp_path))
    m = _one_line(e)
    assert "old.yaml: field 'defaults' is not allowed" in m and "'request_defaults'" in m


# ------------------------------------------------------------------------------------------
# refusals: one line naming the file and field, and what is supported
# ------------------------------------------------------------------------------------------

def _copy(tmp_path, folder):
    dst = tmp_path / folder
    shutil.copytree(HF / folder, dst)
    return dst


def _edit(path: Path, **kv):
    d = json.loads(path.read_text())
    for k, v in kv.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_field_stops_and_can_be_accepted(tmp_path):
    d = _copy(tmp_path, "llama3_1_8b")
    _edit(d / "config.json", new_attention_trick=4)
    with pytest.raises(ConfigImportError) as e:
        import_model(d)
    m = _one_line(e)
    assert "config.json: new_attention_trick" in m and "--ignore-field new_attention_trick" in m
    res = import_model(d, ignore_fields=("new_attention_trick",))
    assert ("config.json", "new_attention_trick") in res.ignored


@pytest.mark.parametrize("folder,file,edit,words", [
    ("llama3_1_8b", "config.json", {"model_type": "phi3"}, ["model_type=\"phi3\"", "llama", "qwen3_moe"]),
    ("llama3_1_8b", "config.json", {"attention_bias": True}, ["attention_bias=true", "supported: false"]),
    ("llama3_1_8b", "config.json", {"hidden_act": "gelu"}, ["hidden_act=\"gelu\"", "\"silu\""]),
    ("llama3_1_8b", "config.json", {"quantization_config": {"quant_method": "fp8"}},
     ["quantization_config", "unquantized"]),
    ("llama3_1_8b", "config.json", {"hidden_size": ...}, ["hidden_size is missing"]),
    ("qwen2_5_vl_3b", "config.json", {"rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}},
     ["mrope_section", "[16, 24, 24]"]),
    ("sdxl_base", "unet/config.json", {"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
     ["unet/config.json: down_block_types", "CrossAttnDownBlock2D"]),
    ("sdxl_base", "model_index.json", {"_class_name": "StableDiffusionPipeline"},
     ["_class_name=\"StableDiffusionPipeline\"", "FluxPipeline"]),
    ("flux1_schnell", "vae/config.json", {"norm_num_groups": 16}, ["vae/config.json: norm_num_groups=16", "32"]),
    ("flux1_schnell", "transformer/config.json", {"in_channels": 32}, ["in_channels=32", "latent channels"]),
])
def test_unsupported_values_stop_with_one_line(tmp_path, folder, file, edit, words):
    d = _copy(tmp_path, folder)
    _edit(d / file, **edit)
    with pytest.raises(ConfigImportError) as e:
        import_model(d)
    m = _one_line(e)
    for w in words:
        assert w in m, m


def test_missing_component_and_processor_files_are_named(tmp_path):
    d = _copy(tmp_path, "sdxl_base")
    (d / "vae" / "config.json").unlink()
    with pytest.raises(ConfigImportError, match=r"vae/config.json: file not found"):
        import_model(d)
    v = _copy(tmp_path, "qwen2_5_vl_3b")
    (v / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigImportError, match=r"preprocessor_config.json: file not found"):
        import_model(v)


def test_sliding_window_needs_a_context_it_cannot_bind():
    with pytest.raises(ConfigImportError) as e:
        imp("gemma2_2b")
    assert "sliding_window=4096 is below the context 8192" in _one_line(e)
    assert "--max-model-len <= 4096" in str(e.value)
    res = imp("gemma2_2b", max_model_len=4096)
    assert res.entry["components"]["llm"]["max_position_embeddings"] == 4096
    assert res.entry["components"]["llm"]["head_dim"] == 256
    with pytest.raises(ConfigImportError, match="exceeds"):
        imp("llama3_1_8b", max_model_len=200000)


# ------------------------------------------------------------------------------------------
# parameter counts against the real modules (meta device: no memory, no weights)
# ------------------------------------------------------------------------------------------

def _meta_params(build) -> int:
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        m = build()
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("folder,kw", [("llama3_1_8b", {}), ("qwen3_30b_a3b", {}),
                                       ("gemma2_2b", {"max_model_len": 4096}),
                                       ("qwen2_5_7b", {}), ("llama2_7b", {})])
def test_llm_param_count_equals_transformers_model(folder, kw):
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((HF / folder / "config.json").read_text())
    hf = transformers.AutoConfig.for_model(**cfg)
    real = _meta_params(lambda: transformers.AutoModelForCausalLM.from_config(hf))
    res = imp(folder, **kw)
    assert param_count(res.entry["components"]["llm"]) == real


@pytest.mark.parametrize("folder,kw", [("llama3_1_8b", {}), ("qwen3_30b_a3b", {}),
                                       ("gemma2_2b", {"max_model_len": 4096})])
def test_vllm_builder_accepts_imported_entries(folder, kw, tmp_path):
    """The engine config the vllm backend writes for an imported entry builds the network the
    entry describes (same parameter count, same shape fields as the public config)."""
    transformers = pytest.importorskip("transformers")
    from profiler.backends.vllm_backend import hf_config
    res = imp(folder, **kw)
    hf_import.write_entry(res, tmp_path, "test")
    spec = load_model(folder, str(tmp_path))
    cfg = hf_config(spec)
    real = _meta_params(lambda: transformers.AutoModelForCausalLM.from_config(cfg))
    assert real == param_count(spec.llm)
    pub = json.loads((HF / folder / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "head_dim", "num_experts",
              "num_experts_per_tok", "moe_intermediate_size"):
        if k in pub:
            assert getattr(cfg, k) == pub[k], k
    assert cfg.architectures == pub["architectures"]


def test_vlm_param_count_close_to_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((HF / "qwen2_5_vl_3b" / "config.json").read_text())
    hf = transformers.AutoConfig.for_model(**cfg)
    real = _meta_params(lambda: transformers.Qwen2_5_VLForConditionalGeneration._from_config(hf))
    comps = imp("qwen2_5_vl_3b").entry["components"]
    est = param_count(comps["llm"]) + param_count(comps["vision"])
    assert abs(est / real - 1) < 0.002, (est, real)


def test_unet_param_count_and_flops_match_diffusers():
    """unet_walk: SDXL's parameter count exactly, and a small UNet's multiply-adds against
    torch's FLOP counter on a real forward pass (CPU): 1.3% apart at writing."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from profiler.models import unet_walk
    ucfg = json.loads((HF / "sdxl_base" / "unet" / "config.json").read_text())
    real = _meta_params(lambda: diffusers.UNet2DConditionModel.from_config(ucfg))
    c = imp("sdxl_base").entry["components"]["transformer"]
    assert param_count(c) == real == 2_567_463_684
    small = dict(ucfg, block_out_channels=[32, 64, 128], attention_head_dim=[2, 4, 8],
                 transformer_layers_per_block=[1, 1, 2], cross_attention_dim=64,
                 addition_time_embed_dim=16, projection_class_embeddings_input_dim=6 * 16 + 32,
                 norm_num_groups=8)
    small = {k: v for k, v in small.items() if not k.startswith("_")}
    torch.manual_seed(0)
    m = diffusers.UNet2DConditionModel(**small).eval()
    sc = dict(small, kind="unet2d_condition")
    assert param_count(sc) == sum(p.numel() for p in m.parameters())
    from torch.utils.flop_counter import FlopCounterMode
    B, h, T = 1, 32, 77
    kw = dict(sample=torch.randn(B, 4, h, h), timestep=torch.tensor([10.0]),
              encoder_hidden_states=torch.randn(B, T, 64),
              added_cond_kwargs={"text_embeds": torch.randn(B, 32), "time_ids": torch.randn(B, 6)})
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        m(**kw)
    # convolutions and linear layers (torch's counter does not count CPU flash attention, so
    # the walk's attention products are left out on both sides)
    counted = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "bmm" not in str(k))
    _, macs, _ = unet_walk(sc, h, h, T, attention=False)
    assert abs(2 * macs / counted - 1) < 0.03, (2 * macs, counted)
    assert unet_walk(sc, h, h, T)[1] > macs
