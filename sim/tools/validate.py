"""Real-engine validation: replay measured `vllm bench serve --save-detailed` runs in the simulator
and compare throughput and TTFT / TPOT / E2EL percentiles with what vLLM measured.

    python -m sim.tools.validate traces/validation/h100/ [--profiles-dir traces/profiles] [--gpu h100]
                           [--out traces/validation/h100/report] [--strict]

For every bench result JSON under the folder (recursively; other JSON is skipped) the model comes
from the `provenance` block that profiler/serve_bench.py writes (else from the file or model_id
name), the replay is composed exactly like `python -m sim +experiment=replay_vllm_bench` (with the
server's measured KV capacity and max_model_len when the provenance has them) and run in-process.
Targets on finite-rate runs: request throughput within 3 %, medians within 10 %, p99 within 15 %.
`--request-rate inf` runs are reported but not held to the targets. Writes validation.csv,
validation.json and validation_cdfs.png into --out. Exit code 0 unless --strict and a target fails.

Image + text runs (profiler.chat_bench results: per-request `images`) replay as understanding
requests with their recorded images (sim.workloads.trace). Every row carries `modality` (text | image) and
`regime` (low | moderate | near_saturation | overload, from rho = offered rate / measured
capacity: `regime()` is the one definition), and the report gives the error table per modality,
per regime and per both (`error_tables`; validation.json `by_modality`, `by_regime`,
`by_modality_regime`).

Runs of several servers behind a proxy (profiler.disagg_bench: provenance.layout) replay with that
layout pinned (cluster.layout: the pools and GPUs the run used; plain replicas as the baseline with
the proxy's round-robin, split instances as stage pools) and `modality: disaggregated` for split
ones; hand-offs cost the links measured on their own by profiler.handoff_bench (--handoff;
default traces/validation/h100_handoff/handoff.json), never the run's own figures.

vLLM-Omni serving runs (profiler.omni_bench, schema mmsim.omni_bench.v1) replay through their
own dataset class (sim.tools.omni_validate.OmniBenchDataset) on the baseline's diffusion engine;
their rows carry modality `image_gen` and join the same per-modality / per-regime tables, with
the issue's diffusion targets (throughput 5 %, median E2EL 10 %, p99 E2EL 15 %).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from profiler.jsonfiles import json_files, read_json, run_name
from sim.names import VAE_DECODE

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
# the connectors' hand-off measured on its own (profiler.handoff_bench), for disaggregated replays
DEFAULT_HANDOFF = ROOT / "traces" / "validation" / "h100_handoff" / "handoff.json"

# metric -> tolerance (relative)
TARGETS: dict[str, float] = {
    "request_throughput": 0.03,
    "median_ttft_ms": 0.10, "median_tpot_ms": 0.10, "median_e2el_ms": 0.10,
    "p99_ttft_ms": 0.15, "p99_tpot_ms": 0.15, "p99_e2el_ms": 0.15,
}
BENCH_KEYS = ("ttfts", "output_lens", "input_lens")

# Load regimes: rho = offered request rate / the capacity C measured for the same model and
# request law (the request throughput of its `--request-rate inf` run; serve_bench records it in
# every run's provenance as calibrated_capacity_rps). The one definition used everywhere; see
# `regime()` and traces/validation/README.md.
REGIMES = ("low", "moderate", "near_saturation", "overload")
REGIME_UPPER = (0.5, 0.8, 1.05)      # rho < 0.5 low, < 0.8 moderate, <= 1.05 near_saturation, else overload


def known_models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def is_bench_json(obj: Any) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in BENCH_KEYS)


def find_bench_files(folder: Path, exclude: Optional[Path] = None) -> list[Path]:
    out = []
    for p in json_files(folder, recursive=True):
        if exclude is not None and exclude.resolve() in p.resolve().parents:
            continue
        try:
            obj = read_json(p)
        except (OSError, ValueError, EOFError):
            continue
        if is_bench_json(obj):
            out.append(p)
    return out


def infer_model(path: Path, obj: dict[str, Any], default: Optional[str] = None) -> Optional[str]:
    prov = obj.get("provenance") or {}
    if prov.get("model"):
        return str(prov["model"])
    names = known_models()
    # longest first: qwen2_5_vl_7b before qwen2_5_7b
    for cand in (path.name, str(obj.get("model_id", "")), str(obj.get("tokenizer_id", ""))):
        for m in sorted(names, key=len, reverse=True):
            if m in cand:
                return m
    hf = {}
    for m in names:  # the yaml's hf_id (e.g. Qwen/Qwen2.5-7B-Instruct) as model_id
        try:
            import yaml
            hf_id = (yaml.safe_load((CONF_DIR / "model" / f"{m}.yaml").read_text()) or {}).get("hf_id")
        except Exception:  # noqa: BLE001
            hf_id = None
        if hf_id:
            hf[str(hf_id).lower()] = m
    mid = str(obj.get("model_id", "")).lower()
    return hf.get(mid, default)


def is_inf_rate(obj: dict[str, Any]) -> bool:
    r = (obj.get("provenance") or {}).get("request_rate", obj.get("request_rate"))
    try:
        return math.isinf(float(r))
    except (TypeError, ValueError):
        return False


def measured_metrics(obj: dict[str, Any], df: pd.DataFrame) -> dict[str, float]:
    """vLLM's own summary numbers; per-request percentiles recomputed where the JSON lacks them."""
    ttft = df["measured_ttft_s"].to_numpy(float) * 1e3
    e2el = df["measured_e2el_s"].to_numpy(float) * 1e3
    out_tok = df["output_tokens"].to_numpy(float)
    ok = out_tok > 1
    tpot = (e2el[ok] - ttft[ok]) / (out_tok[ok] - 1)
    per = {"ttft": ttft, "e2el": e2el, "tpot": tpot}
    m: dict[str, float] = {}
    thr = obj.get("request_throughput")
    if thr is None and obj.get("duration"):
        thr = obj.get("completed", len(df)) / float(obj["duration"])
    m["request_throughput"] = float(thr) if thr is not None else np.nan
    for name, arr in per.items():
        for stat, q in (("median", 50), ("p99", 99)):
            k = f"{stat}_{name}_ms"
            v = obj.get(k)
            m[k] = float(v) if v is not None else (float(np.percentile(arr, q)) if len(arr) else np.nan)
    return m


