"""vLLM-Omni 0.26.0's diffusion engine on one GPU: how `vllm serve <model> --omni` runs image
requests, as its source shows it (docs/vllm_omni_scheduler.md gives file:line for every rule
below; docs/omni_baseline.md the costs, their tables and what is left out).

A replica's engine takes whole requests (every stage of the pipeline runs inside it, on its GPU,
one stage after the other) from one FIFO queue with no bound and no rejection:

- `OmniRequestEngine` (vLLM-Omni's default, RequestScheduler): a request batch is the head of
  the queue plus the requests right behind it with the same batch key (output size, steps, CFG),
  up to `max_num_seqs` (default 1: every request alone, in arrival order). The first request
  that differs ends the batch; it is not skipped over. Pipelines without request batching
  (every image-input pipeline: Qwen-Image-Edit, FLUX.1-Kontext) never batch. The batch runs
  alone from its first stage to its last: condition encode (twice with CFG: prompt, then
  negative prompt), the VAE encode of an edit's condition image, steps x passes of the
  transformer (CFG: two passes at batch B one after the other, not one at 2B), VAE decode.
  Nothing joins a running batch. With `request_batch_max_wait_ms` X > 0 an idle engine first
  waits, before it forms a batch, until max_num_seqs requests wait, or the number waiting has
  not grown for min(50 ms, X/5), or X ms have passed.
- `OmniStepEngine` (`--step-execution`, Qwen-Image generate only): one cycle advances every
  running request by one denoising step. Between steps, waiting requests join from the head of
  the queue while they share the running requests' step key (size and CFG, not the step count)
  and fewer than max_num_seqs run; a head that differs blocks the queue until the running
  requests have drained. A joining request's condition encode runs inside the cycle it joins,
  before that cycle's step, and a finishing request's VAE decode inside the cycle of its last
  step; the other running requests wait for both. A request whose pipeline cannot step
  (an edit) runs alone and whole once the running requests have drained.

CPU work off the GPU loop (an edit's image decode and resize before it is queued; tensor to PIL
and PNG/base64 encoding after, which overlap the next batch) is not modelled: no measurement of
it exists in this repository yet (docs/omni_baseline.md).

Costs (`OmniCosts`) come from the profile tables: a vLLM-Omni table set (<gpu>-vllm-omni,
rows engine = vllm-omni, `python -m profiler sweep backend=vllm_omni`) where it has the stage,
else the diffusers table of the model and the vLLM table of its condition encoder; `sources()`
says which table each stage cost comes from, and the run's summary carries it.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Final, Optional, Sequence

import numpy as np

from profiler.models import load_model
from sim.core.gpu import Engine, EqualSteps, Unit
from sim.core.kernel import Timer
from sim.core.records import Request, StageRecord
from sim.engines.latency import LatencyModel
from sim.engines.pipeline import image_input_tokens, latent_tokens, plan_hops
from sim.names import (AR, DIT_STEP, POSTPROCESS, PREFILL, PREPROCESS, TEXT_ENCODE, VAE_DECODE,
                       VAE_ENCODE, VISION_ENCODE)
from sim.workloads.requests import condition_image_size

# --- what vLLM-Omni 0.26.0's pipelines do (docs/vllm_omni_scheduler.md, sections 2-5) -----------


@dataclass(frozen=True)
class Pipeline:
    """One vLLM-Omni pipeline class: whether it batches requests (supports_request_batch;
    without it the server refuses max_num_seqs > 1) and whether it can step-execute."""
    name: str
    request_batch: bool
    step_execution: bool


# (transformer kind, takes an input image) -> the pipeline vLLM-Omni serves it with
PIPELINES: Final[dict[tuple[str, bool], Pipeline]] = {
    ("qwen_image_mmdit", False): Pipeline("QwenImagePipeline", True, True),
    ("qwen_image_mmdit", True): Pipeline("QwenImageEditPipeline", False, False),
    ("flux_dit", False): Pipeline("FluxPipeline", True, False),
    ("flux_dit", True): Pipeline("FluxKontextPipeline", False, False),
    ("sd3_dit", False): Pipeline("StableDiffusion3Pipeline", True, False),
    ("sd3_dit", True): Pipeline("(no image-input SD3 pipeline in vLLM-Omni 0.26.0)", False, False),
    ("unet2d_condition", False): Pipeline("StableDiffusionXLPipeline", False, False),
    ("unet2d_condition", True): Pipeline("(no image-input SDXL pipeline in vLLM-Omni 0.26.0)", False, False),
}

# Qwen-Image's condition encoder (Qwen2.5-VL under Hugging Face transformers, inside the pipeline):
QWEN_TEMPLATE = 34 + 5          # generate: encoder input = template (34 dropped + 5 after) + prompt
QWEN_TEXT_AFTER = 5             # ... the transformer's text stream = prompt + these 5
QWEN_EDIT_TEMPLATE = 67 - 1 + 5  # edit: template tokens around the image and prompt (one
#                                 <|image_pad|> expands to the image's tokens)
QWEN_EDIT_DROP = 64             # edit: template tokens dropped from the encoder output
EDIT_CONDITION_PIXELS = 1024 * 1024   # calculate_dimensions(1024 * 1024, ratio), sides % 32
NEGATIVE_PROMPT_TOKENS = 1      # " ", Qwen's advice and what profiler.omni_bench sends


class QwenGeometry:
    """What one Qwen-Image(-Edit) request puts through vLLM-Omni's pipeline (module
    constants): transformer image tokens `seq` (target + an edit's condition latents), its
    text stream for the prompt pass (`text`) and the negative-prompt pass (`neg_text`), the
    condition encoder's input tokens for both passes, the condition image's vision tokens and
    size (edits; None for generate). (A plain class: compiled, its __init__ is native.)"""
    __slots__ = ("seq", "text", "neg_text", "enc_tokens", "neg_tokens", "vision_tokens", "cond")

    def __init__(self, seq: int, text: int, neg_text: int, enc_tokens: int, neg_tokens: int,
                 vision_tokens: int, cond: Optional[tuple[int, int]]) -> None:
        self.seq = seq
        self.text = text
        self.neg_text = neg_text
        self.enc_tokens = enc_tokens
        self.neg_tokens = neg_tokens
        self.vision_tokens = vision_tokens
        self.cond = cond

    def __repr__(self) -> str:
        return (f"QwenGeometry(seq={self.seq}, text={self.text}, neg_text={self.neg_text}, "
                f"enc_tokens={self.enc_tokens}, neg_tokens={self.neg_tokens}, "
                f"vision_tokens={self.vision_tokens}, cond={self.cond})")


def qwen_geometry(spec: Any, cond_spec: Any, prompt_tokens: int, output: tuple[int, int],
                  input_image: Optional[tuple[int, int]] = None) -> QwenGeometry:
    """QwenGeometry of a request (generate without `input_image`, edit with it); `spec` is the
    qwen_image entry, `cond_spec` its condition encoder's (qwen2_5_vl_7b). One definition for
    the engine (OmniCosts.job) and the table builder (profiler.omni_table)."""
    seq = latent_tokens(spec, output[0], output[1])
    if input_image is None:
        enc = QWEN_TEMPLATE + prompt_tokens
        neg = QWEN_TEMPLATE + NEGATIVE_PROMPT_TOKENS
        return QwenGeometry(seq, prompt_tokens + QWEN_TEXT_AFTER, NEGATIVE_PROMPT_TOKENS + QWEN_TEXT_AFTER,
                            enc, neg, 0, None)
    ch, cw = condition_image_size(input_image[0], input_image[1], EDIT_CONDITION_PIXELS)
    vis = image_input_tokens(cond_spec, ch, cw)
    enc = QWEN_EDIT_TEMPLATE + vis + prompt_tokens
    neg = QWEN_EDIT_TEMPLATE + vis + NEGATIVE_PROMPT_TOKENS
    return QwenGeometry(seq + latent_tokens(spec, ch, cw), enc - QWEN_EDIT_DROP, neg - QWEN_EDIT_DROP,
                        enc, neg, vis, (ch, cw))


class OmniJob:
    """One request inside an omni engine: what its pipeline computes, and its progress."""
    __slots__ = ("flow", "req", "model", "batch_key", "step_ok", "step_key", "steps", "passes",
                 "weight", "height", "width", "seq", "text", "neg_text", "enc_tokens", "neg_tokens", "vision_tokens",
                 "cond", "work", "enqueued", "last_end", "done", "records")

    def __init__(self, req: Request, model: str) -> None:
        self.flow: Any = None
        self.req = req
        self.model = model
        self.batch_key: Optional[tuple] = None   # request batching key; None: never batches
        self.step_ok = False                     # the step scheduler can run it
        self.step_key: tuple = ()
        self.steps = 0
        self.passes = 1                          # transformer passes per step (2 with CFG)
        self.weight = 1                          # its share of a pass's batch (work="hops": 2 with CFG)
        self.height = self.width = 0             # output image
        self.seq = 0                             # transformer image tokens (+ condition tokens)
        self.text = 0                            # transformer text-stream tokens
        self.neg_text = 0                        # ... of the negative-prompt pass (CFG)
        self.enc_tokens = 0                      # condition-encoder input tokens (prompt pass)
        self.neg_tokens = 0                      # ... negative-prompt pass (CFG)
        self.vision_tokens = 0                   # condition image tokens in the VL encoder
        self.cond: Optional[tuple[int, int]] = None   # condition image fed to the VAE encoder
        self.work = 0.0                          # seconds alone (routing, sizing)
        self.enqueued = 0.0
        self.last_end = 0.0                      # end of its last stage (next stage's enqueue)
        self.done = 0                            # denoising steps done (step scheduler)
        self.records: dict[str, StageRecord] = {}


class OmniCosts:
    """Stage costs of one model's vLLM-Omni pipelines, in seconds, from the profile tables.

    `omni` is the run's vLLM-Omni table set (LatencyModel over <gpu>-vllm-omni) when it holds
    this model, else None; a stage it has rows for is costed from it, every other stage from
    `lat` (the diffusers table of the model, the vLLM table of its condition encoder).
    The transformer: where the vLLM-Omni table's batch-1 rows span image x text tokens
    (profiler.omni_table) each forward is read on both axes (LatencyModel.dit_step_text), CFG's
    negative pass over the negative prompt's own text stream; otherwise by joint length: one
    forward over S image and T text tokens costs what the table's rows at their own text
    length T0 give at S + T - T0 (LatencyModel.dit_step_joint), both passes at the prompt's T.
    A batch larger than the vLLM-Omni table's rows (they are batch 1: vLLM-Omni's default
    max_num_seqs) is its batch-1 cost times the batch ratio of the diffusers / vLLM table.

    Also from the vLLM-Omni table, when it has them (`api_*`, `pipeline_s`, `first_use_s`): the
    pipeline's CPU work inside a batch (stage preprocess, component pipeline_<task>: a phase
    before the encode, holding the engine); the API server's time before a request reaches the
    queue and after its batch (preprocess api_<task>, postprocess api: delays, not GPU work;
    the engines apply them with api_delays); the extra cost of the first decode of an output
    size on a replica (vae_decode rows' first_use_ms: the engines track the sizes each replica
    has decoded).

    work="hops" (an ablation, not vLLM-Omni): each request's work is what sim.engines.pipeline.
    plan_hops gives every policy (the condition encode once, CFG as one transformer pass at twice
    the batch, an edit's condition at the model entry's rule), so only the scheduling differs
    from the step-level engines of the other policies."""

    WORK_RULES = ("pipeline", "hops")

    def __init__(self, model: str, lat: LatencyModel, omni: Any = None, work: str = "pipeline") -> None:
        spec = load_model(model)
        if work not in self.WORK_RULES:
            raise ValueError(f"work={work!r} is invalid; allowed: {list(self.WORK_RULES)}")
        self.hops = work == "hops"
        self.model = model
        self.spec = spec
        self.lat = lat
        self.kind = spec.components["transformer"]["kind"]
        self.qwen = self.kind == "qwen_image_mmdit"
        self.cond_model: Any = spec.condition_encoder      # a model name, or None
        self.omni: LatencyModel | None = omni if omni is not None and _has_model(omni, model) else None
        o = self.omni
        self.dit_lat: LatencyModel = o if o is not None and _has_stage(o, model, DIT_STEP) else lat
        self.vae_lat: dict[str, LatencyModel] = {
            st: (o if o is not None and _has_stage(o, model, st) else lat) for st in (VAE_ENCODE, VAE_DECODE)}
        # Qwen-Image's condition encoder as vLLM-Omni times it (text_encode rows: component
        # text_encoder for generate, text_encoder_vl with the condition image for edits)
        self.omni_enc = {c: o is not None and _has_stage(o, model, TEXT_ENCODE, c)
                         for c in ("text_encoder", "text_encoder_vl")}
        te_from_omni = o is not None and all(_has_stage(o, model, TEXT_ENCODE, c) for c in spec.text_encoders)
        self.te_lat: LatencyModel = o if te_from_omni and spec.text_encoders and o is not None else lat
        self.cond_spec = load_model(self.cond_model) if self.cond_model else None
        # vLLM-Omni's measured transformer on image x text axes (batch 1), and the largest
        # batch each of its stages has rows for (beyond it: scaled by the other table)
        self.dit_text = self.dit_lat is o and o is not None and _spans_text(o, model)
        self.text_t0 = int(spec.request_defaults.get("text_tokens", 64))
        self.omni_batch = {st: (_max_batch(o, model, st) if o is not None else 0)
                           for st in (DIT_STEP, TEXT_ENCODE, VAE_DECODE, VAE_ENCODE)}
        frame = o.frame(model) if o is not None else None
        self.pipeline_s = {t: _row_law(frame, PREPROCESS, f"pipeline_{t}") for t in ("generate", "edit")}
        self.api_pre = {t: _row_law(frame, PREPROCESS, f"api_{t}") for t in ("generate", "edit")}
        self.api_post = _row_law(frame, POSTPROCESS, "api")
        self.first_use_s = (_first_use_s(frame) if self.vae_lat[VAE_DECODE] is o and o is not None else 0.0)

    # --- per request ------------------------------------------------------------------------
    def job(self, req: Request) -> OmniJob:
        spec = self.spec
        j = OmniJob(req, self.model)
        image_in = bool(req.input_images)
        pipe = PIPELINES.get((self.kind, image_in))
        if pipe is None:
            raise ValueError(f"model {self.model}: no vLLM-Omni pipeline is known for transformer "
                             f"kind {self.kind!r}; known: {sorted({k for k, _ in PIPELINES})}")
        d = spec.request_defaults
        j.height, j.width = req.output_image or (d["height"], d["width"])
        j.steps = req.steps or d["steps"]
        j.passes = 2 if req.cfg else 1
        j.seq = latent_tokens(spec, j.height, j.width)
        if self.hops:
            self._from_hops(j, req)
        elif self.qwen:
            assert self.cond_spec is not None
            g = qwen_geometry(spec, self.cond_spec, req.prompt_tokens, (j.height, j.width),
                              req.input_images[0] if image_in else None)
            j.seq, j.text, j.neg_text = g.seq, g.text, g.neg_text
            j.enc_tokens, j.neg_tokens, j.vision_tokens, j.cond = (g.enc_tokens, g.neg_tokens,
                                                                   g.vision_tokens, g.cond)
        else:
            j.enc_tokens = j.neg_tokens = int(d.get("text_tokens", req.prompt_tokens))
            j.text = -1                          # the table's own text length
            if image_in:
                ih, iw = req.input_images[0]
                j.cond = (ih, iw)
                j.seq += latent_tokens(spec, ih, iw)
        if pipe.request_batch:
            j.batch_key = (j.height, j.width, j.steps, j.passes, j.weight)
        j.step_ok = pipe.step_execution
        j.step_key = (j.height, j.width, j.passes, j.weight)
        j.work = self.alone(j)
        return j

    def _from_hops(self, j: OmniJob, req: Request) -> None:
        """work="hops": the request's work as plan_hops plans it for every policy."""
        for h in plan_hops(req, True):
            if h.stage == AR or h.stage == TEXT_ENCODE:
                j.enc_tokens = j.neg_tokens = h.tokens
                j.vision_tokens = h.vision_tokens
            elif h.stage == VAE_ENCODE:
                j.cond = (h.height, h.width)
            elif h.stage == DIT_STEP:
                j.seq, j.weight, j.passes = h.seq_len, h.weight, 1
        j.text = -1

    def alone(self, j: OmniJob) -> float:
        """Seconds of the whole request run alone (a request batch of one), sizes seen before."""
        b = (j,)
        return (sum((t for _, t in self.prepare(b)), 0.0) + j.steps * self.step(b) + self.decode(b)[0][1])

    # --- around the engine (vLLM-Omni table rows; 0 without them) ------------------------------
    @staticmethod
    def _task(j: OmniJob) -> str:
        return "edit" if j.req.input_images else "generate"

    def api_pre_s(self, j: OmniJob) -> float:
        """API server + stage process, request sent -> it reaches the engine's queue."""
        f = self.api_pre[self._task(j)]
        if f is None:
            return 0.0
        ih, iw = j.req.input_images[0] if j.req.input_images else (0, 0)
        return f(ih * iw)

    def api_post_s(self, j: OmniJob) -> float:
        """Batch end -> the client has the image (to PIL, PNG, base64, HTTP)."""
        f = self.api_post
        return f(j.height * j.width) if f is not None else 0.0

    def prepare(self, jobs: Sequence[OmniJob]) -> list[tuple[str, float]]:
        """(stage, seconds) before a batch's first step: the pipeline's own CPU work, the
        condition encode, an edit's VAE encode."""
        f = self.pipeline_s[self._task(jobs[0])]
        pre = [(PREPROCESS, f(0))] if f is not None and not self.hops else []
        return pre + self.encode(jobs) + self.vae_encode(jobs)

    # --- per batch (jobs share a batch key, or run one at a time) ---------------------------
    def encode(self, jobs: Sequence[OmniJob]) -> list[tuple[str, float]]:
        """(stage, seconds) of the condition encode of a batch: prompt pass, then the negative
        prompt pass with CFG; text prompts of a batch are padded to the longest."""
        j, n = jobs[0], len(jobs)
        cfg = j.passes == 2
        if self.hops and self.cond_model:        # the AR hop: vision encode in its step, prefill
            out = [(VISION_ENCODE, self.lat.vision_encode(self.cond_model, sum(x.vision_tokens for x in jobs)))
                   ] if j.vision_tokens else []
            return out + [(PREFILL, self.lat.prefill(self.cond_model, n * max(x.enc_tokens for x in jobs)))]
        if self.qwen:
            if j.cond is not None:               # edit (batch of one): VL encoder with the image
                o = self.omni
                if o is not None and self.omni_enc["text_encoder_vl"]:
                    t = o.text_encode(self.model, "text_encoder_vl", 1, j.enc_tokens)
                    if cfg:
                        t += o.text_encode(self.model, "text_encoder_vl", 1, j.neg_tokens)
                    return [(PREFILL, t)]
                lat, m = self.lat, self.cond_model
                passes = 2 if cfg else 1
                vis = passes * lat.vision_encode(m, j.vision_tokens)
                pre = lat.prefill(m, j.enc_tokens) + (lat.prefill(m, j.neg_tokens) if cfg else 0.0)
                return [(VISION_ENCODE, vis), (PREFILL, pre)]
            longest = max(x.enc_tokens for x in jobs)
            o = self.omni
            if o is not None and self.omni_enc["text_encoder"]:
                t = self._text_encode(o, n, longest)
                if cfg:
                    t += self._text_encode(o, n, j.neg_tokens)
                return [(PREFILL, t)]
            pre = self.lat.prefill(self.cond_model, n * longest)
            if cfg:
                pre += self.lat.prefill(self.cond_model, n * j.neg_tokens)
            return [(PREFILL, pre)]
        comps = self.spec.text_encoders
        if not comps:
            return []
        toks = max(x.enc_tokens for x in jobs)
        t = sum((self.te_lat.text_encode(self.model, c, n, toks) for c in comps), 0.0)
        return [(TEXT_ENCODE, 2 * t if cfg else t)]

    def vae_encode(self, jobs: Sequence[OmniJob]) -> list[tuple[str, float]]:
        j = jobs[0]
        if j.cond is None:
            return []
        return [(VAE_ENCODE, self.vae_lat[VAE_ENCODE].vae(self.model, VAE_ENCODE, len(jobs), *j.cond))]

    def _text_encode(self, o: LatencyModel, n: int, tokens: int) -> float:
        """vLLM-Omni's text_encoder pass over n prompts of `tokens` tokens; past the batch its
        rows have: the batch-1 row times vLLM's batch ratio (the prompts padded to one length)."""
        m = self.model
        if n > self.omni_batch[TEXT_ENCODE]:
            cm = self.cond_model
            return o.text_encode(m, "text_encoder", 1, tokens) * self.lat.prefill(cm, n * tokens) / self.lat.prefill(cm, tokens)
        return o.text_encode(m, "text_encoder", n, tokens)

    def step(self, jobs: Sequence[OmniJob]) -> float:
        """One denoising step of `jobs` as one transformer batch: `passes` forwards at batch
        len(jobs), one after the other, over the longest sequence and text stream present."""
        j = jobs[0]
        if len(jobs) == 1:
            seq, text, neg_text = j.seq, j.text, j.neg_text
        else:
            seq = max(x.seq for x in jobs)
            text = max(x.text for x in jobs)
            neg_text = max(x.neg_text for x in jobs)
        lat = self.dit_lat
        b = len(jobs) * j.weight
        if self.dit_text:
            t = self._forward(b, seq, text if text >= 0 else self.text_t0)
            if j.passes == 2:
                t += self._forward(b, seq, neg_text if text >= 0 else self.text_t0)
            return t
        t = (lat.dit_step_joint(self.model, b, seq, text) if text >= 0
             else lat.dit_step(self.model, b, seq))
        return jobs[0].passes * t

    def _forward(self, b: int, seq: int, text: int) -> float:
        """One forward on the vLLM-Omni table's image x text grid (batch 1), scaled to batch b
        by the diffusers table's batch ratio at the same joint length."""
        t = self.dit_lat.dit_step_text(self.model, seq, text)
        if b > 1:
            m, lat = self.model, self.lat
            t *= lat.dit_step_joint(m, b, seq, text) / lat.dit_step_joint(m, 1, seq, text)
        return t

    def decode(self, jobs: Sequence[OmniJob], decoded: Optional[set] = None) -> list[tuple[str, float]]:
        """The batch's VAE decode; with `decoded` (the output sizes this replica has decoded,
        updated here) a size's first decode costs first_use_s more."""
        j = jobs[0]
        lat, n, m = self.vae_lat[VAE_DECODE], len(jobs), self.model
        if lat is self.omni and n > self.omni_batch[VAE_DECODE]:
            t = (lat.vae(m, VAE_DECODE, 1, j.height, j.width) * self.lat.vae(m, VAE_DECODE, n, j.height, j.width)
                 / self.lat.vae(m, VAE_DECODE, 1, j.height, j.width))
        else:
            t = lat.vae(m, VAE_DECODE, n, j.height, j.width)
        if decoded is not None and self.first_use_s:
            size = (j.height, j.width)
            if size not in decoded:
                decoded.add(size)
                t += self.first_use_s
        return [(VAE_DECODE, t)]

    def phases(self, jobs: Sequence[OmniJob], decoded: Optional[set] = None) -> list["Phase"]:
        """Every stage of a request batch, in the order the pipeline runs them."""
        out = [Phase(st, jobs, t) for st, t in self.prepare(jobs)]
        out.append(Phase(DIT_STEP, jobs, self.step(jobs), jobs[0].steps))
        out += [Phase(st, jobs, t) for st, t in self.decode(jobs, decoded)]
        return out

    # --- provenance ---------------------------------------------------------------------------
    def sources(self) -> dict[str, str]:
        """Which table (and engine) each stage cost is read from."""
        def where(lat: Any, model: str) -> str:
            lat.frame(model)
            t = lat.tables()[model]
            return f"{', '.join(t['engines'])}: {t['path']}"
        out: dict[str, str] = {}
        m = self.model
        if self.qwen:
            cm = self.cond_model
            assert cm is not None           # (Qwen-Image always has its condition encoder)
            for comp, what in (("text_encoder", "generate"), ("text_encoder_vl", "edit")):
                out[f"condition_encode ({what})"] = (
                    where(self.omni, m) if self.omni_enc[comp] else
                    where(self.lat, cm) + " (vLLM's prefill" + (" + vision_encode" if what == "edit" else "")
                    + "; vLLM-Omni runs Qwen2.5-VL under Hugging Face transformers)")
        elif self.spec.text_encoders:
            out["text_encode"] = where(self.te_lat, m)
        note = "" if self.dit_lat is self.omni else (
            " (vLLM-Omni runs the transformer with regional torch.compile; this table is not)")
        out[DIT_STEP] = where(self.dit_lat, m) + note
        for st in (VAE_ENCODE, VAE_DECODE):
            out[st] = where(self.vae_lat[st], m) + (
                " (vLLM-Omni runs the same eager VAE; at its ~1 MP edit condition this table agrees with "
                "the vLLM-Omni timer: profiler.omni_table)" if self.omni is not None and self.vae_lat[st] is not self.omni
                else "")
        if self.omni is not None:
            extras = [name for name, on in (("pipeline CPU work", any(self.pipeline_s.values())),
                                            ("API pre/postprocess", any(self.api_pre.values()) or self.api_post),
                                            (f"first decode of a size +{self.first_use_s * 1e3:.1f} ms",
                                             self.first_use_s)) if on]
            if extras:
                out["around the stages"] = where(self.omni, m) + f" ({'; '.join(extras)})"
        return out


