"""Serve-level constants calibrated on dedicated measurements, never on the validation runs.

    python -m sim.calibrate traces/validation/h100/ [--profiles-dir traces/profiles] [--gpu h100]

`engine.frontend_ms` is the API-server time that an engine-level profile cannot see: HTTP and
tokenization in `vllm serve`'s front end, the hand-off to the engine core and back, and the client's
stream handling. It is measured with zero-load probes (`profiler.serve_bench --runs
probe_in32,probe_in512,probe_in2048`: one request at a time, a fixed prompt length, 16 output
tokens): for each probe, the client's mean TTFT minus the simulated TTFT of the same requests
replayed far apart (an idle engine every time, frontend off). The constant is the mean over the
probes of every model; the spread between probes says how constant it is. The value committed in
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
FRONTEND_OFF = ["engine.frontend_ms=0", "engine.frontend_ms_per_prompt_token=0"]


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
            rows.append({"run": p.stem, "model": model, "prompt_tokens": int(np.mean(obj["input_lens"])),
                         "measured_ttft_ms": meas, "sim_zero_load_ttft_ms": sim, "offset_ms": meas - sim})
    return rows


def frontend_ms(rows: list[dict[str, Any]]) -> Optional[float]:
    return float(np.mean([r["offset_ms"] for r in rows])) if rows else None


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
    print(f"{'probe':34s} {'prompt':>6s} {'measured TTFT':>14s} {'sim zero-load':>14s} {'offset':>8s}")
    for r in rows:
        print(f"{r['run']:34s} {r['prompt_tokens']:6d} {r['measured_ttft_ms']:12.1f}ms "
              f"{r['sim_zero_load_ttft_ms']:12.1f}ms {r['offset_ms']:6.1f}ms")
    off = [r["offset_ms"] for r in rows]
    print(f"\nengine.frontend_ms = {frontend_ms(rows):.1f}  (mean of {len(rows)} probes; "
          f"range {min(off):.1f}..{max(off):.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
