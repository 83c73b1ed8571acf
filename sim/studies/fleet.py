"""What to buy and how to serve: one capacity plan across policy x GPU type x precision x
prefill/decode split (`python -m sim +experiment=capacity capacity.gpus=[h100,h200]
capacity.precisions=[bf16,fp8] capacity.pd_split=[false,true]`).

Every candidate (policy, gpu, precision, split) gets the min-GPUs search of sim.studies.capacity
at capacity.target_qps under the same SLO, the same workload and seed; its fleet costs
num_gpus x cost.usd_per_gpu_hour[gpu]. The plan reports the cheapest candidate that meets the
SLO and, per dimension, the cheapest candidate that differs from it there (the runner-up on that
dimension), as a table (stdout, fleet_plan.csv), capacity.json and a figure (fleet_plan.png).

Next to each simulated answer it prints what the analytic layer says for the same candidate,
with the error: the load estimate (GPUs = ceil(target_qps x the mean GPU-seconds a request's
hops cost at typical batching, sim.engines.cost.hop_work): the work-conserving fleet at 100%
utilisation, no queueing; batching beyond the typical one can beat it) and the memory model per AR model variant
(weights, KV bytes per token, KV capacity and the concurrency it allows; against vLLM's own KV
capacity where the table was measured). And where its numbers come from: every candidate says
which profile tables it read and where they come from, by sim.engines.latency's one rule:
`measured` (<gpu>/), `estimated` (<gpu>-est/: measured tables scaled by roofline ratios,
engine = analytic), `analytic` (<gpu>-analytic/: the roofline alone), or `mixed` when its
models' tables differ; the winner's line names the models that were not measured. Measured and analytic candidates are never
ranked without that label.
"""
from __future__ import annotations

import copy
import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiler.models import load_model, with_precision
from sim.config import ConfigError, SimConfig
from sim.names import AR
from sim.policies import POLICIES, PD_SPLIT
from sim.studies.analytic import GPU_MEM_GIB

DIMENSIONS = ("policy", "gpu", "precision", "pd_split")
BOUND_REQUESTS = 2000        # requests whose hops give the mean GPU-seconds of the load bound


@dataclass(frozen=True)
class Candidate:
    policy: str
    gpu: str
    precision: str
    pd_split: bool

    @property
    def label(self) -> str:
        return f"{self.policy}/{self.gpu}/{self.precision}" + ("/split" if self.pd_split else "")

    def get(self, dim: str) -> Any:
        return getattr(self, dim)


def candidates(cfg: SimConfig) -> list[Candidate]:
    """policy x gpu x precision x split (split only for stage-pool policies)."""
    cap = cfg.capacity
    gpus = list(cap.gpus) or [cfg.cluster.gpu]
    precs = list(cap.precisions) or [cfg.precision or "bf16"]
    splits = list(cap.pd_split) or [bool(cfg.policy.pd_split)]
    out = []
    for p, g, pr, sp in itertools.product(cap.policies, gpus, precs, splits):
        if sp and POLICIES[p](cfg.policy).placement not in PD_SPLIT:
            continue
        out.append(Candidate(p, g, pr, bool(sp)))
    if not out:
        raise ConfigError(f"capacity: no candidate from policies={list(cap.policies)} x "
                          f"pd_split={splits}; allowed: at least one stage-pool policy when "
                          f"every pd_split entry is true")
    return out


def apply(cfg: SimConfig, c: Candidate) -> SimConfig:
    """cfg for candidate c: its GPU (memory, price key, table set), precision and split."""
    out = copy.deepcopy(cfg)
    out.__dict__.pop("_checked", None)
    out.workload.__dict__.pop("_checked", None)
    if c.gpu not in GPU_MEM_GIB and c.gpu != cfg.cluster.gpu:
        raise ConfigError(f"capacity.gpus: {c.gpu!r} is invalid; allowed: {sorted(GPU_MEM_GIB)} or "
                          f"cluster.gpu ({cfg.cluster.gpu!r})")
    if c.gpu not in out.cost.usd_per_gpu_hour:
        raise ConfigError(f"capacity.gpus: {c.gpu!r} has no price; allowed: a GPU of "
                          f"cost.usd_per_gpu_hour {sorted(out.cost.usd_per_gpu_hour)}")
    if c.gpu != cfg.cluster.gpu:
        out.cluster.gpu = c.gpu
        out.cluster.gpu_mem_gib = GPU_MEM_GIB[c.gpu]
    out.workload.task_models = {t: _base(m) for t, m in out.workload.task_models.items()}
    out.precision = c.precision
    out.policy.name = c.policy
    out.policy.pd_split = c.pd_split
    return out.check()


