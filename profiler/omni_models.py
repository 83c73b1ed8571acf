"""Diffusers-style model folders for vLLM-Omni with the real architectures and no weights.

vLLM-Omni's diffusion loader reads a diffusers folder: `model_index.json` (its `_class_name`
picks the pipeline), `transformer/config.json`, `text_encoder*/config.json`, `vae/config.json`,
`scheduler/scheduler_config.json`, `tokenizer*/` and, for Qwen-Image-Edit, `processor/`. This
module writes such a folder from `conf/model/<name>.yaml` (the shapes) with config files only;
the weights come from `profiler.omni_plugin`, which swaps each pipeline class for a subclass
that builds every module from these configs and fills it with random values on the GPU (no
40 GB checkpoint is written or read).

Tokenizers are built offline and are exact where the shape of a request depends on them:
- Qwen2 (Qwen-Image text encoder): byte-level BPE over the Qwen2 pre-tokenizer, with merges
  that make every word of the two prompt templates and of `PROMPT_WORDS` one token, and the
  special tokens at their real ids (151643..151664). The fixed template prefixes then have
  exactly the lengths the pipelines drop (34 for generate, 64 for edit), and a prompt of n
  words from `PROMPT_WORDS` is exactly n tokens, as with the real tokenizer for common words.
- CLIP-L and T5 (FLUX): prompts are padded to 77 and 512 tokens, so only valid ids matter.

Pure config writing: transformers/tokenizers are imported lazily (only `write_*` need them), and
every builder takes a `shapes` override so tests build tiny folders with the same code.
"""
from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from profiler.models import ModelSpec, load_model

# --- the prompt templates of vLLM-Omni 0.26.0 (checked against the installed package in tests)
# vllm_omni/diffusion/models/qwen_image/pipeline_qwen_image.py:362-363
QWEN_GENERATE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n")
QWEN_GENERATE_DROP = 34
# vllm_omni/diffusion/models/qwen_image/pipeline_qwen_image_edit.py:305-306
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    "<|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_EDIT_DROP = 64

# Qwen2 special tokens and their ids (Qwen2.5-VL tokenizer_config.json).
QWEN_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>")
QWEN_FIRST_SPECIAL_ID = 151643          # = the size of Qwen2's regular vocabulary
QWEN_NON_SPECIAL = {"<tool_call>", "</tool_call>"}   # added tokens that are not "special"

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
# 512 letter-only words (consonant-vowel-consonant-vowel), each one token in the Qwen2 tokenizer
# built here; prompts are drawn from them (profiler.omni_bench.make_prompt).
PROMPT_WORDS: tuple[str, ...] = tuple(
    a + b + c + d for a in _CONSONANTS for b in _VOWELS for c in _CONSONANTS for d in _VOWELS)[:512]

# Qwen2-VL image processor of Qwen-Image-Edit's processor/ folder (Qwen2.5-VL defaults).
QWEN_VL_IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "min_pixels": 3136, "max_pixels": 12845056,
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}

# diffusers FlowMatchEulerDiscreteScheduler configs of the public repos (values do not change
# latency; they keep the pipelines' timestep code on its real path).
QWEN_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000,
    "shift": 1.0, "shift_terminal": 0.02, "stochastic_sampling": False, "time_shift_type": "exponential",
    "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
    "use_karras_sigmas": False}
FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True}
# Wan-2.1 VAE latent statistics (Qwen-Image's vae/config.json)
QWEN_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                     -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
QWEN_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                    2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]

# What `python -m profiler.omni_bench --model X` serves: (model yaml, pipeline, builder kind).
SERVED: dict[str, tuple[str, str]] = {
    "qwen_image": ("qwen_image", "QwenImagePipeline"),
    "qwen_image_edit": ("qwen_image", "QwenImageEditPipeline"),
    "flux1_dev": ("flux1_dev", "FluxPipeline"),
}
MARKER = "mmsim_random_weights.json"   # written last: a folder without it is incomplete


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- BPE tokenizers

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def qwen_pretokens(texts: list[str]) -> list[str]:
    """Byte-level pre-tokens of `texts` under Qwen2's pre-tokenizer (special tokens split off)."""
    from tokenizers import Regex, pre_tokenizers

    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    out: list[str] = []
    for t in texts:
        for piece in _split_specials(t, QWEN_SPECIALS):
            if piece in QWEN_SPECIALS or not piece:
                continue
            out.extend(p for p, _ in pre.pre_tokenize_str(piece))
    return out


