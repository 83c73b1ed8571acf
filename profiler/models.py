"""Model registry: reads `conf/model/<name>.yaml` (public architecture shapes) for both CLIs.

The profiler builds random-weight networks from these shapes; the simulator sizes memory
(weights, KV cache) and image tokens from them. Pure Python + PyYAML, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
FAMILIES = ("llm", "vlm", "ar_dit", "dit")
TASKS = ("text", "understand", "generate", "edit", "inpaint", "outpaint")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}

# --- precision variants ------------------------------------------------------------------------
# One rule: the precision variant P of model M is the model named "M@P". It has M's shapes; the
# weights of its QUANTIZED components are stored in P's weight dtype (embeddings and the LM head
# stay in M's dtype, as vLLM's dynamic FP8 leaves them), its KV cache is in P's KV dtype, and
# activations (what hops hand to each other) stay in M's dtype. Its profile tables are
# traces/profiles/<gpu>/M@P.parquet; an AR+DiT variant's condition encoder is the same variant of
# M's condition encoder. `precision=P` (sim config) serves every task with its model's variant P.
VARIANT_SEP = "@"
QUANTIZED = ("llm", "vision", "transformer")   # vLLM fp8: LLM + vision tower; DiT: the transformer


@dataclass(frozen=True)
class Precision:
    name: str
    weights: str            # dtype of the quantized components' weights
    kv: str | None          # KV-cache dtype (None: the model's own dtype)
    about: str


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16", "bfloat16", None, "the model as configured (bfloat16)"),
    "fp8": Precision("fp8", "fp8", None, "FP8 (e4m3) weights, dynamic per-token activation "
                     "scales (vLLM quantization='fp8'; torchao float8 dynamic for a DiT); KV cache "
                     "in bfloat16"),
    "fp8kv": Precision("fp8kv", "fp8", "fp8", "fp8 weights and an FP8 KV cache "
                       "(vLLM kv_cache_dtype='fp8')"),
}


def split_variant(name: str) -> tuple[str, str | None]:
    """("qwen_image", "fp8") for "qwen_image@fp8"; (name, None) without a variant."""
    base, sep, prec = str(name).partition(VARIANT_SEP)
    return base, (prec if sep else None)


def with_precision(name: str, precision: str | None) -> str:
    """The model name of `name`'s variant `precision` (bf16 / None: the base model; a name that
    already names a variant is kept)."""
    base, have = split_variant(name)
    if have is not None or precision in (None, "", "bf16"):
        return name
    return f"{base}{VARIANT_SEP}{precision}"


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    tasks: tuple[str, ...]
    dtype: str
    components: dict[str, dict[str, Any]]
    hf_id: str = ""
    edit_hf_id: str = ""
    image_tokenizer: dict[str, Any] = field(default_factory=dict)
    latent: dict[str, Any] = field(default_factory=dict)
    # one request's pipeline-call settings (steps, cfg, height, width, text_tokens); the YAML key
    # is `request_defaults` because Hydra reserves `defaults` in a config-group file (model=NAME)
    request_defaults: dict[str, Any] = field(default_factory=dict)
    condition_encoder: str | None = None
    condition_image_pixels: int | None = None
    text_encoders: tuple[str, ...] = ()
    precision: str = "bf16"                 # PRECISIONS key (a variant "M@P" has P)
    quant_dtype: str | None = None          # weight dtype of the QUANTIZED components
    kv_dtype: str | None = None             # KV-cache dtype (None: dtype)

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of activations (and of unquantized weights)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def base(self) -> str:
        return split_variant(self.name)[0]

    @property
    def kv_dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.kv_dtype or self.dtype]

    def weight_dtype(self, comp: str) -> str:
        return self.quant_dtype if self.quant_dtype and comp in QUANTIZED else self.dtype

    @property
    def llm(self) -> dict[str, Any] | None:
        return self.components.get("llm")

    def kv_bytes_per_token(self) -> int:
        """2 (K and V) * layers * kv_heads * head_dim * bytes."""
        c = self.llm
        if c is None:
            return 0
        head_dim = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
        return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * self.kv_dtype_bytes

    def component_params(self, comp: str) -> int:
        return param_count(self.components[comp])

    def component_bytes(self, comp: str) -> int:
        """Weight bytes of one component: parameters x its weight dtype; a quantized LLM keeps
        its token embeddings and LM head in the model's dtype."""
        n = self.component_params(comp)
        wd = self.weight_dtype(comp)
        if wd == self.dtype:
            return n * self.dtype_bytes
        c = self.components[comp]
        keep = 0
        if c.get("kind") in LLM_KINDS:
            p = llm_params(c)
            keep = p["embed"] + p["lm_head"]
        return (n - keep) * DTYPE_BYTES[wd] + keep * self.dtype_bytes

    def weights_bytes(self, components: tuple[str, ...] | None = None) -> int:
        names = components if components is not None else tuple(self.components)
        return sum(self.component_bytes(n) for n in names)

    # --- image tokenization (each model's own rule) -------------------------------------------
    def image_input_tokens(self, height: int, width: int) -> int:
        """Tokens an input image costs in this model's LLM (Qwen2-VL smart_resize rule)."""
        tok = self.image_tokenizer
        if not tok:
            raise ValueError(f"model {self.name} has no image_tokenizer (it takes no image input)")
        h, w = qwen2vl_smart_resize(height, width, tok["patch_size"] * tok["merge_size"],
                                    tok["min_pixels"], tok["max_pixels"])
        return (h // tok["patch_size"]) * (w // tok["patch_size"]) // tok["merge_size"] ** 2

    def resized_input(self, height: int, width: int) -> tuple[int, int]:
        tok = self.image_tokenizer
        return qwen2vl_smart_resize(height, width, tok["patch_size"] * tok["merge_size"],
                                    tok["min_pixels"], tok["max_pixels"])

    def latent_tokens(self, height: int, width: int) -> int:
        """DiT image tokens for an (H, W) image: latent patches (H/(8*2)) * (W/(8*2))."""
        f = self.latent["downsample"] * self.latent["patch_size"]
        return max(1, height // f) * max(1, width // f)

    def latent_bytes(self, height: int, width: int) -> int:
        d = self.latent["downsample"]
        return (height // d) * (width // d) * self.latent["channels"] * self.dtype_bytes


def qwen2vl_smart_resize(height: int, width: int, factor: int, min_pixels: int,
                         max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's smart_resize: round to multiples of `factor`, keep pixels within bounds.
    The arithmetic of transformers' `qwen2_vl.image_processing_qwen2_vl.smart_resize` (which
    vLLM 0.26 calls): a side that rounds to 0 goes through the min_pixels branch."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# LLM component kinds (conf/model `components.llm.kind`): the Hugging Face model_type they come
# from. Dense kinds share one closed form; the MoE kinds add routed (and shared) experts.
LLM_KINDS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
             "mixtral", "qwen2_moe", "qwen3_moe")
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe")
# the denoiser component is registered as `transformer` whatever its architecture (a UNet too):
# it is the network a dit_step runs once per transformer-batch item
DENOISER_KINDS = ("flux_dit", "sd3_dit", "qwen_image_mmdit", "unet2d_condition")


def llm_head_dim(c: dict[str, Any]) -> int:
    return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


def moe_layer_flags(c: dict[str, Any]) -> list[bool]:
    """Per decoder layer: True where the MLP is a routed-expert block (transformers' rule:
    layer i is sparse unless listed in mlp_only_layers, and (i + 1) % decoder_sparse_step == 0;
    Mixtral: every layer)."""
    L = c["num_hidden_layers"]
    if c["kind"] not in MOE_KINDS:
        return [False] * L
    if c["kind"] == "mixtral":
        return [True] * L
    step = int(c.get("decoder_sparse_step", 1) or 1)
    only = set(c.get("mlp_only_layers") or [])
    return [i not in only and (i + 1) % step == 0 for i in range(L)]


def moe_shape(c: dict[str, Any]) -> tuple[int, int, int, int]:
    """(experts, experts per token, params of one expert, params of the always-on shared expert
    incl. its gate) of one sparse layer; (0, 0, 0, 0) for a dense model."""
    kind = c["kind"]
    h = c["hidden_size"]
    if kind == "mixtral":
        return c["num_local_experts"], c["num_experts_per_tok"], 3 * h * c["intermediate_size"], 0
    if kind in ("qwen2_moe", "qwen3_moe"):
        shared = c.get("shared_expert_intermediate_size") or 0
        shared_p = 3 * h * shared + h if shared else 0      # shared expert + its sigmoid gate
        return c["num_experts"], c["num_experts_per_tok"], 3 * h * c["moe_intermediate_size"], shared_p
    return 0, 0, 0, 0


def llm_params(c: dict[str, Any]) -> dict[str, int]:
    """Parameters of a decoder-only LLM by part: `embed` (input table), `lm_head` (0 when tied),
    `dense` (attention, norms, dense MLPs, routers, shared experts: read for every token) and
    `experts` (routed experts of all sparse layers). `active_per_token` counts the experts a
    token runs through (top-k) instead of all of them."""
    kind = c["kind"]
    h, L, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    nq, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], llm_head_dim(c)
    q, kv = nq * hd, nkv * hd
    attn = h * q + 2 * h * kv + q * h
    if kind == "qwen2" or kind == "qwen2_moe":
        attn += q + 2 * kv                                   # q, k, v biases
    if kind in ("qwen3", "qwen3_moe", "gemma3_text"):
        attn += 2 * hd                                       # per-head q and k RMSNorm
    norms = (4 if kind in ("gemma2", "gemma3_text") else 2) * h
    E, k, pe, shared = moe_shape(c)
    sparse = moe_layer_flags(c)
    n_sparse = sum(sparse)
    dense_mlp = 3 * h * c["intermediate_size"] if kind != "mixtral" else 0
    dense = L * (attn + norms) + (L - n_sparse) * dense_mlp + n_sparse * (h * E + shared) + h
    experts = n_sparse * E * pe
    emb = v * h
    head = 0 if c.get("tie_word_embeddings") else v * h
    return {"embed": emb, "lm_head": head, "dense": dense, "experts": experts,
            "active_per_token": dense + n_sparse * k * pe}


def param_count(c: dict[str, Any]) -> int:
    """Parameter count of a component from its shapes (closed forms per architecture kind)."""
    kind = c["kind"]
    if kind in LLM_KINDS:
        p = llm_params(c)
        return p["embed"] + p["lm_head"] + p["dense"] + p["experts"]
    if kind == "unet2d_condition":
        return unet_walk(c, 0, 0, 0)[0]
    if kind == "qwen2_5_vl_vision":
        h, d, i = c["hidden_size"], c["depth"], c["intermediate_size"]
        patch = c["in_chans"] * c["temporal_patch_size"] * c["patch_size"] ** 2 * h
        block = 4 * h * h + 4 * h + 3 * h * i + 2 * i + h + 2 * h
        merge_in = h * c["spatial_merge_size"] ** 2
        merger = merge_in * merge_in + merge_in + merge_in * c["out_hidden_size"] + c["out_hidden_size"] + h
        return patch + d * block + merger
    if kind == "t5_encoder":
        d, f, L, v = c["d_model"], c["d_ff"], c["num_layers"], c["vocab_size"]
        inner = c["num_heads"] * c["d_kv"]
        return v * d + L * (4 * d * inner + 3 * d * f + 2 * d) + d
    if kind == "clip_text":
        h, L, i = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
        emb = c["vocab_size"] * h + c["max_position_embeddings"] * h
        block = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        return emb + L * block + 2 * h + h * c.get("projection_dim", h)
    if kind in ("qwen_image_mmdit", "flux_dit", "sd3_dit"):
        inner = c["num_attention_heads"] * c["attention_head_dim"]
        joint = c["joint_attention_dim"]
        # dual-stream block: per stream qkv+o (4 inner^2), MLP 4x (8 inner^2), adaLN (6 inner^2 each)
        dual = 2 * (4 + 8 + 6) * inner * inner
        single = (3 + 4 + 1 + 4 + 3) * inner * inner  # flux single block: qkv, mlp_in 4x, proj_out, adaLN
        layers = c.get("num_layers", 0)
        singles = c.get("num_single_layers", 0)
        io = c["in_channels"] * inner + joint * inner + inner * c.get("out_channels", c["in_channels"]) * 4
        return layers * dual + singles * single + io + 2 * inner * inner
    if kind in ("autoencoder_kl", "qwen_image_vae"):
        ch = c.get("block_out_channels") or [c["base_dim"] * m for m in c["dim_mult"]]
        per = sum(2 * c.get("layers_per_block", c.get("num_res_blocks", 2)) * 9 * x * x for x in ch)
        return 2 * per  # encoder + decoder, 3x3 convs dominate
    raise ValueError(f"component kind {kind!r} has no parameter formula")


@lru_cache(maxsize=None)
def available_models(conf_dir: str | None = None) -> tuple[str, ...]:
    d = Path(conf_dir) if conf_dir else CONF_DIR
    return tuple(sorted(p.stem for p in d.glob("*.yaml")))


@lru_cache(maxsize=None)
def load_model(name: str, conf_dir: str | None = None) -> ModelSpec:
    base, prec = split_variant(name)
    if prec is not None:
        return variant(load_model(base, conf_dir), prec)
    d = Path(conf_dir) if conf_dir else CONF_DIR
    path = d / f"{name}.yaml"
    if not path.exists():
        raise UnknownModelError(
            f"model={name!r} is unknown; allowed values: {list(available_models(conf_dir))}")
    raw = yaml.safe_load(path.read_text())
    if raw.get("family") not in FAMILIES:
        raise ValueError(f"{path}: family={raw.get('family')!r}; allowed values: {list(FAMILIES)}")
    if "defaults" in raw:
        raise ValueError(f"{path}: field 'defaults' is not allowed (Hydra reads it as a defaults "
                         f"list when the entry is selected with model={name}); allowed: "
                         f"'request_defaults' with the same content")
    bad = [t for t in raw.get("tasks", []) if t not in TASKS]
    if bad:
        raise ValueError(f"{path}: tasks {bad} unknown; allowed values: {list(TASKS)}")
    return ModelSpec(
        name=raw["name"], family=raw["family"], tasks=tuple(raw["tasks"]), dtype=raw["dtype"],
        components=raw["components"], hf_id=raw.get("hf_id", ""), edit_hf_id=raw.get("edit_hf_id", ""),
        # (a key written as null is the empty mapping the field's type says: no tokenizer, ...)
        image_tokenizer=raw.get("image_tokenizer") or {}, latent=raw.get("latent") or {},
        request_defaults=raw.get("request_defaults") or {}, condition_encoder=raw.get("condition_encoder"),
        condition_image_pixels=raw.get("condition_image_pixels"),
        text_encoders=tuple(raw.get("text_encoders", ())),
    )


def denoiser_width_layers(c: dict[str, Any]) -> tuple[int, int]:
    """(hidden width, transformer layers) of a denoiser, for communication estimates: a DiT's
    heads x head_dim and its (dual + single) blocks; a UNet's widest level and the transformer
    layers of all its cross-attention blocks (an upper bound: lower levels are narrower)."""
    if c["kind"] == "unet2d_condition":
        n = len(c["block_out_channels"])
        tl = _as_list(c.get("transformer_layers_per_block", 1), n)
        lpb = _as_list(c.get("layers_per_block", 2), n)
        down = sum(tl[i] * lpb[i] for i, b in enumerate(c["down_block_types"]) if b.startswith("CrossAttn"))
        up = sum(tl[::-1][i] * (lpb[::-1][i] + 1) for i, b in enumerate(c["up_block_types"])
                 if b.startswith("CrossAttn"))
        return int(max(c["block_out_channels"])), int(down + tl[-1] + up)
    return (int(c["num_attention_heads"] * c["attention_head_dim"]),
            int(c.get("num_layers", 0) + c.get("num_single_layers", 0)))


def _as_list(x: Any, n: int) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x] * n