def _base(name: str) -> str:
    return name.split("@")[0]


def tables_label(sources: dict[str, str]) -> str:
    """A candidate's tables in one word: the source all its models' tables share (measured /
    estimated / analytic, sim.engines.latency.table_sets), else `mixed`."""
    kinds = set(sources.values())
    return kinds.pop() if len(kinds) == 1 else "mixed"


def analytic_view(cfg: SimConfig, c: Candidate) -> dict[str, Any]:
    """The analytic layer's figures for a candidate: the load bound on GPUs at target_qps and the
    memory model per AR model variant (see the module doc)."""
    import itertools as it

    from sim.engines.cost import hop_work
    from sim.engines.latency import MEASURED, LatencyModel
    from sim.engines.memory import GPUContents, kv_capacity_tokens
    from sim.engines.pipeline import plan_hops
    from sim.run.runner import resolve
    from sim.workloads import request_source
    pc = apply(cfg, c)
    gpu = pc.latency.tables or pc.cluster.gpu
    lat = LatencyModel(resolve(pc.profiles_dir), gpu, "clamp", pc.latency.fallback_set(gpu))
    budget = pc.engine.max_num_batched_tokens
    reqs = list(it.islice(iter(request_source(pc.workload, pc.seed)), BOUND_REQUESTS))
    work, tokens, ar_models = 0.0, {}, set()
    for r in reqs:
        for j in plan_hops(r, fused=False):
            work += hop_work(lat, j, budget)
            if j.stage == AR:
                ar_models.add(j.model)
                n, s = tokens.get(j.model, (0, 0))
                tokens[j.model] = (n + 1, s + j.tokens + j.out_tokens)
    per_req = work / max(len(reqs), 1)
    memory = {}
    for m in sorted(ar_models):
        spec = load_model(m)
        own = GPUContents(tuple((m, comp) for comp in spec.components))
        try:
            measured = lat.engine_settings(m)
        except Exception:           # noqa: BLE001 - no table: the memory model alone
            measured = {}
        est = kv_capacity_tokens(m, own, pc.cluster.gpu_mem_gib, pc.engine.gpu_memory_utilization)
        used = kv_capacity_tokens(m, own, pc.cluster.gpu_mem_gib, pc.engine.gpu_memory_utilization,
                                  measured)
        n, s = tokens[m]
        mean_tok = s / n
        vllm = measured.get("kv_capacity_tokens") if lat.source(m) == MEASURED else None
        memory[m] = {"weights_gib": round(own.weights_bytes() / 2**30, 2),
                     "kv_bytes_per_token": spec.kv_bytes_per_token(),
                     "kv_capacity_tokens_model": est, "kv_capacity_tokens_used": used,
                     "kv_capacity_source": ("vLLM measured" if vllm else
                                            "carried from a measured table (estimate)" if
                                            measured.get("num_gpu_blocks") else "memory model"),
                     "vllm_kv_capacity_tokens": vllm,
                     "kv_model_rel_error": (est - vllm) / vllm if vllm else None,
                     "mean_tokens_per_request": round(mean_tok, 1),
                     "max_concurrency": int(used // mean_tok) if mean_tok else None}
    for m in sorted({_base(j) for j in pc.workload.task_models.values()}):
        spec = load_model(with_precision(m, c.precision))
        if spec.family in ("ar_dit", "dit"):
            w = spec.weights_bytes()
            memory[spec.name] = {"weights_gib": round(w / 2**30, 2),
                                 "fits_gpu": w < pc.cluster.gpu_mem_gib * 2**30}
    rate = pc.capacity.target_qps
    return {"gpu_seconds_per_request": per_req, "bound_gpus": math.ceil(rate * per_req),
            "bound_gpus_exact": rate * per_req, "memory": memory,
            "table_sets": {m: t["table_set"] for m, t in lat.tables().items()},
            "sources": {m: t["source"] for m, t in lat.tables().items()},
            "not_measured": lat.not_measured()}


def plan_fleet(cfg: SimConfig, runner: Any = None) -> dict[str, Any]:
    from sim.studies.capacity import ProbeRunner, drive, min_gpus_search
    cap = cfg.capacity
    cands = candidates(cfg)
    views = {c: analytic_view(cfg, c) for c in cands}
    runner = runner or ProbeRunner(cfg)
    k = max(1, runner.n_jobs if runner.n_jobs > 0 else 2)
    searches = {}
    for c in cands:
        # start well below the analytic load estimate (the sizes under the start are taken as
        # failing: batching beyond the typical one has made fleets up to ~2x smaller than it)
        start = max(cap.min_gpus, views[c]["bound_gpus"] // 4)
        searches[c] = min_gpus_search(start, cap.max_gpus, k, cap.max_probes)
    found = drive(searches, lambda batch: [r["meets_slo"] for r in runner.run(
        [(c, x, cap.target_qps) for c, x in batch])])
    rows = []
    for c in cands:
        n = found[c]
        rec = runner.cache.get((c, n, cap.target_qps)) if n else None
        v = views[c]
        price = cfg.cost.usd_per_gpu_hour[c.gpu]
        row = {"policy": c.policy, "gpu": c.gpu, "precision": c.precision, "pd_split": c.pd_split,
               "label": c.label, "found": n is not None, "num_gpus": n,
               "usd_per_hour": round(n * price, 2) if n else None, "usd_per_gpu_hour": price,
               "tables": tables_label(v["sources"]), "table_sets": v["table_sets"],
               "not_measured": v["not_measured"],
               "bound_gpus": v["bound_gpus"], "gpu_seconds_per_request": round(v["gpu_seconds_per_request"], 4),
               "bound_rel_error": ((v["bound_gpus"] - n) / n) if n else None,
               "memory": v["memory"]}
        if rec:
            row.update({k2: rec.get(k2) for k2 in ("p99_e2el_ms", "median_e2el_ms", "slo_attainment",
                                                   "request_throughput", "mean_gpu_util",
                                                   "usd_per_1k_requests", "layout")})
        rows.append(row)
    ok = sorted((r for r in rows if r["found"]), key=lambda r: (r["usd_per_hour"], r["num_gpus"]))
    best = ok[0] if ok else None
    runners_up = {}
    if best:
        for d in DIMENSIONS:
            other = [r for r in ok if r[d] != best[d]]
            if other:
                runners_up[d] = {"label": other[0]["label"], "usd_per_hour": other[0]["usd_per_hour"],
                                 "num_gpus": other[0]["num_gpus"], "tables": other[0]["tables"],
                                 "extra_usd_per_hour": round(other[0]["usd_per_hour"] - best["usd_per_hour"], 2)}
    slo = ({"p99_e2el_ms": cap.slo_p99_ms} if cap.slo_p99_ms is not None else
           {"min_attainment": cap.min_attainment, "targets": cfg.slo.targets})
    return {"experiment": "capacity", "plan": "fleet", "slo": slo, "target_qps": cap.target_qps,
            "workload": cfg.workload.name, "seed": cfg.seed, "num_requests_per_probe": cap.num_requests,
            "candidates": rows, "best": best, "runner_up": runners_up,
            "probes": sorted(({**r, "policy": r["policy"].label if isinstance(r["policy"], Candidate)
                               else r["policy"]} for r in runner.cache.values()),
                             key=lambda r: (r["policy"], r["num_gpus"])),
            "num_probes": len(runner.cache), "rounds": runner.rounds}


def format_fleet(result: dict[str, Any]) -> str:
    slo = result["slo"]
    slo_s = (f"p99 E2EL <= {slo['p99_e2el_ms']:,.0f} ms" if "p99_e2el_ms" in slo
             else f"SLO attainment >= {slo['min_attainment']:.0%}")
    lines = [f"fleet plan: {result['workload']} at {result['target_qps']:g} req/s, {slo_s}; "
             f"{len(result['candidates'])} candidates, {result['num_probes']} probes of "
             f"{result['num_requests_per_probe']} requests",
             f"{'candidate':36s} {'GPUs':>5s} {'$/h':>8s} {'p99 E2EL s':>10s} {'attain':>7s} "
             f"{'load':>5s} {'err':>6s}  {'tables':9s} KV tokens/GPU (max conc.)"]
    rows = sorted(result["candidates"], key=lambda r: (r["usd_per_hour"] is None, r["usd_per_hour"] or 0))
    for r in rows:
        mem = "; ".join(f"{m.split('@')[0]}: {d['kv_capacity_tokens_used']:,} ({d['max_concurrency']})"
                        for m, d in r["memory"].items() if "kv_capacity_tokens_used" in d)
        err = r.get("bound_rel_error")
        lines.append(
            f"{r['label']:36s} {str(r['num_gpus']) if r['found'] else 'none':>5s} "
            f"{_f(r['usd_per_hour'], 2):>8s} {_f(_div(r.get('p99_e2el_ms'), 1e3), 1):>10s} "
            f"{_f(_mul(r.get('slo_attainment'), 100), 1):>6s}% {r['bound_gpus']:>5d} "
            f"{'-' if err is None else f'{100 * err:+.0f}%':>6s}  {r['tables']:9s} {mem}")
    b = result["best"]
    if b:
        lines.append(f"cheapest: {b['label']}: {b['num_gpus']} GPUs, ${b['usd_per_hour']:.2f}/h "
                     f"(tables: {b['tables']}{'; NOT MEASURED: ' + ', '.join(b['not_measured']) if b['not_measured'] else ''})")
        for d, ru in result["runner_up"].items():
            lines.append(f"  runner-up on {d:9s}: {ru['label']}: {ru['num_gpus']} GPUs, "
                         f"${ru['usd_per_hour']:.2f}/h (+${ru['extra_usd_per_hour']:.2f}/h; tables: {ru['tables']})")
    else:
        lines.append("no candidate meets the SLO within capacity.max_gpus")
    lines.append("load = analytic load estimate, ceil(target_qps x GPU-seconds per request at typical "
                 "batching); err = (load - simulated) / simulated. tables: measured | estimated "
                 "(scaled from measured, engine = analytic) | analytic (roofline) | mixed")
    return "\n".join(lines)


def _div(x, d):
    return None if x is None else x / d


def _mul(x, m):
    return None if x is None else x * m


def _f(x, d: int) -> str:
    return "-" if x is None else f"{x:,.{d}f}"


def write_outputs(result: dict[str, Any], outdir: Path) -> list[Path]:
    """fleet_plan.csv (one row per candidate) and fleet_plan.png ($/h per candidate, analytic
    candidates hatched, the winner outlined)."""
    outdir.mkdir(parents=True, exist_ok=True)
    rows = sorted(result["candidates"], key=lambda r: (r["usd_per_hour"] is None, r["usd_per_hour"] or 0))
    cols = ["label", "policy", "gpu", "precision", "pd_split", "num_gpus", "usd_per_hour",
            "p99_e2el_ms", "slo_attainment", "bound_gpus", "bound_rel_error", "tables"]
    csv_path = outdir / "fleet_plan.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(csv_path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    best = (result.get("best") or {}).get("label")
    for i, r in enumerate(rows):
        v = r["usd_per_hour"] or 0.0
        ax.barh(i, v, color={"h100": "#4C72B0", "h200": "#DD8452"}.get(r["gpu"], "#8172B2"),
                hatch="//" if r["tables"] != "measured" else None,
                edgecolor="black" if r["label"] == best else "none",
                linewidth=2 if r["label"] == best else 0)
        ax.text(v, i, f" {r['num_gpus'] or 'none'} GPUs ({r['tables']})", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("fleet $/h meeting the SLO (hatched: tables not measured, engine = analytic)")
    ax.set_title(f"{result['workload']} at {result['target_qps']:g} req/s")
    fig.tight_layout()
    png = outdir / "fleet_plan.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [csv_path, png]
