"""Per-pool GPU utilization over simulated time (timeline.parquet, drawn by the run's report).

A sampler wakes every `dt` simulated seconds and reads each GPU's busy time so far (committed
units plus the elapsed part of the running one), adding the increment to the GPU's pool at that
moment (pools change under autoscaling). At most `max_intervals` intervals are kept: when full,
neighbours merge and `dt` doubles, so any run length gives 120-240 equal intervals. The
sampler only reads state, so the simulation's results do not change; it stops when the run is
done or when nothing else is left to happen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from sim.core.gpu import GPU
from sim.run.output import arrow_table, write_parquet_atomic

TIMELINE_SCHEMA = pa.schema([("t_start", pa.float64()), ("t_end", pa.float64()),
                             ("pool", pa.string()), ("gpus", pa.float64()),
                             ("busy_gpu_s", pa.float64()), ("utilization", pa.float64())])


class UtilizationSampler:
    def __init__(self, env: Any, gpus: Sequence[GPU], done: Callable[[], bool],
                 dt: float = 1.0, max_intervals: int = 240):
        self.env, self.gpus, self.done = env, gpus, done
        self.dt = dt
        self.max_intervals = max_intervals
        self.prev = [0.0] * len(gpus)
        self.t_prev = 0.0
        # per interval: end time, {pool: busy GPU-seconds}, {pool: GPU-seconds available}
        self.ends: list[float] = []
        self.busy: list[dict[str, float]] = []
        self.cap: list[dict[str, float]] = []
        self._cb = self._tick

    def start(self) -> None:
        self.env.timer(self.dt, self._cb)

    @staticmethod
    def _busy(g: GPU, now: float) -> float:
        return g.busy_time + (now - g.start if g.cur is not None else 0.0)

    def sample(self, now: float) -> None:
        """Close the interval (t_prev, now]."""
        span = now - self.t_prev
        if span <= 0:
            return
        busy: dict[str, float] = {}
        cap: dict[str, float] = {}
        prev = self.prev
        for i, g in enumerate(self.gpus):
            b = self._busy(g, now)
            role = g.role or "gpu"
            busy[role] = busy.get(role, 0.0) + (b - prev[i])
            cap[role] = cap.get(role, 0.0) + span
            prev[i] = b
        self.ends.append(now)
        self.busy.append(busy)
        self.cap.append(cap)
        self.t_prev = now
        if len(self.ends) >= self.max_intervals:
            self._halve()

    def _halve(self) -> None:
        ends, busy, cap = [], [], []
        for k in range(0, len(self.ends) - 1, 2):
            ends.append(self.ends[k + 1])
            busy.append(_add(self.busy[k], self.busy[k + 1]))
            cap.append(_add(self.cap[k], self.cap[k + 1]))
        if len(self.ends) % 2:
            ends.append(self.ends[-1])
            busy.append(self.busy[-1])
            cap.append(self.cap[-1])
        self.ends, self.busy, self.cap = ends, busy, cap
        self.dt *= 2

    def _tick(self, _ev: Any) -> None:
        if self.done():
            return
        self.sample(self.env.now)
        if self.env.peek() != float("inf"):       # else nothing is left to happen: stop
            self.env.timer(self.dt, self._cb)

    def finish(self, end: float) -> None:
        """Close the last (partial) interval at the run's end."""
        self.sample(end)

    def table(self) -> pa.Table:
        rows: dict[str, list[Any]] = {n: [] for n in TIMELINE_SCHEMA.names}
        start = 0.0
        for end, busy, cap in zip(self.ends, self.busy, self.cap):
            span = end - start
            for pool in sorted(cap):
                rows["t_start"].append(start)
                rows["t_end"].append(end)
                rows["pool"].append(pool)
                rows["gpus"].append(cap[pool] / span)
                rows["busy_gpu_s"].append(busy.get(pool, 0.0))
                rows["utilization"].append(busy.get(pool, 0.0) / cap[pool])
            start = end
        return arrow_table(rows, TIMELINE_SCHEMA)

    def write(self, path: Path) -> None:
        write_parquet_atomic(path, self.table())


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v
    return out
