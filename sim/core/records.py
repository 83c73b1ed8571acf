"""Per-request records: what a request asks for and what happened to it, stage by stage."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

NAN = math.nan
TEXT_OUT_TASKS = ("text", "understand")
IMAGE_OUT_TASKS = ("generate", "edit", "inpaint", "outpaint")
IMAGE_IN_TASKS = ("understand", "edit", "inpaint", "outpaint")


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
