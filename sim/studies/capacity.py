"""Capacity planning by search over simulations (`python -m sim +experiment=capacity ...`).

Per policy in ``capacity.policies``:

* ``min_gpus``: the fewest GPUs (``cluster.num_gpus``) that meet the SLO at
  ``capacity.target_qps`` -- speculative doubling from ``capacity.min_gpus`` until a size meets
  it, then k-ary bisection between the largest failing and the smallest passing size. The pool
  split of disaggregated policies comes from the policy's own sizing rule (fixed
  ``cluster.pools`` / ``cluster.replicas`` are dropped for the probes) and is reported from the
  run's ``summary['layout']``.
* ``max_qps``: the highest ``workload.arrival.rate`` a cluster of ``capacity.num_gpus`` (default
  ``cluster.num_gpus``) sustains under the SLO -- doubling from ``target_qps`` to bracket it,
  then k-ary bisection until ``(hi - lo) <= qps_rel_tol * hi``.

SLO: ``p99_e2el_ms <= capacity.slo_p99_ms`` over all requests, or, with ``slo_p99_ms: null``,
goodput-based: ``slo_attainment >= capacity.min_attainment`` under the per-task ``slo`` targets.
Stability guard (``capacity.max_drain_factor``, default 3): a probe also fails when the last
completion comes more than that many SLO time scales after the last arrival. A p99 leaves 1% of
requests unconstrained, so a policy that starves large jobs (SJF) can meet it while a backlog
grows; in a finite run that backlog shows up as a long drain after arrivals stop. And
``capacity.min_throughput_ratio`` (default 0.9): over the second half of the arrival window,
completions must keep up with arrivals -- a run of a few thousand requests at a rate above
capacity only builds a backlog for a few minutes, which a p99 of minutes can hide.

Both searches assume the SLO is monotone (more GPUs / less load never hurts); the probes are
kept in capacity.json so a reader can check that. Every round gathers the pending probes of
all policies and searches and runs them in parallel with joblib (loky processes, the backend
hydra's joblib launcher uses), ``capacity.n_jobs`` at a time; k = n_jobs points per round.
Each probe simulates ``capacity.num_requests`` requests (the workload's own law otherwise).
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Generator

from sim.config import ConfigError, SimConfig

Search = Generator[list, dict, Any]


# ------------------------------------------------------------------------------------------
# Searches (pure: a generator yields the points it wants evaluated and receives {point: ok})
# ------------------------------------------------------------------------------------------

def _interior_ints(lo: int, hi: int, k: int) -> list[int]:
    pts = sorted({lo + (hi - lo) * i // (k + 1) for i in range(1, k + 1)})
    pts = [p for p in pts if lo < p < hi]
    return pts or [(lo + hi) // 2]


def min_gpus_search(start: int, max_n: int, k: int = 2, max_probes: int = 40) -> Search:
    """Smallest n in [start, max_n] with ok(n), for ok monotone non-decreasing in n; None if
    max_n fails. Yields lists of candidate n, receives {n: bool}."""
    lo, hi, n, probes = start - 1, None, start, 0
    while hi is None and n <= max_n and probes < max_probes:
        cands = []
        c = n
        while len(cands) < k and c <= max_n:
            cands.append(c)
            c *= 2
        if cands[-1] < max_n and c > max_n and len(cands) < k:
            cands.append(max_n)
        res = yield cands
        probes += len(cands)
        for c in cands:
            if res[c]:
                hi = c
                break
            lo = c
        n = cands[-1] * 2
        if hi is None and cands[-1] < max_n < n:
            n = max_n
    if hi is None:
        return None
    while hi - lo > 1 and probes < max_probes:
        pts = _interior_ints(lo, hi, k)
        res = yield pts
        probes += len(pts)
        for p in pts:
            if res[p]:
                hi = p
                break
            lo = p
    return hi


def max_rate_search(start: float, k: int = 2, rel_tol: float = 0.05, max_probes: int = 40,
                    max_rate: float = 1e6) -> Search:
    """Largest rate with ok(rate), for ok monotone non-increasing in rate, to within
    (hi - lo) <= rel_tol * hi. Returns (lo, hi): lo the best passing rate probed (0.0 if none),
    hi the smallest failing one (None if none failed up to max_rate)."""
    lo, hi, r, probes = 0.0, None, float(start), 0
    while hi is None and r <= max_rate and probes < max_probes:
        cands = [r * 2 ** i for i in range(k)]
        res = yield cands
        probes += len(cands)
        for c in cands:
            if res[c]:
                lo = c
            else:
                hi = c
                break
        r = cands[-1] * 2
    if hi is None:
        return lo, None
    while hi - lo > rel_tol * hi and probes < max_probes:
        pts = [lo + (hi - lo) * i / (k + 1) for i in range(1, k + 1)]
        res = yield pts
        probes += len(pts)
        for p in pts:
            if res[p]:
                lo = p
            else:
                hi = p
                break
    return lo, hi


def drive(searches: dict[Any, Search], evaluate: Callable[[list[tuple[Any, Any]]], list[bool]]
          ) -> dict[Any, Any]:
    """Run several searches in lockstep: each round, all pending points of all searches go to
    `evaluate` at once (a list of (search key, point) -> list of ok flags)."""
    results: dict[Any, Any] = {}
    pending: dict[Any, list] = {}
    for key, gen in searches.items():
        try:
            pending[key] = next(gen)
        except StopIteration as e:
            results[key] = e.value
    while pending:
        batch = [(key, x) for key, xs in pending.items() for x in xs]
        oks = evaluate(batch)
        got: dict[Any, dict] = {}
        for (key, x), ok in zip(batch, oks):
            got.setdefault(key, {})[x] = ok
        nxt = {}
        for key in pending:
            try:
                nxt[key] = searches[key].send(got[key])
            except StopIteration as e:
                results[key] = e.value
        pending = nxt
    return results


# ------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------

def probe_config(cfg: SimConfig, policy: str, num_gpus: int, rate: float) -> SimConfig:
    """The serve config of one probe: policy, cluster size and offered rate replaced."""
    c = copy.deepcopy(cfg)
    c.experiment = "serve"
    c.policy.name = policy
    c.cluster.num_gpus = int(num_gpus)
    c.cluster.name = f"{c.cluster.gpu}x{num_gpus}"
    c.cluster.pools = {}
    c.cluster.replicas = {}
    c.workload.num_requests = cfg.capacity.num_requests
    set_rate(c, rate)
    c.output.write_requests = False
    c.output.progress = "off"
    return c


def mean_rate(cfg: SimConfig) -> float:
    a = cfg.workload.arrival
    if a.process == "mmpp":
        return (a.base_rate * a.mean_base_s + a.burst_rate * a.mean_burst_s) / (a.mean_base_s + a.mean_burst_s)
    return a.rate


def set_rate(cfg: SimConfig, rate: float) -> None:
    """Offered mean rate: Gamma `rate`; MMPP both state rates scaled together."""
    a = cfg.workload.arrival
    if a.process == "trace":
        raise ConfigError("capacity: workload.arrival.process='trace' is invalid; allowed: gamma or "
                          "mmpp (a synthetic workload whose rate the search can set)")
    if a.process == "mmpp":
        f = rate / mean_rate(cfg)
        a.base_rate *= f
        a.burst_rate *= f
    a.rate = float(rate)


def slo_scale_s(cfg: SimConfig) -> float:
    """The SLO's time scale in seconds (p99 target, else the largest per-task e2el target)."""
    cap = cfg.capacity
    if cap.slo_p99_ms is not None:
        return cap.slo_p99_ms / 1e3
    e2el = [t.get("e2el_ms") for t in cfg.slo.targets.values() if t.get("e2el_ms")]
    return max(e2el) / 1e3 if e2el else math.inf


