"""One simulation run: config -> workload -> policy -> stage servers -> records -> metrics."""
from __future__ import annotations

import itertools
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Optional

from sim.compiled import ROOT
from sim.config import SimConfig
from sim.core.kernel import Kernel, clock
from sim.core.records import Request
from sim.engines.latency import ANALYTIC, ESTIMATED, LatencyModel, table_source_line
from sim.policies.policy import PILOT_REQUESTS, SimContext, build_policy
from sim.run.gc_control import gc_tuned_for_simulation
from sim.run.metrics import MetricsCollector
from sim.run.output import RequestsParquetWriter, write_json_atomic
from sim.run.timeline import UtilizationSampler
from sim.workloads import request_source

REPO_ROOT = ROOT     # (compiled, a module's own __file__ is not its path while it initialises)


def resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


class Run:
    """Holds everything of one run so tests can inspect the policy and requests afterwards."""

    def __init__(self, cfg: SimConfig, outdir: Path | None = None, keep_rows: int = 20_000):
        cfg.check()
        self.cfg = cfg
        self.outdir = outdir
        self.env = Kernel()
        self.lat = LatencyModel(resolve(cfg.profiles_dir), cfg.latency.tables or cfg.cluster.gpu,
                                cfg.latency.out_of_range,
                                cfg.latency.fallback_set(cfg.latency.tables or cfg.cluster.gpu))
        self.metrics = MetricsCollector(cfg.slo, keep_rows=keep_rows)
        self.workload = request_source(cfg.workload, cfg.seed, model_override=cfg.model)
        self.n_total = len(self.workload)
        self.completed = 0
        self.arrived = 0
        self.steps = 0                    # SimPy events processed (Kernel.run_until)
        self.last_finish = 0.0
        self.writer: Optional[RequestsParquetWriter] = None
        self.sampler: UtilizationSampler | None = None   # per-pool utilization over time
        self._on_arrival = self._arrive   # one bound method for every arrival event
        self.max_concurrency: Optional[int] = self.workload.max_concurrency   # None: open loop
        self._in_flight = 0
        self._held: deque = deque()       # closed loop: arrived, waiting for a free slot
        self._on_release = self._release
        self.requests: Optional[list[Request]] = [] if keep_rows and self.n_total <= keep_rows else None
        # a source gives the same requests on every iteration (fresh objects): the pilot is
        # the first of them, without building (for a trace: loading) the source again
        pilot = list(itertools.islice(iter(self.workload), PILOT_REQUESTS))
        self.ctx = SimContext(self.env, cfg, self.lat, self._on_complete, self.metrics.add_itl,
                              done=lambda: self.completed >= self.n_total, pilot=pilot)
        self.policy = build_policy(cfg.policy.name, self.ctx)

    def _on_complete(self, req: Request) -> None:
        self.completed += 1
        self.last_finish = now = clock(self.env)
        if self.max_concurrency:        # the client's slot frees when it has seen the last token
            wait = req.finish - now
            if wait > 0:
                self.env.timer(wait, self._on_release)
            else:
                self._release(None)
        if self.writer is not None:
            row = self.metrics.record(req)
            assert row is not None
            self.writer.add_row(row)
        else:
            self.metrics.record(req, row=False)   # no row dict unless it is kept
        if self.requests is not None:
            self.requests.append(req)

    def _start_arrivals(self) -> None:
        """Arrivals as event callbacks, not a SimPy process: the same events at the same times
        in the same order (an urgent start event at time 0, as a process's initialisation, then
        one timeout per arrival later than the clock), without a generator resumed per request."""
        self._reqs: Iterator[Request] = iter(self.workload)
        self._pending: Optional[Request] = None
        self.env.call_soon(self._arrive)

    def _arrive(self, _ev) -> None:
        env = self.env
        now = clock(env)                # (the clock does not move inside an event)
        send = self._send if self.max_concurrency else self.policy.admit
        req = self._pending
        if req is not None:             # its timeout fired
            self._pending = None
            self.arrived += 1
            send(req, now)
        for req in self._reqs:
            if req.arrival > now:
                self._pending = req
                env.timer(req.arrival - now, self._on_arrival)
                return
            self.arrived += 1
            send(req, now)

    def _send(self, req: Request, now: float) -> None:
        """Closed loop: send now if a slot is free, else hold it (FIFO, as the client's
        semaphore); its latencies count from the send, as `vllm bench serve` measures them."""
        if self._in_flight < (self.max_concurrency or 0):
            self._in_flight += 1
            self.policy.admit(req, now)
        else:
            self._held.append(req)

    def _release(self, _ev) -> None:
        self._in_flight -= 1
        if self._held:
            req = self._held.popleft()
            req.arrival = now = clock(self.env)
            self._in_flight += 1
            self.policy.admit(req, now)

    def run(self, progress: bool = False, finish: Callable[[dict], None] | None = None) -> dict:
        """Simulate; returns the summary (also written to outdir/summary.json, last of the run's
        files, so its presence means the run finished). `finish(summary)` runs before that
        write (sim.cli: adds the cache key and writes report.html)."""
        t0 = time.perf_counter()
        if self.outdir is not None and self.cfg.output.write_requests:
            self.outdir.mkdir(parents=True, exist_ok=True)
            self.writer = RequestsParquetWriter(self.outdir / "requests.parquet",
                                                self.cfg.output.chunk_rows, self.cfg.slo)
        if self.outdir is not None and self.cfg.output.report:
            w = self.cfg.workload      # a first interval of ~1/240 of the expected span
            span = w.num_requests / w.arrival.rate if w.arrival.process == "gamma" else 0.0
            self.sampler = UtilizationSampler(self.env, self.policy.gpus,
                                              done=lambda: self.completed >= self.n_total,
                                              dt=max(1.0, span / 240))
        try:
            self._start_arrivals()
            if self.sampler is not None:
                self.sampler.start()
            with gc_tuned_for_simulation():
                if progress:
                    self._run_with_bar()
                else:
                    self.steps += self.env.run_all()
            if self.writer is not None:
                self.writer.close()
        except BaseException:
            if self.writer is not None:
                self.writer.abort()
            raise
        wall = time.perf_counter() - t0
        return self.summarize(wall, finish)

    def _run_with_bar(self) -> None:
        from tqdm import tqdm
        with tqdm(total=self.n_total, unit="req", desc="simulating", mininterval=0.5) as bar:
            while self.env.peek() != float("inf"):
                self.steps += self.env.run_until(self.env.peek() + 5.0)
                bar.set_postfix_str(f"t={self.env.now:,.0f}s sim", refresh=False)
                bar.update(self.completed - bar.n)

    def summarize(self, wall_s: float, finish: Callable[[dict], None] | None = None) -> dict:
        cfg = self.cfg
        if self.completed != self.n_total:
            raise RuntimeError(f"simulation ended with {self.n_total - self.completed} of "
                               f"{self.n_total} requests unfinished (arrived {self.arrived})")
        # the last completion, not env.now: a periodic process (the autoscaler) may tick past it
        duration = self.last_finish
        util = self.policy.utilization(duration)
        price = cfg.cost.usd_per_gpu_hour.get(cfg.cluster.gpu, 0.0)
        extra = {
            "policy": cfg.policy.name, "seed": cfg.seed, "num_requests": self.n_total,
            "workload": cfg.workload.name, "cluster": cfg.cluster.name,
            "layout": self.policy.notes,
            "latency_model": self.lat.report(),
            # where each model's stage latencies come from (LatencyModel.table_sets: measured
            # <gpu>/, estimated <gpu>-est/, roofline <gpu>-analytic/), at the top level so no
            # reader mistakes a run on estimated or roofline tables for a measured one
            "profile_tables": {m: table_source_line(t) for m, t in self.lat.tables().items()},
            "estimated_tables": self.lat.models_from(ESTIMATED),
            "analytic_tables": self.lat.models_from(ANALYTIC),
            "sim_wall_s": round(wall_s, 3),
            "sim_events": sum(g.events for g in self.policy.gpus),
            "max_concurrency": self.max_concurrency,    # as vllm bench serve's result
        }
        if self.policy.moves is not None:
            extra["autoscale_moves"] = self.policy.moves
        summary = self.metrics.summary(duration, len(self.policy.gpus), cfg.cluster.gpu, price,
                                       cfg.slo, util, extra)
        if self.outdir is not None:
            if self.sampler is not None:
                self.sampler.finish(duration)
                self.sampler.write(self.outdir / "timeline.parquet")
            if finish is not None:
                finish(summary)
            write_json_atomic(self.outdir / "summary.json", summary)
        return summary


def run(cfg: SimConfig, outdir: Path | None = None, progress: bool = False) -> dict:
    return Run(cfg, outdir).run(progress)
