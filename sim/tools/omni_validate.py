"""Replay of vLLM-Omni serving runs (`python -m profiler.omni_bench`, schema mmsim.omni_bench.v1)
in the simulator, called by `python -m sim.tools.validate <folder>` for every such run found.

`OmniBenchDataset` is this source's dataset (one class per source, as vLLM's benchmark
datasets): the run's sent requests as a trace (send times, task, prompt words, input and output
sizes, steps, CFG), the server's settings as overrides (max_num_seqs, admission wait, step
scheduler) and its history (the output sizes it had decoded before the run's first send, from
the call's stage log: the VAE's first-use cost is paid per size and server). The replay runs
`+experiment=replay_omni_bench` (one GPU, the baseline policy, its diffusion replicas on the
engine the server ran: omni_request by default) with the API server's time around the engine
(diffusion.omni_api_delays); open-loop runs replay at their send times, the zero-load probe
closed loop (one request at a time).

Failed requests count as the real run counted them: they are replayed (their batch ran on the
GPU) and left out of the metrics; throughput = completed / (first send -> last completed
answer), as profiler.omni_client.summarize. Targets (issue 14): throughput 5%, median E2EL
10%, p99 E2EL 15%, on the open-loop runs; the probe, which the vLLM-Omni table was built from
(profiler.omni_table), is reported as in-sample. Per stage, the mean over the run's requests of
vLLM-Omni's own timer (condition encode, diffuse per step, VAE decode / encode) against the
simulated stages of the same requests.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from profiler.omni_runs import OmniBenchRun, OmniServerCall, find_runs, server_calls

MODALITY = "image_gen"
TARGETS: dict[str, float] = {"request_throughput": 0.05, "median_e2el_ms": 0.10, "p99_e2el_ms": 0.15}
REPORTED = ("request_throughput", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")
IN_SAMPLE = ("probe", "warmup")        # the runs profiler.omni_table builds the table from
# per-stage comparison: name -> (measured column of OmniBenchRun.batch_frame, simulated stages)
STAGES = {"encode": ("text_encode_s", ("vision_encode", "prefill")),
          "diffuse_per_step": ("diffuse_s", ("dit_step",)),
          "vae_decode": ("vae_decode_s", ("vae_decode",)),
          "vae_encode": ("vae_encode_s", ("vae_encode",))}


class OmniBenchDataset:
    """One omni_bench run as the simulator replays it (module docstring)."""
    source = "omni_bench"

    def __init__(self, run: OmniBenchRun, call: Optional[OmniServerCall] = None) -> None:
        self.run = run
        self.call = call

    @property
    def held_to_targets(self) -> bool:
        return self.run.validation and not self.run.sequential and self.run.run not in IN_SAMPLE

    def trace(self) -> pd.DataFrame:
        """Every sent request in send order, in sim.workloads.trace's columns: arrival = its send
        time (0 for a one-at-a-time run: the closed loop sends each when the previous answered)."""
        df = self.run.requests
        sent = df[df["sent"]].sort_values("sent_s", kind="stable")
        edit = sent["task"] == "edit"
        return pd.DataFrame({
            "arrival_time": 0.0 if self.run.sequential else sent["sent_s"].to_numpy(float),
            "task": sent["task"].to_numpy(), "model": self.run.model,
            "prompt_tokens": sent["prompt_tokens"].to_numpy(int),
            "image_height": np.where(edit, sent.get("image_height"), None),
            "image_width": np.where(edit, sent.get("image_width"), None),
            "output_height": sent["output_height"].to_numpy(int),
            "output_width": sent["output_width"].to_numpy(int),
            "steps": sent["steps"].to_numpy(int), "cfg": sent["cfg"].to_numpy(bool),
            "completed": sent["completed"].to_numpy(bool), "seed": sent["seed"].to_numpy(int)})

    def warm_sizes(self) -> list[tuple[int, int]]:
        """Output sizes the server had decoded before the run's first send."""
        t0 = self.run.start_wall()
        if self.call is None or self.call.stagelog is None or t0 is None:
            return [(512, 512)]                 # vLLM-Omni's start-up warm-up
        return self.call.decoded_before(t0)

    def overrides(self) -> list[str]:
        """The server's scheduler settings (provenance.server_settings) as diffusion.* overrides."""
        st = self.run.provenance.get("server_settings") or {}

        def val(k: str, default: Any) -> Any:
            v = st.get(k)
            return v.get("value", default) if isinstance(v, dict) else default
        ov = [f"diffusion.engine={'omni_step' if val('step_execution', False) else 'omni_request'}",
              f"diffusion.max_num_seqs={int(val('max_num_seqs', 1) or 1)}"]
        if not val("step_execution", False):
            ov.append(f"diffusion.request_batch_max_wait_ms={float(val('request_batch_max_wait_ms', 0.0) or 0.0)}")
        sizes = ",".join(f"[{h},{w}]" for h, w in self.warm_sizes())
        ov += ["diffusion.omni_api_delays=true", f"diffusion.omni_warm_sizes=[{sizes}]"]
        if self.run.sequential:
            ov.append("workload.max_concurrency=1")
        return ov