def meets(s: dict, cap, slo_s: float = math.inf) -> bool:
    if s.get("error"):
        return False
    if cap.max_drain_factor is not None and s.get("drain_s") is not None \
            and s["drain_s"] > cap.max_drain_factor * slo_s:
        return False
    if cap.min_throughput_ratio is not None and s.get("window_throughput_ratio") is not None \
            and s["window_throughput_ratio"] < cap.min_throughput_ratio:
        return False
    if cap.slo_p99_ms is not None:
        p99 = s.get("p99_e2el_ms")
        return p99 is not None and p99 <= cap.slo_p99_ms
    att = s.get("slo_attainment")
    return att is not None and att >= cap.min_attainment


def run_probe(cfg: SimConfig, policy: Any, num_gpus: int, rate: float) -> dict[str, Any]:
    """One simulation; a compact record (an infeasible layout is an error record, not a crash).
    `policy`: a policy name, or a sim.studies.fleet.Candidate (policy, GPU, precision, split)."""
    from sim.run.runner import Run
    rec: dict[str, Any] = {"policy": policy, "num_gpus": int(num_gpus), "rate": float(rate)}
    t0 = time.perf_counter()
    try:
        if not isinstance(policy, str):
            from sim.studies.fleet import apply
            cfg, policy = apply(cfg, policy), policy.policy
        pc = probe_config(cfg, policy, num_gpus, rate)
        run = Run(pc, None, keep_rows=0)
        s = run.run()
        arr, fin = run.metrics.column("arrival"), run.metrics.column("finish")
        last_arrival = float(arr.max()) if len(arr) else 0.0
        half = last_arrival / 2
        n_arr = int(((arr > half) & (arr <= last_arrival)).sum())
        n_fin = int(((fin > half) & (fin <= last_arrival)).sum())
    except (ConfigError, ValueError) as e:      # (e.g. a request too big for a GPU's KV cache)
        rec.update(error=str(e), wall_s=round(time.perf_counter() - t0, 3))
        return rec
    rec.update({k: s.get(k) for k in (
        "request_throughput", "goodput", "slo_attainment", "median_e2el_ms", "p99_e2el_ms",
        "p99_ttft_ms", "usd_per_1k_requests", "duration")})
    rec["mean_gpu_util"] = s["utilization"]["mean_gpu"]
    rec["last_arrival_s"] = last_arrival
    rec["drain_s"] = s["duration"] - last_arrival      # completion of the last request - last arrival
    # completions / arrivals over the second half of the arrival window (~1 when stable)
    rec["window_throughput_ratio"] = n_fin / n_arr if n_arr else None
    rec["layout"] = s.get("layout")
    rec["gpus_per_pool"] = s["utilization"].get("gpus_per_pool")
    rec["per_task_p99_e2el_ms"] = {t: d.get("p99_e2el_ms") for t, d in s["per_task"].items()}
    rec["not_measured"] = s["latency_model"].get("not_measured", [])
    rec["wall_s"] = round(time.perf_counter() - t0, 3)
    return rec