def _split_specials(text: str, specials: tuple[str, ...]) -> list[str]:
    parts = [text]
    for s in specials:
        nxt: list[str] = []
        for p in parts:
            if p in specials:
                nxt.append(p)
                continue
            bits = p.split(s)
            for i, b in enumerate(bits):
                if i:
                    nxt.append(s)
                nxt.append(b)
        parts = nxt
    return [p for p in parts if p]


def prefix_chain_bpe(pretokens: list[str], alphabet: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocab and merges that turn each pre-token into exactly one token.

    Each pre-token t gets the merges (t[:k], t[k]) for k = 1..len(t)-1 (a prefix chain). BPE
    always applies the lowest-ranked merge present, and a merge whose left side starts with "Ġ"
    can only apply at a word start, so ranking every "Ġ"-chain before every other chain keeps the
    chains from cutting into each other; `write_qwen_tokenizer` checks the result anyway."""
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    seen: set[str] = set()
    uniq = [t for t in pretokens if len(t) > 1 and not (t in seen or seen.add(t))]
    uniq.sort(key=lambda t: (not t.startswith("Ġ"),))       # stable: Ġ-words first
    merges: list[str] = []
    for t in uniq:
        for k in range(1, len(t)):
            left, new = t[:k], t[:k + 1]
            if new in vocab:
                continue
            vocab[new] = len(vocab)
            merges.append(f"{left} {t[k]}")
    return vocab, merges


@lru_cache(maxsize=1)
def _qwen_vocab_json() -> tuple[str, str]:
    vocab, merges = qwen_vocab()
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


def qwen_vocab() -> tuple[dict[str, int], list[str]]:
    """The Qwen2 vocabulary: byte alphabet + template/prompt-word merges, padded with unreachable
    fillers to 151643 regular ids, then the 22 special tokens at their real ids."""
    # prompts are sent with a leading space (profiler.omni_bench.make_prompt), so every prompt
    # word is a "Ġ"-word whatever precedes it in the template
    texts = [QWEN_GENERATE_TEMPLATE.replace("{}", " "), QWEN_EDIT_TEMPLATE.replace("{}", " "),
             " " + " ".join(PROMPT_WORDS)]
    alphabet = list(bytes_to_unicode().values())
    vocab, merges = prefix_chain_bpe(qwen_pretokens(texts), alphabet)
    if len(vocab) > QWEN_FIRST_SPECIAL_ID:
        raise ValueError(f"Qwen2 vocabulary too large: {len(vocab)} > {QWEN_FIRST_SPECIAL_ID}")
    i = 0
    while len(vocab) < QWEN_FIRST_SPECIAL_ID:
        vocab[f"<|mmsim_unused_{i}|>"] = len(vocab)    # never produced: no merge builds it
        i += 1
    for s in QWEN_SPECIALS:
        vocab[s] = len(vocab)
    return vocab, merges


def write_qwen_tokenizer(dst: Path, with_processor: bool = False) -> None:
    """vocab.json + merges.txt + tokenizer_config.json for transformers' Qwen2Tokenizer (which
    rebuilds Qwen2's own pre-tokenizer from them); with_processor also writes the Qwen2-VL image
    processor config (Qwen-Image-Edit's processor/ folder)."""
    dst.mkdir(parents=True, exist_ok=True)
    vocab_json, merges_txt = _qwen_vocab_json()       # a pure function of the templates: built once
    (dst / "vocab.json").write_text(vocab_json)
    (dst / "merges.txt").write_text(merges_txt)
    added = {str(QWEN_FIRST_SPECIAL_ID + i): {"content": s, "lstrip": False, "normalized": False,
                                              "rstrip": False, "single_word": False,
                                              "special": s not in QWEN_NON_SPECIAL}
             for i, s in enumerate(QWEN_SPECIALS)}
    _dump(dst / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added,
        "additional_special_tokens": [s for s in QWEN_SPECIALS[1:14]],
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "clean_up_tokenization_spaces": False, "errors": "replace",
        "model_max_length": 131072, "split_special_tokens": False,
        **({"processor_class": "Qwen2VLProcessor"} if with_processor else {})})
    if with_processor:
        _dump(dst / "preprocessor_config.json", QWEN_VL_IMAGE_PROCESSOR)


def write_clip_tokenizer(dst: Path, vocab_size: int = 49408) -> None:
    """CLIP-L BPE files: the byte alphabet (plain and with "</w>"), the two specials at their
    real ids (49406, 49407), unreachable fillers in between. FLUX pads CLIP prompts to 77."""
    dst.mkdir(parents=True, exist_ok=True)
    alpha = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in alpha + [c + "</w>" for c in alpha]:
        vocab[ch] = len(vocab)
    i = 0
    while len(vocab) < vocab_size - 2:
        vocab[f"mmsimunused{i}</w>"] = len(vocab)
        i += 1
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (dst / "merges.txt").write_text("#version: 0.2\n")
    _dump(dst / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77,
        "do_lower_case": True, "clean_up_tokenization_spaces": True})


