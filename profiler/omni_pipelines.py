"""Random-weight subclasses of vLLM-Omni 0.26.0's own pipelines (imported only inside the server).

`profiler.omni_plugin.register` (a `vllm_omni.general_plugins` entry point, loaded by vLLM-Omni
in the API server, the diffusion stage process and every worker) registers these classes under
the built-in architecture names (`register_diffusion_model`, vllm_omni/diffusion/registry.py:590,
"replace an existing built-in pipeline"), so `vllm serve <dir> --omni` runs vLLM-Omni's own
pipeline code — scheduler, runner, torch.compile, attention backend, CFG, VAE, pre/post-processing
— and only construction and weight loading differ:

- Hugging Face modules the pipelines load with `from_pretrained` (the Qwen2.5-VL text encoder,
  CLIP-L, the VAEs) are built from the folder's config.json with `from_config` instead;
- `weights_sources` is emptied, so vLLM-Omni's loader reads no checkpoint, and `load_weights`
  fills every floating-point parameter with vLLM's own dummy values
  (`initialize_single_dummy_weight`: uniform(-1e-3, 1e-3), per-parameter seed — what
  `vllm serve --load-format dummy` does for LLMs). The modules were allocated on the GPU by the
  loader (`with target_device:`), so this takes seconds for 20B parameters.

With MMSIM_OMNI_STAGELOG=<path>, every pipeline forward (one request batch) appends a JSON line:
wall-clock start/end, request ids, batch size, shape, steps, CFG and, when the server runs with
`--enable-diffusion-pipeline-profiler`, vLLM-Omni's own stage durations for that batch. The line
is written after a device synchronize that the runner's output copy would do anyway.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Iterable, Iterator

import torch

from vllm_omni.diffusion.models.flux.pipeline_flux import (  # noqa: F401 (re-exported post-process hook)
    FluxPipeline, get_flux_post_process_func)
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import (  # noqa: F401
    QwenImagePipeline, get_qwen_image_post_process_func)
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image_edit import (  # noqa: F401
    QwenImageEditPipeline, get_qwen_image_edit_post_process_func, get_qwen_image_edit_pre_process_func)

__all__ = ["RandomQwenImagePipeline", "RandomQwenImageEditPipeline", "RandomFluxPipeline",
           "config_only_from_pretrained", "fill_dummy",
           # vLLM-Omni's pre/post-process hooks, looked up in this module once it is registered
           "get_flux_post_process_func", "get_qwen_image_post_process_func",
           "get_qwen_image_edit_pre_process_func", "get_qwen_image_edit_post_process_func"]
STAGELOG_ENV = "MMSIM_OMNI_STAGELOG"
DUMMY_LOW, DUMMY_HIGH = -1e-3, 1e-3


def _hf_from_config(cls, pretrained: str, *args: Any, subfolder: str | None = None, **kwargs: Any):
    """transformers PreTrainedModel.from_pretrained without weights: config + _from_config."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(pretrained, subfolder=subfolder or "")
    return cls._from_config(cfg, dtype=kwargs.get("torch_dtype") or kwargs.get("dtype")
                            or torch.get_default_dtype())


def _diffusers_from_config(cls, pretrained: str, *args: Any, subfolder: str | None = None, **kwargs: Any):
    """diffusers ModelMixin.from_pretrained without weights: load_config + from_config."""
    cfg = cls.load_config(pretrained, subfolder=subfolder)
    m = cls.from_config(cfg)
    dtype = kwargs.get("torch_dtype") or torch.get_default_dtype()
    return m.to(dtype=dtype)


@contextlib.contextmanager
def config_only_from_pretrained() -> Iterator[None]:
    """Within the block, transformers and diffusers model `from_pretrained` build from config.
    Tokenizers, processors and schedulers still load their files (they are in the folder)."""
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel
    saved = (PreTrainedModel.__dict__["from_pretrained"], ModelMixin.__dict__["from_pretrained"])
    PreTrainedModel.from_pretrained = classmethod(_hf_from_config)
    ModelMixin.from_pretrained = classmethod(_diffusers_from_config)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained, ModelMixin.from_pretrained = saved


