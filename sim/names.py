"""The simulator's name families, each defined once and imported everywhere else.

Task and stage names are part of the contract with the profiler (profile tables, model
registry), so they are defined there (`profiler.models.TASKS`, `profiler.schema.STAGES`); here
they are constants checked against those at import. Policy names are the keys of `sim.policies.POLICIES`.
"""
from __future__ import annotations

from typing import Final

from profiler.models import TASKS
from profiler.schema import STAGES

# Each name is written out as a Final literal, so compiled modules use the string itself rather
# than looking the name up at every use; the checks below bind them to the profiler's schema
# (a renamed task or stage there fails every import of the simulator until it is renamed here).

# --- tasks: what a request asks for ------------------------------------------------------------
TEXT: Final = "text"
UNDERSTAND: Final = "understand"
GENERATE: Final = "generate"
EDIT: Final = "edit"
INPAINT: Final = "inpaint"
OUTPAINT: Final = "outpaint"
TEXT_OUT_TASKS: Final = (TEXT, UNDERSTAND)                       # text out: TTFT / TPOT apply
IMAGE_OUT_TASKS: Final = (GENERATE, EDIT, INPAINT, OUTPAINT)     # an output image (DiT + VAE)
IMAGE_IN_TASKS: Final = (UNDERSTAND, EDIT, INPAINT, OUTPAINT)    # input image(s)

# --- stages: what a GPU (or the network) spends time on ------------------------------------------
PREPROCESS: Final = "preprocess"
VISION_ENCODE: Final = "vision_encode"
TEXT_ENCODE: Final = "text_encode"
PREFILL: Final = "prefill"
DECODE: Final = "decode"
DIT_STEP: Final = "dit_step"
VAE_ENCODE: Final = "vae_encode"
VAE_DECODE: Final = "vae_decode"
POSTPROCESS: Final = "postprocess"
TRANSFER: Final = "transfer"
# A request's hop through an AR (vLLM-like) engine: one hop, recorded as its PREFILL and DECODE
# stages (and VISION_ENCODE when the engine encodes the images inside its step).
AR: Final = "ar"
# hops (sim.engines.pipeline) in the order a request can take them
HOP_STAGES: Final = (VISION_ENCODE, AR, TEXT_ENCODE, VAE_ENCODE, DIT_STEP, VAE_DECODE)

if (TEXT, UNDERSTAND, GENERATE, EDIT, INPAINT, OUTPAINT) != TASKS:
    raise ImportError(f"sim.names: the task names differ from profiler.models.TASKS {TASKS}")
if (PREPROCESS, VISION_ENCODE, TEXT_ENCODE, PREFILL, DECODE, DIT_STEP, VAE_ENCODE, VAE_DECODE,
        POSTPROCESS, TRANSFER) != STAGES:
    raise ImportError(f"sim.names: the stage names differ from profiler.schema.STAGES {STAGES}")

__all__ = ["TASKS", "STAGES", "TEXT", "UNDERSTAND", "GENERATE", "EDIT", "INPAINT", "OUTPAINT",
           "TEXT_OUT_TASKS", "IMAGE_OUT_TASKS", "IMAGE_IN_TASKS", "PREPROCESS", "VISION_ENCODE",
           "TEXT_ENCODE", "PREFILL", "DECODE", "DIT_STEP", "VAE_ENCODE", "VAE_DECODE",
           "POSTPROCESS", "TRANSFER", "AR", "HOP_STAGES"]