def write_t5_tokenizer(dst: Path, vocab_size: int = 32128, extra_ids: int = 100) -> None:
    """T5 Unigram tokenizer.json: <pad>=0 </s>=1 <unk>=2, "▁" + letters and digits, fillers up to
    vocab_size - extra_ids, then <extra_id_99..0> (T5's layout). FLUX pads T5 prompts to 512."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    dst.mkdir(parents=True, exist_ok=True)
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'-":
        pieces += [(ch, -5.0), ("▁" + ch, -4.0)]
    i = 0
    while len(pieces) < vocab_size - extra_ids:
        pieces.append((f"<mmsim_unused_{i}>", -99.0))
        i += 1
    pieces += [(f"<extra_id_{k}>", 0.0) for k in range(extra_ids - 1, -1, -1)]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Sequence([normalizers.Replace(" +", " ")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    tk.save(str(dst / "tokenizer.json"))
    _dump(dst / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "extra_ids": extra_ids, "model_max_length": 512,
        "clean_up_tokenization_spaces": True,
        "additional_special_tokens": [f"<extra_id_{k}>" for k in range(extra_ids)]})


# ----------------------------------------------------------------------------- configs

def _merged(base: dict[str, Any], over: Optional[dict[str, Any]]) -> dict[str, Any]:
    out = dict(base)
    out.update(over or {})
    return out


def qwen_transformer_config(spec: ModelSpec, over: Optional[dict] = None) -> dict[str, Any]:
    c = _merged(spec.components["transformer"], over)
    return {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.38.0",
            "attention_head_dim": c["attention_head_dim"], "axes_dims_rope": list(c["axes_dims_rope"]),
            "guidance_embeds": False, "in_channels": c["in_channels"],
            "joint_attention_dim": c["joint_attention_dim"],
            "num_attention_heads": c["num_attention_heads"], "num_layers": c["num_layers"],
            "out_channels": c["out_channels"], "patch_size": c["patch_size"],
            "pooled_projection_dim": 768}


def qwen_vae_config(spec: ModelSpec, over: Optional[dict] = None) -> dict[str, Any]:
    c = _merged(spec.components["vae"], over)
    z = c["z_dim"]
    return {"_class_name": "AutoencoderKLQwenImage", "_diffusers_version": "0.38.0",
            "attn_scales": list(c["attn_scales"]), "base_dim": c["base_dim"],
            "dim_mult": list(c["dim_mult"]), "dropout": 0.0,
            "latents_mean": (QWEN_LATENTS_MEAN + [0.0] * z)[:z],
            "latents_std": (QWEN_LATENTS_STD + [1.0] * z)[:z],
            "num_res_blocks": c["num_res_blocks"],
            "temperal_downsample": list(c["temperal_downsample"]), "z_dim": z}


def qwen_text_encoder_config(enc: ModelSpec, over: Optional[dict] = None) -> dict[str, Any]:
    """Qwen2.5-VL-7B-Instruct's config.json (Qwen-Image's text_encoder/), shapes from the
    condition encoder's yaml; `over` may hold 'text' and 'vision' dicts (tiny test shapes)."""
    t = _merged(enc.components["llm"], (over or {}).get("text"))
    v = _merged(enc.components["vision"], (over or {}).get("vision"))
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    # mrope sections cover head_dim/2 rotary frequencies: [16, 24, 24] at head_dim 128
    half = head_dim // 2
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    rope = {"rope_type": "default", "mrope_section": mrope, "rope_theta": float(t["rope_theta"])}
    text = {"model_type": "qwen2_5_vl_text", "vocab_size": t["vocab_size"],
            "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
            "num_hidden_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
            "num_key_value_heads": t["num_key_value_heads"], "hidden_act": "silu",
            "max_position_embeddings": 128000, "rms_norm_eps": float(t["rms_norm_eps"]),
            "use_sliding_window": False, "sliding_window": 32768,
            "max_window_layers": t["num_hidden_layers"], "attention_dropout": 0.0,
            "rope_parameters": rope, "bos_token_id": 151643, "eos_token_id": 151645,
            "dtype": "bfloat16"}
    vision = {"model_type": "qwen2_5_vl", "depth": v["depth"], "hidden_size": v["hidden_size"],
              "hidden_act": "silu", "intermediate_size": v["intermediate_size"],
              "num_heads": v["num_heads"], "in_channels": v["in_chans"], "patch_size": v["patch_size"],
              "spatial_merge_size": v["spatial_merge_size"],
              "temporal_patch_size": v["temporal_patch_size"], "tokens_per_second": 2,
              "window_size": v["window_size"], "out_hidden_size": v["out_hidden_size"],
              "fullatt_block_indexes": list(v["fullatt_block_indexes"])}
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "text_config": text, "vision_config": vision, "image_token_id": 151655,
            "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "tie_word_embeddings": bool(t.get("tie_word_embeddings", False)), "dtype": "bfloat16"}