def _has_model(lat: Any, model: str) -> bool:
    try:
        return len(lat.frame(model)) > 0
    except FileNotFoundError:           # (MissingProfileError: no table for it in that set)
        return False


def _spans_text(lat: Any, model: str) -> bool:
    """Do the table's batch-1 dit_step rows form a product grid over seq_len x num_tokens with
    at least two of each (profiler.omni_table's rows; a sweep's rows at one text length do not)?"""
    t = lat.frame(model)
    seq, text = t["seq_len"], t["num_tokens"]
    sel = (t["stage"] == DIT_STEP) & (t["batch_size"] == 1) & ~np.isnan(seq) & ~np.isnan(text)
    seqs, texts = seq[sel].tolist(), text[sel].tolist()
    s, n = len(set(seqs)), len(set(texts))
    return s >= 2 and n >= 2 and len(set(zip(seqs, texts))) == s * n


def _max_batch(lat: Any, model: str, stage: str) -> int:
    t = lat.frame(model)
    b = t["batch_size"][t["stage"] == stage]
    b = b[~np.isnan(b)]
    return int(b.max()) if len(b) else 0


def _row_law(rows: Any, stage: str, component: str) -> Optional[Callable[[float], float]]:
    """seconds(pixels) from a vLLM-Omni table's rows (LatencyModel.frame) of (stage,
    component): interpolated over height x width (held at the ends), or the rows' median when
    they have no size; None when the table has no such rows."""
    if rows is None:
        return None
    d = rows.select((rows["stage"] == stage) & (rows["component"] == component))
    if not len(d):
        return None
    ms = d["latency_ms_median"].astype(float)
    if np.isnan(d["height"]).all():
        v = float(np.median(ms)) / 1e3
        return lambda _px: v
    px = (d["height"] * d["width"]).astype(float)
    order = np.argsort(px)
    xs, ys = px[order].tolist(), (ms[order] / 1e3).tolist()
    return lambda p: float(np.interp(p, xs, ys))