def unet_walk(c: dict[str, Any], h: int, w: int, text_tokens: int,
              attention: bool = True) -> tuple[int, float, float]:
    """(parameters, multiply-accumulates, activation elements read + written) of one forward pass
    of a diffusers UNet2DConditionModel on an h x w latent (one batch item), walking its blocks
    as diffusers builds them: conv_in, time (+ SDXL text_time) embedding, down blocks (ResNets,
    cross-attention transformers, strided downsample convs), the cross-attention mid block, up
    blocks (ResNets on skip-concatenated inputs, transformers, upsample convs), conv_out.

    Attention is counted as 2 N^2 d (self) and 2 N T d (cross) MACs per transformer layer
    (flash attention: scores never written; `attention=False` leaves these score and value
    products out); h = w = 0 gives the parameter count alone."""
    chs = list(c["block_out_channels"])
    n = len(chs)
    lpb = _as_list(c.get("layers_per_block", 2), n)
    tl = _as_list(c.get("transformer_layers_per_block", 1), n)
    cross = int(c["cross_attention_dim"])
    temb = 4 * chs[0]
    P = 0
    M = 0.0
    A = 0.0

    def conv(cin: int, cout: int, pix: float, k: int = 3) -> None:
        nonlocal P, M, A
        P += k * k * cin * cout + cout
        M += k * k * cin * cout * pix
        A += (cin + cout) * pix

    def resnet(cin: int, cout: int, pix: float) -> None:
        nonlocal P, A
        P += 2 * cin + temb * cout + cout + 2 * cout      # norm1, time_emb_proj, norm2
        conv(cin, cout, pix)
        conv(cout, cout, pix)
        if cin != cout:
            conv(cin, cout, pix, 1)
        A += 2 * (cin + cout) * pix                       # group norms + activations

    def transformer(d: int, layers: int, pix: float) -> None:
        nonlocal P, M, A
        N, T = pix, text_tokens
        P += 2 * d + 2 * (d * d + d)                      # group norm, proj_in, proj_out
        M += 2 * d * d * N
        per = (3 * d * d + d * d + d) + (d * d + 2 * cross * d + d * d + d) + 6 * d \
            + (d * 8 * d + 8 * d) + (4 * d * d + d)       # attn1, attn2, 3 norms, GEGLU ff
        P += layers * per
        M += layers * (N * (4 * d * d + 2 * d * d + 12 * d * d) + T * 2 * cross * d
                       + ((2 * N * N * d + 2 * N * T * d) if attention else 0))
        A += layers * N * d * 24 + 4 * N * d

    pix0 = float(h * w)
    conv(c["in_channels"], chs[0], pix0)
    P += chs[0] * temb + temb + temb * temb + temb        # time_embedding
    if c.get("addition_embed_type") == "text_time":
        pc = c["projection_class_embeddings_input_dim"]
        P += pc * temb + temb + temb * temb + temb        # add_embedding
    skips = [chs[0]]
    cin = chs[0]
    for i, bt in enumerate(c["down_block_types"]):
        pix = pix0 / 4 ** i
        for _ in range(lpb[i]):
            resnet(cin, chs[i], pix)
            cin = chs[i]
            if bt.startswith("CrossAttn"):
                transformer(chs[i], tl[i], pix)
            skips.append(cin)
        if i < n - 1:
            conv(cin, cin, pix / 4)
            skips.append(cin)
    pix = pix0 / 4 ** (n - 1)
    resnet(chs[-1], chs[-1], pix)
    transformer(chs[-1], tl[-1], pix)
    resnet(chs[-1], chs[-1], pix)
    rch, rtl, rl = chs[::-1], tl[::-1], lpb[::-1]
    prev = rch[0]
    for i, bt in enumerate(c["up_block_types"]):
        pix = pix0 / 4 ** (n - 1 - i)
        for j in range(rl[i] + 1):
            skip = skips.pop()
            resnet((prev if j == 0 else rch[i]) + skip, rch[i], pix)
            if bt.startswith("CrossAttn"):
                transformer(rch[i], rtl[i], pix)
        prev = rch[i]
        if i < n - 1:
            conv(rch[i], rch[i], pix * 4)
    P += 2 * chs[0]                                        # conv_norm_out
    conv(chs[0], c.get("out_channels", c["in_channels"]), pix0)
    return P, M, A


def variant(spec: ModelSpec, precision: str) -> ModelSpec:
    """The precision variant `precision` of a base model spec (see PRECISIONS)."""
    if precision not in PRECISIONS:
        raise UnknownModelError(f"model={spec.name}{VARIANT_SEP}{precision!r}: precision "
                                f"{precision!r} is unknown; allowed: {sorted(PRECISIONS)}")
    if precision == "bf16":
        return spec
    p = PRECISIONS[precision]
    from dataclasses import replace
    return replace(spec, name=f"{spec.name}{VARIANT_SEP}{precision}", precision=precision,
                   quant_dtype=p.weights, kv_dtype=p.kv,
                   condition_encoder=(with_precision(spec.condition_encoder, precision)
                                      if spec.condition_encoder else None))
