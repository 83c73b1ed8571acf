"""Where the server's processes are while the slowest first tokens wait:
`python -m profiler.stacks traces/validation/h100_diagnostic/` (runs made with
`serve_bench --gclog --stacklog`).

Why: the p99-TTFT tail of loaded qwen2_5_7b runs is mostly requests whose own first token is late
while others stream on; garbage collection is ruled out (profiler/gclog.py). This report puts the
stack samples (every thread's Python stack every 5 ms, profiler/gclog.py) next to the requests:
per run, the share of samples per innermost frames of the API server's event loop, the engine
core's busy loop and its input thread, over the whole run and inside the TTFT windows of the
slowest 3% of requests; and the time each finished request spent outside the engine core (vLLM's
own per-request times from the step log: end-to-end minus queued, prefill and decode = API
ingest plus the output path), whose tail the model's mean ingest does not have.
The samples share the step log's clock (time.monotonic) and the client's start times.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from profiler.gclog import role
from profiler.jsonfiles import json_files, read_json, run_name
from profiler.vllm_steplog import outside_engine_ms

EAGER = ("output_code.py:__call__", "execution_fn", "qwen2.py:forward", "llama.py:forward")
THREADS = (("api_server", "MainThread"), ("engine_core", "MainThread"),
           ("engine_core", "Thread-1 (process_input_sockets)"))


def read_stacks(path: str | Path):
    """(role by pid, frames by (pid, key), samples by pid as [(monotonic, {thread: key})])."""
    roles: dict[int, str] = {}
    frames: dict[tuple[int, int], list[str]] = {}
    samples: dict[int, list[tuple[float, dict[str, int]]]] = collections.defaultdict(list)
    with gzip.open(path, "rt") as fh:
        for line in fh:
            r = json.loads(line)
            if "cmd" in r:
                roles[r["pid"]] = role(r["cmd"])
            elif "k" in r:
                frames[(r["pid"], r["k"])] = r["f"]
            else:
                samples[r["pid"]].append((r["m"], r["s"]))
    return roles, frames, samples


def label(fr: list[str], depth: int = 3) -> str:
    """Innermost `depth` frames without line numbers; the eager (non-CUDA-graph) forward marked."""
    head = " < ".join(f.rsplit(":", 1)[0] for f in fr[:depth])
    return ("[eager forward] " if any(any(e in f for e in EAGER) for f in fr) else "") + head


def shares(samples, frames, pid: int, thread: str, windows: list[tuple[float, float]],
           top: int = 6) -> tuple[int, list[tuple[str, float]]]:
    c: collections.Counter = collections.Counter()
    ms = np.array([m for m, _ in samples[pid]])
    for a, b in windows:
        for j in range(int(np.searchsorted(ms, a)), int(np.searchsorted(ms, b, side="right"))):
            k = samples[pid][j][1].get(thread)
            if k is not None:
                c[label(frames[(pid, k)])] += 1
    n = sum(c.values())
    return n, [(k, v / n) for k, v in c.most_common(top)] if n else []


def outside_ms(path: Path, obj: dict[str, Any]) -> np.ndarray:
    """Per finished request: e2e - (queued + prefill + decode), ms (vLLM's own request times)."""
    return np.array(outside_engine_ms(path, obj))


def report(folder: str | Path, tail_share: float = 0.03) -> list[dict[str, Any]]:
    folder = Path(folder)
    out = []
    for p in json_files(folder):
        obj = read_json(p)
        prov = obj.get("provenance") if isinstance(obj, dict) else None
        if not isinstance(prov, dict) or not prov.get("stacklog") or "start_times" not in obj:
            continue
        roles, frames, samples = read_stacks(folder / prov["stacklog"])
        st, tt = np.array(obj["start_times"]), np.array(obj["ttfts"])
        tail = np.argsort(tt)[-max(1, int(len(tt) * tail_share)):]
        rec: dict[str, Any] = {"run": run_name(p), "requests": len(tt), "tail": len(tail),
                               "tail_ttft_ms": [float(np.min(tt[tail]) * 1e3), float(np.max(tt[tail]) * 1e3)],
                               "threads": []}
        for who, thread in THREADS:
            pid = next((q for q, r in roles.items() if r == who and q in samples), None)
            if pid is None:
                continue
            n_all, all_ = shares(samples, frames, pid, thread, [(float(st[0]), float(st[-1] + tt[-1]))])
            n_tail, tail_ = shares(samples, frames, pid, thread, [(float(st[i]), float(st[i] + tt[i])) for i in tail])
            rec["threads"].append({"process": who, "thread": thread, "samples": n_all, "whole_run": all_,
                                   "tail_samples": n_tail, "in_tail_windows": tail_})
        o = outside_ms(p, obj)
        if o.size:
            rec["outside_ms"] = {q: float(np.percentile(o, q)) for q in (10, 50, 90, 99)}
        out.append(rec)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.stacks", description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="?", help="runs made with serve_bench --gclog --stacklog")
    ap.add_argument("--tail", type=float, default=0.03, help="share of slowest-TTFT requests")
    ap.add_argument("--outside", nargs="+", metavar="RUN_JSON",
                    help="only print the time outside the engine core of these runs (any with a step log)")
    a = ap.parse_args(argv)
    if a.outside:
        for f in a.outside:
            path = Path(f)
            o = outside_ms(path, read_json(path))
            if o.size:
                print(f"{run_name(path):34s} {o.size:4d} requests  outside the engine core ms: p10 "
                      f"{np.percentile(o, 10):5.1f}  p50 {np.median(o):5.1f}  p90 {np.percentile(o, 90):5.1f}  "
                      f"p99 {np.percentile(o, 99):5.1f}")
        return 0
    if not a.folder:
        ap.error("give a folder of stack-sampled runs, or --outside RUN_JSON ...")
    for rec in report(a.folder, a.tail):
        lo, hi = rec["tail_ttft_ms"]
        print(f"== {rec['run']}: {rec['requests']} requests; slowest {rec['tail']} TTFT {lo:.0f}-{hi:.0f} ms")
        if "outside_ms" in rec:
            o = rec["outside_ms"]
            print(f"   time outside the engine core per request (API ingest + output path): p10 {o[10]:.1f}  "
                  f"p50 {o[50]:.1f}  p90 {o[90]:.1f}  p99 {o[99]:.1f} ms")
        for th in rec["threads"]:
            print(f"   {th['process']} {th['thread']}: whole run ({th['samples']} samples) | "
                  f"inside the slow requests' TTFT windows ({th['tail_samples']})")
            for (k, v) in th["whole_run"][:4]:
                print(f"      all  {v * 100:5.1f}%  {k}")
            for (k, v) in th["in_tail_windows"][:4]:
                print(f"      tail {v * 100:5.1f}%  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