def _first_use_s(rows: Any) -> float:
    """The first-use cost (s) of an output size's VAE decode, from the vae_decode rows' extra."""
    for e in rows["extra"][rows["stage"] == VAE_DECODE].tolist():
        if e is None:
            continue
        try:
            v = json.loads(e).get("first_use_ms")
        except (TypeError, ValueError):
            continue
        if v:
            return float(v) / 1e3
    return 0.0


def _has_stage(lat: Any, model: str, stage: str, component: Optional[str] = None) -> bool:
    t = lat.frame(model)
    sel = t["stage"] == stage
    if component is not None:
        sel = sel & (t["component"] == component)
    return bool(sel.any())


# --- running stages on the GPU --------------------------------------------------------------------


class Phase:
    """One stage of a batch on the GPU: k equal units of t seconds (k denoising steps, or one
    pass of a one-shot stage)."""
    __slots__ = ("stage", "jobs", "t", "k")

    def __init__(self, stage: str, jobs: Sequence[OmniJob], t: float, k: int = 1) -> None:
        self.stage = stage
        self.jobs = jobs
        self.t = t
        self.k = k


class _OmniEngine(Engine):
    """What both schedulers share: the FIFO queue of whole requests, the phases of the work in
    hand, stage records, completion (an Engine: sim.core.gpu)."""

    def __init__(self, costs: OmniCosts, max_num_seqs: int, api_delays: bool = False,
                 warm_sizes: Any = ()) -> None:
        super().__init__()
        self.model = costs.model
        self.costs = costs
        self.max_num_seqs = max_num_seqs
        # the API server's time around the engine (costs.api_pre_s / api_post_s), when on
        self.api_delays = api_delays
        # output sizes this replica's VAE has decoded (a first decode costs costs.first_use_s)
        self.decoded: set[tuple[int, int]] = {(int(h), int(w)) for h, w in warm_sizes}
        self.queue = None               # (no shared StageQueue)
        self.waiting: deque[OmniJob] = deque()
        self.waiting_work = 0.0
        self.phases: deque[Phase] = deque()
        self._cur: Optional[Phase] = None
        self._last: Optional[OmniJob] = None     # the job work() built, reused by submit()

    # --- Engine (sim.core.gpu) ----------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.phases) or bool(self.waiting) or self._busy()

    def can_join(self, job: Any) -> bool:
        return False                    # jobs come through submit(), never a shared queue

    def load(self) -> float:
        return self.waiting_work + self._running_work()

    # --- requests -----------------------------------------------------------------------------
    def work(self, req: Request) -> float:
        """Seconds `req` takes alone here (the router's outstanding-work estimate)."""
        j = self.costs.job(req)
        self._last = j
        return j.work

    def submit(self, flow: Any, now: float) -> None:
        """A request reaches this replica: it waits at the tail of the queue (after the API
        server's preprocessing, with api_delays)."""
        j = self._last if self._last is not None and self._last.req is flow.req else self.costs.job(flow.req)
        self._last = None
        j.flow = flow
        self.waiting_work += j.work              # (counted for routing from the submit)
        pre = self.costs.api_pre_s(j) if self.api_delays else 0.0
        if pre > 0:
            self.placed().agenda.timer(pre, self._enqueue_later, j)
        else:
            self._enqueue(j, now)

    def _enqueue_later(self, ev: Timer) -> None:
        self._enqueue(ev.value, self.placed().agenda.now)

    def _enqueue(self, j: OmniJob, now: float) -> None:
        j.enqueued = j.last_end = now
        self.waiting.append(j)
        self._arrived(j, now)

    def _take(self) -> OmniJob:
        j = self.waiting.popleft()
        self.waiting_work -= j.work
        return j

    # --- phases -------------------------------------------------------------------------------
    def _unit(self, now: float, k: Optional[int] = None) -> Unit:
        """The unit of the first phase (at most k of its steps), its records started."""
        ph = self.phases[0]
        server = self.placed().name
        for j in ph.jobs:
            rec = j.records.get(ph.stage)
            if rec is None:
                rec = StageRecord(ph.stage, server, j.last_end, now)
                j.records[ph.stage] = rec
                j.req.stages.append(rec)
        n = ph.k if k is None else min(k, ph.k)
        self._cur = ph
        ends = EqualSteps(ph.t, n) if n > 1 else (ph.t,)
        return Unit(ends, self._commit, ph.stage, self)

    def _commit(self, k: int, now: float) -> None:
        ph = self._cur
        assert ph is not None
        self._cur = None
        ph.k -= k
        self._advanced(ph, k)
        if ph.k > 0 and not self._ends_early(ph):
            return                      # cut: the rest of the phase runs next
        self.phases.popleft()
        for j in ph.jobs:
            j.records[ph.stage].end = now
            j.last_end = now
        self._phase_done(ph, now)

    def _finish(self, jobs: Sequence[OmniJob], now: float) -> None:
        """The batch's work is done: each request is answered now (after the API server's
        postprocessing, with api_delays; the engine goes on meanwhile)."""
        for j in jobs:
            j.records.clear()
            flow = j.flow
            j.flow = None
            post = self.costs.api_post_s(j) if self.api_delays else 0.0
            if post > 0:
                self.placed().agenda.timer(post, self._answer, flow)
            else:
                flow.finish(now)

    def _answer(self, ev: Timer) -> None:
        ev.value.finish(self.placed().agenda.now)

    # --- what the schedulers define -------------------------------------------------------------
    def plan(self, now: float) -> Unit | None:
        raise NotImplementedError

    def _arrived(self, j: OmniJob, now: float) -> None:
        raise NotImplementedError

    def _busy(self) -> bool:
        return False

    def _running_work(self) -> float:
        return 0.0

    def _advanced(self, ph: Phase, k: int) -> None:
        """k units of phase `ph` have run."""

    def _ends_early(self, ph: Phase) -> bool:
        """Does phase `ph` end after a commit that left some of its units (not a mere cut)?"""
        return False

    def _phase_done(self, ph: Phase, now: float) -> None:
        raise NotImplementedError


