"""The simulator's name families, each defined once and imported everywhere else.

Task and stage names are part of the contract with the profiler (profile tables, model
registry), so they are defined there (`profiler.models.TASKS`, `profiler.schema.STAGES`) and
bound here to constants. Policy names are the keys of `sim.policies.POLICIES`.
"""
from __future__ import annotations

from profiler.models import TASKS
from profiler.schema import STAGES

# --- tasks: what a request asks for ------------------------------------------------------------
TEXT, UNDERSTAND, GENERATE, EDIT, INPAINT, OUTPAINT = TASKS
TEXT_OUT_TASKS = (TEXT, UNDERSTAND)                       # text out: TTFT / TPOT apply
IMAGE_OUT_TASKS = (GENERATE, EDIT, INPAINT, OUTPAINT)     # an output image (DiT + VAE)
IMAGE_IN_TASKS = (UNDERSTAND, EDIT, INPAINT, OUTPAINT)    # input image(s)

# --- stages: what a GPU (or the network) spends time on ------------------------------------------
(PREPROCESS, VISION_ENCODE, TEXT_ENCODE, PREFILL, DECODE, DIT_STEP, VAE_ENCODE, VAE_DECODE,
 POSTPROCESS, TRANSFER) = STAGES
# A request's hop through an AR (vLLM-like) engine: one hop, recorded as its PREFILL and DECODE
# stages (and VISION_ENCODE when the engine encodes the images inside its step).
AR = "ar"
# hops (sim.engines.pipeline) in the order a request can take them
HOP_STAGES = (VISION_ENCODE, AR, TEXT_ENCODE, VAE_ENCODE, DIT_STEP, VAE_DECODE)

__all__ = ["TASKS", "STAGES", "TEXT", "UNDERSTAND", "GENERATE", "EDIT", "INPAINT", "OUTPAINT",
           "TEXT_OUT_TASKS", "IMAGE_OUT_TASKS", "IMAGE_IN_TASKS", "PREPROCESS", "VISION_ENCODE",
           "TEXT_ENCODE", "PREFILL", "DECODE", "DIT_STEP", "VAE_ENCODE", "VAE_DECODE",
           "POSTPROCESS", "TRANSFER", "AR", "HOP_STAGES"]