class ProbeRunner:
    """Evaluates (policy, n, rate) probes in parallel with joblib, caching by key."""

    def __init__(self, cfg: SimConfig, n_jobs: int | None = None):
        self.cfg = cfg
        self.n_jobs = n_jobs or cfg.capacity.n_jobs
        self.cache: dict[tuple, dict] = {}
        self.rounds = 0

    def run(self, keys: list[tuple[str, int, float]]) -> list[dict]:
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache]
        if todo:
            self.rounds += 1
            if self.n_jobs == 1 or len(todo) == 1:
                recs = [run_probe(self.cfg, *k) for k in todo]
            else:
                from joblib import Parallel, delayed
                recs = Parallel(n_jobs=self.n_jobs, backend="loky")(
                    delayed(run_probe)(self.cfg, *k) for k in todo)
            for k, r in zip(todo, recs):
                r["meets_slo"] = meets(r, self.cfg.capacity, slo_scale_s(self.cfg))
                self.cache[k] = r
        return [self.cache[k] for k in keys]


# ------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------

def plan(cfg: SimConfig, runner: ProbeRunner | None = None) -> dict[str, Any]:
    cap = cfg.capacity
    cap.check()
    runner = runner or ProbeRunner(cfg)
    k = max(1, runner.n_jobs if runner.n_jobs > 0 else 2)
    fleet = cap.num_gpus or cfg.cluster.num_gpus
    searches: dict[tuple[str, str], Search] = {}
    for p in cap.policies:
        if "min_gpus" in cap.search:
            searches[(p, "min_gpus")] = min_gpus_search(cap.min_gpus, cap.max_gpus, k, cap.max_probes)
        if "max_qps" in cap.search:
            searches[(p, "max_qps")] = max_rate_search(cap.target_qps, k, cap.qps_rel_tol, cap.max_probes)

    def evaluate(batch):
        keys = [(key[0], x, cap.target_qps) if key[1] == "min_gpus" else (key[0], fleet, x)
                for key, x in batch]
        return [r["meets_slo"] for r in runner.run(keys)]

    t0 = time.perf_counter()
    found = drive(searches, evaluate)
    out: dict[str, Any] = {}
    for p in cap.policies:
        res: dict[str, Any] = {}
        if (p, "min_gpus") in found:
            n = found[(p, "min_gpus")]
            rec = runner.cache.get((p, n, cap.target_qps)) if n else None
            res["min_gpus"] = {"num_gpus": n, "target_qps": cap.target_qps,
                               "found": n is not None,
                               "at_min": _brief(rec),
                               "layout": rec.get("layout") if rec else None}
            below = runner.cache.get((p, n - 1, cap.target_qps)) if n else None
            if below:
                res["min_gpus"]["one_fewer"] = _brief(below)
        if (p, "max_qps") in found:
            lo, hi = found[(p, "max_qps")]
            rec = runner.cache.get((p, fleet, lo)) if lo else None
            res["max_qps"] = {"num_gpus": fleet, "max_qps": lo, "first_failing_qps": hi,
                              "at_max": _brief(rec), "layout": rec.get("layout") if rec else None}
        out[p] = res
    slo = ({"p99_e2el_ms": cap.slo_p99_ms} if cap.slo_p99_ms is not None else
           {"min_attainment": cap.min_attainment, "targets": cfg.slo.targets})
    return {
        "experiment": "capacity", "slo": slo, "target_qps": cap.target_qps,
        "fleet_gpus": fleet, "num_requests_per_probe": cap.num_requests, "n_jobs": runner.n_jobs,
        "workload": cfg.workload.name, "arrival_process": cfg.workload.arrival.process,
        "gpu": cfg.cluster.gpu, "seed": cfg.seed, "results": out,
        "probes": sorted(runner.cache.values(), key=lambda r: (r["policy"], r["num_gpus"], r["rate"])),
        "num_probes": len(runner.cache), "rounds": runner.rounds,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def _brief(rec: dict | None) -> dict | None:
    if not rec:
        return None
    return {k: rec.get(k) for k in ("num_gpus", "rate", "p99_e2el_ms", "median_e2el_ms",
                                    "slo_attainment", "request_throughput", "mean_gpu_util",
                                    "usd_per_1k_requests", "error") if rec.get(k) is not None}


def format_table(result: dict[str, Any]) -> str:
    slo = result["slo"]
    slo_s = (f"p99 E2EL <= {slo['p99_e2el_ms']:,.0f} ms" if "p99_e2el_ms" in slo
             else f"SLO attainment >= {slo['min_attainment']:.0%}")
    lines = [f"capacity: {slo_s}; target {result['target_qps']:g} req/s; fleet "
             f"{result['fleet_gpus']} GPUs; {result['num_requests_per_probe']} requests/probe; "
             f"{result['num_probes']} probes in {result['rounds']} rounds, {result['wall_s']:.1f} s",
             f"{'policy':16s} {'min GPUs':>8s} {'p99 ms':>11s} {'$/1k':>8s}  {'max QPS':>9s} "
             f"{'p99 ms':>11s}  layout at min GPUs"]
    for p, r in result["results"].items():
        mg, mq = r.get("min_gpus", {}), r.get("max_qps", {})
        am, ax = mg.get("at_min") or {}, mq.get("at_max") or {}
        n = mg.get("num_gpus")
        lay = mg.get("layout") or {}
        lay = lay.get("pools") or lay.get("replicas") or lay
        q = mq.get("max_qps")
        lines.append(
            f"{p:16s} {(str(n) if n is not None else ('none' if mg else '-')):>8s} "
            f"{_n(am.get('p99_e2el_ms')):>11s} {_n(am.get('usd_per_1k_requests'), 3):>8s}  "
            f"{_n(q, 3) if q is not None else '-':>9s} {_n(ax.get('p99_e2el_ms')):>11s}  "
            f"{json.dumps(lay, separators=(',', ':'))}")
    return "\n".join(lines)


def _n(x, d: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{d}f}"


def run_capacity(cfg: SimConfig, outdir: Path | None) -> dict[str, Any]:
    """Entry point of `experiment: capacity` (sim/cli.py): searches, writes capacity.json (and,
    for a fleet plan, fleet_plan.csv / .png) and returns the result dict (sim.cli prints it with
    format_result)."""
    cap = cfg.capacity
    if cap.gpus or cap.precisions or cap.pd_split:      # the fleet plan (sim/studies/fleet.py)
        from sim.studies.fleet import plan_fleet, write_outputs
        result = plan_fleet(cfg)
        if outdir is not None:
            write_outputs(result, Path(outdir))
    else:
        result = plan(cfg)
    if outdir is not None:
        from sim.run.output import write_json_atomic
        Path(outdir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(outdir) / "capacity.json", result)
    return result


def format_result(cfg: SimConfig, result: dict[str, Any]) -> str:
    """The printed table of run_capacity's result: the fleet plan's or the capacity plan's."""
    if result.get("plan") == "fleet":
        from sim.studies.fleet import format_fleet
        return format_fleet(result)
    return format_table(result)