def flux_configs(spec: ModelSpec, over: Optional[dict] = None) -> dict[str, dict[str, Any]]:
    """transformer/, text_encoder/ (CLIP-L), text_encoder_2/ (T5-XXL encoder), vae/ configs."""
    over = over or {}
    tr = _merged(spec.components["transformer"], over.get("transformer"))
    t5 = _merged(spec.components["t5_xxl"], over.get("t5_xxl"))
    cl = _merged(spec.components["clip_l"], over.get("clip_l"))
    va = _merged(spec.components["vae"], over.get("vae"))
    n = len(va["block_out_channels"])
    return {
        "transformer": {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.38.0",
                        "attention_head_dim": tr["attention_head_dim"],
                        "axes_dims_rope": list(tr["axes_dims_rope"]),
                        "guidance_embeds": bool(tr["guidance_embeds"]), "in_channels": tr["in_channels"],
                        "joint_attention_dim": tr["joint_attention_dim"],
                        "num_attention_heads": tr["num_attention_heads"], "num_layers": tr["num_layers"],
                        "num_single_layers": tr["num_single_layers"], "patch_size": tr["patch_size"],
                        "pooled_projection_dim": tr["pooled_projection_dim"]},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                         "hidden_size": cl["hidden_size"], "intermediate_size": cl["intermediate_size"],
                         "num_hidden_layers": cl["num_hidden_layers"],
                         "num_attention_heads": cl["num_attention_heads"],
                         "max_position_embeddings": cl["max_position_embeddings"],
                         "vocab_size": cl["vocab_size"], "projection_dim": cl["projection_dim"],
                         "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0,
                         "eos_token_id": 2, "pad_token_id": 1, "dtype": "bfloat16"},
        "text_encoder_2": {"architectures": ["T5EncoderModel"], "model_type": "t5",
                           "d_model": t5["d_model"], "d_ff": t5["d_ff"], "d_kv": t5["d_kv"],
                           "num_layers": t5["num_layers"], "num_heads": t5["num_heads"],
                           "vocab_size": t5["vocab_size"],
                           "feed_forward_proj": t5.get("feed_forward_proj", "gated-gelu"),
                           "dense_act_fn": "gelu_new", "is_gated_act": True,
                           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                           "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "is_encoder_decoder": True,
                           "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
                           "tie_word_embeddings": False, "dtype": "bfloat16"},
        "vae": {"_class_name": "AutoencoderKL", "_diffusers_version": "0.38.0",
                "in_channels": va["in_channels"], "out_channels": va["out_channels"],
                "latent_channels": va["latent_channels"],
                "block_out_channels": list(va["block_out_channels"]),
                "layers_per_block": va["layers_per_block"],
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "act_fn": "silu", "norm_num_groups": 32, "sample_size": 1024,
                "scaling_factor": va["scaling_factor"], "shift_factor": va["shift_factor"],
                "use_quant_conv": bool(va["use_quant_conv"]),
                "use_post_quant_conv": bool(va["use_post_quant_conv"]), "force_upcast": True,
                "mid_block_add_attention": True},
    }


