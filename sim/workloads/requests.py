"""What every request source shares: image tokens in each model's own tokenization, model and
task validation, and the Request objects built from column lists."""
from __future__ import annotations

import gc
import math
from collections.abc import Mapping
from typing import Any

from profiler.models import TASKS, ModelSpec, UnknownModelError, available_models, load_model
from sim.config import ConfigError
from sim.core.records import Request
from sim.names import IMAGE_IN_TASKS, IMAGE_OUT_TASKS

# ------------------------------------------------------------------------------------------
# Image tokens: the single definition everyone imports
# ------------------------------------------------------------------------------------------


def condition_image_size(h: int, w: int, target_pixels: int) -> tuple[int, int]:
    """Qwen-Image-Edit's condition copy: same aspect ratio, area ~ target_pixels, sides rounded
    to multiples of 32 (diffusers `calculate_dimensions`)."""
    ratio = w / h
    cw = math.sqrt(target_pixels * ratio)
    ch = cw / ratio
    return max(32, round(ch / 32) * 32), max(32, round(cw / 32) * 32)


def image_tokens(spec: ModelSpec, task: str, input_images: tuple[tuple[int, int], ...],
                 output_image: tuple[int, int] | None) -> tuple[int, int]:
    """(image_tokens_in, image_tokens_out) of a request in the serving model's own tokenization.

    In: VLMs (an `image_tokenizer`): Qwen2-VL smart_resize tokens of each input image. AR+DiT
    models with a `condition_encoder` (Qwen-Image-Edit): the encoder's tokens of a copy resized
    to `condition_image_pixels`. DiT-only models (FLUX, SD3): latent patches of each input.
    Out: latent patches of the output image (0 for text output). `task` is part of the
    signature so task-specific rules can be added without changing callers.
    """
    tin = 0
    if input_images:
        if spec.image_tokenizer:
            tin = sum(spec.image_input_tokens(h, w) for h, w in input_images)
        elif spec.condition_encoder:
            enc = load_model(spec.condition_encoder)
            px = spec.condition_image_pixels
            for h, w in input_images:
                ch, cw = condition_image_size(h, w, px) if px else (h, w)
                tin += enc.image_input_tokens(ch, cw)
        elif spec.latent:
            tin = sum(spec.latent_tokens(h, w) for h, w in input_images)
        else:
            raise ValueError(f"model {spec.name} cannot take input images (task {task})")
    tout = spec.latent_tokens(*output_image) if output_image is not None and spec.latent else 0
    return tin, tout


def resolve_model(name: str, fieldname: str) -> ModelSpec:
    """load_model with a ConfigError naming the field and the available models."""
    try:
        return load_model(name)
    except UnknownModelError:
        raise ConfigError(f"{fieldname}={name!r} is invalid; allowed: one of "
                          f"{list(available_models())}") from None


def check_task_model(task: str, spec: ModelSpec, fieldname: str) -> None:
    """Refuse a (task, model) pair the model cannot serve, before any simulation."""
    if task not in TASKS:
        raise ConfigError(f"{fieldname}: task={task!r} is invalid; allowed: one of {list(TASKS)}")
    if task not in spec.tasks:
        raise ConfigError(f"{fieldname}={spec.name!r} cannot serve task {task!r}; allowed: a model "
                          f"whose tasks include {task!r} (this one serves {list(spec.tasks)})")
    if task in IMAGE_IN_TASKS and not (spec.image_tokenizer or spec.condition_encoder or spec.latent):
        raise ConfigError(f"{fieldname}={spec.name!r} has no image tokenizer for task {task!r}")
    if task in IMAGE_OUT_TASKS and not spec.latent:
        raise ConfigError(f"{fieldname}={spec.name!r} has no latent spec for image task {task!r}")


class TokenCache:
    """Memoised `image_tokens`: sizes are multiples of round_to, so few distinct shapes occur."""

    def __init__(self) -> None:
        self._d: dict[tuple[Any, ...], tuple[int, int]] = {}

    def get(self, spec: ModelSpec, task: str, ins: tuple[tuple[int, int], ...],
            out: tuple[int, int] | None) -> tuple[int, int]:
        key = (spec.name, task, ins, out)
        v = self._d.get(key)
        if v is None:
            v = self._d[key] = image_tokens(spec, task, ins, out)
        return v


def build_requests(first_id: int, arrival: list[float], task: list[str], model: list[str],
                   prompt: list[int], output: list[int],
                   inputs: list[tuple[tuple[int, int], ...]], out_img: list[tuple[int, int] | None],
                   steps: list[int], cfgf: list[bool], slo: list[str],
                   specs: Mapping[str, ModelSpec], cache: TokenCache,
                   image_ids: list[tuple[int, ...]] | None = None) -> list[Request]:
    """Request objects from column lists (shared by synthetic and trace workloads).

    The cyclic GC is paused while a chunk is built: tens of thousands of fresh container
    objects otherwise trigger repeated full collections that double the cost, and nothing
    built here forms a cycle."""
    reqs: list[Request] = []
    append, get = reqs.append, cache.get
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(len(arrival)):   # (by index: compiled, native list reads)
            t, m, ins, oi = task[i], model[i], inputs[i], out_img[i]
            tin, tout = get(specs[m], t, ins, oi) if (ins or oi is not None) else (0, 0)
            append(Request(first_id + i, arrival[i], t, m, prompt[i], output[i], ins, oi, steps[i],
                           cfgf[i], slo[i], image_tokens_in=tin, image_tokens_out=tout,
                           image_ids=image_ids[i] if image_ids is not None else ()))
    finally:
        if was_enabled:
            gc.enable()
    return reqs
