"""Fixed-seed simulator benchmarks: `python -m sim.tools.bench [--quick] [--profiles-dir DIR] [--scale X]`.

Scenarios (every one a fresh subprocess, so `peak_rss_mb` -- the child's ru_maxrss -- is per
scenario):
  llm_1gpu      qwen2_5_7b text requests, Poisson at 50 req/s (near the analytic H100
                table's saturation, ~60 req/s), 50,000 requests on 1 GPU (baseline policy)
  mixed_8gpu    the default mixed multimodal bursty workload (conf/workload/mixed_bursty:
                Gamma k=0.5, 4 req/s), 20,000 requests on 8 GPUs (baseline policy)
  mixed_1000gpu 1,000,000 requests of the same mix on 1,000 GPUs, arrival rate 0.25 req/s per
                GPU (250 req/s: loaded, stable for every policy), once per policy
  mixed_10000gpu 10,000,000 requests of the same mix on 10,000 GPUs at 0.25 req/s per GPU
                (2,500 req/s), once per policy
--quick runs llm_1gpu and mixed_8gpu only; mixed_10000gpu runs only when named (--scenario).
--scale multiplies every request count (tests use a tiny one; the figures in docs/speed.md are
--scale 1).

One line per scenario:
  scenario=<name> policy=<p> requests=<n> gpus=<g> requests_per_s=<x> events_per_s=<x>
  wall_s=<x> peak_rss_mb=<x> build=<compiled|pure|pure-stale>
`build` is the hot path the child ran (sim/compiled.py): compiled by `pip install` when a C
compiler was there, else pure Python.
`requests_per_s` = simulated requests / wall seconds of `Run.run()` (workload generation,
simulation and metrics; not interpreter start-up or profile loading). `events_per_s` counts
SimPy events processed (counted by the run's event loop, sim.core.kernel.run).
--json also prints each result as JSON, with `cpu_s` (the child's CPU seconds over the same span:
wall_s much above cpu_s means the machine was shared), simulated duration, utilization, p99 E2EL.
requests.parquet is written only with --write (into a temp dir). Children run with
OPENBLAS_NUM_THREADS=1 unless it is set (idle BLAS threads spin on the other cores).

Profile tables: --profiles-dir (default traces/profiles when it holds h100 tables for the
models, else analytic roofline tables generated once into ~/.cache/mmserve-sim/bench_profiles).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sim.names import TEXT
from sim.policies import DEFAULT_POLICY, POLICIES as POLICY_CONFIGS

REPO = Path(__file__).resolve().parents[2]
MODELS = ("qwen2_5_vl_7b", "qwen_image", "qwen2_5_7b")
POLICIES = tuple(POLICY_CONFIGS)

SCENARIOS = {
    "llm_1gpu": dict(requests=50_000, gpus=1, policies=(DEFAULT_POLICY,)),
    "mixed_8gpu": dict(requests=20_000, gpus=8, policies=(DEFAULT_POLICY,)),
    "mixed_1000gpu": dict(requests=1_000_000, gpus=1000, policies=POLICIES),
    "mixed_10000gpu": dict(requests=10_000_000, gpus=10_000, policies=POLICIES),
}
QUICK = ("llm_1gpu", "mixed_8gpu")
DEFAULT = ("llm_1gpu", "mixed_8gpu", "mixed_1000gpu")     # mixed_10000gpu: --scenario only


def make_config(scenario: str, policy: str, n: int, profiles_dir: str, write: bool = False):
    from sim.config import SimConfig
    cfg = SimConfig()
    cfg.seed = 0
    cfg.profiles_dir = profiles_dir
    cfg.policy.name = policy
    cfg.output.write_requests = write
    cfg.output.progress = "off"
    cfg.latency.out_of_range = "clamp"
    w = cfg.workload
    w.num_requests = n
    if scenario == "llm_1gpu":
        w.name = "poisson_text"
        w.arrival.rate, w.arrival.shape = 50.0, 1.0
        w.mix = {TEXT: 1.0}
        w.task_models = {TEXT: "qwen2_5_7b"}
        cfg.cluster.name, cfg.cluster.num_gpus = "h100x1", 1
    elif scenario == "mixed_8gpu":
        pass                                   # the defaults = conf/workload/mixed_bursty + h100x8
    elif scenario in ("mixed_1000gpu", "mixed_10000gpu"):
        n_gpus = SCENARIOS[scenario]["gpus"]
        cfg.cluster.name, cfg.cluster.num_gpus = f"h100x{n_gpus}", n_gpus
        w.arrival.rate = 0.25 * n_gpus
    else:
        raise SystemExit(f"unknown scenario {scenario!r}; allowed: {list(SCENARIOS)}")
    return cfg.check()


def have_tables(d: Path) -> bool:
    return all((d / "h100" / f"{m}.parquet").exists() for m in MODELS)


def default_profiles() -> str:
    shipped = REPO / "traces" / "profiles"
    if have_tables(shipped):
        return str(shipped)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmserve-sim" / "bench_profiles"
    if not have_tables(cache):
        tmp = Path(tempfile.mkdtemp(prefix="bench_prof_"))
        subprocess.run([sys.executable, "-m", "profiler", "sweep", "backend=analytic",
                        f"models=[{','.join(MODELS)}]", f"out_dir={tmp}", "progress=false"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        src = next(p for p in tmp.iterdir() if p.is_dir())
        (cache / "h100").mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.parquet"):
            os.replace(f, cache / "h100" / f.name)
    return str(cache)


def run_one(scenario: str, policy: str, n: int, profiles_dir: str, write: bool) -> dict:
    """Runs in the child: one scenario, returns its figures."""
    import resource

    from sim.compiled import build
    from sim.run.runner import Run
    cfg = make_config(scenario, policy, n, profiles_dir, write)
    outdir = Path(tempfile.mkdtemp(prefix="bench_out_")) if write else None
    r = Run(cfg, outdir, keep_rows=0)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    s = r.run()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux
    return {"scenario": scenario, "policy": policy, "requests": s["completed"],
            "gpus": cfg.cluster.num_gpus, "requests_per_s": s["completed"] / wall,
            "events_per_s": r.steps / wall, "wall_s": wall, "peak_rss_mb": rss,
            "events": r.steps, "cpu_s": cpu, "sim_duration_s": s["duration"],
            "mean_gpu_util": s["utilization"]["mean_gpu"], "p99_e2el_ms": s["p99_e2el_ms"],
            "build": build()}


def fmt(r: dict) -> str:
    return (f"scenario={r['scenario']} policy={r['policy']} requests={r['requests']} gpus={r['gpus']} "
            f"requests_per_s={r['requests_per_s']:.0f} events_per_s={r['events_per_s']:.0f} "
            f"wall_s={r['wall_s']:.2f} peak_rss_mb={r['peak_rss_mb']:.0f} build={r['build']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.tools.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="llm_1gpu and mixed_8gpu only")
    ap.add_argument("--profiles-dir", default=None)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply request counts (tests)")
    ap.add_argument("--scenario", action="append", help="run only these (repeatable)")
    ap.add_argument("--policy", action="append", help="mixed_1000gpu: only these policies")
    ap.add_argument("--write", action="store_true", help="also write requests.parquet")
    ap.add_argument("--json", action="store_true", help="also print each result as JSON")
    ap.add_argument("--child", nargs=3, metavar=("SCENARIO", "POLICY", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    prof = a.profiles_dir or default_profiles()
    if a.child:
        sc, pol, n = a.child
        print("RESULT " + json.dumps(run_one(sc, pol, int(n), prof, a.write)), flush=True)
        return 0
    names = a.scenario or list(QUICK if a.quick else DEFAULT)
    for sc in names:
        spec = SCENARIOS[sc]
        n = max(1, int(round(spec["requests"] * a.scale)))
        for pol in spec["policies"]:
            if a.policy and pol not in a.policy:
                continue
            cmd = [sys.executable, "-m", "sim.tools.bench", "--profiles-dir", prof, "--child", sc, pol, str(n)]
            if a.write:
                cmd.append("--write")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
            # the simulator is single-threaded; OpenBLAS threads (np.dot in the sketches) only
            # spin and take the CPU from it on a small shared machine
            env.setdefault("OPENBLAS_NUM_THREADS", "1")
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                print(f"scenario={sc} policy={pol} FAILED rc={p.returncode}\n{p.stderr[-3000:]}",
                      file=sys.stderr)
                return 1
            r = json.loads(line[len("RESULT "):])
            print(fmt(r), flush=True)
            if a.json:
                print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
