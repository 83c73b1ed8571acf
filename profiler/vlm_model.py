"""A Qwen2.5-VL model directory that `vllm serve --load-format dummy` serves with images.

What vLLM 0.26.0's Qwen2.5-VL path reads (vllm/model_executor/models/qwen2_vl.py, qwen2_5_vl.py,
vllm/transformers_utils/processor.py, vllm/renderers/hf.py):
- `config.json`: a `Qwen2_5_VLConfig` (text + vision config; image/video/vision-start/end token
  ids). The shapes come from `conf/model/qwen2_5_vl_7b.yaml`; the ids are the public checkpoint's.
- `preprocessor_config.json`: the image processor (`Qwen2VLImageProcessor`, min/max pixels from
  the yaml's `image_tokenizer`), with `processor_class: Qwen2_5_VLProcessor`. vLLM builds the HF
  processor with `Qwen2_5_VLProcessor.from_pretrained(<model dir>, tokenizer=<the served
  tokenizer>)`; transformers 5 first loads a tokenizer from the model dir itself (then swaps in
  the given one), so the model dir holds a copy of the tokenizer files too.
- the tokenizer (`--tokenizer <dir>/tokenizer`, its own folder; see serve_bench.tokenizer_dir):
  a `tokenizers` WordLevel vocabulary of exactly `vocab_size` ids: `t<i>` words, Qwen's 22
  special tokens at their real ids (151643 <|endoftext|> ... 151664 <|file_sep|>; among them
  <|im_start|> 151644, <|im_end|> 151645, <|vision_start|> 151652, <|vision_end|> 151653,
  <|image_pad|> 151655), `[UNK]` as the last id. Whitespace pre-tokenizer, no post-processor:
  a text of n `t<i>` words is exactly n tokens, and special tokens are matched whole.
- the chat template: Qwen2-VL's own (system prompt by default; per image part
  `<|vision_start|><|image_pad|><|vision_end|>`), which loops over `message['content']`, so vLLM
  detects the "openai" content format and the template places one placeholder per image; vLLM's
  multimodal processor then expands each `<|image_pad|>` to (H'/28)(W'/28) copies, H' x W' the
  smart_resize'd size.

Prompt length accounting of one chat request (this tokenizer): `chat_overhead_tokens(k)` tokens
of template around the user text (14 with the default system prompt and no image, +2 per image for
<|vision_start|> / <|vision_end|>), plus the user text's n tokens, plus the image tokens. The
server's `usage.prompt_tokens` is the sum; `profiler.chat_bench` checks it on every request.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

# The public Qwen2.5 / Qwen2.5-VL tokenizer's added tokens (tokenizer_config.json
# added_tokens_decoder), ids 151643..151664, in id order.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>")
FIRST_SPECIAL_ID = 151643
SPECIAL_IDS: dict[str, int] = {t: FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
IMAGE_TOKEN, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
UNK = "[UNK]"

# Qwen2-VL / Qwen2.5-VL's chat template (the public checkpoints' chat_template.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Template tokens around one user message under this tokenizer (words are one token each,
# whitespace is dropped): <|im_start|> system You are a helpful assistant . <|im_end|>
# <|im_start|> user ... <|im_end|> <|im_start|> assistant
CHAT_OVERHEAD_TOKENS = 14


def chat_overhead_tokens(num_images: int) -> int:
    """Prompt tokens of the chat template around the user text, images' own tokens excluded."""
    return CHAT_OVERHEAD_TOKENS + 2 * num_images


def text_word_ids(vocab_size: int) -> range:
    """Ids whose token is a plain `t<i>` word (what a client may put in a prompt)."""
    return range(0, FIRST_SPECIAL_ID)


# ----------------------------------------------------------------------------- shapes

