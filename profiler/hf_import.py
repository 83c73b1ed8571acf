"""Registry entries from public configs: a Hugging Face `config.json` (LLM / VLM) or a diffusers
`model_index.json` with its component configs becomes `conf/model/<name>.yaml`.

Contract (nothing is guessed silently):
* every key of every config read is classified, per architecture, as
  - **used**: copied into the entry (the shapes the profiler builds and the simulator sizes from),
  - **checked**: must hold a value the builders and the cost model represent, else the import
    stops with one line naming the file, the field, its value and what is supported,
  - **ignored**: no effect on latency or memory (token ids, init ranges, dropout, rope
    frequencies, norm epsilons, activation choice...), listed in the report;
  a key in none of the three stops the import (`--ignore-field KEY` accepts it, and is recorded);
* a field the config leaves out takes the default of the class that reads it (transformers /
  diffusers `__init__`), and each such default is listed in the report and in the entry's
  `source.defaults`; pipeline-call settings (steps, CFG, resolution, text length) come from the
  diffusers pipeline's `__call__` defaults, listed the same way, each overridable.

Pure Python + PyYAML: importing needs neither torch nor a model hub.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from profiler.models import CONF_DIR, TASKS, load_model

IMPORTER_VERSION = "hf-import-2"


class ConfigImportError(ValueError):
    """One line: which file and field stopped the import, and what is supported."""


@dataclass
class ImportResult:
    entry: dict[str, Any]
    used: list[str] = field(default_factory=list)      # "file: key -> entry path"
    defaults: list[str] = field(default_factory=list)  # "file: key = value (source)"
    ignored: list[tuple[str, str]] = field(default_factory=list)   # (file, key)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    root: Path = Path(".")                              # folder the file names are relative to

    @property
    def name(self) -> str:
        return self.entry["name"]


# keys every transformers PretrainedConfig / diffusers config may carry that say nothing about
# the architecture's cost (ids, bookkeeping, training-only switches)
COMMON_IGNORED = {
    "_name_or_path", "transformers_version", "_diffusers_version", "_class_name", "torch_dtype",
    "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "use_cache", "initializer_range", "initializer_factor",
    "attention_dropout", "dropout", "hidden_dropout", "dropout_rate", "classifier_dropout",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "is_decoder", "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder",
    "chunk_size_feed_forward", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "finetuning_task", "cross_attention_hidden_size", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "_use_default_values", "architectures",
    "model_type", "num_labels",
}


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigImportError(f"{path}: file not found") from None
    except ValueError as e:
        raise ConfigImportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigImportError(f"{path}: top level is {type(d).__name__}; allowed: a JSON object")
    return d


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def slug(text: str) -> str:
    """Registry name from a model id or folder name: lowercase, [a-z0-9_] only."""
    s = text.rsplit("/", 1)[-1].lower()
    s = re.sub(r"[^a-z0-9]+", "_", s).strip("_")
    return s


class _Reader:
    """Reads one config dict, records what was used / defaulted / checked / ignored, and
    refuses keys it was not told about."""

    def __init__(self, path: Path, d: dict[str, Any], res: ImportResult, ignore_fields: set[str],
                 label: str | None = None) -> None:
        self.path, self.d, self.res, self.ignore_fields = path, d, res, ignore_fields
        rel = os.path.relpath(path, res.root) if res.root != Path(".") else str(path)
        self.label = (label.replace(str(path), rel) if label else rel)
        self.seen: set[str] = set()
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.label}: {key}"

    def fail(self, key: str, msg: str) -> None:
        raise ConfigImportError(f"{self.where(key)}={json.dumps(self.d.get(key))} {msg}")

    def has(self, key: str) -> bool:
        return key in self.d and self.d[key] is not None

    def get(self, key: str, default: Any = ..., source: str = "", to: str = "") -> Any:
        """A used field; absent (or null) -> `default` (recorded), no default -> stop."""
        self.seen.add(key)
        if self.has(key) or (key in self.d and default is None):
            self.used.add(key)
            self.res.used.append(f"{self.where(key)} -> {to or key}")
            return self.d[key]
        if default is ...:
            raise ConfigImportError(f"{self.where(key)} is missing; it is required (no class "
                                    "default applies)")
        self.res.defaults.append(f"{self.where(key)} = {json.dumps(default)} ({source or 'class default'})")
        return default

    def check(self, key: str, allowed: tuple, default: Any = None, why: str = "") -> Any:
        """A field that must hold one of `allowed` (absent -> default, which must be allowed)."""
        self.seen.add(key)
        v = self.d.get(key, default)
        if v not in allowed:
            raise ConfigImportError(f"{self.where(key)}={json.dumps(v)} is not supported; "
                                    f"supported: {', '.join(json.dumps(a) for a in allowed)}"
                                    + (f" ({why})" if why else ""))
        return v

    def ignore(self, *keys: str) -> None:
        self.seen.update(keys)

    def finish(self) -> None:
        """Stops on a key nobody classified; the unused rest goes to the report as ignored."""
        for k in self.d:
            if k in self.seen or k in COMMON_IGNORED or k in self.ignore_fields:
                continue
            raise ConfigImportError(
                f"{self.where(k)} is not a field this importer knows for this architecture "
                f"(value {json.dumps(self.d[k])[:60]}); if it does not change the network's cost, "
                f"pass --ignore-field {k}")
        self.res.ignored.extend((self.label, k) for k in sorted(self.d) if k not in self.used)


# ------------------------------------------------------------------------------------------
# LLM / VLM: config.json
# ------------------------------------------------------------------------------------------

# model_type -> (architectures entry, registry kind). Qwen2.5-VL's text model is a qwen2 decoder.
LLM_TYPES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3_text"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
VLM_TYPES: dict[str, tuple[str, str]] = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2"),
}
# transformers config-class defaults of the fields a public config may leave out
LLM_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "gemma": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "gemma2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "gemma3_text": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "mixtral": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen2_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen3_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
}
SILU_KINDS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
GELU_KINDS = ("gemma", "gemma2", "gemma3_text")
SLIDING_KINDS = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe",
                 "qwen3_moe")
# fields of one kind, beyond the common block, copied into the entry (in this order)
LLM_EXTRA: dict[str, tuple[str, ...]] = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "decoder_sparse_step", "mlp_only_layers"),
}
MOE_DEFAULTS = {"decoder_sparse_step": 1, "mlp_only_layers": [], "shared_expert_intermediate_size": 0}
# ignored per kind (no effect on latency or memory: the cost model and vLLM's kernels are the
# same whatever their values)
LLM_IGNORED = {
    "hidden_act", "hidden_activation", "rope_scaling", "rope_parameters", "max_window_layers",
    "pretraining_tp", "norm_topk_prob", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "rope_local_base_freq", "sliding_window_pattern", "layer_types",
    "use_sliding_window", "sliding_window", "head_dim", "use_bidirectional_attention",
    "cache_implementation",
}


def _rope_theta(r: _Reader, kind: str) -> float:
    if r.has("rope_theta"):
        return float(r.get("rope_theta", to="components.llm.rope_theta"))
    rp = r.d.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        r.used.add("rope_parameters")
        r.res.used.append(f"{r.where('rope_parameters')}.rope_theta -> components.llm.rope_theta")
        return float(rp["rope_theta"])
    return float(r.get("rope_theta", LLM_DEFAULTS[kind]["rope_theta"],
                       f"{kind} config-class default", "components.llm.rope_theta"))


def _llm_component(r: _Reader, kind: str, max_model_len: int | None) -> dict[str, Any]:
    """components.llm from a decoder config (top level or a VLM's text part)."""
    g = r.get
    if r.has("quantization_config"):
        r.fail("quantization_config", "is not supported; supported: unquantized bf16/fp16/fp32 "
               "checkpoints (the profiler builds bf16 weights)")
    c: dict[str, Any] = {"kind": kind}
    h = int(g("hidden_size", to="components.llm.hidden_size"))
    c["hidden_size"] = h
    c["num_hidden_layers"] = int(g("num_hidden_layers", to="components.llm.num_hidden_layers"))
    nq = int(g("num_attention_heads", to="components.llm.num_attention_heads"))
    c["num_attention_heads"] = nq
    c["num_key_value_heads"] = int(g("num_key_value_heads", nq, f"{kind} config-class default: "
                                     "num_attention_heads", "components.llm.num_key_value_heads"))
    c["intermediate_size"] = int(g("intermediate_size", to="components.llm.intermediate_size"))
    c["vocab_size"] = int(g("vocab_size", to="components.llm.vocab_size"))
    cfg_len = int(g("max_position_embeddings", to="components.llm.max_position_embeddings"))
    L = cfg_len
    if max_model_len is not None:
        if max_model_len > cfg_len:
            raise ConfigImportError(f"--max-model-len {max_model_len} exceeds {r.where('max_position_embeddings')}"
                                    f"={cfg_len}; allowed: <= {cfg_len}")
        L = max_model_len
        r.res.notes.append(f"max_position_embeddings {cfg_len} -> {L} (--max-model-len: the "
                           "serving context limit the profiler's engine and the simulator use)")
    c["max_position_embeddings"] = L
    c["rope_theta"] = _rope_theta(r, kind)
    c["rms_norm_eps"] = float(g("rms_norm_eps", LLM_DEFAULTS[kind]["rms_norm_eps"],
                                f"{kind} config-class default", "components.llm.rms_norm_eps"))
    c["tie_word_embeddings"] = bool(g("tie_word_embeddings", LLM_DEFAULTS[kind]["tie_word_embeddings"],
                                      f"{kind} config-class default",
                                      "components.llm.tie_word_embeddings"))
    # head_dim: explicit where the config states it (Gemma, Qwen3, Mistral-Nemo), else h / heads
    if r.has("head_dim"):
        hd = int(r.get("head_dim", to="components.llm.head_dim"))
        c["head_dim"] = hd
    elif kind in ("gemma", "gemma2", "gemma3_text", "qwen3", "qwen3_moe"):
        hd = {"gemma": 256, "gemma2": 256, "gemma3_text": 256}.get(kind, 128)
        c["head_dim"] = int(r.get("head_dim", hd, f"{kind} config-class default", "components.llm.head_dim"))
    for k in LLM_EXTRA.get(kind, ()):
        v = g(k, MOE_DEFAULTS[k], f"{kind} config-class default", f"components.llm.{k}") \
            if k in MOE_DEFAULTS else g(k, to=f"components.llm.{k}")
        c[k] = list(v) if isinstance(v, (list, tuple)) else int(v)
    # checked fields
    if kind in SILU_KINDS:
        r.check("hidden_act", ("silu",), "silu", "the engine's fused MLP")
    else:
        act = r.d.get("hidden_activation", r.d.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu"):
            r.fail("hidden_activation" if "hidden_activation" in r.d else "hidden_act",
                   "is not supported; supported: \"gelu_pytorch_tanh\", \"gelu\"")
    if kind in ("qwen2", "qwen2_moe"):
        r.ignore("attention_bias")          # q/k/v biases always on: in the parameter count
    else:
        r.check("attention_bias", (False,), False, f"{kind}'s cost model has no q/k/v/o biases")
    r.check("mlp_bias", (False,), False)
    if kind in SLIDING_KINDS:
        _check_sliding(r, kind, L)
    if kind in ("qwen2_moe", "qwen3_moe") and c.get("decoder_sparse_step", 1) < 1:
        r.fail("decoder_sparse_step", "is not supported; supported: >= 1")
    r.ignore(*LLM_IGNORED)
    return c


def _check_sliding(r: _Reader, kind: str, L: int) -> None:
    """A sliding window that can bind at the serving context is not representable: the
    simulator's KV model holds every token of every layer (2 * layers * kv_heads * head_dim)."""
    use = r.d.get("use_sliding_window", kind not in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"))
    w = r.d.get("sliding_window")
    if not use or w is None:
        return
    if int(w) >= L:
        r.res.notes.append(f"sliding_window={w} >= context {L}: no effect (full attention)")
        return
    raise ConfigImportError(
        f"{r.where('sliding_window')}={w} is below the context {L}: a sliding window is not "
        f"representable (the simulator keeps every layer's KV for every token); supported: "
        f"no window, or --max-model-len <= {w}")


def _image_tokenizer(folder: Path, vision: dict[str, Any], res: ImportResult,
                     ignore_fields: set[str]) -> dict[str, Any]:
    p = folder / "preprocessor_config.json"
    if not p.exists():
        raise ConfigImportError(f"{p}: file not found; a VLM's image tokenizer (min_pixels, "
                                "max_pixels, patch_size, merge_size) is read from it")
    d = _read_json(p)
    res.files.append(p)
    r = _Reader(p, d, res, ignore_fields)
    r.check("image_processor_type", ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast"),
            "Qwen2VLImageProcessor", "the smart_resize rule the simulator implements")
    ps = int(r.get("patch_size", to="image_tokenizer.patch_size"))
    ms = int(r.get("merge_size", to="image_tokenizer.merge_size"))
    if r.has("min_pixels"):
        lo, hi = int(r.get("min_pixels", to="image_tokenizer.min_pixels")), \
            int(r.get("max_pixels", to="image_tokenizer.max_pixels"))
        r.ignore("size")
    else:
        size = r.get("size", to="image_tokenizer.min_pixels/max_pixels")
        if not isinstance(size, dict) or "shortest_edge" not in size or "longest_edge" not in size:
            r.fail("size", "is not supported; supported: {shortest_edge, longest_edge} in pixels, "
                   "or min_pixels / max_pixels")
        lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
    if ps != vision["patch_size"] or ms != vision["spatial_merge_size"]:
        r.fail("patch_size", f"(merge_size {ms}) differs from the vision tower's patch_size "
               f"{vision['patch_size']} / spatial_merge_size {vision['spatial_merge_size']}")
    r.ignore("temporal_patch_size", "image_mean", "image_std", "processor_class", "do_resize",
             "do_rescale", "do_normalize", "do_convert_rgb", "rescale_factor", "resample",
             "min_pixels", "max_pixels")
    r.finish()
    return {"kind": "qwen2_vl", "patch_size": ps, "merge_size": ms, "min_pixels": lo,
            "max_pixels": hi}


def _vision_component(r: _Reader) -> dict[str, Any]:
    g = r.get
    v: dict[str, Any] = {"kind": "qwen2_5_vl_vision"}
    for k in ("depth", "hidden_size", "intermediate_size", "num_heads"):
        v[k] = int(g(k, to=f"components.vision.{k}"))
    if r.has("in_chans"):
        v["in_chans"] = int(g("in_chans", to="components.vision.in_chans"))
        r.ignore("in_channels")
    else:
        v["in_chans"] = int(g("in_channels", 3, "Qwen2_5_VLVisionConfig default",
                              "components.vision.in_chans"))
    for k in ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size",
              "out_hidden_size"):
        v[k] = int(g(k, to=f"components.vision.{k}"))
    v["fullatt_block_indexes"] = [int(x) for x in g("fullatt_block_indexes",
                                                    to="components.vision.fullatt_block_indexes")]
    r.check("hidden_act", ("silu",), "silu")
    sp = r.d.get("spatial_patch_size", v["patch_size"])
    if sp != v["patch_size"]:
        r.fail("spatial_patch_size", f"differs from patch_size {v['patch_size']}")
    r.ignore("spatial_patch_size", "tokens_per_second", "model_type", "initializer_range")
    r.finish()
    return v


def import_hf_config(path: Path, res: ImportResult, max_model_len: int | None,
                     ignore_fields: set[str], image_tokenizer: bool = True) -> dict[str, Any]:
    """(family, components, image_tokenizer?) of a transformers config.json. A VLM's image
    tokenizer comes from preprocessor_config.json beside it (`image_tokenizer=False`: shapes
    only, e.g. to match a diffusion pipeline's text encoder with a registry entry)."""
    d = _read_json(path)
    if path not in res.files:
        res.files.append(path)
    r = _Reader(path, d, res, ignore_fields)
    mt = d.get("model_type")
    archs = d.get("architectures") or []
    if mt in LLM_TYPES:
        arch, kind = LLM_TYPES[mt]
        if archs and archs != [arch]:
            r.fail("architectures", f"is not supported for model_type={mt}; supported: [\"{arch}\"]")
        llm = _llm_component(r, kind, max_model_len)
        r.finish()
        return {"family": "llm", "components": {"llm": llm}, "tasks": ["text"], "arch": arch}
    if mt in VLM_TYPES:
        arch, kind = VLM_TYPES[mt]
        if archs and archs != [arch]:
            r.fail("architectures", f"is not supported for model_type={mt}; supported: [\"{arch}\"]")
        text = d.get("text_config")
        if isinstance(text, dict):       # transformers >= 4.5x nests the decoder's fields
            tr = _Reader(path, {k: v for k, v in text.items()}, res, ignore_fields,
                         label=f"{path}: text_config")
            r.ignore(*[k for k in d if k not in ("vision_config", "rope_scaling")])
        else:
            tr = r
        rs = tr.d.get("rope_scaling") or d.get("rope_scaling") or tr.d.get("rope_parameters") or {}
        sec = rs.get("mrope_section") if isinstance(rs, dict) else None
        if sec is not None and list(sec) != [16, 24, 24]:
            tr.fail("rope_scaling", "has mrope_section "
                    f"{list(sec)}; supported: [16, 24, 24] (the vllm builder's M-RoPE sections)")
        llm = _llm_component(tr, kind, max_model_len)
        tr.ignore("vision_start_token_id", "vision_end_token_id", "vision_token_id",
                  "image_token_id", "video_token_id", "vision_config", "text_config")
        if tr is not r:
            tr.finish()
        vc = d.get("vision_config")
        if not isinstance(vc, dict):
            r.fail("vision_config", "is missing; a qwen2_5_vl config carries its vision tower")
        vr = _Reader(path, vc, res, ignore_fields, label=f"{path}: vision_config")
        vision = _vision_component(vr)
        r.ignore("vision_config", "text_config", "vision_start_token_id", "vision_end_token_id",
                 "vision_token_id", "image_token_id", "video_token_id")
        r.finish()
        out = {"family": "vlm", "components": {"llm": llm, "vision": vision},
               "tasks": ["text", "understand"], "arch": arch}
        if image_tokenizer:
            out["image_tokenizer"] = _image_tokenizer(path.parent, vision, res, ignore_fields)
        return out
    supported = sorted(LLM_TYPES) + sorted(VLM_TYPES)
    if mt is None and "_class_name" in d:
        raise ConfigImportError(f"{path}: a diffusers component config ({d['_class_name']}); "
                                "import the pipeline's model_index.json (or its folder) instead")
    raise ConfigImportError(f"{path}: model_type={json.dumps(mt)} is not supported; supported: "
                            f"{', '.join(supported)}")


# ------------------------------------------------------------------------------------------
# diffusers: model_index.json + component configs
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineRule:
    """What a diffusers pipeline class tells the registry (its `__call__` defaults)."""
    denoiser: str               # model_index key of the denoiser: transformer | unet
    steps: int                  # num_inference_steps default
    cfg: bool                   # two denoiser passes per step by default
    cfg_why: str
    max_sequence_length: int | None   # T5 / text length default (None: no such argument)
    default_sample_size: int    # x vae_scale_factor = default height / width
    text_tokens: str            # how the DiT's text sequence length follows (doc)


PIPELINES: dict[str, PipelineRule] = {
    "FluxPipeline": PipelineRule("transformer", 28, False,
                                 "guidance-distilled: one transformer pass per step", 512, 128,
                                 "max_sequence_length (T5 tokens; CLIP is pooled)"),
    "StableDiffusion3Pipeline": PipelineRule("transformer", 28, True,
                                             "guidance_scale 7.0 > 1: CFG", 256, 128,
                                             "77 CLIP + max_sequence_length T5 tokens"),
    "StableDiffusionXLPipeline": PipelineRule("unet", 50, True, "guidance_scale 5.0 > 1: CFG",
                                              None, 128, "77 CLIP tokens"),
    "QwenImagePipeline": PipelineRule("transformer", 50, True,
                                      "true_cfg_scale 4.0: CFG when a negative prompt is given",
                                      None, 128, "the prompt's own tokens (typical: 64)"),
}
DENOISERS = {"FluxTransformer2DModel": "flux_dit", "SD3Transformer2DModel": "sd3_dit",
             "QwenImageTransformer2DModel": "qwen_image_mmdit",
             "UNet2DConditionModel": "unet2d_condition"}
VAES = {"AutoencoderKL": "autoencoder_kl", "AutoencoderKLQwenImage": "qwen_image_vae"}
TEXT_ENCODERS = {"CLIPTextModel": "clip_text", "CLIPTextModelWithProjection": "clip_text",
                 "T5EncoderModel": "t5_encoder"}
T5_NAMES = {512: "t5_small", 768: "t5_base", 1024: "t5_large", 2048: "t5_xl", 4096: "t5_xxl"}
CLIP_NAMES = {512: "clip_b", 768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
QWEN_IMAGE_EDIT_CONDITION_PIXELS = 384 * 384   # QwenImageEditPipeline resizes the VL copy to this area
QWEN_IMAGE_TYPICAL_PROMPT = 64

# per denoiser kind: fields copied (in order), their class defaults when absent, checked
# fields (allowed values) and ignored fields
DIT_FIELDS: dict[str, tuple[tuple[str, ...], dict[str, Any], dict[str, tuple], set[str]]] = {
    "flux_dit": (("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                  "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                  "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"),
                 {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19,
                  "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                  "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                  "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]},
                 {}, set()),
    "sd3_dit": (("sample_size", "patch_size", "in_channels", "out_channels", "num_layers",
                 "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                 "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size",
                 "dual_attention_layers", "qk_norm"),
                {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
                 "num_layers": 18, "attention_head_dim": 64, "num_attention_heads": 18,
                 "joint_attention_dim": 4096, "caption_projection_dim": 1152,
                 "pooled_projection_dim": 2048, "pos_embed_max_size": 96,
                 "dual_attention_layers": [], "qk_norm": None},
                {"qk_norm": (None, "rms_norm")}, set()),
    "qwen_image_mmdit": (("patch_size", "in_channels", "out_channels", "num_layers",
                          "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                          "axes_dims_rope"),
                         {"patch_size": 2, "in_channels": 64, "out_channels": 16,
                          "num_layers": 60, "attention_head_dim": 128,
                          "num_attention_heads": 24, "joint_attention_dim": 3584,
                          "axes_dims_rope": [16, 56, 56]},
                         {"guidance_embeds": (False,)},
                         {"pooled_projection_dim"}),   # in the public config, not a class argument
    "unet2d_condition": (("sample_size", "in_channels", "out_channels", "block_out_channels",
                          "layers_per_block", "down_block_types", "mid_block_type",
                          "up_block_types", "transformer_layers_per_block",
                          "attention_head_dim", "num_attention_heads", "cross_attention_dim",
                          "use_linear_projection", "addition_embed_type",
                          "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                          "norm_num_groups"),
                         {"sample_size": None, "in_channels": 4, "out_channels": 4,
                          "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                          "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                          "mid_block_type": "UNetMidBlock2DCrossAttn",
                          "transformer_layers_per_block": 1, "attention_head_dim": 8,
                          "num_attention_heads": None, "cross_attention_dim": 1280,
                          "use_linear_projection": False, "addition_embed_type": None,
                          "addition_time_embed_dim": None,
                          "projection_class_embeddings_input_dim": None, "norm_num_groups": 32},
                         {"only_cross_attention": (False,), "dual_cross_attention": (False,),
                          "class_embed_type": (None,), "encoder_hid_dim": (None,),
                          "encoder_hid_dim_type": (None,), "time_cond_proj_dim": (None,),
                          "num_class_embeds": (None,), "conv_in_kernel": (3,),
                          "conv_out_kernel": (3,), "time_embedding_type": ("positional",),
                          "resnet_time_scale_shift": ("default",),
                          "reverse_transformer_layers_per_block": (None,),
                          "class_embeddings_concat": (False,), "attention_type": ("default",),
                          "mid_block_only_cross_attention": (None, False),
                          "addition_embed_type_num_heads": (64,), "time_embedding_dim": (None,)},
                         {"act_fn", "center_input_sample", "downsample_padding",
                          "flip_sin_to_cos", "freq_shift", "mid_block_scale_factor", "norm_eps",
                          "resnet_out_scale_factor", "resnet_skip_time_act", "timestep_post_act",
                          "time_embedding_act_fn", "upcast_attention", "cross_attention_norm"}),
}
UNET_BLOCKS = {"down": ("DownBlock2D", "CrossAttnDownBlock2D"),
               "up": ("UpBlock2D", "CrossAttnUpBlock2D"), "mid": ("UNetMidBlock2DCrossAttn",)}


def _component_config(folder: Path, key: str, res: ImportResult) -> tuple[Path, dict[str, Any]]:
    p = folder / key / "config.json"
    d = _read_json(p)
    if p not in res.files:
        res.files.append(p)
    return p, d


def _denoiser(path: Path, d: dict[str, Any], kind: str, res: ImportResult,
              ignore_fields: set[str]) -> dict[str, Any]:
    r = _Reader(path, d, res, ignore_fields)
    fields, defaults, checks, ignored = DIT_FIELDS[kind]
    c: dict[str, Any] = {"kind": kind}
    for k in fields:
        v = r.get(k, defaults[k], f"{d.get('_class_name')} default", f"components.transformer.{k}")
        if v is None and k in ("out_channels", "sample_size", "num_attention_heads",
                               "addition_embed_type", "addition_time_embed_dim",
                               "projection_class_embeddings_input_dim"):
            if kind in ("flux_dit", "unet2d_condition"):
                continue            # null = "same as in_channels" / "not used": left out
        c[k] = list(v) if isinstance(v, tuple) else v
    for k, allowed in checks.items():
        r.check(k, allowed, allowed[0])
    r.ignore(*ignored)
    if kind == "unet2d_condition":
        for part, key in (("down", "down_block_types"), ("up", "up_block_types"),
                          ("mid", "mid_block_type")):
            vals = c[key] if isinstance(c[key], list) else [c[key]]
            bad = [b for b in vals if b not in UNET_BLOCKS[part]]
            if bad:
                r.fail(key, f"has {bad}; supported: {list(UNET_BLOCKS[part])}")
        if c.get("addition_embed_type") not in (None, "text_time"):
            r.fail("addition_embed_type", "is not supported; supported: null, \"text_time\"")
        # the text-embedding width the denoiser reads (the registry's name for it, as the DiTs')
        c["joint_attention_dim"] = int(c["cross_attention_dim"])
        res.notes.append("components.transformer.joint_attention_dim = cross_attention_dim "
                         f"{c['cross_attention_dim']} (the width of the text hand-off)")
    r.finish()
    return c


def _vae(path: Path, d: dict[str, Any], kind: str, res: ImportResult,
         ignore_fields: set[str]) -> dict[str, Any]:
    r = _Reader(path, d, res, ignore_fields)
    c: dict[str, Any] = {"kind": kind}
    if kind == "autoencoder_kl":
        dflt = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
                "block_out_channels": [64], "layers_per_block": 1, "use_quant_conv": True,
                "use_post_quant_conv": True, "scaling_factor": 0.18215, "shift_factor": None}
        for k, v0 in dflt.items():
            c[k] = r.get(k, v0, "AutoencoderKL default", f"components.vae.{k}")
        n = len(c["block_out_channels"])
        for k, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            v = r.d.get(k, [want] * n)
            r.ignore(k)
            if list(v) != [want] * n:
                r.fail(k, f"is not supported; supported: {n} x \"{want}\" (the builder's blocks)")
        r.check("act_fn", ("silu",), "silu")
        r.check("norm_num_groups", (32,), 32)
        r.check("mid_block_add_attention", (True,), True)
        r.ignore("sample_size", "force_upcast", "latents_mean", "latents_std")
    else:
        dflt = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attn_scales": [], "temperal_downsample": [False, True, True]}
        for k, v0 in dflt.items():
            c[k] = r.get(k, v0, "AutoencoderKLQwenImage default", f"components.vae.{k}")
        r.ignore("latents_mean", "latents_std", "dropout")
    r.finish()
    return c


def _text_encoder(path: Path, d: dict[str, Any], kind: str, res: ImportResult,
                  ignore_fields: set[str], max_length: int | None) -> dict[str, Any]:
    r = _Reader(path, d, res, ignore_fields)
    c: dict[str, Any] = {"kind": kind}
    if kind == "t5_encoder":
        r.check("architectures", (["T5EncoderModel"], ["T5ForConditionalGeneration"]),
                ["T5EncoderModel"])
        for k in ("d_model", "d_ff", "d_kv", "num_layers", "num_heads", "vocab_size"):
            c[k] = int(r.get(k, to=f"components.<t5>.{k}"))
        c["feed_forward_proj"] = r.get("feed_forward_proj", "relu", "T5Config default",
                                       "components.<t5>.feed_forward_proj")
        if c["feed_forward_proj"] not in ("gated-gelu", "relu", "gated-relu", "gelu"):
            r.fail("feed_forward_proj", "is not supported; supported: gated-gelu, relu")
        if max_length is None:
            raise ConfigImportError(f"{path}: a T5 encoder needs the pipeline's "
                                    "max_sequence_length; pass --max-sequence-length")
        c["max_length"] = int(max_length)
        r.ignore("num_decoder_layers", "dense_act_fn", "is_gated_act", "layer_norm_epsilon",
                 "relative_attention_num_buckets", "relative_attention_max_distance",
                 "output_past", "tie_word_embeddings", "n_positions", "gradient_checkpointing")
    else:
        r.check("architectures", (["CLIPTextModel"], ["CLIPTextModelWithProjection"]),
                ["CLIPTextModel"])
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "vocab_size"):
            c[k] = int(r.get(k, to=f"components.<clip>.{k}"))
        c["projection_dim"] = int(r.get("projection_dim", 512, "CLIPTextConfig default",
                                        "components.<clip>.projection_dim"))
        r.ignore("hidden_act", "layer_norm_eps", "attention_dropout", "initializer_factor",
                 "eos_token_id", "bos_token_id", "pad_token_id")
    r.finish()
    return c


def _encoder_name(c: dict[str, Any], key: str) -> str:
    if c["kind"] == "t5_encoder":
        return T5_NAMES.get(c["d_model"], key)
    return CLIP_NAMES.get(c["hidden_size"], key)


def _same_shapes(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> bool:
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def _find_condition_encoder(comps: dict[str, Any], registry: Path) -> str | None:
    """A registry VLM whose llm + vision shapes equal these (the serving context may differ)."""
    for p in sorted(registry.glob("*.yaml")):
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            continue
        rc = raw.get("components") or {}
        if raw.get("family") == "vlm" and set(rc) == set(comps) and \
                _same_shapes(rc["llm"], comps["llm"], ("max_position_embeddings",)) and \
                _same_shapes(rc["vision"], comps["vision"]):
            return str(raw.get("name", p.stem))
    return None


def import_diffusers(path: Path, res: ImportResult, opts: dict[str, Any],
                     ignore_fields: set[str], registry: Path) -> dict[str, Any]:
    d = _read_json(path)
    res.files.append(path)
    folder = path.parent
    r = _Reader(path, d, res, ignore_fields)
    cls = d.get("_class_name")
    if cls not in PIPELINES:
        raise ConfigImportError(f"{path}: _class_name={json.dumps(cls)} is not supported; "
                                f"supported: {', '.join(PIPELINES)}")
    rule = PIPELINES[cls]
    comps: dict[str, dict[str, Any]] = {}
    text_encoders: list[str] = []
    out: dict[str, Any] = {"family": "dit"}
    # pipeline-call settings
    msl = opts.get("max_sequence_length") or rule.max_sequence_length
    if rule.max_sequence_length is not None:
        src = "--max-sequence-length" if opts.get("max_sequence_length") else f"{cls}.__call__ default"
        res.defaults.append(f"{path}: max_sequence_length = {msl} ({src})")
    # components, in model_index order
    for key in d:
        if key.startswith("_") or key in ("scheduler", "force_zeros_for_empty_prompt",
                                          "add_watermarker", "is_distilled", "requires_safety_checker"):
            r.ignore(key)
            continue
        spec = d[key]
        if key.startswith(("tokenizer", "processor", "feature_extractor", "image_encoder",
                           "safety_checker")):
            r.ignore(key)
            continue
        if not (isinstance(spec, list) and len(spec) == 2):
            r.fail(key, "is not a [library, class] component entry")
        lib, ccls = spec
        r.ignore(key)
        if ccls is None:
            continue
        cpath, cd = _component_config(folder, key, res)
        if key == rule.denoiser:
            if ccls not in DENOISERS or DENOISERS[ccls] == "unet2d_condition" and key != "unet":
                r.fail(key, f"class {ccls} is not supported; supported: {', '.join(DENOISERS)}")
            comps["transformer"] = _denoiser(cpath, cd, DENOISERS[ccls], res, ignore_fields)
        elif key == "vae":
            if ccls not in VAES:
                r.fail(key, f"class {ccls} is not supported; supported: {', '.join(VAES)}")
            comps["vae"] = _vae(cpath, cd, VAES[ccls], res, ignore_fields)
        elif key.startswith("text_encoder"):
            if ccls == "Qwen2_5_VLForConditionalGeneration" and cls == "QwenImagePipeline":
                vl = import_hf_config(cpath, res, None, ignore_fields, image_tokenizer=False)
                out["condition_shapes"] = vl["components"]
                continue
            if ccls not in TEXT_ENCODERS:
                r.fail(key, f"class {ccls} is not supported; supported: {', '.join(TEXT_ENCODERS)}")
            kind = TEXT_ENCODERS[ccls]
            c = _text_encoder(cpath, cd, kind, res, ignore_fields,
                              msl if kind == "t5_encoder" else None)
            name = _encoder_name(c, key)
            if name in comps:
                name = key
            comps[name] = c
            text_encoders.append(name)
            res.notes.append(f"{key} -> components.{name} ({ccls})")
        else:
            r.fail(key, f"component {key!r} ({ccls}) is not supported; supported: "
                   f"{rule.denoiser}, vae, text_encoder*, tokenizer*, scheduler")
    r.finish()
    for need in ("transformer", "vae"):
        if need not in comps:
            raise ConfigImportError(f"{path}: no {rule.denoiser if need == 'transformer' else need} "
                                    "component; a diffusion pipeline needs a denoiser and a VAE")
    vae, den = comps["vae"], comps["transformer"]
    # latent geometry: VAE downsampling, packing, channels
    if vae["kind"] == "autoencoder_kl":
        down, ch = 2 ** (len(vae["block_out_channels"]) - 1), vae["latent_channels"]
    else:
        down, ch = 2 ** (len(vae["dim_mult"]) - 1), vae["z_dim"]
    cin = den["in_channels"]
    if cin == 4 * ch and den["kind"] in ("flux_dit", "qwen_image_mmdit"):
        patch = 2                               # the pipeline packs 2x2 latent patches
        res.notes.append(f"latent.patch_size = 2: {den['kind']} in_channels {cin} = 4 x "
                         f"{ch} latent channels (2x2 packing by the pipeline)")
    elif cin == ch:
        patch = int(den.get("patch_size", 1)) if den["kind"] != "unet2d_condition" else 1
    else:
        raise ConfigImportError(f"{folder / rule.denoiser / 'config.json'}: in_channels={cin} does "
                                f"not match the VAE's {ch} latent channels (or 4x that, packed)")
    out["latent"] = {"downsample": down, "patch_size": patch, "channels": ch}
    # request_defaults: one request's settings (the pipeline's __call__ defaults)
    steps = opts.get("steps") or rule.steps
    cfg = rule.cfg if opts.get("cfg") is None else bool(opts["cfg"])
    side = rule.default_sample_size * down
    height, width = opts.get("height") or side, opts.get("width") or side
    if cls == "StableDiffusion3Pipeline":
        tt = 77 + int(msl)
    elif cls == "FluxPipeline":
        tt = int(msl)
    elif cls == "StableDiffusionXLPipeline":
        tt = 77
    else:
        tt = QWEN_IMAGE_TYPICAL_PROMPT
    if opts.get("text_tokens"):
        tt = int(opts["text_tokens"])
    for k, v, src in (("steps", steps, "--steps" if opts.get("steps") else f"{cls}.__call__ num_inference_steps"),
                      ("cfg", cfg, "--cfg/--no-cfg" if opts.get("cfg") is not None else rule.cfg_why),
                      ("height", height, "--height" if opts.get("height") else
                       f"default_sample_size {rule.default_sample_size} x vae_scale_factor {down}"),
                      ("width", width, "--width" if opts.get("width") else
                       f"default_sample_size {rule.default_sample_size} x vae_scale_factor {down}"),
                      ("text_tokens", tt, "--text-tokens" if opts.get("text_tokens") else rule.text_tokens)):
        res.defaults.append(f"request_defaults.{k} = {json.dumps(v)} ({src})")
    out["request_defaults"] = {"steps": int(steps), "cfg": bool(cfg), "height": int(height),
                       "width": int(width), "text_tokens": int(tt)}
    out["tasks"] = ["generate", "edit", "inpaint", "outpaint"]
    if text_encoders:
        out["text_encoders"] = text_encoders
    if cls == "QwenImagePipeline":
        out["family"] = "ar_dit"
        shapes = out.pop("condition_shapes", None)
        name = opts.get("condition_encoder")
        if name:
            try:
                load_model(name, str(registry))
            except KeyError:
                raise ConfigImportError(f"--condition-encoder {name}: no such registry entry in "
                                        f"{registry}") from None
        elif shapes is not None:
            name = _find_condition_encoder(shapes, registry)
            if name is None:
                raise ConfigImportError(
                    f"{folder / 'text_encoder' / 'config.json'}: no registry entry has this "
                    "Qwen2.5-VL's shapes; import it first (python -m profiler import-model "
                    "<its folder with preprocessor_config.json>) and pass --condition-encoder NAME")
            res.notes.append(f"condition_encoder = {name} (registry entry with the text "
                             "encoder's llm + vision shapes)")
        else:
            raise ConfigImportError(f"{path}: QwenImagePipeline needs a text_encoder entry")
        out["condition_encoder"] = name
        if opts.get("edit_hf_id"):
            out["condition_image_pixels"] = QWEN_IMAGE_EDIT_CONDITION_PIXELS
            res.defaults.append(f"condition_image_pixels = {QWEN_IMAGE_EDIT_CONDITION_PIXELS} "
                                "(QwenImageEditPipeline's 384x384-area condition copy)")
    out["components"] = comps
    return out


# ------------------------------------------------------------------------------------------
# entry assembly and writing
# ------------------------------------------------------------------------------------------

def resolve_source(src: str | os.PathLike) -> tuple[Path, str]:
    """(config file, 'hf' | 'diffusers') of a config.json, a model_index.json or a folder."""
    p = Path(src)
    if p.is_dir():
        if (p / "model_index.json").exists():
            return p / "model_index.json", "diffusers"
        if (p / "config.json").exists():
            return p / "config.json", "hf"
        raise ConfigImportError(f"{p}: holds neither model_index.json nor config.json")
    if not p.exists():
        raise ConfigImportError(f"{p}: file not found")
    if p.name == "model_index.json":
        return p, "diffusers"
    return p, "hf"


def import_model(src: str | os.PathLike, name: str | None = None, *, dtype: str = "bfloat16",
                 max_model_len: int | None = None, hf_id: str | None = None,
                 edit_hf_id: str | None = None, tasks: list[str] | None = None,
                 ignore_fields: tuple[str, ...] = (), registry: Path | None = None,
                 **diffusion_opts: Any) -> ImportResult:
    """Builds the registry entry (not written). `diffusion_opts`: steps, cfg, height, width,
    max_sequence_length, text_tokens, condition_encoder."""
    registry = Path(registry) if registry else CONF_DIR
    path, form = resolve_source(src)
    res = ImportResult(entry={}, root=path.parent)
    ign = set(ignore_fields)
    opts = dict(diffusion_opts, edit_hf_id=edit_hf_id)
    if form == "hf":
        if any(v is not None for k, v in diffusion_opts.items()):
            bad = [k for k, v in diffusion_opts.items() if v is not None]
            raise ConfigImportError(f"{path}: options {bad} apply to diffusers pipelines only")
        body = import_hf_config(path, res, max_model_len, ign)
        body.pop("arch")
    else:
        if max_model_len is not None:
            raise ConfigImportError(f"{path}: --max-model-len applies to LLM / VLM configs only")
        body = import_diffusers(path, res, opts, ign, registry)
    if hf_id is None:
        nm = _read_json(path).get("_name_or_path") or ""
        hf_id = nm if re.fullmatch(r"[\w.-]+/[\w.-]+", nm or "") else ""
        if hf_id:
            res.notes.append(f"hf_id = {hf_id} (config _name_or_path)")
    base = path.parent.name if path.parent.name not in ("", ".") else path.stem
    name = name or slug(hf_id or base)
    if not re.fullmatch(r"[a-z0-9_]+", name or ""):
        raise ConfigImportError(f"--name {name!r} is invalid; allowed: lowercase letters, digits, _")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigImportError(f"--dtype {dtype!r} is invalid; allowed: bfloat16, float16, float32")
    if tasks is not None:
        bad = [t for t in tasks if t not in body["tasks"]]
        if bad or not tasks:
            raise ConfigImportError(f"--tasks {tasks} is invalid for a {body['family']} model; "
                                    f"allowed: a non-empty subset of {body['tasks']}")
        body["tasks"] = [t for t in TASKS if t in tasks]
    e: dict[str, Any] = {"name": name, "family": body["family"]}
    e["hf_id"] = hf_id or ""
    if edit_hf_id:
        e["edit_hf_id"] = edit_hf_id
    e["tasks"] = body["tasks"]
    e["dtype"] = dtype
    res.notes.append(f"dtype = {dtype} (--dtype: the serving / profiling dtype; weights are random)")
    for k in ("condition_encoder", "condition_image_pixels"):
        if k in body:
            e[k] = body[k]
    e["components"] = body["components"]
    for k in ("image_tokenizer", "latent", "text_encoders", "request_defaults"):
        if k in body:
            e[k] = body[k]
    res.entry = e
    return res


class _FlowListDumper(yaml.SafeDumper):
    pass


def _repr_list(dumper: yaml.SafeDumper, data: list) -> Any:
    flow = all(not isinstance(x, (dict, list)) and len(str(x)) <= 40 for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _repr_list)


def entry_yaml(res: ImportResult, command: str, git_sha: str = "") -> str:
    """The YAML text: a provenance header, the entry, then `source` (files + digests, the
    defaults taken and the fields ignored)."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    e = dict(res.entry)
    ignored: dict[str, list[str]] = {}
    for f, k in res.ignored:
        ignored.setdefault(f, []).append(k)
    e["source"] = {
        "importer": IMPORTER_VERSION, "command": command, "imported_at": now,
        **({"git_sha": git_sha} if git_sha else {}),
        "files": {os.path.relpath(f, res.root): _sha256(f) for f in res.files},
        "defaults": list(res.defaults), "notes": list(res.notes),
        "ignored": ignored,
    }
    head = (f"# {res.name}: imported from public configs by `python -m profiler import-model` "
            f"({IMPORTER_VERSION}).\n# Shapes only (weights are random when profiled); `source` "
            "lists the files, the defaults taken\n# and the fields ignored (no effect on latency "
            "or memory).\n")
    return head + yaml.dump(e, Dumper=_FlowListDumper, sort_keys=False, width=100)


def write_entry(res: ImportResult, conf_dir: Path, command: str, force: bool = False,
                git_sha: str = "") -> Path:
    """Writes <conf_dir>/<name>.yaml atomically; refuses to overwrite unless `force`."""
    conf_dir = Path(conf_dir)
    out = conf_dir / f"{res.name}.yaml"
    if out.exists() and not force:
        raise ConfigImportError(f"{out} exists; pass --force to replace it or --name to pick "
                                "another name")
    conf_dir.mkdir(parents=True, exist_ok=True)
    text = entry_yaml(res, command, git_sha)
    fd, tmp = tempfile.mkstemp(prefix=f".{res.name}.", suffix=".yaml", dir=conf_dir)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    load_model.cache_clear()
    from profiler.models import available_models
    available_models.cache_clear()
    return out


def entry_fields(e: dict[str, Any]) -> dict[str, Any]:
    """An entry without its provenance (`source`): what the profiler and simulator read."""
    return {k: v for k, v in e.items() if k != "source"}
