"""diffusers backend: text encoders, DiT steps and VAE encode/decode with random weights.

Every network is built from the yaml shapes (conf/model/*.yaml) with random weights in the
configured dtype directly on the target device (`torch.set_default_dtype` + `with
torch.device(...)`), so a 20B DiT builds in about a second and no checkpoint is downloaded.
The same code runs on the CPU with tiny configs (tests) and on the GPU (sweeps).
"""
from __future__ import annotations

import gc
import inspect
from contextlib import contextmanager
from typing import Any

from profiler.backends.base import Backend, RunContext, summarize, time_callable

DIT_KINDS = {"qwen_image_mmdit": "QwenImageTransformer2DModel",
             "flux_dit": "FluxTransformer2DModel",
             "sd3_dit": "SD3Transformer2DModel",
             "unet2d_condition": "UNet2DConditionModel"}   # the denoiser of SDXL-style pipelines


# dit_step calls shorter than this are timed back to back (cfg.dit_chain): their kernel-launch time
# is comparable to their GPU time, and a denoising loop overlaps the two
CHAIN_BELOW_MS = 250.0


def _filter_kwargs(cls, cfg: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in cfg.items()
            if k in params and k != "self"}


def torch_dtype(name: str):
    import torch
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


@contextmanager
def default_dtype(dtype):
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_component(spec, comp: str, device: str, dtype_name: str, fp8_impl: str = "auto"):
    """Random-weight module for component `comp` of `spec` (eval mode, on `device`); a precision
    variant's quantized component (spec.weight_dtype(comp) == "fp8") gets FP8 linear layers."""
    import torch
    cfg = dict(spec.components[comp])
    kind = cfg.pop("kind")
    dtype = torch_dtype(dtype_name)
    with default_dtype(dtype), torch.device(device):
        if kind in DIT_KINDS:
            import diffusers
            cls = getattr(diffusers, DIT_KINDS[kind])
            m = cls(**_filter_kwargs(cls, cfg))
        elif kind == "autoencoder_kl":
            from diffusers import AutoencoderKL
            n = len(cfg["block_out_channels"])
            kw = _filter_kwargs(AutoencoderKL, cfg)
            kw.update(down_block_types=("DownEncoderBlock2D",) * n,
                      up_block_types=("UpDecoderBlock2D",) * n, force_upcast=False)
            m = AutoencoderKL(**kw)
        elif kind == "qwen_image_vae":
            from diffusers import AutoencoderKLQwenImage
            m = AutoencoderKLQwenImage(**_filter_kwargs(AutoencoderKLQwenImage, cfg))
        elif kind == "t5_encoder":
            from transformers import T5Config, T5EncoderModel
            tc = T5Config(d_model=cfg["d_model"], d_ff=cfg["d_ff"], d_kv=cfg["d_kv"],
                          num_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
                          vocab_size=cfg["vocab_size"],
                          feed_forward_proj=cfg.get("feed_forward_proj", "gated-gelu"))
            m = T5EncoderModel(tc)
        elif kind == "clip_text":
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection
            cc = CLIPTextConfig(hidden_size=cfg["hidden_size"],
                                intermediate_size=cfg["intermediate_size"],
                                num_hidden_layers=cfg["num_hidden_layers"],
                                num_attention_heads=cfg["num_attention_heads"],
                                max_position_embeddings=cfg["max_position_embeddings"],
                                vocab_size=cfg["vocab_size"],
                                projection_dim=cfg.get("projection_dim", cfg["hidden_size"]))
            m = CLIPTextModelWithProjection(cc)
        else:
            raise ValueError(f"no diffusers builder for component kind {kind!r}")
    m = m.to(device=device, dtype=dtype).eval()
    m.requires_grad_(False)
    if spec.weight_dtype(comp) == "fp8":
        m._fp8_impl = quantize_fp8(m, fp8_impl)
    return m


FP8_MAX = 448.0             # largest finite float8_e4m3fn


