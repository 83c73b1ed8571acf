"""Serve-level constants calibrated on dedicated measurements, never on the validation runs.

    python -m sim.calibrate traces/validation/h100/ [--profiles-dir traces/profiles] [--gpu h100]

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

Without server histograms only the total is known (`total_ms`). The values committed in
conf/experiment/replay_vllm_bench.yaml must match this command's output (tests/test_validate.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sim.validate import find_bench_files, infer_model, validate_one

GAP_S = 1.0          # seconds between replayed probe requests: the engine is idle at each arrival
FRONTEND_OFF = ["engine.frontend_ms=0", "engine.frontend_ms_per_prompt_token=0", "engine.idle_wakeup_ms=0"]


def is_probe(obj: dict[str, Any]) -> bool:
    """A zero-load probe: the client kept at most one request in flight."""
    return (obj.get("provenance") or {}).get("max_concurrency") == 1 or obj.get("max_concurrency") == 1


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
        for p in find_bench_files(Path(folder), exclude=Path(folder) / "report"):
            obj = json.loads(p.read_text())
            if not is_probe(obj):
                continue
            model = infer_model(p, obj)
            if model is None or not (Path(profiles_dir) / gpu / f"{model}.parquet").exists():
                continue
            spread = Path(tmp) / p.name
            spread.write_text(json.dumps(spread_out(obj)))
            row, _, sim_df = validate_one(spread, model, profiles_dir, gpu, Path(tmp) / p.stem, FRONTEND_OFF)
            meas = float(np.mean(obj["ttfts"])) * 1e3
            sim = float(sim_df["ttft_ms"].mean())
            hist = ((obj.get("provenance") or {}).get("server_metrics") or {}).get("histograms") or {}
            srv = (hist.get("time_to_first_token_seconds") or {}).get("mean")
            srv = float(srv) * 1e3 if srv is not None else float("nan")
            rows.append({"run": p.stem, "model": model, "prompt_tokens": int(np.mean(obj["input_lens"])),
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


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.calibrate", description=__doc__.split("\n")[0])
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