# ----------------------------------------------------------------------------- folders

def write_model_dir(served: str, path: str | Path, shapes: Optional[dict[str, Any]] = None,
                    force: bool = False) -> dict[str, Any]:
    """Write the diffusers folder for `served` (a key of SERVED) at `path`; returns its manifest.

    Idempotent: a complete folder (MARKER present, same manifest) is kept. The folder is built
    next to `path` and renamed into place, so a reader never sees half a folder. `shapes`
    overrides yaml shapes per component (tests: tiny models)."""
    if served not in SERVED:
        raise ValueError(f"model={served!r} is unknown to omni_models; allowed: {sorted(SERVED)}")
    yaml_name, pipeline = SERVED[served]
    spec = load_model(yaml_name)
    path = Path(path)
    manifest = {"served": served, "pipeline": pipeline, "model_yaml": yaml_name,
                "weights": "random (profiler.omni_plugin)", "shapes_override": shapes or {}}
    mk = path / MARKER
    if mk.exists() and not force:
        try:
            if json.loads(mk.read_text()) == manifest:
                return manifest
        except ValueError:
            pass
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = shapes or {}
    if yaml_name == "qwen_image":
        enc = load_model(spec.condition_encoder or "qwen2_5_vl_7b")
        comps = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                 "tokenizer": ["transformers", "Qwen2Tokenizer"],
                 "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                 "vae": ["diffusers", "AutoencoderKLQwenImage"]}
        if pipeline == "QwenImageEditPipeline":
            comps["processor"] = ["transformers", "Qwen2VLProcessor"]
        _dump(tmp / "model_index.json", {"_class_name": pipeline, "_diffusers_version": "0.38.0", **comps})
        _dump(tmp / "transformer" / "config.json", qwen_transformer_config(spec, shapes.get("transformer")))
        _dump(tmp / "vae" / "config.json", qwen_vae_config(spec, shapes.get("vae")))
        _dump(tmp / "text_encoder" / "config.json", qwen_text_encoder_config(enc, shapes.get("text_encoder")))
        _dump(tmp / "scheduler" / "scheduler_config.json", QWEN_SCHEDULER)
        write_qwen_tokenizer(tmp / "tokenizer")
        if pipeline == "QwenImageEditPipeline":
            write_qwen_tokenizer(tmp / "processor", with_processor=True)
    elif yaml_name == "flux1_dev":
        cfgs = flux_configs(spec, shapes)
        _dump(tmp / "model_index.json", {
            "_class_name": pipeline, "_diffusers_version": "0.38.0",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
        for sub, c in cfgs.items():
            _dump(tmp / sub / "config.json", c)
        _dump(tmp / "scheduler" / "scheduler_config.json", FLUX_SCHEDULER)
        write_clip_tokenizer(tmp / "tokenizer", cfgs["text_encoder"]["vocab_size"])
        write_t5_tokenizer(tmp / "tokenizer_2", cfgs["text_encoder_2"]["vocab_size"])
    else:  # pragma: no cover - SERVED only names the two yamls above
        raise ValueError(yaml_name)
    _dump(tmp / MARKER, manifest)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def qwen_token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)