def quantize_fp8(m, impl: str = "auto") -> str:
    """FP8 weights with dynamic per-token activation scales on every nn.Linear of `m` (a DiT's
    transformer), what diffusers offers on Hopper through torchao's Float8DynamicActivation-
    Float8Weight (per-row scales). impl: torchao | builtin | auto (torchao when importable, else
    the builtin Fp8Linear: the same arithmetic on torch._scaled_mm). Returns what was used."""
    if impl in ("auto", "torchao"):
        try:
            import torchao
            from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, PerRow,
                                              quantize_)
            quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            return f"torchao {torchao.__version__} Float8DynamicActivationFloat8WeightConfig(PerRow)"
        except ImportError:
            if impl == "torchao":
                raise
    import torch
    n = 0
    for name, child in list(m.named_modules()):
        for cname, sub in list(child.named_children()):
            if type(sub) is torch.nn.Linear and sub.in_features % 16 == 0 and sub.out_features % 16 == 0:
                setattr(child, cname, Fp8Linear(sub))
                n += 1
    return f"builtin Fp8Linear (torch._scaled_mm, per-row scales) on {n} linear layers"


def _fp8_linear_class():
    import torch

    class Fp8Linear(torch.nn.Module):
        """y = x W^T + b with W in float8_e4m3fn (one scale per output row) and x quantized per
        token at run time; torch._scaled_mm on CUDA, the dequantized product elsewhere (tests)."""

        def __init__(self, lin: "torch.nn.Linear"):
            super().__init__()
            w = lin.weight.detach()
            scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
            self.register_buffer("w", (w.float() / scale).to(torch.float8_e4m3fn))   # (out, in)
            self.register_buffer("w_scale", scale.t().contiguous())                  # (1, out)
            self.bias = lin.bias
            self.out_features = lin.out_features

        def forward(self, x):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            xs = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
            xq = (x2.float() / xs).to(torch.float8_e4m3fn)
            if x.is_cuda:
                y = torch._scaled_mm(xq, self.w.t(), scale_a=xs, scale_b=self.w_scale,
                                     out_dtype=x.dtype)
            else:
                y = ((xq.float() * xs) @ (self.w.float() * self.w_scale.t()).t()).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*shape[:-1], self.out_features)
    return Fp8Linear


def Fp8Linear(lin):     # noqa: N802 - a class made on first use (torch imported lazily)
    global _FP8_CLS
    try:
        cls = _FP8_CLS
    except NameError:
        cls = _FP8_CLS = _fp8_linear_class()
    return cls(lin)


