"""Plots and sweep helpers for the notebooks (seaborn + matplotlib; no notebook logic here).

Every plotting function takes DataFrames / dicts, returns a matplotlib Figure and, given
``path``, also writes it as PNG. Inputs:

* a *requests* frame: rows of ``requests.parquet`` (sim/run/output.py) plus ``policy`` / ``rate`` /
  ``seed`` columns added by the loaders;
* a *summaries* frame: one row per run, flattened from ``summary.json`` (``summary_row``), with
  the ``summary`` dict itself kept in column ``summary`` for per-stage / per-pool detail.

``run_sweep`` runs a small policies x rates x seeds sweep in-process (sim.run.runner.Run);
``load_multirun`` reads a Hydra multirun directory of summary.json (+ requests.parquet) files.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable

import matplotlib

if os.environ.get("MPLBACKEND") is None:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICY_ORDER = ["baseline", "disaggregated", "modality_aware"]
TASK_ORDER = ["text", "understand", "generate", "edit", "inpaint", "outpaint"]
STAGES = ["vision_encode", "text_encode", "prefill", "decode", "dit_step", "vae_encode",
          "vae_decode", "transfer"]
SUMMARY_KEYS = ("policy", "seed", "cluster", "num_gpus", "num_requests", "request_throughput",
                "goodput", "slo_attainment", "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms",
                "p99_e2el_ms", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                "usd_per_1k_requests", "duration", "sim_wall_s")

sns.set_theme(style="whitegrid", context="notebook")


def small() -> bool:
    """MMSIM_SMALL=1: notebooks shrink their sweeps (CI)."""
    return os.environ.get("MMSIM_SMALL", "0") not in ("", "0", "false", "False")


def _save(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120, bbox_inches="tight")
    return fig


def _order(values: Iterable[str], preferred: list[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + sorted(v for v in vals if v not in preferred)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

def summary_row(summary: dict[str, Any], **extra: Any) -> dict[str, Any]:
    row = {k: summary.get(k) for k in SUMMARY_KEYS}
    util = summary.get("utilization") or {}
    row["mean_gpu_util"] = util.get("mean_gpu")
    for task, d in (summary.get("per_task") or {}).items():
        row[f"{task}_p99_e2el_ms"] = d.get("p99_e2el_ms")
        row[f"{task}_slo_attainment"] = d.get("slo_attainment")
    row.update(extra)
    row["summary"] = summary
    return row


def analytic_profiles_dir(profiles_dir: str | Path, gpu: str = "h100") -> tuple[str, str]:
    """(profiles_dir, cluster.gpu) to simulate with: measured <gpu>/ tables when the default
    workload's models are there, else the roofline <gpu>-analytic/ set."""
    root = Path(profiles_dir)
    root = root if root.is_absolute() else REPO_ROOT / root
    need = ("qwen2_5_vl_7b", "qwen_image")
    for folder in (gpu, f"{gpu}-analytic"):
        if all((root / folder / f"{m}.parquet").exists() for m in need):
            return str(root), folder
    raise FileNotFoundError(f"no profile tables for {list(need)} under {root}/{gpu} or "
                            f"{root}/{gpu}-analytic")


def base_config(profiles_dir: str | Path = "traces/profiles", gpu: str = "h100", **overrides: Any):
    """A SimConfig (default mixed bursty workload) on the available tables; dotted overrides
    as keyword arguments with '__' for '.' (workload__num_requests=500)."""
    from sim.config import SimConfig
    root, folder = analytic_profiles_dir(profiles_dir, gpu)
    cfg = SimConfig()
    cfg.profiles_dir = root
    cfg.cluster.gpu = folder
    base = gpu
    price = cfg.cost.usd_per_gpu_hour.get(base, 0.0)
    cfg.cost.usd_per_gpu_hour[folder] = price
    cfg.output.progress = "off"
    for k, v in overrides.items():
        obj = cfg
        parts = k.split("__")
        for p in parts[:-1]:
            obj = getattr(obj, p)
        if not hasattr(obj, parts[-1]):
            raise AttributeError(f"config has no field {'.'.join(parts)!r}")
        setattr(obj, parts[-1], v)
    return cfg