def regime(offered_rps: Any, capacity_rps: Optional[float], max_concurrency: Optional[int] = None,
           measured_rps: Optional[float] = None) -> tuple[str, float]:
    """(regime, rho) of a measured run, rho = offered rate / capacity C.

    - one request at a time (`max_concurrency` 1, the zero-load probes): `low`, rho 0;
    - open loop at `--request-rate inf` (every request sent at once, the queue holds the run):
      `overload`, rho inf;
    - a closed loop of N > 1 clients offers what it is served: rho = measured throughput / C,
      and it can never overload (at most `near_saturation`);
    - otherwise rho = request_rate / C: `low` below 0.5, `moderate` below 0.8, `near_saturation`
      up to 1.05 (a run at C, e.g. ShareGPT at 1.0 C, whose rate is rounded to 3 decimals),
      `overload` above;
    - no capacity known (no provenance, no open-loop inf run of the model): `unknown`, rho NaN.
    Bursts are not counted: a bursty run at 0.6 C is `moderate` though its bursts overload."""
    if max_concurrency == 1:
        return "low", 0.0
    try:
        rate = float(offered_rps)
    except (TypeError, ValueError):
        rate = math.inf
    closed = bool(max_concurrency) and max_concurrency > 1
    if math.isinf(rate) and not closed:
        return "overload", math.inf
    if closed:
        rate = float(measured_rps) if measured_rps is not None else math.nan
    if not capacity_rps or not np.isfinite(rate) or capacity_rps <= 0:
        return "unknown", math.nan
    rho = rate / float(capacity_rps)
    if closed:
        rho = min(rho, REGIME_UPPER[2])
    for name, upper in zip(REGIMES, REGIME_UPPER):
        if rho < upper or (name == "near_saturation" and rho <= upper):
            return name, rho
    return "overload", rho


SPLIT_ROLES = ("encoder", "prefill", "decode")     # a layout with one of these is disaggregated


