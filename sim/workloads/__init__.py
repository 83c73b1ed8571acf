"""Request sources: where a run's requests come from. Two implementations of one interface,
`RequestSource`: the synthetic source (sim.workloads.synthetic: task mix, arrival process,
length and image-size laws from sim.workloads.laws) and trace replay (sim.workloads.trace:
CSV / JSONL / parquet tables and `vllm bench serve` results). `request_source` picks one from
the workload config."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional, Protocol

from sim.config import ConfigError, WorkloadConfig
from sim.core.records import Request
from sim.workloads.laws import DEFAULT_CHUNK
from sim.workloads.requests import resolve_model
from sim.workloads.synthetic import SyntheticWorkload
from sim.workloads.trace import TraceWorkload


class RequestSource(Protocol):
    """Requests in arrival order, the same ones on every iteration."""
    max_concurrency: Optional[int]      # the client's in-flight limit; None: open loop

    def __len__(self) -> int:
        """How many requests."""

    def __iter__(self) -> Iterator[Request]:
        """The requests one by one (a consumed request is not kept by the source)."""

    def chunks(self) -> Iterator[list[Request]]:
        """The requests in lists of at most chunk_size."""


def request_source(cfg: WorkloadConfig, seed: int, model_override: Optional[str] = None,
                   chunk_size: int = DEFAULT_CHUNK) -> RequestSource:
    """The source of a workload config: trace replay for `arrival.process: trace` (or
    `workload.path`), else synthetic. `model_override` serves every task with one model."""
    cfg.check()
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r} is invalid; allowed: >= 1")
    if model_override:
        resolve_model(model_override, "model")
    if cfg.arrival.process == "trace":
        return TraceWorkload(cfg, int(seed), model_override, chunk_size)
    return SyntheticWorkload(cfg, int(seed), model_override, chunk_size)


__all__ = ["RequestSource", "request_source", "SyntheticWorkload", "TraceWorkload"]
