"""Queueing validation scenario: G/G/c with one central FCFS queue, built from the same GPU
executor, StageQueue and batch engine the serving policies use (batch size 1, synthetic
service laws), so the closed forms (M/M/1, Erlang C, Pollaczek-Khinchine, Gamma/M/1) check the
simulator's own machinery. `python -m sim +experiment=queueing queueing.servers=C ...`"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from sim.config import SimConfig
from sim.core.gpu import GPU
from sim.core.kernel import Kernel
from sim.core.records import Job, Request
from sim.engines.batch import BatchEngine
from sim.engines.queues import StageQueue
from sim.rng import stream
from sim.run.output import write_json_atomic, write_parquet_atomic
from sim.workloads.laws import gamma_arrivals
from sim.names import TEXT


def sample_service(law: str, mean: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Service times with the given mean and coefficient of variation."""
    if law in ("constant", "deterministic"):
        return np.full(n, mean)
    if law == "exponential":
        return rng.exponential(mean, n)
    if law == "lognormal":
        s2 = math.log(1.0 + cv * cv)
        return rng.lognormal(math.log(mean) - s2 / 2.0, math.sqrt(s2), n)
    raise ValueError(f"queueing.service_law={law!r}; allowed: constant, deterministic, exponential, lognormal")


class _Little:
    """Time integral of the number in system, kept independently of per-request times."""

    def __init__(self) -> None:
        self.n = 0
        self.last = 0.0
        self.area = 0.0

    def step(self, now: float, delta: int) -> None:
        self.area += self.n * (now - self.last)
        self.last = now
        self.n += delta


def simulate(servers: int, arrivals: np.ndarray, service: np.ndarray) -> dict:
    env = Kernel()
    queue = StageQueue("queueing")
    gpus = []
    for i in range(servers):
        g = GPU(env, i, 0)
        g.role = "queueing"
        g.add(BatchEngine("service", "synthetic", queue, None, max_batch=1,
                          service=lambda batch: batch[0].work))
        gpus.append(g)
    little = _Little()
    n = len(arrivals)
    start = np.full(n, np.nan)
    end = np.full(n, np.nan)

    def done(job: Job, now: float) -> None:
        little.step(now, -1)
        start[job.req.id] = job.record.start
        end[job.req.id] = now

    def source():
        for i in range(n):
            t = float(arrivals[i])
            if t > env.now:
                yield env.timeout(t - env.now)
            little.step(env.now, +1)
            req = Request(i, env.now, TEXT, "synthetic", 0)
            queue.put(Job(req, "service", "synthetic", on_done=done, work=float(service[i])), env.now)

    env.process(source())
    env.run()
    busy = sum(g.busy_time for g in gpus)
    return {"start": start, "end": end, "duration": env.now, "area": little.area, "busy": busy}


def run_queueing(cfg: SimConfig, outdir: Path | None) -> dict:
    q = cfg.queueing
    arrivals = gamma_arrivals(q.num_requests, q.arrival_rate, q.arrival_shape, stream(cfg.seed, "arrivals"))
    service = sample_service(q.service_law, q.service_mean_s, q.service_cv, q.num_requests,
                             stream(cfg.seed, "service"))
    r = simulate(q.servers, arrivals, service)
    wait = r["start"] - arrivals
    soj = r["end"] - arrivals
    T = r["duration"]
    summary = {
        "experiment": "queueing", "seed": cfg.seed, "servers": q.servers,
        "arrival_rate": q.arrival_rate, "arrival_shape": q.arrival_shape,
        "service_law": q.service_law, "service_mean_s": q.service_mean_s, "service_cv": q.service_cv,
        "completed": int(np.isfinite(r["end"]).sum()), "duration": T,
        "offered_load": q.arrival_rate * q.service_mean_s / q.servers,
        "utilization": r["busy"] / (q.servers * T),
        "mean_queue_ms": float(wait.mean() * 1e3), "median_queue_ms": float(np.median(wait) * 1e3),
        "p99_queue_ms": float(np.percentile(wait, 99) * 1e3),
        "mean_e2el_ms": float(soj.mean() * 1e3), "median_e2el_ms": float(np.median(soj) * 1e3),
        "p90_e2el_ms": float(np.percentile(soj, 90) * 1e3), "p99_e2el_ms": float(np.percentile(soj, 99) * 1e3),
        "request_throughput": q.num_requests / T,
        # Little's law, sample-path form: time-average number in system vs throughput x mean sojourn
        "time_avg_in_system": r["area"] / T,
        "littles_law_rhs": (q.num_requests / T) * float(soj.mean()),
    }
    if outdir is not None:
        outdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(outdir / "summary.json", summary)
        write_parquet_atomic(outdir / "requests.parquet", pa.Table.from_pandas(pd.DataFrame(
            {"arrival": arrivals, "start": r["start"], "end": r["end"]}), preserve_index=False))
    return summary
