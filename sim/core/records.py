"""Records: what a request asks for and what happened to it, stage by stage, and the hops
(jobs) it is served as."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from sim.names import DIT_STEP, TEXT_OUT_TASKS, VAE_DECODE, VAE_ENCODE

NAN = math.nan


@dataclass(slots=True)
class StageRecord:
    """One stage a request went through on one server (times in simulated seconds)."""
    stage: str
    server: str
    enqueue: float
    start: float = NAN
    end: float = NAN


@dataclass(slots=True, eq=False)
class Request:
    """A request as the workload creates it; the simulator fills in the outcome fields."""
    id: int
    arrival: float
    task: str
    model: str
    prompt_tokens: int
    output_tokens: int = 0
    input_images: tuple[tuple[int, int], ...] = ()
    output_image: tuple[int, int] | None = None
    steps: int = 0
    cfg: bool = False
    slo_class: str = "standard"
    # --- outcome -------------------------------------------------------------------------
    stages: list[StageRecord] = field(default_factory=list)
    first_token: float = NAN
    finish: float = NAN
    preemptions: int = 0
    image_tokens_in: int = 0     # input-image tokens in the serving model's own tokenization
    image_tokens_out: int = 0    # output-image latent tokens (DiT patches)
    image_ids: tuple[int, ...] = ()   # one per input image: equal ids = the same picture (caches)

    @property
    def text_out(self) -> bool:
        return self.task in TEXT_OUT_TASKS

    @property
    def e2el(self) -> float:
        return self.finish - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival if self.text_out else NAN

    @property
    def tpot(self) -> float:
        if not self.text_out or self.output_tokens <= 1:
            return NAN
        return (self.finish - self.first_token) / (self.output_tokens - 1)


class Job:
    """One hop of a request's pipeline (sim.engines.pipeline.plan_hops), waiting for or running
    on an engine. The payload fields' meaning depends on the stage."""
    __slots__ = ("req", "stage", "model", "on_done", "tokens", "vision_tokens", "out_tokens",
                 "height", "width", "seq_len", "steps", "weight", "components", "priority",
                 "record", "server", "work", "enqueued", "out_delay", "pre_computed",
                 "pre_generated")

    def __init__(self, req: Request, stage: str, model: str,
                 on_done: Optional[Callable[["Job", float], None]] = None, tokens: int = 0,
                 vision_tokens: int = 0, out_tokens: int = 0, height: int = 0, width: int = 0,
                 seq_len: int = 0, steps: int = 0, weight: int = 1, components: tuple = (),
                 priority: int = 1, record: Optional[StageRecord] = None, server: str = "",
                 work: float = 0.0, enqueued: float = 0.0, out_delay: float = 0.0,
                 pre_computed: int = 0, pre_generated: int = 0) -> None:
        self.req = req
        self.stage = stage              # a hop stage (sim.names.HOP_STAGES)
        self.model = model
        self.on_done = on_done          # called (job, now) when the hop has finished
        self.tokens = tokens            # AR prompt tokens (text + image); encoder tokens; DiT text
                                        # tokens; VAE encode: which input image (its index)
        self.vision_tokens = vision_tokens  # image tokens encoded in the AR step (fused) / by an encoder
        self.out_tokens = out_tokens    # AR tokens to generate (0 = prefill only, e.g. a condition encoder)
        self.height = height
        self.width = width
        self.seq_len = seq_len          # DiT image-sequence tokens
        self.steps = steps
        self.weight = weight            # DiT transformer batch share (2 with CFG)
        self.components = components
        self.priority = priority
        self.record = record
        self.server = server
        self.work = work                # estimated service seconds (load balancing)
        self.enqueued = enqueued
        self.out_delay = out_delay      # from its last output leaving the engine to the client seeing it
        # AR: prompt tokens whose KV the engine already holds when the job arrives (a prefix-cache
        # hit, or the KV a prefill GPU sent), and output tokens already generated elsewhere (1:
        # a prefill/decode split's decode hop, whose first token the prefill GPU produced)
        self.pre_computed = pre_computed
        self.pre_generated = pre_generated

    def __repr__(self) -> str:
        return f"Job(req={self.req.id}, stage={self.stage!r}, model={self.model!r})"

    def shape(self, buckets: list[int] | None = None) -> tuple:
        if self.stage == DIT_STEP:
            return (_bucket(self.seq_len, buckets) if buckets else self.seq_len,)
        if self.stage == VAE_ENCODE or self.stage == VAE_DECODE:
            return (self.height, self.width)
        return ()


def _bucket(x: int, buckets: list[int]) -> int:
    for b in buckets:
        if x <= b:
            return b
    return x
