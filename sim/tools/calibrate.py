"""Serve-level constants calibrated on dedicated measurements, never on the validation runs.

    python -m sim.tools.calibrate traces/validation/h100/ [--profiles-dir traces/profiles] [--gpu h100]

Measured with zero-load probes (`profiler.serve_bench --runs probe_in32,probe_in512,probe_in2048`:
one request at a time, a fixed prompt length, 16 output tokens), each probe's requests replayed far
apart (an idle engine every time, these constants off), and vLLM's server-side TTFT histogram of
the same run (`provenance.server_metrics.histograms`) to split the client's TTFT in two:

- `engine.frontend_ms` + `engine.frontend_ms_per_prompt_token`: client mean TTFT minus the server's
  (HTTP, tokenization, the client's stream handling), a least-squares line over the prompt length;
- `engine.idle_wakeup_ms`: the server's mean TTFT minus the simulated zero-load TTFT: time an idle
  engine adds before its first token (the engine core sleeps on its input queue; the first step
  after idle overlaps no host work). Loaded engines do not pay it (the step logs of loaded runs
  show the server's TTFT equal to the simulated one for llama2_7b).

Loaded engines: the concurrency ladders (`profiler.serve_bench --runs conc8,conc32,conc64,conc128
--steplog` and `--runs lconc16,...,lconc128`, in <folder>/ladder: N clients at once, 512 / 128 and
1,536 / 128 tokens) sample the CPU seconds of
the API server's and the client's processes every 0.25 s. Least squares of each interval's CPU
seconds on (its length, tokens streamed in it, first tokens in it), over intervals with engine
steps, gives each process's CPU seconds per streamed token:

- `engine.stream_ms_per_token`: API server + client per token: a step's B tokens are handled one
  after another by both single-threaded event loops, so a first / last token reaches its client
  about B times this after the step ends;
- `engine.api_ingest_ms_per_running_seq`: the API server's share: a request arriving at a busy
  engine waits behind that work (one token per running sequence per step) on its way in;
- `engine.api_ingest_ms`: the API-side time of a request at zero load, the median over the probes'
  step-log records of e2e - (queued + prefill + decode) (API arrival to the engine core and the
  last output back). With these a request at a busy engine can miss the next scheduling point
  and wait one more step, as the step logs of loaded runs show (first token 3 or 4 steps after
  the API arrival).

The ladder's steady decode steps (every one of the N sequences decoding, no prompt in or around the
step; step-log medians) also give the host time that async scheduling hides per model:
`engine.host_overhead_by_model[model] = [base_ms, per_seq_ms]`, a least-squares line over N of the
synchronously profiled decode step (at the wave's mean context) minus the served one.

The values committed in conf/experiment/replay_vllm_bench.yaml must match this command's output
(tests/test_validate.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from profiler.jsonfiles import read_json, run_name
from profiler.vllm_steplog import outside_engine_ms, run_steplog
from sim.tools.validate import find_bench_files, infer_model, validate_one

GAP_S = 1.0          # seconds between replayed probe requests: the engine is idle at each arrival
FRONTEND_OFF = ["engine.frontend_ms=0", "engine.frontend_ms_per_prompt_token=0", "engine.idle_wakeup_ms=0",
                "engine.api_ingest_ms=0", "engine.api_ingest_ms_per_running_seq=0",
                "engine.stream_ms_per_token=0"]


def is_probe(obj: dict[str, Any]) -> bool:
    """A zero-load probe of the text front end: the client kept at most one request in flight.
    Image-path probes (profiler.chat_bench results, which carry `images`) measure another front
    end (chat template, image decode and processing) and are not among them."""
    if "images" in obj:
        return False
    return (obj.get("provenance") or {}).get("max_concurrency") == 1 or obj.get("max_concurrency") == 1


def runs_of(folder: str | Path, keep) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, result) of the bench results under `folder` (not its report) that `keep` accepts."""
    for p in find_bench_files(Path(folder), exclude=Path(folder) / "report"):
        obj = read_json(p)
        if keep(obj):
            yield p, obj