class OmniRequestEngine(_OmniEngine):
    """vLLM-Omni's default request scheduler (module docstring): FIFO request batches of one
    key, head-of-line, each run whole and alone; optional admission wait."""

    STABLE_WINDOW_S = 0.05          # min(50 ms, max_wait / 5): diffusion_engine.py:495

    def __init__(self, costs: OmniCosts, max_num_seqs: int = 1, max_wait_s: float = 0.0,
                 api_delays: bool = False, warm_sizes: Any = ()) -> None:
        super().__init__(costs, max_num_seqs, api_delays, warm_sizes)
        self.max_wait_s = max_wait_s
        self.window_s = min(self.STABLE_WINDOW_S, max_wait_s / 5.0)
        self.batch: list[OmniJob] = []
        self._wait: Optional[list[float]] = None     # [deadline, stable_since] while waiting
        self._released = False
        self._token = 0
        self._on_timer = self._timer

    def _busy(self) -> bool:
        return bool(self.batch)

    def _running_work(self) -> float:
        return sum((j.work for j in self.batch), 0.0)

    def _arrived(self, j: OmniJob, now: float) -> None:
        w = self._wait
        if w is not None:               # an admission wait: more requests may end it
            if len(self.waiting) >= self.max_num_seqs:
                self._release()
                return
            w[1] = now                  # the waiting count grew: the stable window restarts
            self._arm(now)
            return
        g = self.gpu
        if g is None or self.batch:     # nothing joins a running batch
            return
        u = g.cur
        if u is None or u.engine is not self:
            g.kick()                    # idle: start; another engine's unit: its turn ends at
                                        # the next step boundary (GPU round robin)

    # admission wait (diffusion_engine.py:467-520): applies when the head's pipeline batches
    def _must_wait(self, now: float) -> bool:
        if self._released:
            self._released = False
            return False
        head = self.waiting[0]
        if (self.max_wait_s <= 0 or head.batch_key is None
                or len(self.waiting) >= self.max_num_seqs):
            return False
        if self._wait is None:
            self._wait = [now + self.max_wait_s, now]
            self._arm(now)
        return True

    def _arm(self, now: float) -> None:
        w = self._wait
        assert w is not None
        self._token += 1
        at = min(w[0], w[1] + self.window_s)
        self.placed().agenda.timer(max(at - now, 0.0), self._on_timer, self._token)

    def _timer(self, ev: Timer) -> None:
        if ev.value == self._token and self._wait is not None:
            self._release()

    def _release(self) -> None:
        self._wait = None
        self._token += 1
        self._released = True
        g = self.placed()
        if g.cur is None:
            g.kick()

    def plan(self, now: float) -> Unit | None:
        if self.phases:
            return self._unit(now)
        if not self.waiting or self._must_wait(now):
            return None
        head = self._take()
        batch = [head]
        key = head.batch_key
        if key is not None:
            w = self.waiting
            while w and len(batch) < self.max_num_seqs and w[0].batch_key == key:
                batch.append(self._take())      # the first that differs ends the batch
        self.batch = batch
        self.phases.extend(self.costs.phases(batch, self.decoded))
        return self._unit(now)

    def _phase_done(self, ph: Phase, now: float) -> None:
        if not self.phases:
            batch, self.batch = self.batch, []
            self._finish(batch, now)