def run_one(cfg, outdir: str | Path | None = None, keep_requests: bool = True) -> tuple[dict, pd.DataFrame | None]:
    from sim.run.runner import Run
    r = Run(cfg, Path(outdir) if outdir else None,
            keep_rows=cfg.workload.num_requests if keep_requests else 0)
    s = r.run()
    req = r.metrics.requests_frame() if keep_requests else None
    return s, req


def _sweep_point(cfg, policy, rate, seed, keep_requests):
    c = copy.deepcopy(cfg)
    c.policy.name = policy
    c.workload.arrival.rate = float(rate)
    c.seed = int(seed)
    s, req = run_one(c, None, keep_requests)
    if req is not None:
        req = req.assign(policy=policy, rate=float(rate), seed=int(seed))
    return summary_row(s, rate=float(rate)), req


def run_sweep(cfg, policies: Iterable[str] = POLICY_ORDER, rates: Iterable[float] = (2.0,),
              seeds: Iterable[int] = (0,), keep_requests: bool = True, n_jobs: int = 1
              ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """policies x rates x seeds runs of `cfg` in-process -> (summaries, requests) frames."""
    points = [(p, r, s) for p in policies for r in rates for s in seeds]
    if n_jobs == 1:
        out = [_sweep_point(cfg, p, r, s, keep_requests) for p, r, s in points]
    else:
        from joblib import Parallel, delayed
        out = Parallel(n_jobs=n_jobs)(delayed(_sweep_point)(cfg, p, r, s, keep_requests)
                                      for p, r, s in points)
    summaries = pd.DataFrame([o[0] for o in out])
    reqs = [o[1] for o in out if o[1] is not None]
    return summaries, (pd.concat(reqs, ignore_index=True) if reqs else None)


def load_multirun(root: str | Path, with_requests: bool = False
                  ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Every summary.json under `root` (a Hydra multirun dir, or several) -> summaries frame
    (rate from the run's .hydra/config.yaml when present); optionally its requests.parquet."""
    import yaml
    rows, reqs = [], []
    for sp in sorted(Path(root).rglob("summary.json")):
        s = json.loads(sp.read_text())
        rate = None
        hc = sp.parent / ".hydra" / "config.yaml"
        if hc.exists():
            c = yaml.safe_load(hc.read_text()) or {}
            rate = ((c.get("workload") or {}).get("arrival") or {}).get("rate")
        rows.append(summary_row(s, rate=rate, run_dir=str(sp.parent)))
        rq = sp.parent / "requests.parquet"
        if with_requests and rq.exists():
            reqs.append(pd.read_parquet(rq).assign(policy=s.get("policy"), rate=rate,
                                                   seed=s.get("seed"), cluster=s.get("cluster"),
                                                   num_gpus=s.get("num_gpus"), run_dir=str(sp.parent)))
    df = pd.DataFrame(rows)
    return df, (pd.concat(reqs, ignore_index=True) if reqs else None)


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------

def latency_cdf(requests: pd.DataFrame, metric: str = "e2el_ms", hue: str = "policy",
                by: str = "task", path: str | Path | None = None, title: str | None = None) -> plt.Figure:
    """Empirical CDFs of a per-request latency, one panel per task, log x."""
    d = requests.dropna(subset=[metric])
    d = d[d[metric] > 0]
    panels = _order(d[by].unique(), TASK_ORDER) if by in d else [None]
    n = max(len(panels), 1)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    hue_order = _order(d[hue].unique(), POLICY_ORDER) if hue in d else None
    for ax, p in zip(axes.flat, panels):
        sub = d if p is None else d[d[by] == p]
        sns.ecdfplot(data=sub, x=metric, hue=hue if hue in d else None, hue_order=hue_order,
                     log_scale=True, ax=ax, legend=ax is axes.flat[0])
        ax.set_title(f"{p}" if p is not None else metric)
        ax.set_xlabel(metric.replace("_ms", " (ms)"))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title or f"{metric} CDF by {by}")
    fig.tight_layout()
    return _save(fig, path)


def qps_latency(summaries: pd.DataFrame, x: str = "rate",
                metrics: tuple[str, ...] = ("median_e2el_ms", "p99_e2el_ms"), hue: str = "policy",
                path: str | Path | None = None, title: str | None = None, logy: bool = True) -> plt.Figure:
    """Offered QPS vs latency percentiles, mean over seeds with a 95% CI band."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    hue_order = _order(summaries[hue].unique(), POLICY_ORDER)
    for ax, m in zip(axes.flat, metrics):
        sns.lineplot(data=summaries, x=x, y=m, hue=hue, hue_order=hue_order, marker="o",
                     errorbar=("ci", 95), ax=ax, legend=ax is axes.flat[0])
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("offered load (req/s)" if x == "rate" else x)
        ax.set_ylabel(m.replace("_ms", " (ms)"))
    fig.suptitle(title or "load vs latency (band: 95% CI over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def slo_attainment(summaries: pd.DataFrame, x: str = "rate", hue: str = "policy",
                   path: str | Path | None = None, title: str | None = None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    sns.lineplot(data=summaries, x=x, y="slo_attainment", hue=hue,
                 hue_order=_order(summaries[hue].unique(), POLICY_ORDER), marker="o",
                 errorbar=("ci", 95), ax=ax)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("offered load (req/s)" if x == "rate" else x)
    ax.set_ylabel("SLO attainment")
    ax.set_title(title or "SLO attainment vs load")
    fig.tight_layout()
    return _save(fig, path)


def utilization_by_pool(summaries: dict[str, dict] | pd.DataFrame, key: str = "per_pool",
                        path: str | Path | None = None, title: str | None = None) -> plt.Figure:
    """Bars of summary['utilization'][key] (per_pool or per_stage) per policy."""
    items = _summaries_by_label(summaries)
    rows = [{"policy": lab, "pool": k, "utilization": v}
            for lab, s in items for k, v in ((s.get("utilization") or {}).get(key) or {}).items()]
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(df) + 2), 3.8))
    if not df.empty:
        sns.barplot(data=df, x="pool", y="utilization", hue="policy",
                    hue_order=_order(df["policy"].unique(), POLICY_ORDER), ax=ax)
        ax.tick_params(axis="x", rotation=30)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or f"GPU utilization ({key.replace('_', ' ')})")
    fig.tight_layout()
    return _save(fig, path)


def stage_occupancy(requests: pd.DataFrame, bin_s: float | None = None, hue: str = "policy",
                    stages: Iterable[str] = tuple(s for s in STAGES if s != "transfer"), path: str | Path | None = None,
                    title: str | None = None) -> plt.Figure:
    """Per-stage occupancy over time from <stage>_start/<stage>_end: mean number of requests in
    service at each stage per time bin (a request's first start to last end at that stage; so
    `transfer`, whose first and last hops bracket the whole DiT phase, is left out by default)."""
    stages = [s for s in stages if f"{s}_start" in requests and requests[f"{s}_start"].notna().any()]
    labels = _order(requests[hue].unique(), POLICY_ORDER) if hue in requests else [None]
    fig, axes = plt.subplots(len(labels), 1, figsize=(9, 2.6 * len(labels)), squeeze=False,
                             sharex=True)
    t_end = float(np.nanmax(requests["finish"])) if len(requests) else 1.0
    bin_s = bin_s or max(t_end / 120.0, 1e-3)
    edges = np.arange(0.0, t_end + bin_s, bin_s)
    for ax, lab in zip(axes.flat, labels):
        sub = requests if lab is None else requests[requests[hue] == lab]
        for st in stages:
            a = sub[f"{st}_start"].to_numpy(float)
            b = sub[f"{st}_end"].to_numpy(float)
            ok = ~(np.isnan(a) | np.isnan(b))
            occ = _occupancy(a[ok], b[ok], edges)
            ax.plot(edges[:-1], occ, label=st, lw=1.2)
        ax.set_ylabel("in service")
        ax.set_title(f"{lab}" if lab is not None else "stage occupancy", fontsize=10)
        ax.set_yscale("symlog", linthresh=1)
    axes.flat[0].legend(fontsize=8, ncol=4, loc="upper right")
    axes.flat[-1].set_xlabel("simulated time (s)")
    fig.suptitle(title or "stage occupancy over time (from requests.parquet)")
    fig.tight_layout()
    return _save(fig, path)


def _occupancy(start: np.ndarray, end: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Time-average count of [start, end) intervals overlapping each bin (vectorised:
    G(t) = sum over intervals of |[s, e) & [0, t)| = sum_{e<t} e + t (#{s<t} - #{e<t}) - sum_{s<t} s)."""
    s = np.sort(np.asarray(start, float))
    e = np.sort(np.asarray(end, float))
    cs = np.concatenate([[0.0], np.cumsum(s)])
    ce = np.concatenate([[0.0], np.cumsum(e)])
    ns = np.searchsorted(s, edges, "left")
    ne = np.searchsorted(e, edges, "left")
    g = ce[ne] + edges * (ns - ne) - cs[ns]
    return np.diff(g) / np.diff(edges)


def scale_comparison(summaries: pd.DataFrame, metrics: tuple[str, ...] = (
        "p99_e2el_ms", "slo_attainment", "mean_gpu_util", "usd_per_1k_requests"),
        x: str = "num_gpus", path: str | Path | None = None, title: str | None = None) -> plt.Figure:
    """Bars per cluster size and policy (mean over seeds, 95% CI) for a few headline metrics."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.8), squeeze=False)
    hue_order = _order(summaries["policy"].unique(), POLICY_ORDER)
    for ax, m in zip(axes.flat, metrics):
        sns.barplot(data=summaries, x=x, y=m, hue="policy", hue_order=hue_order,
                    errorbar=("ci", 95), ax=ax)
        if m.endswith("_ms"):
            ax.set_yscale("log")
        ax.set_xlabel("GPUs" if x == "num_gpus" else x)
        if ax is not axes.flat[0] and ax.get_legend():
            ax.get_legend().remove()
    fig.suptitle(title or "policies across cluster sizes")
    fig.tight_layout()
    return _save(fig, path)


def stage_breakdown(summaries: dict[str, dict] | pd.DataFrame, path: str | Path | None = None,
                    title: str | None = None) -> plt.Figure:
    """Stacked bars: mean per-request time at each stage (queue hatched, service solid), from
    summary['per_stage'] (per visit means x visits / completed requests)."""
    items = _summaries_by_label(summaries)
    stages = _order([st for _, s in items for st in (s.get("per_stage") or {})], STAGES)
    colors = dict(zip(stages, sns.color_palette("tab10", len(stages))))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(items) + 3), 4.2))
    for i, (lab, s) in enumerate(items):
        n = max(s.get("completed") or 1, 1)
        bottom = 0.0
        for st in stages:
            d = (s.get("per_stage") or {}).get(st)
            if not d:
                continue
            k = d["visits"] / n
            for part, hatch, alpha in (("service", None, 0.95), ("queue", "//", 0.45)):
                v = (d.get(f"mean_{part}_ms") or 0.0) * k / 1e3
                if v <= 0:
                    continue
                ax.bar(i, v, bottom=bottom, color=colors[st], hatch=hatch, alpha=alpha,
                       edgecolor="white", label=f"{st} {part}")
                bottom += v
    ax.set_xticks(range(len(items)), [lab for lab, _ in items], rotation=15)
    ax.set_ylabel("mean seconds per request")
    h, lab = ax.get_legend_handles_labels()
    uniq = dict(zip(lab, h))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(title or "stage latency breakdown (queue hatched)")
    fig.tight_layout()
    return _save(fig, path)


def cost_by_policy(summaries: pd.DataFrame, x: str = "policy", hue: str | None = None,
                   path: str | Path | None = None, title: str | None = None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    sns.barplot(data=summaries, x=x, y="usd_per_1k_requests", hue=hue,
                order=_order(summaries[x].unique(), POLICY_ORDER) if x == "policy" else None,
                errorbar=("ci", 95), ax=ax)
    ax.set_ylabel("$ per 1k requests")
    ax.set_title(title or "cost per 1k requests")
    fig.tight_layout()
    return _save(fig, path)


def theory_vs_sim_table(rows: list[dict] | pd.DataFrame, path: str | Path | None = None,
                        title: str | None = None) -> plt.Figure:
    """A table figure of (model, quantity, estimate, measured, rel. error) rows."""
    df = pd.DataFrame(rows)
    fmt = df.copy()
    for c in fmt.columns:
        if c == "rel_error":
            fmt[c] = [f"{v:+.1%}" if isinstance(v, (int, float)) and v == v else "-" for v in df[c]]
        elif pd.api.types.is_numeric_dtype(df[c]):
            fmt[c] = [f"{v:,.4g}" if v == v else "-" for v in df[c]]
        else:
            fmt[c] = df[c].fillna("-").astype(str)
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(df) + 0.9))
    ax.axis("off")
    t = ax.table(cellText=fmt.values, colLabels=list(fmt.columns), cellLoc="left",
                 bbox=[0, 0, 1, 1])
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.auto_set_column_width(list(range(len(fmt.columns))))
    ax.set_title(title or "theory vs simulation / measurement")
    fig.tight_layout()
    return _save(fig, path)


def theory_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Estimate-vs-check rows of a sim.studies.analytic report (for theory_vs_sim_table)."""
    m = report["model"]
    rows = []
    sim = report.get("simulated") or {}
    if sim:
        rows.append({"model": m, "quantity": "throughput, 1 GPU (req/s)",
                     "estimate": report["bound_qps_batched"], "check": sim["request_throughput"],
                     "check_source": "simulated Run at saturation",
                     "rel_error": sim.get("bound_batched_rel_error")})
    rows.append({"model": m, "quantity": "serial bound (req/s)", "estimate": report["bound_qps_serial"],
                 "check": np.nan, "check_source": "-", "rel_error": np.nan})
    mem = report.get("memory") or {}
    kv = mem.get("kv_capacity_vs_vllm") or {}
    if kv:
        rows.append({"model": m, "quantity": "KV capacity (tokens)", "estimate": kv.get("estimate_tokens"),
                     "check": kv.get("vllm_tokens") if kv.get("vllm_tokens") is not None else np.nan,
                     "check_source": "vLLM num_gpu_blocks" if kv.get("vllm_tokens") else "not measured",
                     "rel_error": kv.get("rel_error") if kv.get("rel_error") is not None else np.nan})
    for st, d in (mem.get("peak_mem_vs_profiler") or {}).items():
        if isinstance(d, dict) and "median_rel_error" in d:
            rows.append({"model": m, "quantity": f"peak memory {st} (GB)",
                         "estimate": d["largest_point"]["estimate_bytes"] / 1e9,
                         "check": d["largest_point"]["measured_bytes"] / 1e9,
                         "check_source": f"profiler peak_mem_bytes ({d['points']} pts, median err "
                                         f"{d['median_rel_error']:+.0%})",
                         "rel_error": d["largest_point"]["estimate_bytes"] / d["largest_point"]["measured_bytes"] - 1})
    for st, b in (report.get("batching_gain") or {}).items():
        if b.get("overhead") is not None and len(b.get("batch", [])) > 1:
            rows.append({"model": m, "quantity": f"batching gain {st} @b={b['batch'][-1]}",
                         "estimate": b["gain_model"][-1], "check": b["gain_measured"][-1],
                         "check_source": f"profile table (fit a={b['overhead']:.2f})",
                         "rel_error": b["rel_error"][-1]})
    return rows


def analytic_stages(reports: list[dict[str, Any]], path: str | Path | None = None,
                    title: str | None = None) -> plt.Figure:
    """Serial latency of each model's typical request, stacked by stage (log-free seconds),
    with the bound QPS (serial / batched) in the labels."""
    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 3.8), squeeze=False)
    for ax, r in zip(axes.flat, reports):
        st = r["serial_latency_ms_by_stage"]
        b = r["batched_cost_ms_by_stage"]
        names = list(st)
        colors = sns.color_palette("tab10", len(names))
        for i, (label, d) in enumerate((("serial", st), ("best batch", b))):
            bottom = 0.0
            for c, n in zip(colors, names):
                v = d.get(n, 0.0) / 1e3
                ax.bar(i, v, bottom=bottom, color=c, label=n if i == 0 else None)
                bottom += v
        ax.set_xticks([0, 1], [f"serial\n{r['bound_qps_serial']:.3g} req/s",
                               f"best batch\n{r['bound_qps_batched']:.3g} req/s"])
        ax.set_ylabel("GPU seconds per request")
        ax.set_title(f"{r['model']} (bottleneck: {r['bottleneck_stage']})", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title or "analytic per-request stage cost and 1-GPU bound")
    fig.tight_layout()
    return _save(fig, path)