def run_layout(obj: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The deployment layout a run recorded (profiler.disagg_bench's provenance.layout), or None
    for one server."""
    lay = (obj.get("provenance") or {}).get("layout")
    return lay if isinstance(lay, dict) and lay.get("pools") else None


def modality(obj: dict[str, Any]) -> str:
    """`disaggregated` for a run served by split instances (encoder / prefill / decode pools in its
    provenance.layout), else `image` if any request carried an image (profiler.chat_bench's
    `images`), else `text`. Plain replicas behind a proxy keep image / text (their `layout`
    column says how many)."""
    lay = run_layout(obj)
    if lay and any(str(k).split(":")[0] in SPLIT_ROLES for k in lay["pools"]):
        return "disaggregated"
    return "image" if any(len(x or ()) for x in (obj.get("images") or ())) else "text"


def inf_capacities(files: list[Path]) -> dict[tuple[str, str], float]:
    """(model, modality) -> median request throughput of the open-loop `--request-rate inf` runs
    among `files`: the capacity of runs whose provenance has none."""
    caps: dict[tuple[str, str], list[float]] = {}
    for p in files:
        try:
            obj = read_json(p)
        except (OSError, ValueError, EOFError):
            continue
        if not is_bench_json(obj) or not is_inf_rate(obj) or obj.get("max_concurrency"):
            continue
        m = infer_model(Path(p), obj)
        if m and obj.get("request_throughput"):
            caps.setdefault((m, modality(obj)), []).append(float(obj["request_throughput"]))
    return {k: float(np.median(v)) for k, v in caps.items()}


def run_class(obj: dict[str, Any], model: Optional[str],
              fallback: Optional[dict[tuple[str, str], float]] = None) -> dict[str, Any]:
    """modality, regime, rho and where the capacity came from, for one measured run."""
    prov = obj.get("provenance") or {}
    mod = modality(obj)
    cap, src = prov.get("calibrated_capacity_rps"), "provenance"
    if not cap and fallback and (model, mod) in fallback:
        cap, src = fallback[(model, mod)], "inf run"
    offered = "inf" if is_inf_rate(obj) else prov.get("request_rate", obj.get("request_rate"))
    reg, rho = regime(offered, float(cap) if cap else None, obj.get("max_concurrency"),
                      obj.get("request_throughput"))
    lay = run_layout(obj)
    return {"modality": mod, "regime": reg, "load_ratio": rho,
            "capacity_rps": float(cap) if cap else None, "capacity_source": src if cap else None,
            "layout": lay.get("name") if lay else None}


def group_errors(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Error table per group of runs (e.g. ("modality",), ("regime",)): runs, runs held to the
    targets, and per metric the mean |relative error|, the largest one and how many runs are
    within the target (every replayed run counts, held or not)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    order = {g: i for i, g in enumerate(REGIMES + ("unknown",))}
    out = []
    for g, rs in sorted(groups.items(), key=lambda kv: tuple(order.get(x, -1) if k == "regime" else str(x)
                                                            for k, x in zip(keys, kv[0]))):
        rec: dict[str, Any] = {k: v for k, v in zip(keys, g)}
        rec.update(runs=len(rs), held_to_targets=sum(bool(r.get("held_to_targets")) for r in rs))
        for k, tol in TARGETS.items():
            e = np.array([abs(r.get(f"err_{k}", np.nan)) for r in rs], float)
            t = np.array([r.get(f"tol_{k}", tol) for r in rs], float)     # a source's own target
            fin = np.isfinite(e)
            rec[f"mean_abs_err_{k}"] = float(e[fin].mean()) if fin.any() else np.nan
            rec[f"max_abs_err_{k}"] = float(e[fin].max()) if fin.any() else np.nan
            rec[f"within_{k}"] = int((e[fin] <= t[fin]).sum())
        out.append(rec)
    return out


def print_groups(title: str, table: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    if not table:
        return
    print(f"\n== {title}: mean |error| (runs within target) over every replayed run")
    name_w = max(18, *(len(" / ".join(str(r[k]) for k in keys)) for r in table))
    print(f"   {'group':{name_w}s} {'runs':>4s} " + " ".join(f"{_short(k):>14s}" for k in TARGETS))
    for r in table:
        cells = [f"{r[f'mean_abs_err_{k}'] * 100:6.1f}% ({r[f'within_{k}']:>2d}/{r['runs']:<2d})"
                 if np.isfinite(r[f"mean_abs_err_{k}"]) else f"{'-':>14s}" for k in TARGETS]
        print(f"   {' / '.join(str(r[k]) for k in keys):{name_w}s} {r['runs']:>4d} " + " ".join(cells))


def compose_replay(path: Path, model: str, profiles_dir: str, gpu: str,
                   extra: Optional[list[str]] = None, prov: Optional[dict[str, Any]] = None,
                   handoff: Optional[dict[str, Any]] = None):
    """The SimConfig `python -m sim +experiment=replay_vllm_bench workload.path=... model=...` builds."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sim.cli import register_schema, to_config
    register_schema()
    # clamp: ShareGPT prompts shorter than the shortest measured decode context (16) use that
    # point's latency (attention over fewer tokens is no slower); such lookups are counted.
    ov = ["+experiment=replay_vllm_bench", f"workload.path={path}", f"+model={model}",
          f"profiles_dir={profiles_dir}", f"cluster.gpu={gpu}", "latency.out_of_range=clamp"]
    prov = prov or {}
    if prov.get("kv_cache_tokens"):
        ov.append(f"engine.kv_capacity_tokens={int(prov['kv_cache_tokens'])}")
    if prov.get("max_model_len"):
        ov.append(f"engine.max_model_len={int(prov['max_model_len'])}")
    for k in ("max_num_seqs", "max_num_batched_tokens"):
        if prov.get(k):
            ov.append(f"engine.{k}={int(prov[k])}")
    lay = prov.get("layout") if isinstance(prov.get("layout"), dict) else None
    if lay and lay.get("pools"):
        ov += layout_overrides(lay)
    ov += list(extra or [])
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=ov)
    out = to_config(cfg)
    if lay and lay.get("pools"):
        pin_layout(out, lay, handoff)
    return out, ov


def layout_overrides(lay: dict[str, Any]) -> list[str]:
    """The policy and cluster size a recorded layout runs under: plain replicas behind the proxy
    are the baseline with the proxy's round-robin; split instances are stage pools (a prefill /
    decode split where the layout has one)."""
    pools = lay["pools"]
    n = len({i for ids in pools.values() for i in ids})
    roles = {str(k).split(":")[0] for k in pools}
    ov = [f"cluster.num_gpus={n}", f"cluster.name=layout_{lay.get('name', 'pinned')}"]
    if roles == {"replica"}:
        ov += ["policy.name=baseline", "policy.router=round_robin"]
    else:
        ov += ["policy.name=disaggregated"]
        from sim.config import PolicyConfig
        if roles & {"prefill", "decode"} and "pd_split" in PolicyConfig.__dataclass_fields__:
            ov += ["policy.pd_split=true"]
    return ov


def pin_layout(cfg, lay: dict[str, Any], handoff: Optional[dict[str, Any]] = None) -> None:
    """cfg.cluster.layout = the recorded layout (pools as the run placed them), with the measured
    hand-off links of `handoff` ({kind: {gb_s, latency_us, source}}, from a dedicated connector
    measurement, never from the run replayed)."""
    from sim.config import HandoffLink, LayoutConfig
    links = {k: HandoffLink(float(v["gb_s"]), float(v.get("latency_us", 0.0)), str(v.get("source", "")))
             for k, v in (handoff or {}).items()}
    cfg.cluster.layout = LayoutConfig(name=str(lay.get("name", "")),
                                      pools={str(k): [int(i) for i in v] for k, v in lay["pools"].items()},
                                      handoff=links)
    cfg.cluster.check()


def load_handoff(path: Optional[str | Path]) -> dict[str, Any]:
    """Measured hand-off links for replays of disaggregated runs: a JSON or YAML file whose
    `links` (or top level) maps a kind (encoder, kv) to {gb_s, latency_us, source}, e.g.
    profiler.handoff_bench's output. None / missing file: no links (bytes over NVLink)."""
    if not path or not Path(path).exists():
        return {}
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        obj = yaml.safe_load(text) or {}
    else:
        obj = json.loads(text)
    links = obj.get("links", obj)
    return {k: v for k, v in links.items() if k in ("encoder", "kv") and isinstance(v, dict)}


def validate_one(path: Path, model: str, profiles_dir: str, gpu: str, outdir: Path,
                 extra: Optional[list[str]] = None, handoff: Optional[dict[str, Any]] = None
                 ) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    from sim.run.runner import Run
    from sim.workloads.trace import load_vllm_bench
    obj = read_json(path)
    prov = obj.get("provenance") or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meas_df = load_vllm_bench(path).to_pandas()
        cfg, ov = compose_replay(path, model, profiles_dir, gpu, extra, prov, handoff)
        outdir.mkdir(parents=True, exist_ok=True)
        summary = Run(cfg, outdir).run()
    sim_df = pd.read_parquet(outdir / "requests.parquet") if (outdir / "requests.parquet").exists() else pd.DataFrame()
    meas = measured_metrics(obj, meas_df)
    inf = is_inf_rate(obj)
    row: dict[str, Any] = {"run": run_name(path), "file": str(path), "model": model,
                           "request_rate": "inf" if inf else obj.get("request_rate"),
                           "burstiness": obj.get("burstiness"), "completed": obj.get("completed"),
                           "held_to_targets": not inf,
                           "kv_cache_tokens": prov.get("kv_cache_tokens"),
                           "measured_preemptions": (prov.get("server_metrics") or {}).get("num_preemptions_delta"),
                           "sim_preemptions": summary.get("preemptions"),
                           "max_concurrency": summary.get("max_concurrency"), "overrides": " ".join(ov)}
    if cfg.cluster.layout is not None:
        lay = cfg.cluster.layout
        row["layout_pools"] = {k: list(v) for k, v in lay.pools.items()}
        row["handoff_links"] = {k: {"gb_s": v.gb_s, "latency_us": v.latency_us, "source": v.source}
                                for k, v in lay.handoff.items()} or "none: bytes / cluster.nvlink_gb_s"
        row["measured_handoff"] = prov.get("handoff")
    passed = True
    for k, tol in TARGETS.items():
        mv, sv = meas.get(k, np.nan), float(summary.get(k, np.nan))
        err = (sv - mv) / mv if mv and np.isfinite(mv) and np.isfinite(sv) else np.nan
        ok = bool(np.isfinite(err) and abs(err) <= tol)
        row[f"meas_{k}"], row[f"sim_{k}"], row[f"err_{k}"], row[f"ok_{k}"] = mv, sv, err, ok
        passed &= ok
    row.update(ttft_split(path, obj, cfg, sim_df))
    row["pass"] = passed
    row["status"] = ("PASS" if passed else "FAIL") if not inf else ("info (PASS)" if passed else "info")
    return row, meas_df, sim_df


def steplog_ttfts_ms(path: Path, obj: dict[str, Any]) -> np.ndarray:
    """Per-request server-side TTFTs of a run from its step log (serve_bench --steplog), if any."""
    from profiler.vllm_steplog import run_steplog
    return np.array([x for r in run_steplog(path, obj) for x in r.get("ttft", ())], float) * 1e3


STALL_MS = 15.0          # a step this much over the median of its batch size counts as a stall


def clean_decode_steps(lines: list[dict], before: int = 1, after: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Step gaps of a step log's lines that have "gen" (ms; gaps[k] ends at line k + 1) and the
    mask of "clean" decode steps: no prompt record from `before` lines before to `after` after,
    the engine not idle (gap < 200 ms)."""
    m = np.array([r["m"] for r in lines])
    prompt = np.array([r["prompt"] for r in lines])
    gaps = np.diff(m) * 1e3
    near = np.array([(prompt[max(0, k + 1 - before):k + 2 + after] > 0).any()
                     for k in range(len(gaps))], bool)
    return gaps, ~near & (gaps < 200.0)


def steplog_step_stats(lines: list[dict], before: int = 1, after: int = 3) -> dict[str, Any]:
    """Step-time structure of a step log: `gaps_around_prefill` = median step gaps ending at the
    records j-2 .. j+2 around isolated prompt records j (no other prompt within 4 records), and
    the stall share of "clean" decode steps: those with no prompt record from `before` records
    before to `after` after. vLLM's async output path logs the step that carries a prefill one
    record before the one that counts the prompt, so a filter on the record's own count alone
    reads prefill steps as stalls."""
    lines = [r for r in lines if "gen" in r]
    prompt = np.array([r["prompt"] for r in lines])
    run = np.array([r["run"] for r in lines])
    gaps, clean = clean_decode_steps(lines, before, after)
    excess = []
    for b in np.unique(run[1:][clean]):
        sel = clean & (run[1:] == b)
        if sel.sum() >= 10:
            excess.append(gaps[sel] - np.median(gaps[sel]))
    ex = np.concatenate(excess) if excess else np.array([])
    iso = [j for j in range(4, len(lines) - 4)
           if prompt[j] > 0 and not (prompt[j - 4:j] > 0).any() and not (prompt[j + 1:j + 5] > 0).any()]
    around = np.median([[gaps[j + o - 1] for o in range(-2, 3)] for j in iso], axis=0) if iso else None
    return {"clean_steps": int(ex.size),
            "stall_share": float(np.mean(ex > STALL_MS)) if ex.size else float("nan"),
            "mean_excess_ms": float(ex.mean()) if ex.size else float("nan"),
            "isolated_prefills": len(iso),
            "gaps_around_prefill": None if around is None else [float(x) for x in around]}


def decoding_at_first_token(sim_df: pd.DataFrame) -> np.ndarray:
    """Per simulated request: how many requests (itself included) are between their first token
    and their finish at its first token, from the records alone."""
    ft, fin = sim_df["first_token"].to_numpy(float), sim_df["finish"].to_numpy(float)
    return (np.searchsorted(np.sort(ft), ft, side="right") - np.searchsorted(np.sort(fin), ft, side="right"))


def ttft_split(path: Path, obj: dict[str, Any], cfg, sim_df: pd.DataFrame) -> dict[str, float]:
    """TTFT as the client saw it, as vLLM's API server logged it (/metrics histogram mean, and
    per request from the step log where the run recorded one), and as simulated with and without
    the frontend constant: says whether an error sits in the engine model or in the API-server /
    client side."""
    fe = float(cfg.engine.frontend_ms)
    per_tok = float(cfg.engine.frontend_ms_per_prompt_token)
    out = {"frontend_ms": fe, "meas_client_mean_ttft_ms": float(np.mean(obj["ttfts"])) * 1e3}
    hist = ((obj.get("provenance") or {}).get("server_metrics") or {}).get("histograms") or {}
    srv = (hist.get("time_to_first_token_seconds") or {}).get("mean")
    out["meas_server_mean_ttft_ms"] = float(srv) * 1e3 if srv is not None else np.nan
    eng = steplog_ttfts_ms(path, obj)
    out["meas_server_median_ttft_ms"] = float(np.median(eng)) if len(eng) else np.nan
    out["meas_server_p99_ttft_ms"] = float(np.percentile(eng, 99)) if len(eng) else np.nan
    if "ttft_ms" in sim_df and len(sim_df):
        # the simulated server-side TTFT: without the client/HTTP part of the frontend delay and
        # without the streaming of the first token's step (vLLM stamps TTFT when its output loop
        # takes the step's outputs); that step's batch ~ the requests decoding at the first token
        sim = sim_df["ttft_ms"].to_numpy(float)
        eng_sim = sim - fe - per_tok * sim_df["prompt_tokens"].to_numpy(float) \
            - float(cfg.engine.stream_ms_per_token) * decoding_at_first_token(sim_df)
        out["sim_mean_ttft_ms"], out["sim_engine_mean_ttft_ms"] = float(sim.mean()), float(eng_sim.mean())
        out["sim_engine_median_ttft_ms"] = float(np.median(eng_sim))
        out["sim_engine_p99_ttft_ms"] = float(np.percentile(eng_sim, 99))
    else:
        out["sim_mean_ttft_ms"] = out["sim_engine_mean_ttft_ms"] = np.nan
    return out


REPLICATE_SUFFIX = re.compile(r"__[a-z]+\d+$")    # a session's tag: r2, r3, g1, l1, ...


def replicate_spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run-to-run spread of the MEASURED figures between replicates of one run (same seed, rate
    and arrivals; a fresh server start; files `<run>`, `<run>__r2`, `<run>__g1`, ...): the noise
    floor any simulator error should be read against. Spread = (max - min) / mean.

    Floor = (max - min) / (max + min): the smallest error that ONE prediction can have on every
    replicate at once (the prediction 2 max min / (max + min) errs by exactly that on both
    extremes, any other by more on one of them). A floor above a target means no simulator,
    however exact, meets that target on every replicate of the run."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault(REPLICATE_SUFFIX.sub("", r["run"]), []).append(r)
    out = []
    for base, rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        rec: dict[str, Any] = {"run": base, "replicates": len(rs),
                               "held_to_targets": all(r.get("held_to_targets") for r in rs)}
        for k in TARGETS:
            v = np.array([r[f"meas_{k}"] for r in rs], float)
            ok = bool(np.all(np.isfinite(v)) and np.all(v > 0))
            rec[f"spread_{k}"] = float((v.max() - v.min()) / v.mean()) if ok else np.nan
            rec[f"floor_{k}"] = float((v.max() - v.min()) / (v.max() + v.min())) if ok else np.nan
        out.append(rec)
    return out


def print_replicates(reps: list[dict[str, Any]]) -> None:
    if not reps:
        return
    print("\n== measured run-to-run spread between replicates (same arrivals, fresh server): (max-min)/mean")
    print(f"   {'run':28s} " + " ".join(f"{_short(k):>9s}" for k in TARGETS))
    for r in reps:
        print(f"   {r['run']:28s} " + " ".join(f"{r[f'spread_{k}'] * 100:8.1f}%" for k in TARGETS))
    print("\n== the least error ONE prediction can have on every replicate: (max-min)/(max+min); "
          "x = above the target, so no model meets it on all of them")
    print(f"   {'run':28s} " + " ".join(f"{_short(k):>9s}" for k in TARGETS))
    for r in reps:
        print(f"   {r['run']:28s} " + " ".join(
            f"{r[f'floor_{k}'] * 100:7.1f}%" + ("x" if r[f"floor_{k}"] > TARGETS[k] else " ")
            for k in TARGETS))
    finite = [r for r in reps if r["held_to_targets"]]
    blocked = [r["run"] for r in finite if any(r[f"floor_{k}"] > TARGETS[k] for k in TARGETS)]
    print(f"   {len(blocked)} of {len(finite)} finite-rate runs with replicates have a target that no "
          f"prediction can meet on all replicates" + (f": {', '.join(blocked)}" if blocked else ""))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README's results table: relative error per run, a cross where a target is missed."""
    keys = list(TARGETS)
    head = "| run | rate (req/s) | " + " | ".join(_short(k) for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        if "error" in r or r.get("source") == "omni_bench":    # (markdown_omni prints those)
            continue
        rate = r["request_rate"] if r["request_rate"] == "inf" else f"{float(r['request_rate']):.2f}"
        if r.get("burstiness") not in (None, 1.0, "1.0"):
            rate += f", k={r['burstiness']}"
        cells = [f"{r[f'err_{k}'] * 100:+.1f}%" + (" ✗" if r["held_to_targets"] and not r[f"ok_{k}"] else "")
                 for k in keys]
        lines.append(f"| {r['run']} | {rate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_groups(table: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """An error table per group (error_tables) as markdown: mean |error| (runs within target)."""
    head = "| " + " / ".join(keys) + " | runs | " + " | ".join(_short(k) for k in TARGETS) + " |"
    lines = [head, "|" + "---|" * (len(TARGETS) + 2)]
    for r in table:
        cells = [f"{r[f'mean_abs_err_{k}'] * 100:.1f}% ({r[f'within_{k}']}/{r['runs']})"
                 if np.isfinite(r[f"mean_abs_err_{k}"]) else "-" for k in TARGETS]
        lines.append(f"| {' / '.join(str(r[k]) for k in keys)} | {r['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(k: str) -> str:
    return (k.replace("request_throughput", "thr").replace("median_", "p50 ").replace("p99_", "p99 ")
            .replace("_ms", ""))


def print_table(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r.get("source") == "omni_bench":     # (omni_validate.print_omni prints those)
            continue
        if "error" in r:
            print(f"\n== {r['run']} ({r.get('model')}): {r['error']}")
            continue
        print(f"\n== {r['run']}  model={r['model']}  {r.get('modality', '?')} / {r.get('regime', '?')}"
              f"  rate={r['request_rate']}  burstiness={r['burstiness']}"
              f"  completed={r['completed']}  preemptions meas/sim={r['measured_preemptions']}/{r['sim_preemptions']}"
              + (f"  closed loop: {r['max_concurrency']} clients" if r.get("max_concurrency") else "")
              + f"  -> {r['status']}")
        print(f"   {'metric':10s} {'measured':>12s} {'simulated':>12s} {'rel.err':>9s} {'target':>7s}")
        for k, tol in TARGETS.items():
            mark = "ok" if r[f"ok_{k}"] else ("--" if not r["held_to_targets"] else "FAIL")
            print(f"   {_short(k):10s} {r[f'meas_{k}']:12.2f} {r[f'sim_{k}']:12.2f} "
                  f"{r[f'err_{k}'] * 100:+8.1f}% {tol * 100:6.0f}% {mark}")


def plot_cdfs(curves: list[tuple[str, pd.DataFrame, pd.DataFrame]], path: Path, cols: int = 3) -> None:
    """Measured vs simulated TTFT and E2EL CDFs, one pair of panels per run; replicates of a run
    share its panels (one measured line each, the spread between them is the engine's own noise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    try:
        import seaborn as sns
        sns.set_theme(style="whitegrid", context="paper")
    except ImportError:
        pass
    groups: dict[str, list[tuple[str, pd.DataFrame, pd.DataFrame]]] = {}
    for name, m, s in curves:
        groups.setdefault(REPLICATE_SUFFIX.sub("", name), []).append((name, m, s))
    n = max(1, len(groups))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for g, (base, members) in enumerate(groups.items()):
        for j, (metric, mcol, scol) in enumerate((("TTFT", "measured_ttft_s", "ttft_ms"),
                                                  ("E2EL", "measured_e2el_s", "e2el_ms"))):
            ax = axes[g // cols][2 * (g % cols) + j]
            ax.set_visible(True)
            lines = [(f"measured {REPLICATE_SUFFIX.search(nm).group(0)[2:] if REPLICATE_SUFFIX.search(nm) else 'r1'}",
                      m[mcol].to_numpy(float) * 1e3 if mcol in m else np.array([]), 1.0) for nm, m, _ in members]
            s0 = members[0][2]
            lines.append(("simulated", s0[scol].to_numpy(float) if scol in s0 else np.array([]), 2.0))
            for label, vals, lw in lines:
                v = np.sort(vals[np.isfinite(vals) & (vals > 0)])
                if len(v):
                    ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label, lw=lw,
                            color="black" if label == "simulated" else None)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"{metric} (ms)", fontsize=7)
            ax.set_title(f"{base}: {metric}", fontsize=7)
            ax.tick_params(labelsize=6)
            if ax.get_legend_handles_labels()[0]:     # (an image run has no TTFT)
                ax.legend(fontsize=5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DIFFUSION_TARGET = 0.05      # request latency of a real diffusers pipeline vs the sum of stages


def is_diffusers_e2e(obj: Any) -> bool:
    return isinstance(obj, dict) and str(obj.get("pipeline", "")).startswith("diffusers") and "results" in obj


def validate_diffusion(path: Path, profiles_dir: str, gpu: str) -> list[dict[str, Any]]:
    """A measured end-to-end diffusers pipeline (profiler e2e) vs the simulator's sum of profiled
    stages for the same request batch: steps x dit_step(batch, latent tokens) + vae_decode."""
    from profiler.models import load_model
    from sim.engines.latency import LatencyModel
    obj = read_json(path)
    model = obj["model"]
    spec = load_model(model)
    lat = LatencyModel(Path(profiles_dir), gpu, "error")
    rows = []
    for r in obj["results"]:
        if r.get("status", "ok") != "ok":
            continue
        b, h, w, steps = int(r["batch_size"]), int(r["height"]), int(r["width"]), int(r["steps"])
        weight = b * (2 if r.get("cfg") else 1)
        dit = steps * lat.dit_step(model, weight, spec.latent_tokens(h, w))
        vae = lat.vae(model, VAE_DECODE, b, h, w)
        sim_ms, meas = (dit + vae) * 1e3, float(r["latency_ms_median"])
        err = sim_ms / meas - 1.0
        rows.append({"run": f"{run_name(path)}:{h}x{w}:b{b}", "model": model, "height": h, "width": w,
                     "batch_size": b, "steps": steps, "measured_ms": meas, "sim_ms": sim_ms,
                     "sim_dit_ms": dit * 1e3, "sim_vae_ms": vae * 1e3, "err": err,
                     "ok": abs(err) <= DIFFUSION_TARGET})
    return rows


def print_diffusion(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print(f"\n== diffusion pipelines: measured request latency vs sum of profiled stages (target {DIFFUSION_TARGET:.0%})")
    print(f"   {'point':32s} {'measured':>10s} {'simulated':>10s} {'rel.err':>8s}")
    for r in rows:
        print(f"   {r['run']:32s} {r['measured_ms']:10.1f} {r['sim_ms']:10.1f} {r['err']:+8.1%} "
              f"{'ok' if r['ok'] else 'FAIL'}")


def run_validation(folder: str | Path, profiles_dir: str = "traces/profiles", gpu: str = "h100",
                   out: Optional[str | Path] = None, model: Optional[str] = None,
                   extra: Optional[list[str]] = None, files: Optional[list[Path]] = None,
                   handoff: Optional[str | Path] = None) -> list[dict[str, Any]]:
    folder = Path(folder)
    out = Path(out) if out else (folder / "report" if folder.is_dir() else folder.parent / "report")
    out.mkdir(parents=True, exist_ok=True)
    if files is None:
        files = ([] if _is_omni_file(folder) else [folder]) if folder.is_file() else find_bench_files(folder, exclude=out)
    rows: list[dict[str, Any]] = []
    curves = []
    caps = inf_capacities(find_bench_files(folder, exclude=out) if folder.is_dir() else list(files))
    for p in files:
        obj = read_json(p)
        mdl = model or infer_model(Path(p), obj)
        cls = run_class(obj, mdl, caps)
        if mdl is None:
            rows.append({"run": run_name(p), "file": str(p), "model": None, **cls,
                         "error": "cannot infer the model (no provenance.model, no model name in the file name)"})
            continue
        table = Path(profiles_dir) / gpu / f"{mdl}.parquet"
        if not table.exists():
            rows.append({"run": run_name(p), "file": str(p), "model": mdl, **cls, "error": f"no profile table {table}"})
            continue
        try:
            row, mdf, sdf = validate_one(Path(p), mdl, profiles_dir, gpu, out / "sim" / run_name(p), extra,
                                         load_handoff(handoff if handoff is not None else DEFAULT_HANDOFF))
        except Exception as e:  # noqa: BLE001 - one bad run must not hide the others
            rows.append({"run": run_name(p), "file": str(p), "model": mdl, **cls, "error": f"{type(e).__name__}: {e}"})
            continue
        row.update(cls)
        rows.append(row)
        curves.append((run_name(p), mdf, sdf))
    omni_rows, omni_curves = validate_omni(folder, profiles_dir, gpu, out, extra)
    rows += omni_rows
    curves += omni_curves
    print_table(rows)
    from sim.tools.omni_validate import print_omni
    print_omni(rows)
    tables = error_tables(rows)
    print_groups("error by modality", tables["by_modality"], ("modality",))
    print_groups("error by load regime (rho = offered rate / measured capacity)", tables["by_regime"], ("regime",))
    print_groups("error by modality and regime", tables["by_modality_regime"], ("modality", "regime"))
    diffusion: list[dict[str, Any]] = []
    if Path(folder).is_dir():
        for p in json_files(folder, recursive=True):
            try:
                obj = read_json(p)
            except (OSError, ValueError, EOFError):
                continue
            if is_diffusers_e2e(obj):
                diffusion += validate_diffusion(p, profiles_dir, gpu)
    print_diffusion(diffusion)
    reps = replicate_spread(rows)
    print_replicates(reps)
    pd.DataFrame(rows).to_csv(out / "validation.csv", index=False)
    (out / "validation.json").write_text(json.dumps(
        {"targets": TARGETS, "profiles_dir": str(profiles_dir), "gpu": gpu, "runs": rows,
         "regimes": {"names": REGIMES, "upper_load_ratio": REGIME_UPPER,
                     "definition": "rho = offered request rate / capacity C (the request throughput "
                                   "of the model's --request-rate inf run with the same request law); "
                                   "low < 0.5 <= moderate < 0.8 <= near_saturation <= 1.05 < overload; "
                                   "rate inf (open loop) = overload; one client = low; a closed loop "
                                   "of N > 1 clients: rho = its throughput / C, at most near_saturation"},
         **tables,
         "diffusion_target": DIFFUSION_TARGET, "diffusion": diffusion, "replicates": reps},
        indent=2, default=lambda x: None if isinstance(x, float) and not np.isfinite(x) else str(x)))
    plot_cdfs(curves, out / "validation_cdfs.png")
    held = [r for r in rows if r.get("held_to_targets")]
    print(f"\n{sum(r['pass'] for r in held)}/{len(held)} finite-rate runs within targets; "
          f"{sum('error' in r for r in rows)} not run; report in {out}")
    return rows


def _is_omni_file(path: Path) -> bool:
    from profiler.omni_runs import is_omni_bench
    try:
        return is_omni_bench(read_json(path))
    except (OSError, ValueError, EOFError):
        return False


def validate_omni(folder: str | Path, profiles_dir: str, gpu: str, out: Path,
                  extra: Optional[list[str]] = None) -> tuple[list[dict[str, Any]], list]:
    """Rows (and CDF curves) of the vLLM-Omni serving runs under `folder` (or the one file)."""
    from profiler.omni_runs import OmniRunError
    from sim.tools.omni_validate import datasets, validate_run
    folder = Path(folder)
    if folder.is_file() and not _is_omni_file(folder):
        return [], []
    rows: list[dict[str, Any]] = []
    curves: list = []
    try:
        found = datasets(folder)
    except OmniRunError as e:
        return [{"run": folder.name, "file": str(folder), "model": None, "modality": "image_gen",
                 "source": "omni_bench", "error": str(e)}], []
    for ds in found:
        try:
            row, mdf, sdf = validate_run(ds, profiles_dir, gpu, out / "sim" / ds.run.name, extra)
        except Exception as e:  # noqa: BLE001 - one bad run must not hide the others
            rows.append({"run": ds.run.name, "file": str(ds.run.path), "model": ds.run.model,
                         "modality": "image_gen", "source": "omni_bench", "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append(row)
        curves.append((ds.run.name, mdf, sdf))
    return rows, curves


def error_tables(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The report's error tables per modality, per regime and per both."""
    return {"by_modality": group_errors(rows, ("modality",)), "by_regime": group_errors(rows, ("regime",)),
            "by_modality_regime": group_errors(rows, ("modality", "regime"))}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.tools.validate", description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="folder with bench result JSON (searched recursively), or one file")
    ap.add_argument("--profiles-dir", default="traces/profiles")
    ap.add_argument("--gpu", default="h100", help="profile table set: <profiles-dir>/<gpu>/<model>.parquet")
    ap.add_argument("--model", default=None, help="force the model (default: from provenance / file name)")
    ap.add_argument("--out", default=None, help="default <folder>/report")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 if a finite-rate run misses a target or could not be run")
    ap.add_argument("--markdown", action="store_true", help="also print the results as a markdown table")
    ap.add_argument("--handoff", default=None,
                    help=f"measured hand-off links for disaggregated runs (default {DEFAULT_HANDOFF.relative_to(ROOT)} "
                         f"when it exists: profiler.handoff_bench's output)")
    ap.add_argument("overrides", nargs="*", help="extra hydra overrides for every replay")
    a = ap.parse_args(argv)
    rows = run_validation(a.folder, a.profiles_dir, a.gpu, a.out, a.model, a.overrides, handoff=a.handoff)
    if a.markdown:
        if any(r.get("source") != "omni_bench" for r in rows):
            print("\n" + markdown_table(rows))
        from sim.tools.omni_validate import markdown_omni
        if any(r.get("source") == "omni_bench" for r in rows):
            print("\n" + markdown_omni(rows))
        tables = error_tables(rows)
        for name, keys in (("by_modality", ("modality",)), ("by_regime", ("regime",)),
                           ("by_modality_regime", ("modality", "regime"))):
            print("\n" + markdown_groups(tables[name], keys))
    if a.strict:
        bad = [r for r in rows if "error" in r or (r.get("held_to_targets") and not r.get("pass"))]
        return 1 if bad or not rows else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
