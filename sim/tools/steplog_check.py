"""The model's engine steps against a run's server step log (`serve_bench --steplog`):
`python -m sim.tools.steplog_check traces/validation/h100/*__r3.json.gz`.

For each run it prints (1) clean decode steps (no prompt record from one before to three after,
see sim.tools.validate.steplog_step_stats) binned by batch size: the logged median against the model's
served step at that batch and the bin's mean context (KV use x capacity / batch), and (2) the
window around an isolated prefill (its step and the three decode steps after it) against the
model's mixed step plus three decode steps. Host time uses the replay's
`engine.host_overhead_by_model` (conf/experiment/replay_vllm_bench.yaml)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from profiler.jsonfiles import read_json, run_name
from profiler.vllm_steplog import run_steplog
from sim.engines.latency import LatencyModel
from sim.tools.validate import CONF_DIR, clean_decode_steps, infer_model
from sim.names import DECODE

BINS = ((1, 8), (8, 16), (16, 24), (24, 32), (32, 48), (48, 64), (64, 96), (96, 160))


def host_constants() -> dict[str, list[float]]:
    cfg = yaml.safe_load((CONF_DIR / "experiment" / "replay_vllm_bench.yaml").read_text())
    return cfg["engine"]["host_overhead_by_model"]


def served(host: list[float], sync_s: float, batch: int) -> float:
    """ms of a step whose synchronous time is sync_s, by the AR engine's async host rule
    (sim.engines.ar: max(sync - host(B), host(B)), host(B) = base + per_seq x B)."""
    h = host[0] + host[1] * batch
    return max(sync_s * 1e3 - h, h)


def check_run(path: Path, lat: LatencyModel, hosts: dict[str, list[float]]) -> Optional[dict[str, Any]]:
    obj = read_json(path)
    lines = [r for r in run_steplog(path, obj) if "gen" in r]
    model = infer_model(path, obj)
    if len(lines) < 100 or model not in hosts:
        return None
    cap = float(obj["provenance"]["kv_cache_tokens"])
    host = hosts[model]
    prompt = np.array([r["prompt"] for r in lines])
    run = np.array([r["run"] for r in lines])
    kv = np.array([r["kv"] for r in lines])
    gaps, clean = clean_decode_steps(lines)
    out: dict[str, Any] = {"run": run_name(path), "model": model, DECODE: [], "windows": None}
    for lo, hi in BINS:
        sel = clean & (run[1:] >= lo) & (run[1:] < hi)
        if sel.sum() < 20:
            continue
        b = int(np.median(run[1:][sel]))
        ctx = float(np.median(kv[1:][sel] * cap / run[1:][sel]))
        pred = served(host, lat.decode(model, b, ctx), b)
        meas = float(np.median(gaps[sel]))
        out[DECODE].append({"batch": b, "context": ctx, "steps": int(sel.sum()),
                              "measured_ms": meas, "model_ms": pred, "error": pred / meas - 1})
    iso = [j for j in range(4, len(lines) - 4)
           if prompt[j] > 0 and not (prompt[j - 4:j] > 0).any() and not (prompt[j + 1:j + 5] > 0).any()]
    if iso and np.median(run[iso]) >= 2:    # at zero load a prefill is logged in its own record
        meas_w, model_w = [], []
        for j in iso:
            d = max(int(run[j]) - 1, 0)
            ctx = kv[j] * cap / max(run[j], 1)
            mixed = served(host, lat.ar_step(model, int(prompt[j]), d, ctx), d + 1)
            dec = served(host, lat.decode(model, max(d, 1), ctx), max(d, 1))
            model_w.append(mixed + 3 * dec)
            meas_w.append(gaps[j - 3:j + 1].sum())   # the prefill's step (logged at j-1) + 3
        out["windows"] = {"prefills": len(iso), "measured_ms": float(np.median(meas_w)),
                          "model_ms": float(np.median(model_w)),
                          "error": float(np.median(model_w) / np.median(meas_w) - 1)}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.tools.steplog_check", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="bench result JSONs whose provenance names a step log")
    ap.add_argument("--profiles-dir", default="traces/profiles")
    ap.add_argument("--gpu", default="h100")
    a = ap.parse_args(argv)
    lat = LatencyModel(a.profiles_dir, a.gpu, "clamp")
    hosts = host_constants()
    for p in a.runs:
        r = check_run(Path(p), lat, hosts)
        if r is None:
            print(f"== {run_name(p)}: no step log (or too short, or no host constants)")
            continue
        print(f"== {r['run']}")
        for d in r[DECODE]:
            print(f"   decode B~{d['batch']:3d} ctx~{d['context']:5.0f} n={d['steps']:4d}  "
                  f"measured {d['measured_ms']:6.2f}  model {d['model_ms']:6.2f}  {d['error']:+.1%}")
        w = r["windows"]
        if w:
            print(f"   prefill + 3 decode steps ({w['prefills']} isolated prefills): measured "
                  f"{w['measured_ms']:.2f}  model {w['model_ms']:.2f}  {w['error']:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