def fill_dummy(module: torch.nn.Module) -> set[str]:
    """vLLM's dummy weights in every floating-point parameter; returns the parameter names."""
    from vllm.model_executor.model_loader.weight_utils import initialize_single_dummy_weight
    names = set()
    with torch.no_grad():
        for name, p in module.named_parameters():
            initialize_single_dummy_weight(p.data, DUMMY_LOW, DUMMY_HIGH)
            names.add(name)
    return names


def _describe(req: Any) -> dict[str, Any]:
    """Shape of one request batch, for the stage log."""
    sps = list(getattr(req, "sampling_params_list", []) or [])
    sp = sps[0] if sps else None
    prompts = list(getattr(req, "prompts", []) or [])
    neg = [p.get("negative_prompt") is not None for p in prompts if isinstance(p, dict)]
    return {"request_ids": list(getattr(req, "request_ids", []) or []), "batch_size": len(sps),
            "seeds": [getattr(p, "seed", None) for p in sps],
            "height": getattr(sp, "height", None), "width": getattr(sp, "width", None),
            "num_inference_steps": getattr(sp, "num_inference_steps", None),
            "negative_prompt": neg, "true_cfg_scale": getattr(sp, "true_cfg_scale", None)}


class _RandomWeights:
    """Mixin: config-only construction, no checkpoint, dummy weights, optional stage log."""

    def _mmsim_init(self, base: type, od_config: Any, prefix: str) -> None:
        with config_only_from_pretrained():
            base.__init__(self, od_config=od_config, prefix=prefix)
        self.weights_sources = []          # the loader reads nothing from disk
        self._mmsim_stagelog = os.environ.get(STAGELOG_ENV) or None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for _ in weights:                  # empty: weights_sources is []
            pass
        return fill_dummy(self)

    def _mmsim_forward(self, base: type, req: Any) -> Any:
        if not self._mmsim_stagelog:
            return base.forward(self, req)
        t0 = time.time()
        out = base.forward(self, req)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t1 = time.time()
        rec = dict(_describe(req), t_start=round(t0, 6), t_end=round(t1, 6),
                   forward_s=round(t1 - t0, 6), pipeline=base.__name__, pid=os.getpid())
        if getattr(self, "enable_diffusion_pipeline_profiler", False):
            rec["stage_durations"] = {k: round(float(v), 6) for k, v in self.stage_durations.items()}
        with open(self._mmsim_stagelog, "a") as f:   # one short append per batch
            f.write(json.dumps(rec) + "\n")
        return out


class RandomQwenImagePipeline(_RandomWeights, QwenImagePipeline):
    def __init__(self, *, od_config: Any, prefix: str = "") -> None:
        self._mmsim_init(QwenImagePipeline, od_config, prefix)

    def forward(self, req: Any) -> Any:
        return self._mmsim_forward(QwenImagePipeline, req)


class RandomQwenImageEditPipeline(_RandomWeights, QwenImageEditPipeline):
    def __init__(self, *, od_config: Any, prefix: str = "") -> None:
        self._mmsim_init(QwenImageEditPipeline, od_config, prefix)

    def forward(self, req: Any) -> Any:
        return self._mmsim_forward(QwenImageEditPipeline, req)


class RandomFluxPipeline(_RandomWeights, FluxPipeline):
    # vLLM-Omni's profiler times text_encoder (CLIP-L) but not T5-XXL (text_encoder_2); with the
    # profiler on (it is off by default) FLUX's stage durations then cover both encoders
    _PROFILER_TARGETS = FluxPipeline._PROFILER_TARGETS + ["text_encoder_2.forward"]

    def __init__(self, *, od_config: Any, prefix: str = "") -> None:
        self._mmsim_init(FluxPipeline, od_config, prefix)

    def forward(self, req: Any, **kwargs: Any) -> Any:
        return self._mmsim_forward(FluxPipeline, req)
