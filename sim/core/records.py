"""Records: what a request asks for and what happened to it, stage by stage, and the hops
(jobs) it is served as."""
from __future__ import annotations

import math
from typing import Callable, Optional

from sim.names import DIT_STEP, TEXT_OUT_TASKS, VAE_DECODE, VAE_ENCODE

NAN = math.nan


class StageRecord:
    """One stage a request went through on one server (times in simulated seconds). Compared
    by identity. (Plain classes, not dataclasses, here: compiled, their __init__ is native,
    where dataclasses would generate an interpreted one.)"""
    __slots__ = ("stage", "server", "enqueue", "start", "end")

    def __init__(self, stage: str, server: str, enqueue: float, start: float = NAN,
                 end: float = NAN) -> None:
        self.stage = stage
        self.server = server
        self.enqueue = enqueue
        self.start = start
        self.end = end

    def __repr__(self) -> str:
        return (f"StageRecord(stage={self.stage!r}, server={self.server!r}, "
                f"enqueue={self.enqueue!r}, start={self.start!r}, end={self.end!r})")


# a Request's fields in order (its constructor's parameters)
REQUEST_FIELDS = ("id", "arrival", "task", "model", "prompt_tokens", "output_tokens",
                  "input_images", "output_image", "steps", "cfg", "slo_class", "stages",
                  "first_token", "finish", "preemptions", "image_tokens_in", "image_tokens_out",
                  "image_ids")


class Request:
    """A request as the workload creates it; the simulator fills in the outcome fields
    (stages, first_token, finish, preemptions). Compared by identity."""
    __slots__ = REQUEST_FIELDS

    def __init__(self, id: int, arrival: float, task: str, model: str, prompt_tokens: int,
                 output_tokens: int = 0, input_images: tuple[tuple[int, int], ...] = (),
                 output_image: tuple[int, int] | None = None, steps: int = 0, cfg: bool = False,
                 slo_class: str = "standard", stages: list[StageRecord] | None = None,
                 first_token: float = NAN, finish: float = NAN, preemptions: int = 0,
                 image_tokens_in: int = 0, image_tokens_out: int = 0,
                 image_ids: tuple[int, ...] = ()) -> None:
        self.id = id
        self.arrival = arrival
        self.task = task
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.input_images = input_images
        self.output_image = output_image
        self.steps = steps
        self.cfg = cfg
        self.slo_class = slo_class
        # --- outcome ---------------------------------------------------------------------
        self.stages: list[StageRecord] = [] if stages is None else stages
        self.first_token = first_token
        self.finish = finish
        self.preemptions = preemptions
        self.image_tokens_in = image_tokens_in      # input-image tokens in the serving model's own tokenization
        self.image_tokens_out = image_tokens_out    # output-image latent tokens (DiT patches)
        self.image_ids = image_ids      # one per input image: equal ids = the same picture (caches)

    def latencies_ms(self, first: float) -> tuple[float, float, float, float]:
        """(ttft, tpot, e2el, queue) of the completed request in ms, NaN where undefined; queue
        is from arrival to `first`, its first stage's start. The one definition requests.parquet
        and summary.json share (sim.run.output.latencies_ms)."""
        return (self.ttft * 1000.0, self.tpot * 1000.0, (self.finish - self.arrival) * 1000.0,
                (first - self.arrival) * 1000.0)

    def __repr__(self) -> str:
        return "Request(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in REQUEST_FIELDS) + ")"

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