def compose(path: Path, ds: OmniBenchDataset, profiles_dir: str, gpu: str, extra: Optional[list[str]] = None):
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sim.cli import register_schema, to_config
    from sim.tools.validate import CONF_DIR
    register_schema()
    ov = ["+experiment=replay_omni_bench", f"workload.trace.path={path}", f"profiles_dir={profiles_dir}",
          f"cluster.gpu={gpu}", "latency.out_of_range=clamp", *ds.overrides(), *(extra or [])]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base=None, config_dir=str(CONF_DIR)):
        cfg = _compose(config_name="config", overrides=ov)
    return to_config(cfg), ov


def simulated_metrics(sim: pd.DataFrame, completed: np.ndarray) -> dict[str, float]:
    """The measured summary's definitions on the simulated requests the real run completed."""
    ok = sim[completed]
    lat = ok["e2el_ms"].to_numpy(float)
    start = float(sim["arrival"].min())
    dur = float(ok["finish"].max() - start) if len(ok) else math.nan
    return {"request_throughput": len(ok) / dur if dur > 0 else math.nan,
            "mean_e2el_ms": float(lat.mean()) if len(lat) else math.nan,
            "median_e2el_ms": float(np.percentile(lat, 50)) if len(lat) else math.nan,
            "p99_e2el_ms": float(np.percentile(lat, 99)) if len(lat) else math.nan}


def stage_errors(run: OmniBenchRun, sim: pd.DataFrame, trace: pd.DataFrame) -> dict[str, float]:
    """Mean seconds per stage over the run's batches (vLLM-Omni's timer) and over the same
    requests simulated (by seed), and their relative error."""
    b = run.batch_frame()
    out: dict[str, float] = {}
    sim = sim.assign(seed=trace["seed"].to_numpy())
    merged = b.merge(sim, on="seed", how="inner", suffixes=("", "_sim"))
    for name, (col, stages) in STAGES.items():
        m = merged[col].to_numpy(float)
        s = np.zeros(len(merged))
        have = np.zeros(len(merged), bool)
        for st in stages:
            if f"{st}_start" in merged:
                d = (merged[f"{st}_end"] - merged[f"{st}_start"]).to_numpy(float)
                have |= np.isfinite(d)
                s += np.nan_to_num(d)
        if name == "diffuse_per_step":
            m, s = m / merged["steps"].to_numpy(float), s / merged["steps"].to_numpy(float)
        ok = np.isfinite(m) & have
        if not ok.any():
            continue
        mm, sm = float(m[ok].mean()), float(s[ok].mean())
        out[f"meas_stage_{name}_ms"], out[f"sim_stage_{name}_ms"] = mm * 1e3, sm * 1e3
        out[f"err_stage_{name}"] = sm / mm - 1.0
    # all timed stages of a request together (what one batch holds the GPU for, less the
    # pipeline's untimed CPU work)
    cols = [c for c, _ in STAGES.values()]
    m = merged[cols].fillna(0.0).sum(axis=1).to_numpy(float)
    s = np.zeros(len(merged))
    for _, stages in STAGES.values():
        for st in stages:
            if f"{st}_start" in merged:
                s += np.nan_to_num((merged[f"{st}_end"] - merged[f"{st}_start"]).to_numpy(float))
    if len(merged):
        out["meas_stage_all_ms"], out["sim_stage_all_ms"] = float(m.mean()) * 1e3, float(s.mean()) * 1e3
        out["err_stage_all"] = out["sim_stage_all_ms"] / out["meas_stage_all_ms"] - 1.0
    return out