def latent_grid(spec, height: int, width: int) -> tuple[int, int]:
    """(h, w) in DiT tokens per side: image / (vae downsample * patch)."""
    f = spec.latent["downsample"] * spec.latent["patch_size"]
    return max(1, height // f), max(1, width // f)


def dit_inputs(spec, p: dict, device: str, dtype) -> dict[str, Any]:
    """Forward kwargs for one DiT step at point p (random data, never zeros)."""
    import torch
    c = spec.components["transformer"]
    kind = c["kind"]
    B, T, H, W = p["batch_size"], p["num_tokens"], p["height"], p["width"]
    gh, gw = latent_grid(spec, H, W)
    S = p["seq_len"]
    n_img = S // (gh * gw)  # 1 = generate, 2 = edit (condition latents concatenated)
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    ts = torch.rand(B, generator=g).to(device=device, dtype=dtype)
    if kind == "flux_dit":
        ids = []
        for k in range(n_img):
            yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            ids.append(torch.stack([torch.full_like(yy, k), yy, xx], -1).reshape(-1, 3))
        kw = dict(hidden_states=rnd(B, S, c["in_channels"]),
                  encoder_hidden_states=rnd(B, T, c["joint_attention_dim"]),
                  pooled_projections=rnd(B, c["pooled_projection_dim"]), timestep=ts,
                  img_ids=torch.cat(ids).to(device=device, dtype=dtype),
                  txt_ids=torch.zeros(T, 3, device=device, dtype=dtype), return_dict=False)
        if c.get("guidance_embeds"):
            kw["guidance"] = torch.full((B,), 3.5, device=device, dtype=dtype)
        return kw
    if kind == "qwen_image_mmdit":
        return dict(hidden_states=rnd(B, S, c["in_channels"]),
                    encoder_hidden_states=rnd(B, T, c["joint_attention_dim"]),
                    encoder_hidden_states_mask=torch.ones(B, T, device=device, dtype=torch.long),
                    timestep=ts, img_shapes=[[(1, gh, gw)] * n_img] * B, return_dict=False)
    if kind == "unet2d_condition":
        d = spec.latent["downsample"]
        kw = dict(sample=rnd(B, c["in_channels"], H // d, W // d), timestep=ts * 1000,
                  encoder_hidden_states=rnd(B, T, c["cross_attention_dim"]), return_dict=False)
        if c.get("addition_embed_type") == "text_time":
            # SDXL: pooled text embedding + 6 micro-conditioning ids (sizes, crop)
            pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
            kw["added_cond_kwargs"] = {"text_embeds": rnd(B, pooled), "time_ids": rnd(B, 6)}
        return kw
    if kind == "sd3_dit":
        d = spec.latent["downsample"]
        return dict(hidden_states=rnd(B, c["in_channels"], H // d, W // d),
                    encoder_hidden_states=rnd(B, T, c["joint_attention_dim"]),
                    pooled_projections=rnd(B, c["pooled_projection_dim"]),
                    timestep=ts * 1000, return_dict=False)
    raise ValueError(kind)


class DiffusersBackend(Backend):
    name = "diffusers"

    def __init__(self) -> None:
        self._cache: tuple[str, str, Any] | None = None  # (model, component, module)

    def engine_version(self) -> str:
        import diffusers
        return diffusers.__version__

    # ---------------------------------------------------------------- planning
    def plan(self, spec, grid) -> list[dict]:
        from profiler.grid import plan_diffusers
        return plan_diffusers(spec, grid)

    # ---------------------------------------------------------------- measuring
    def _module(self, spec, comp: str, ctx: RunContext):
        if self._cache and self._cache[:2] == (spec.name, comp):
            return self._cache[2]
        self.release()
        m = build_component(spec, comp, ctx.device, ctx.cfg.dtype,
                            str(ctx.cfg.get("dit_fp8", "auto")))
        self._cache = (spec.name, comp, m)
        return m

    def release(self) -> None:
        self._cache = None
        _free_gpu_memory()

    def cleanup_after_error(self, ctx: RunContext) -> None:
        _free_gpu_memory()

    def make_call(self, spec, p: dict, ctx: RunContext):
        """Builds inputs for point p; returns a no-arg callable running one forward pass."""
        import torch
        dtype = torch_dtype(ctx.cfg.dtype)
        dev = ctx.device
        stage, comp = p["stage"], p["component"]
        m = self._module(spec, comp, ctx)
        g = torch.Generator(device="cpu").manual_seed(1)
        B = p["batch_size"]
        if stage == "dit_step":
            kw = dit_inputs(spec, p, dev, dtype)
            return lambda: m(**kw)
        if stage == "text_encode":
            vocab = spec.components[comp]["vocab_size"]
            ids = torch.randint(0, vocab, (B, p["num_tokens"]), generator=g).to(dev)
            return lambda: m(input_ids=ids)
        kind = spec.components[comp]["kind"]
        H, W = p["height"], p["width"]
        d = spec.latent["downsample"]
        zc = spec.latent["channels"]
        video = kind == "qwen_image_vae"
        if stage == "vae_encode":
            shape = (B, 3, 1, H, W) if video else (B, 3, H, W)
            x = torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)
            return lambda: m.encode(x, return_dict=False)
        if stage == "vae_decode":
            shape = (B, zc, 1, H // d, W // d) if video else (B, zc, H // d, W // d)
            z = torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)
            return lambda: m.decode(z, return_dict=False)
        raise ValueError(f"diffusers backend has no stage {stage!r}")

    def measure_point(self, spec, p: dict, ctx: RunContext) -> dict:
        import torch
        cfg = ctx.cfg
        cuda = str(ctx.device).startswith("cuda")
        fn = self.make_call(spec, p, ctx)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        chain = int(cfg.get("dit_chain", 1)) if p["stage"] == "dit_step" else 1
        with torch.inference_mode():
            first = time_callable(fn, ctx.device, int(cfg.warmup), 1)
            if first[0] > CHAIN_BELOW_MS:      # GPU-bound: launch time hidden anyway
                chain = 1
            samples = first if chain == 1 else []
            samples += time_callable(fn, ctx.device, 0, max(1, int(cfg.repeats) - len(samples)),
                                     max_seconds=float(cfg.max_point_seconds), chain=chain)
        row = dict(p)
        row.update(summarize(samples))
        row["status"] = "ok"
        row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else None
        m = self._cache[2] if self._cache else None
        row["engine_settings"] = {"attention": "diffusers default (SDPA)", "compile": False,
                                  "fp8": getattr(m, "_fp8_impl", None),
                                  "warmup": int(cfg.warmup), "repeats": int(cfg.repeats),
                                  "max_point_seconds": float(cfg.max_point_seconds),
                                  "chain": chain}
        return row


def _free_gpu_memory() -> None:
    """Drop unreachable tensors and return cached blocks, so the next point (or the next model
    after an OOM) starts from a clean allocator."""
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