def vlm_shape(model: str) -> dict[str, Any]:
    from profiler.serve_bench import CONF_MODEL, _read_yaml
    raw = _read_yaml(CONF_MODEL / f"{model}.yaml")
    comp = raw.get("components") or {}
    if "vision" not in comp or "image_tokenizer" not in raw:
        raise ValueError(f"conf/model/{model}.yaml: components.vision and image_tokenizer are required "
                         f"for a VLM model dir")
    return {"llm": dict(comp["llm"]), "vision": dict(comp["vision"]),
            "image_tokenizer": dict(raw["image_tokenizer"]), "dtype": raw.get("dtype", "bfloat16")}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
    """Qwen2-VL's smart_resize (transformers' qwen2_vl image processor), same arithmetic; kept
    here so the client needs no transformers. Raises on an aspect ratio over 200, as HF does."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(height: int, width: int, tok: dict[str, Any]) -> int:
    """LLM tokens of one image: (H'/patch)(W'/patch)/merge^2 after smart_resize."""
    p, m = int(tok["patch_size"]), int(tok["merge_size"])
    h, w = smart_resize(height, width, p * m, int(tok["min_pixels"]), int(tok["max_pixels"]))
    return (h // p) * (w // p) // (m * m)


# ----------------------------------------------------------------------------- writers

def make_vlm_tokenizer(vocab_size: int):
    """WordLevel tokenizer: `t<i>` words, Qwen's special tokens at their real ids, [UNK] last."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    last = FIRST_SPECIAL_ID + len(QWEN_SPECIAL_TOKENS)
    if vocab_size <= last:
        raise ValueError(f"vocab_size={vocab_size} is invalid; allowed: > {last} (Qwen's special ids)")
    vocab = {f"t{i}": i for i in range(FIRST_SPECIAL_ID)}
    vocab.update(SPECIAL_IDS)
    vocab.update({f"t{i}": i for i in range(last, vocab_size - 1)})
    vocab[UNK] = vocab_size - 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
                          + [AddedToken(UNK, special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=UNK, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", clean_up_tokenization_spaces=False,
                                  model_max_length=1 << 20)
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def write_vlm_model_dir(model: str, path: Path, tokenizer_subdir: str = "tokenizer") -> dict[str, Any]:
    """config.json, preprocessor_config.json, chat_template.jinja and the tokenizer (in the model
    dir and in `<path>/<tokenizer_subdir>`). Returns the config dict as written."""
    from transformers import Qwen2_5_VLConfig
    s = vlm_shape(model)
    llm, vis, itok = s["llm"], s["vision"], s["image_tokenizer"]
    V = int(llm["vocab_size"])
    if int(vis["patch_size"]) != int(itok["patch_size"]) or int(vis["spatial_merge_size"]) != int(itok["merge_size"]):
        raise ValueError(f"conf/model/{model}.yaml: vision.patch_size/spatial_merge_size "
                         f"({vis['patch_size']}/{vis['spatial_merge_size']}) must equal "
                         f"image_tokenizer.patch_size/merge_size ({itok['patch_size']}/{itok['merge_size']})")
    text = dict(vocab_size=V, hidden_size=int(llm["hidden_size"]),
                intermediate_size=int(llm["intermediate_size"]),
                num_hidden_layers=int(llm["num_hidden_layers"]),
                num_attention_heads=int(llm["num_attention_heads"]),
                num_key_value_heads=int(llm["num_key_value_heads"]),
                max_position_embeddings=int(llm["max_position_embeddings"]),
                rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)), hidden_act="silu",
                use_sliding_window=False, sliding_window=32768, max_window_layers=28,
                bos_token_id=SPECIAL_IDS["<|endoftext|>"], eos_token_id=SPECIAL_IDS["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 1e6)),
                                 "mrope_section": [16, 24, 24]},
                tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)))
    vision = dict(depth=int(vis["depth"]), hidden_size=int(vis["hidden_size"]), hidden_act="silu",
                  intermediate_size=int(vis["intermediate_size"]), num_heads=int(vis["num_heads"]),
                  in_channels=int(vis.get("in_chans", 3)), patch_size=int(vis["patch_size"]),
                  spatial_merge_size=int(vis["spatial_merge_size"]),
                  temporal_patch_size=int(vis["temporal_patch_size"]), tokens_per_second=2,
                  window_size=int(vis["window_size"]), out_hidden_size=int(vis["out_hidden_size"]),
                  fullatt_block_indexes=list(vis["fullatt_block_indexes"]))
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                           image_token_id=SPECIAL_IDS[IMAGE_TOKEN],
                           video_token_id=SPECIAL_IDS["<|video_pad|>"],
                           vision_start_token_id=SPECIAL_IDS[VISION_START],
                           vision_end_token_id=SPECIAL_IDS[VISION_END],
                           tie_word_embeddings=text["tie_word_embeddings"],
                           architectures=["Qwen2_5_VLForConditionalGeneration"])
    cfg.dtype = s["dtype"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(path))
    cj = json.loads((path / "config.json").read_text())
    # both dtype spellings, and the flat text keys older readers look for at the top level
    cj["torch_dtype"] = cj["dtype"] = s["dtype"]
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rms_norm_eps"):
        cj.setdefault(k, text[k])
    cj.setdefault("bos_token_id", text["bos_token_id"])
    cj.setdefault("eos_token_id", text["eos_token_id"])
    (path / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True))
    pp = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
          "min_pixels": int(itok["min_pixels"]), "max_pixels": int(itok["max_pixels"]),
          "size": {"shortest_edge": int(itok["min_pixels"]), "longest_edge": int(itok["max_pixels"])},
          "patch_size": int(itok["patch_size"]), "merge_size": int(itok["merge_size"]),
          "temporal_patch_size": int(vis["temporal_patch_size"]),
          "image_mean": [0.48145466, 0.4578275, 0.40821073],
          "image_std": [0.26862954, 0.26130258, 0.27577711],
          "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
          "rescale_factor": 1.0 / 255}
    (path / "preprocessor_config.json").write_text(json.dumps(pp, indent=2, sort_keys=True))
    (path / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    tok = make_vlm_tokenizer(V)
    tok.save_pretrained(str(path / tokenizer_subdir))
    tok.save_pretrained(str(path))      # the processor's own load (then replaced by vLLM's)
    return cj


# ----------------------------------------------------------------------------- checks

def check_vlm_tokenizer(tok_dir: Path, vocab_size: int, lengths=(1, 7, 60, 512, 4096), seed: int = 0) -> None:
    """n `t<i>` words are n tokens and decode back; specials are single tokens at their ids; the
    chat template around a k-image message costs chat_overhead_tokens(k) + 1 per image pad."""
    import numpy as np
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    assert tok.num_special_tokens_to_add() == 0
    for t, i in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(t) == i, t
        assert tok.encode(t, add_special_tokens=False) == [i], t
    rng = np.random.default_rng(seed)
    words = text_word_ids(vocab_size)
    for n in lengths:
        ids = rng.integers(words.start, words.stop, size=n).tolist()
        text = " ".join(f"t{i}" for i in ids)
        assert tok.encode(text, add_special_tokens=False) == ids, f"encode failed at length {n}"
        assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids, f"round trip failed at length {n}"
    for k in (0, 1, 3):
        content: Any = [{"type": "image"}] * k + [{"type": "text", "text": "t1 t2 t3"}]
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        assert len(ids) == chat_overhead_tokens(k) + 3 + k, (k, len(ids))
        assert ids.count(SPECIAL_IDS[IMAGE_TOKEN]) == k


def check_vlm_processor(model_dir: Path, tok_dir: Path,
                        sizes=((448, 448), (896, 896), (1344, 1344), (300, 532), (1328, 747), (20, 30)),
                        tok: Optional[dict[str, Any]] = None) -> list[tuple[int, int, int]]:
    """Load the HF processor the way vLLM does (from the model dir, with the served tokenizer
    swapped in) and check that every image expands to image_tokens(h, w) pads in the prompt and
    that the text around it keeps its length. Returns [(h, w, tokens)]."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer
    served = AutoTokenizer.from_pretrained(str(tok_dir))
    proc = AutoProcessor.from_pretrained(str(model_dir), tokenizer=served, use_fast=True)
    if type(proc).__name__ != "Qwen2_5_VLProcessor":
        raise AssertionError(f"AutoProcessor({model_dir}) is {type(proc).__name__}, not Qwen2_5_VLProcessor")
    tok = tok or json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    pad = SPECIAL_IDS[IMAGE_TOKEN]
    out = []
    for h, w in sizes:
        img = Image.fromarray(np.full((h, w, 3), 128, np.uint8))
        text = f"{VISION_START}{IMAGE_TOKEN}{VISION_END} t5 t6 t7"
        enc = proc(text=[text], images=[img], return_tensors="np")
        ids = enc["input_ids"][0].tolist()
        n = image_tokens(h, w, tok)
        grid = enc["image_grid_thw"][0].tolist()
        assert grid[0] * grid[1] * grid[2] // (int(tok["merge_size"]) ** 2) == n, (h, w, grid, n)
        assert ids.count(pad) == n, (h, w, ids.count(pad), n)
        assert len(ids) == n + 2 + 3, (h, w, len(ids), n)
        out.append((h, w, n))
    return out