def validate_run(ds: OmniBenchDataset, profiles_dir: str, gpu: str, outdir: Path,
                 extra: Optional[list[str]] = None) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Replay one run; (row for sim.tools.validate's tables, measured frame, simulated frame)."""
    from sim.run.runner import Run
    from sim.tools.validate import TARGETS as ALL_TARGETS
    from sim.tools.validate import regime
    run = ds.run
    outdir.mkdir(parents=True, exist_ok=True)
    trace = ds.trace()
    path = outdir / "trace.csv"
    trace.drop(columns=["completed", "seed"]).to_csv(path, index=False)
    cfg, ov = compose(path, ds, profiles_dir, gpu, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = Run(cfg, outdir).run()
    sim = pd.read_parquet(outdir / "requests.parquet").sort_values("id").reset_index(drop=True)
    if len(sim) != len(trace) or not (np.array_equal(sim["output_h"], trace["output_height"])
                                      and np.array_equal(sim["steps"], trace["steps"])):
        raise RuntimeError(f"{run.path}: the simulated requests do not line up with the trace rows")
    meas = run.measured()
    simm = simulated_metrics(sim, trace["completed"].to_numpy(bool))
    reg, rho = regime("sequential" if run.sequential else run.obj.get("request_rate"), run.capacity_rps,
                      1 if run.sequential else None, meas["request_throughput"])
    held = ds.held_to_targets
    row: dict[str, Any] = {
        "run": run.name, "file": str(run.path), "model": run.model, "served": run.served, "task": run.task,
        "source": ds.source, "modality": MODALITY, "regime": reg, "load_ratio": rho,
        "capacity_rps": run.capacity_rps, "capacity_source": run.provenance.get("capacity_source"),
        "layout": None, "request_rate": "sequential" if run.sequential else run.obj.get("request_rate"),
        "burstiness": run.obj.get("burstiness"), "completed": meas["completed"], "failed": meas["failed"],
        "held_to_targets": held, "measured_preemptions": None, "sim_preemptions": None,
        "max_concurrency": 1 if run.sequential else None, "overrides": " ".join(ov),
        "warm_sizes": len(ds.warm_sizes()),
        "stage_costs": _relative((summary.get("layout") or {}).get("diffusion_engine", {}).get("stage_costs")),
        "out_of_grid_lookups": (summary.get("latency_model") or {}).get("out_of_grid_lookups")}
    passed = True
    for k in dict.fromkeys([*ALL_TARGETS, *REPORTED]):     # (a fixed order: the report is committed)
        mv, sv = meas.get(k, math.nan), simm.get(k, math.nan)
        err = (sv - mv) / mv if mv and np.isfinite(mv) and np.isfinite(sv) else math.nan
        tol = TARGETS.get(k)
        ok = bool(tol is not None and np.isfinite(err) and abs(err) <= tol)
        row[f"meas_{k}"], row[f"sim_{k}"], row[f"err_{k}"], row[f"ok_{k}"] = mv, sv, err, ok
        if tol is not None:
            row[f"tol_{k}"] = tol
            passed &= ok
    row.update(stage_errors(run, sim, trace))
    row["pass"] = passed
    row["status"] = ("PASS" if passed else "FAIL") if held else (
        "in-sample" if run.run in IN_SAMPLE else "info")
    mdf = pd.DataFrame({"measured_e2el_s": run.requests.loc[run.requests["completed"], "latency_s"].to_numpy(float),
                        "measured_ttft_s": np.nan})
    return row, mdf, sim.loc[trace["completed"].to_numpy(bool)].reset_index(drop=True)


def _relative(obj: Any) -> Any:
    """Table paths in a summary's strings relative to the repository (a report is committed)."""
    from sim.tools.validate import ROOT
    if isinstance(obj, dict):
        return {k: _relative(v) for k, v in obj.items()}
    return obj.replace(f"{ROOT}/", "") if isinstance(obj, str) else obj


def datasets(folder: str | Path, include_warmup: bool = False) -> list[OmniBenchDataset]:
    """Every omni_bench run under `folder` as a dataset with its server call (the warm-up runs
    only when asked: they are not ground truth)."""
    runs = find_runs(folder) if Path(folder).is_dir() else [OmniBenchRun.load(folder)]
    calls = server_calls(folder, runs) if Path(folder).is_dir() else server_calls(Path(folder).parent, runs)
    return [OmniBenchDataset(r, calls.get((r.served, r.call_id))) for r in runs
            if include_warmup or r.validation]


def print_omni(rows: list[dict[str, Any]]) -> None:
    rows = [r for r in rows if r.get("source") == OmniBenchDataset.source]
    if not rows:
        return
    print(f"\n== vLLM-Omni serving replays (modality {MODALITY}): measured vs simulated; targets "
          + ", ".join(f"{k} {v:.0%}" for k, v in TARGETS.items()) + " on the open-loop runs")
    head = f"   {'run':30s} {'status':9s} " + " ".join(f"{k.replace('request_throughput', 'thr').replace('_ms', ''):>26s}"
                                                    for k in REPORTED)
    print(head)
    for r in rows:
        if "error" in r:
            print(f"   {r['run']:30s} error: {r['error']}")
            continue
        cells = []
        for k in REPORTED:
            mv, sv, e = r[f"meas_{k}"], r[f"sim_{k}"], r[f"err_{k}"]
            fmt = "{:.3f}" if k == "request_throughput" else "{:,.0f}"
            cells.append(f"{fmt.format(mv):>8s} {fmt.format(sv):>8s} {e * 100:+6.1f}%"
                         + ("x" if k in TARGETS and r["held_to_targets"] and not r[f"ok_{k}"] else " "))
        print(f"   {r['run']:30s} {r['status']:9s} " + " ".join(f"{c:>26s}" for c in cells))
    print("\n   per stage, mean ms over the run's requests (vLLM-Omni's timer vs simulated):")
    names = [n for n in (*STAGES, "all") if any(f"err_stage_{n}" in r for r in rows)]
    print(f"   {'run':30s} " + " ".join(f"{n:>26s}" for n in names))
    for r in rows:
        if "error" in r:
            continue
        cells = [(f"{r[f'meas_stage_{n}_ms']:8.1f} {r[f'sim_stage_{n}_ms']:8.1f} {r[f'err_stage_{n}'] * 100:+6.1f}%"
                  if f"err_stage_{n}" in r else "-") for n in names]
        print(f"   {r['run']:30s} " + " ".join(f"{c:>26s}" for c in cells))


def markdown_omni(rows: list[dict[str, Any]]) -> str:
    rows = [r for r in rows if r.get("source") == OmniBenchDataset.source and "error" not in r]
    keys = list(REPORTED)
    lines = ["| run | rate (req/s) | " + " | ".join(k.replace("request_throughput", "throughput (req/s)")
                                                    .replace("_ms", " (ms)").replace("_", " ") for k in keys)
             + " | encode | diffuse/step | VAE decode |",
             "|" + "---|" * (len(keys) + 5)]
    for r in rows:
        rate = "one at a time" if r["request_rate"] == "sequential" else f"{float(r['request_rate']):.3f}"
        if r.get("burstiness") not in (None, 1.0):
            rate += f", k={r['burstiness']}"
        cells = []
        for k in keys:
            fmt = "{:.3f}" if k == "request_throughput" else "{:,.0f}"
            mark = " ✗" if k in TARGETS and r["held_to_targets"] and not r[f"ok_{k}"] else ""
            cells.append(f"{fmt.format(r[f'meas_{k}'])} / {fmt.format(r[f'sim_{k}'])} ({r[f'err_{k}'] * 100:+.1f}%){mark}")
        for n in ("encode", "diffuse_per_step", "vae_decode"):
            cells.append(f"{r[f'err_stage_{n}'] * 100:+.1f}%" if f"err_stage_{n}" in r else "-")
        name = r["run"] + (" (in-sample)" if r["status"] == "in-sample" else "")
        lines.append(f"| {name} | {rate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