def _summaries_by_label(summaries) -> list[tuple[str, dict]]:
    if isinstance(summaries, pd.DataFrame):
        out = []
        for _, r in summaries.iterrows():
            lab = str(r.get("label", r.get("policy")))
            out.append((lab, r["summary"]))
        return out
    return [(str(k), v) for k, v in summaries.items()]


def capacity_frame(capacity: dict[str, Any]) -> pd.DataFrame:
    """capacity.json probes as a frame."""
    df = pd.DataFrame(capacity.get("probes", []))
    return df


def capacity_plot(capacity: dict[str, Any], path: str | Path | None = None) -> plt.Figure:
    """p99 E2EL of every capacity probe vs GPUs (at target QPS) and vs QPS (at the fleet size),
    with the SLO line."""
    df = capacity_frame(capacity)
    slo = (capacity.get("slo") or {}).get("p99_e2el_ms")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    if not df.empty and "p99_e2el_ms" in df:
        d = df.dropna(subset=["p99_e2el_ms"])
        a = d[d["rate"] == capacity["target_qps"]]
        b = d[d["num_gpus"] == capacity["fleet_gpus"]]
        order = _order(d["policy"].unique(), POLICY_ORDER)
        if len(a):
            sns.scatterplot(data=a, x="num_gpus", y="p99_e2el_ms", hue="policy", style="meets_slo",
                            hue_order=order, ax=axes[0], s=50)
            axes[0].set_xscale("log", base=2)
        if len(b):
            sns.scatterplot(data=b, x="rate", y="p99_e2el_ms", hue="policy", style="meets_slo",
                            hue_order=order, ax=axes[1], s=50, legend=False)
        for ax in axes:
            ax.set_yscale("log")
            if slo:
                ax.axhline(slo, color="k", ls="--", lw=1)
    axes[0].set_title(f"p99 E2EL vs GPUs at {capacity.get('target_qps')} req/s")
    axes[1].set_title(f"p99 E2EL vs load on {capacity.get('fleet_gpus')} GPUs")
    fig.tight_layout()
    return _save(fig, path)