class OmniStepEngine(_OmniEngine):
    """vLLM-Omni's step scheduler (`--step-execution`, module docstring): continuous batching
    at step granularity across requests of one step key."""

    def __init__(self, costs: OmniCosts, max_num_seqs: int = 1, api_delays: bool = False,
                 warm_sizes: Any = ()) -> None:
        super().__init__(costs, max_num_seqs, api_delays, warm_sizes)
        self.running: list[OmniJob] = []
        self.key: Optional[tuple] = None
        self.alone: Optional[OmniJob] = None     # a request that cannot step, run whole
        self.stepping = False                    # this cycle's step is planned or running

    def _busy(self) -> bool:
        return bool(self.running) or self.alone is not None

    def _running_work(self) -> float:
        w = sum((j.work * (j.steps - j.done) / max(j.steps, 1) for j in self.running), 0.0)
        return w + (self.alone.work if self.alone is not None else 0.0)

    def _joinable(self) -> bool:
        """Would the head of the queue join at the next cycle?"""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        h = self.waiting[0]
        return h.step_ok and (not self.running or h.step_key == self.key)

    def _arrived(self, j: OmniJob, now: float) -> None:
        g = self.gpu
        if g is None:
            return
        u = g.cur
        if u is None or u.engine is not self:
            g.kick()                    # idle: start; another engine's unit: cut at its next
                                        # step boundary (GPU round robin)
        elif self.stepping and self._joinable():
            g.kick()                    # cut the running steps at the next boundary: it joins

    def plan(self, now: float) -> Unit | None:
        if self.phases:
            ph = self.phases[0]
            if self._is_step(ph):
                # the cycle's step(s): only one when the head waits to join
                return self._unit(now, 1 if self._joinable() else None)
            return self._unit(now)
        # a cycle starts: admit from the head of the queue
        if not self.running:
            if not self.waiting:
                return None
            if not self.waiting[0].step_ok:      # e.g. an edit: alone, whole, as in request mode
                j = self.alone = self._take()
                self.phases.extend(self.costs.phases([j], self.decoded))
                return self._unit(now)
        joined: list[OmniJob] = []
        while self._joinable():
            j = self._take()
            if not self.running:
                self.key = j.step_key
            self.running.append(j)
            joined.append(j)
        if not self.running:
            return None
        c = self.costs
        for j in joined:                # each joiner's encode runs alone, before the step
            b = (j,)
            self.phases.extend(Phase(st, b, t) for st, t in c.prepare(b))
        k = min(j.steps - j.done for j in self.running)
        self.phases.append(Phase(DIT_STEP, self.running, c.step(self.running), k))
        self.stepping = True
        return self.plan(now)

    def _is_step(self, ph: Phase) -> bool:
        return ph.stage == DIT_STEP and ph.jobs is self.running

    def _advanced(self, ph: Phase, k: int) -> None:
        if self._is_step(ph):
            for j in self.running:
                j.done += k

    def _ends_early(self, ph: Phase) -> bool:
        return self._is_step(ph)        # a cut, or one step for a joiner: the cycle ends here

    def _phase_done(self, ph: Phase, now: float) -> None:
        if self.alone is not None:
            if not self.phases:
                j, self.alone = self.alone, None
                self._finish((j,), now)
            return
        if self._is_step(ph):
            self._cycle_end()
        elif ph.stage == VAE_DECODE and not self.phases:
            done = [j for j in self.running if j.done >= j.steps]
            self.running = [j for j in self.running if j.done < j.steps]
            if not self.running:
                self.key = None
            self._finish(done, now)

    def _cycle_end(self) -> None:
        """The cycle's step has run: the finishing requests' decodes close the cycle."""
        self.stepping = False
        c = self.costs
        for j in self.running:
            if j.done >= j.steps:
                b = (j,)
                self.phases.extend(Phase(st, b, t) for st, t in c.decode(b, self.decoded))


ENGINES: dict[str, Callable[..., _OmniEngine]] = {
    "omni_request": OmniRequestEngine,
    "omni_step": OmniStepEngine,
}