def spread_out(obj: dict[str, Any], gap_s: float = GAP_S) -> dict[str, Any]:
    """The same requests, each arriving `gap_s` after the previous one."""
    t0 = float(min(obj["start_times"]))
    out = dict(obj)
    out["start_times"] = [t0 + i * gap_s for i in range(len(obj["start_times"]))]
    return out


def probe_offsets(folder: str | Path, profiles_dir: str = "traces/profiles",
                  gpu: str = "h100") -> list[dict[str, Any]]:
    """Per probe: measured mean TTFT, simulated zero-load TTFT, and their difference."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p, obj in runs_of(folder, is_probe):
            model = infer_model(p, obj)
            if model is None or not (Path(profiles_dir) / gpu / f"{model}.parquet").exists():
                continue
            spread = Path(tmp) / f"{run_name(p)}.json"
            spread.write_text(json.dumps(spread_out(obj)))
            row, _, sim_df = validate_one(spread, model, profiles_dir, gpu, Path(tmp) / run_name(p), FRONTEND_OFF)
            meas = float(np.mean(obj["ttfts"])) * 1e3
            sim = float(sim_df["ttft_ms"].mean())
            hist = ((obj.get("provenance") or {}).get("server_metrics") or {}).get("histograms") or {}
            srv = (hist.get("time_to_first_token_seconds") or {}).get("mean")
            srv = float(srv) * 1e3 if srv is not None else float("nan")
            rows.append({"run": run_name(p), "model": model, "prompt_tokens": int(np.mean(obj["input_lens"])),
                         "measured_ttft_ms": meas, "server_ttft_ms": srv, "sim_zero_load_ttft_ms": sim,
                         "offset_ms": meas - sim, "client_ms": meas - srv, "idle_ms": srv - sim})
    return rows


def frontend_ms(rows: list[dict[str, Any]]) -> Optional[float]:
    """The whole zero-load offset (client TTFT minus simulated engine TTFT), mean over probes."""
    return float(np.mean([r["offset_ms"] for r in rows])) if rows else None


def split_constants(rows: list[dict[str, Any]]) -> Optional[dict[str, float]]:
    """frontend_ms, frontend_ms_per_prompt_token and idle_wakeup_ms from probes with server data."""
    rs = [r for r in rows if np.isfinite(r["server_ttft_ms"])]
    if len(rs) < 2 or len({r["prompt_tokens"] for r in rs}) < 2:
        return None
    x = np.array([r["prompt_tokens"] for r in rs], float)
    slope, icpt = np.polyfit(x, np.array([r["client_ms"] for r in rs]), 1)
    if slope < 0:                      # no growth with the prompt: a constant
        slope, icpt = 0.0, float(np.mean([r["client_ms"] for r in rs]))
    return {"frontend_ms": float(icpt), "frontend_ms_per_prompt_token": float(slope),
            "idle_wakeup_ms": float(np.mean([r["idle_ms"] for r in rs])), "probes": len(rs)}


def probe_api_ingest_ms(folder: str | Path) -> Optional[float]:
    """Median API-side time of probe requests: e2e - (queued + prefill + decode) from the step log."""
    vals = [v for p, obj in runs_of(folder, is_probe) for v in outside_engine_ms(p, obj)]
    return float(np.median(vals)) if vals else None


def is_ladder(obj: dict[str, Any]) -> bool:
    """A concurrency-ladder run with a CPU series (serve_bench conc<N>)."""
    prov = obj.get("provenance") or {}
    return bool(prov.get("cpu_samples")) and (prov.get("max_concurrency") or 0) > 1


def ladder_intervals(path: Path, obj: dict[str, Any]) -> np.ndarray:
    """Rows (seconds, tokens, first tokens, API CPU s, client CPU s) per CPU-sample interval that
    holds engine steps (the client's start-up and result saving hold none)."""
    cs = obj["provenance"]["cpu_samples"]
    rows = np.array([[np.nan if x is None else x for x in r] for r in cs["rows"]], float)
    t = rows[:, 0] + cs["t0_wall"]
    cols = {c: i for i, c in enumerate(cs["columns"])}
    api, cli = rows[:, cols["api_server_cpu_s"]], rows[:, cols["client_cpu_s"]]
    recs = [r for r in run_steplog(path, obj) if "gen" in r]
    rt = np.array([r["t"] for r in recs])
    gen = np.array([r["gen"] for r in recs], float)
    first = np.array([len(r.get("ttft", ())) for r in recs], float)
    out = []
    for i in range(len(t) - 1):
        m = (rt >= t[i]) & (rt < t[i + 1])
        d = (api[i + 1] - api[i], cli[i + 1] - cli[i])
        if m.any() and np.isfinite(d).all():
            out.append((t[i + 1] - t[i], gen[m].sum(), first[m].sum()) + d)
    return np.array(out, float).reshape(-1, 5)


def ladder_cpu_costs(folder: str | Path) -> Optional[dict[str, float]]:
    """CPU ms per streamed token of the API server and of the client (see the module docstring)."""
    parts = [ladder_intervals(p, obj) for p, obj in runs_of(folder, is_ladder)]
    if not parts:
        return None
    x = np.concatenate(parts)
    out = {"intervals": len(x), "runs": len(parts)}
    for j, who in ((3, "api_server"), (4, "client")):
        coef = np.linalg.lstsq(x[:, :3], x[:, j], rcond=None)[0]
        out[f"{who}_ms_per_token"] = float(coef[1]) * 1e3
        out[f"{who}_idle_share"] = float(coef[0])
    return out


def ladder_decode_steps(path: Path, obj: dict[str, Any]) -> Optional[float]:
    """Median served step (ms) of a ladder run's steady decode: all N sequences produce a token
    and neither this step nor the previous one finished a prompt."""
    recs = [r for r in run_steplog(path, obj) if "gen" in r]
    n = obj["provenance"]["max_concurrency"]
    gaps = [(b["m"] - a["m"]) * 1e3 for a0, a, b in zip(recs, recs[1:], recs[2:])
            if b["gen"] == n and b["prompt"] == 0 and a["prompt"] == 0 and a0["prompt"] == 0]
    return float(np.median(gaps)) if gaps else None


def ladder_host_overlap(folder: str | Path, profiles_dir: str = "traces/profiles",
                        gpu: str = "h100") -> dict[str, dict[str, Any]]:
    """Per model: [base_ms, per_seq_ms] of the host time async scheduling hides (see the module
    docstring), with the points it was fitted on. Both ladders (512- and 1,536-token prompts)
    count: the hidden time does not depend on the context (qwen2_5_7b: within 0.2 ms at each
    batch). A point whose profiled step is an OOM hole of the table (filled, not measured) is
    left out."""
    from sim.engines.latency import LatencyModel
    lat = LatencyModel(profiles_dir, gpu, "clamp")
    pts: dict[str, list[tuple[int, float, float]]] = {}
    skipped: list[tuple[str, int, float]] = []
    for p, obj in runs_of(folder, is_ladder):
        prov = obj["provenance"]
        model = infer_model(p, obj)
        served = ladder_decode_steps(p, obj)
        if model is None or served is None or not (Path(profiles_dir) / gpu / f"{model}.parquet").exists():
            continue
        n = int(prov["max_concurrency"])
        ctx = prov["random_input_len"] + prov["random_output_len"] / 2
        holes = sum(lat.hole_hits.values())
        sync = lat.decode(model, n, ctx) * 1e3
        if sum(lat.hole_hits.values()) > holes:     # the table point there was OOM: filled, not measured
            skipped.append((model, n, ctx))
            continue
        pts.setdefault(model, []).append((n, sync, served))
    out = {}
    for model, rows in sorted(pts.items()):
        rows.sort()
        if len(rows) < 2:
            continue
        b = np.array([r[0] for r in rows], float)
        slope, icpt = np.polyfit(b, np.array([r[1] - r[2] for r in rows]), 1)
        out[model] = {"base_ms": float(icpt), "per_seq_ms": float(slope), "points": rows,
                      "skipped_oom_points": [(n, c) for m, n, c in skipped if m == model]}
    return out


def loaded_constants(folder: str | Path) -> Optional[dict[str, float]]:
    """api_ingest_ms, api_ingest_ms_per_running_seq and stream_ms_per_token."""
    ingest, cpu = probe_api_ingest_ms(folder), ladder_cpu_costs(folder)
    if ingest is None or cpu is None:
        return None
    return {"api_ingest_ms": ingest, "api_ingest_ms_per_running_seq": cpu["api_server_ms_per_token"],
            "stream_ms_per_token": cpu["api_server_ms_per_token"] + cpu["client_ms_per_token"],
            **{k: v for k, v in cpu.items() if k.startswith("client") or k in ("intervals", "runs")}}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.tools.calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="folder with `serve_bench` results, probes among them")
    ap.add_argument("--profiles-dir", default="traces/profiles")
    ap.add_argument("--gpu", default="h100")
    a = ap.parse_args(argv)
    rows = probe_offsets(a.folder, a.profiles_dir, a.gpu)
    if not rows:
        print(f"no zero-load probe runs (provenance max_concurrency == 1) with a profile table under {a.folder}",
              file=sys.stderr)
        return 1
    print(f"{'probe':30s} {'prompt':>6s} {'client TTFT':>12s} {'server TTFT':>12s} {'sim zero-load':>14s} "
          f"{'client-server':>14s} {'server-sim':>11s}")
    for r in rows:
        print(f"{r['run']:30s} {r['prompt_tokens']:6d} {r['measured_ttft_ms']:10.1f}ms {r['server_ttft_ms']:10.1f}ms "
              f"{r['sim_zero_load_ttft_ms']:12.1f}ms {r['client_ms']:12.1f}ms {r['idle_ms']:9.1f}ms")
    off = [r["offset_ms"] for r in rows]
    print(f"\nwhole offset (client - simulated engine): {frontend_ms(rows):.1f} ms "
          f"(mean of {len(rows)} probes; range {min(off):.1f}..{max(off):.1f} ms)")
    c = split_constants(rows)
    if c is None:
        print("no probes with server-side histograms: use the whole offset as engine.frontend_ms")
    else:
        print(f"engine.frontend_ms = {c['frontend_ms']:.2f}  engine.frontend_ms_per_prompt_token = "
              f"{c['frontend_ms_per_prompt_token']:.5f}  engine.idle_wakeup_ms = {c['idle_wakeup_ms']:.2f}"
              f"  ({c['probes']} probes with server histograms)")
    lc = loaded_constants(a.folder)
    if lc is None:
        print("no probe step logs / concurrency-ladder CPU series: busy-engine constants not calibrated")
    else:
        print(f"engine.api_ingest_ms = {lc['api_ingest_ms']:.2f}  engine.api_ingest_ms_per_running_seq = "
              f"{lc['api_ingest_ms_per_running_seq']:.4f}  engine.stream_ms_per_token = "
              f"{lc['stream_ms_per_token']:.4f}  (client {lc['client_ms_per_token']:.4f} ms/token; "
              f"{lc['intervals']} CPU intervals of {lc['runs']} ladder runs)")
    for model, h in ladder_host_overlap(a.folder, a.profiles_dir, a.gpu).items():
        pts = ", ".join(f"B={n}: {sync:.2f} sync / {srv:.2f} served" for n, sync, srv in h["points"])
        if h["skipped_oom_points"]:
            pts += f"; left out (table OOM hole): {h['skipped_oom_points']}"
        print(f"engine.host_overhead_by_model.{model} = [{h['base_ms']:.3f}, {h['per_seq_ms']:.4f}]  ({pts} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
