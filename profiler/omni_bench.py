"""Serving ground truth for image generation and editing: a real `vllm serve <dir> --omni`
(vLLM-Omni 0.26.0) with random weights of the real architectures, loaded by our own client.

Runs ON THE GPU HOST (PYTHONPATH=/tmp/site-omni:/tmp/site:$PWD), one server start per call:

    python -m profiler.omni_bench --model qwen_image --out $OUT/h100_omni [--max-minutes 9] [--dry-run]

1. Writes a diffusers-style folder (profiler/omni_models.py: configs and offline tokenizers from
   conf/model/*.yaml, no weights) and a vLLM-Omni plugin (profiler/omni_plugin.py) that serves
   the built-in pipeline classes with vLLM's dummy weights filled on the GPU.
2. Starts `vllm serve <dir> --omni` with vLLM-Omni's default scheduler settings (recorded in the
   provenance; `--max-num-seqs`, `--request-batch-max-wait-ms`, `--step-execution` are named
   options) and waits for /health.
3. Runs, in order: `warmup` (three requests, not validation data: first-use compilation),
   `probe` (requests one at a time: zero-load latency; its throughput calibrates the capacity C
   unless --capacity is given), then open-loop runs at fractions of C with Poisson or Gamma
   (bursty) gaps, low load to overload. Requests are drawn as the simulator draws them
   (profiler/omni_client.py); every outcome is recorded, failures included.
4. Writes <out>/<model>__<run>[__tag].json.gz per run (shape in traces/validation/README.md,
   "vLLM-Omni image serving"), the server log, and <out>/omni_bench_<model>[__tag].json. A run
   that does not fit --max-minutes is shrunk or skipped; at the deadline requests in flight are
   recorded as cancelled and the server is always stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from profiler.jsonfiles import write_json_gz
from profiler.omni_client import (ImageRequest, WorkloadLaw, columns, draw_requests,
                                  input_image_jpeg, run_requests, summarize)
from profiler.omni_server import OmniServer, gzip_file, prepare, serve_command, server_env
from profiler.serve_bench import git_sha, gpu_info, parent_age_s, pkg_version, torch_gpu_name_proc, vllm_cli

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "mmsim.omni_bench.v1"


@dataclass(frozen=True)
class ServedPlan:
    """What one served model is asked: its task, CFG, and a service-time guess for --dry-run."""
    task: str
    cfg: bool
    assumed_service_s: float      # mean s/request at the default steps; used only until calibrated
    max_prompt_words: int


MODELS: dict[str, ServedPlan] = {
    # Qwen-Image: true CFG (a negative prompt) as conf/model/qwen_image.yaml request_defaults.cfg
    "qwen_image": ServedPlan("generate", True, 2.8, 1000),
    "qwen_image_edit": ServedPlan("edit", True, 4.2, 1000),
    # FLUX.1-dev is guidance-distilled: one transformer pass per step, no negative prompt
    "flux1_dev": ServedPlan("generate", False, 1.2, 500),
}
# Tiny shapes for --shapes tiny: the whole serving path in a minute (a smoke test, not data).
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "qwen_image": {"transformer": {"num_layers": 2}, "text_encoder": {"text": {"num_hidden_layers": 2}}},
    "qwen_image_edit": {"transformer": {"num_layers": 2},
                        "text_encoder": {"text": {"num_hidden_layers": 2}, "vision": {"depth": 4}}},
    "flux1_dev": {"transformer": {"num_layers": 1, "num_single_layers": 2}, "t5_xxl": {"num_layers": 2}},
}
# vLLM-Omni 0.26.0's diffusion serving defaults (what `vllm serve <dir> --omni` runs with when
# the flag is not given), with the source line that sets each one.
OMNI_DEFAULTS: dict[str, tuple[Any, str]] = {
    "max_num_seqs": (1, "vllm_omni/engine/async_omni_engine.py:1011 (`kwargs.get('max_num_seqs') or 1`)"),
    "request_batch_max_wait_ms": (0.0, "vllm_omni/entrypoints/cli/serve.py:597-604 (0 disables admission wait)"),
    "step_execution": (False, "vllm_omni/entrypoints/cli/serve.py:592-596; scheduler = RequestScheduler "
                              "(vllm_omni/diffusion/diffusion_engine.py:221-227)"),
    "cfg_parallel_size": (1, "vllm_omni/entrypoints/cli/serve.py:702: the two CFG passes run one after "
                             "the other (vllm_omni/diffusion/distributed/cfg_parallel.py:139-142)"),
    "cache_backend": ("none", "vllm_omni/entrypoints/cli/serve.py:572-576"),
    "enforce_eager": (False, "regional torch.compile of the transformer, dynamic shapes "
                             "(vllm_omni/engine/async_omni_engine.py:1027-1037)"),
    "true_cfg_scale": (4.0, "vllm_omni/diffusion/models/qwen_image/pipeline_qwen_image.py:1029 "
                            "(CFG only when a negative prompt is sent: line 704)"),
}


@dataclass
class RunSpec:
    name: str
    sequential: bool = False
    rate_frac: Optional[float] = None     # fraction of the capacity C (open loop)
    burstiness: float = 1.0
    seed: int = 0
    fixed_n: Optional[int] = None         # request count independent of the rate
    validation: bool = True               # False: warm-up, not ground truth
    n: int = 0                            # filled in by size_run
    rate: Optional[float] = None          # filled in by size_run


RUN_CATALOG: dict[str, RunSpec] = {
    "warmup": RunSpec("warmup", sequential=True, seed=90, fixed_n=3, validation=False),
    "probe": RunSpec("probe", sequential=True, seed=91, fixed_n=16),
    "low": RunSpec("low", rate_frac=0.35, seed=92),
    "sat": RunSpec("sat", rate_frac=0.85, seed=93),
    "bursty_k0.5": RunSpec("bursty_k0.5", rate_frac=0.6, burstiness=0.5, seed=94),
    "bursty_k0.25": RunSpec("bursty_k0.25", rate_frac=0.6, burstiness=0.25, seed=95),
    "over": RunSpec("over", rate_frac=1.3, seed=96),
}
# In priority order: when time runs short the last ones are shrunk, then skipped.
DEFAULT_RUNS = ("warmup", "probe", "sat", "bursty_k0.5", "low", "over", "bursty_k0.25")
WARMUP_SIZES = ((512, 512), (1024, 768), (1328, 1328))
SERVER_STOP_S = 25.0


def size_run(run: RunSpec, capacity: float, target_s: float) -> RunSpec:
    """Request count and rate of a run: open-loop runs get about target_s seconds of arrivals."""
    r = replace(run)
    if run.sequential or run.rate_frac is None:
        r.rate, r.n = None, int(run.fixed_n or 8)
    else:
        r.rate = max(1e-3, run.rate_frac * capacity)
        r.n = int(run.fixed_n or max(8, round(r.rate * target_s)))
    return r


def _est_terms(run: RunSpec, capacity: float) -> tuple[float, float]:
    """(per-request seconds, fixed seconds) of a run's wall time, linear in its request count:
    sequential = n services; open = the arrivals span or the backlog, whichever ends later, plus
    two services of tail; both + 5 s of client start and result writing."""
    svc = 1.0 / max(capacity, 1e-6)
    if run.rate is None:
        return svc, 5.0
    return max(1.0 / run.rate, svc) * 1.1, 2 * svc + 5.0


def est_seconds(run: RunSpec, capacity: float) -> float:
    a, b = _est_terms(run, capacity)
    return a * run.n + b


def shrink_to(run: RunSpec, capacity: float, left_s: float) -> Optional[RunSpec]:
    """The run cut to fit left_s seconds (None if fewer than 4 requests would be left)."""
    if est_seconds(run, capacity) <= left_s:
        return run
    a, b = _est_terms(run, capacity)
    r = replace(run)
    r.n = int(max(0.0, left_s - b) / a)
    return r if r.n >= 4 else None


def warmup_requests(plan: ServedPlan, law: WorkloadLaw, seed: int) -> list[ImageRequest]:
    """One small, one medium, one large request at the smallest step count (first-use kernels,
    compilation of new shapes); sides clipped to the workload's max."""
    reqs = draw_requests(plan.task, len(WARMUP_SIZES), None, 1.0, seed, law, plan.cfg,
                         plan.max_prompt_words)
    top = int(law.image["max"])
    for r, (h, w) in zip(reqs, WARMUP_SIZES):
        r.height, r.width, r.steps = min(h, top), min(w, top), min(law.steps)
        if r.task == "edit":
            r.input_height, r.input_width = r.height, r.width
    return reqs


def bench_serve_command(cli: list[str], model_dir: Path, port: int, a: argparse.Namespace) -> list[str]:
    return serve_command(cli, model_dir, port, max_num_seqs=a.max_num_seqs,
                         request_batch_max_wait_ms=a.request_batch_max_wait_ms,
                         step_execution=a.step_execution, stage_profiler=a.stage_profiler,
                         enforce_eager=a.enforce_eager, extra=a.server_args)


def server_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The scheduler settings the server ran with: vLLM-Omni's default unless a flag set it."""
    out: dict[str, Any] = {}
    for k, (v, src) in OMNI_DEFAULTS.items():
        out[k] = {"value": v, "source": "vLLM-Omni default: " + src}
    if a.max_num_seqs is not None:
        out["max_num_seqs"] = {"value": a.max_num_seqs, "source": "--max-num-seqs"}
    if a.request_batch_max_wait_ms is not None:
        out["request_batch_max_wait_ms"] = {"value": a.request_batch_max_wait_ms,
                                            "source": "--request-batch-max-wait-ms"}
    if a.step_execution:
        out["step_execution"] = {"value": True, "source": "--step-execution (StepScheduler)"}
    if a.enforce_eager:
        out["enforce_eager"] = {"value": True, "source": "--enforce-eager"}
    out["enable_diffusion_pipeline_profiler"] = {
        "value": bool(a.stage_profiler),
        "source": "vLLM-Omni's per-stage timer (synchronizes the device at stage boundaries)"}
    return out


def read_stagelog(path: Optional[Path], t_from: float, t_to: float) -> list[dict[str, Any]]:
    """Stage-log lines (one per pipeline forward) that ended within [t_from, t_to] (wall clock)."""
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue           # a line cut by a killed server
        if t_from <= float(rec.get("t_end", -1)) <= t_to:
            out.append(rec)
    return out


def make_images(reqs: list[ImageRequest]) -> dict[tuple[int, int], bytes]:
    """Input JPEGs for edit requests, built before the run starts (no client work while it runs)."""
    out: dict[tuple[int, int], bytes] = {}
    for r in reqs:
        if r.task == "edit" and (r.input_height, r.input_width) not in out:
            out[(r.input_height, r.input_width)] = input_image_jpeg(r.input_height, r.input_width,
                                                                    seed=r.input_height * 7919 + r.input_width)
    return out


def run_one(base_url: str, plan: ServedPlan, rr: RunSpec, reqs: list[ImageRequest], left_s: float,
            negative_prompt: str) -> dict[str, Any]:
    images = make_images(reqs)
    return asyncio.run(run_requests(base_url, reqs, sequential=rr.sequential, deadline_s=left_s,
                                    negative_prompt=negative_prompt, images=images))


def build_result(served: str, plan: ServedPlan, rr: RunSpec, reqs: list[ImageRequest],
                 out: dict[str, Any], batches: list[dict[str, Any]], prov: dict[str, Any]) -> dict[str, Any]:
    summary = summarize(reqs, out["rows"], out["duration_s"])
    return {"schema": SCHEMA, "model": served, "run": rr.name, "task": plan.task,
            "validation": rr.validation,
            "request_rate": "sequential" if rr.sequential else rr.rate,
            "burstiness": None if rr.sequential else rr.burstiness,
            "max_concurrency": 1 if rr.sequential else None,
            **summary, "requests": columns(reqs, out["rows"], served), "batches": batches,
            "provenance": prov}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.omni_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--out", required=True, help="folder for <model>__<run>.json.gz and logs")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                    help=f"comma list, in order; known: {','.join(RUN_CATALOG)}")
    ap.add_argument("--max-minutes", type=float, default=9.0,
                    help="hard budget for everything incl. server start and stop")
    ap.add_argument("--since-parent", action="store_true",
                    help="count --max-minutes from the start of the parent shell (ignored if > 5 min)")
    ap.add_argument("--target-s", type=float, default=90.0, help="seconds of arrivals per open-loop run")
    ap.add_argument("--capacity", type=float, default=None,
                    help="req/s to size the runs instead of calibrating from the probe run")
    ap.add_argument("--workload", default="mixed_bursty", help="conf/workload/<name>.yaml: image sizes, prompts")
    ap.add_argument("--max-side", type=int, default=None, help="override the workload's image.max")
    ap.add_argument("--steps", default="4,6,8,12", help="denoising steps, drawn uniformly per request")
    ap.add_argument("--seed", type=int, default=0, help="root seed (run seeds are offsets from it)")
    ap.add_argument("--tag", default="", help="suffix of the result names (<model>__<run>__<tag>), "
                    "e.g. r2 for a replicate (same seeds; pass --capacity to keep the rates)")
    ap.add_argument("--shapes", choices=("full", "tiny"), default="full",
                    help="tiny: a 2-layer smoke test of the whole path (not data)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="server flag (default: vLLM-Omni's, 1)")
    ap.add_argument("--request-batch-max-wait-ms", type=float, default=None,
                    help="server flag (default: vLLM-Omni's, 0)")
    ap.add_argument("--step-execution", action="store_true", help="server flag: the step scheduler")
    ap.add_argument("--enforce-eager", action="store_true", help="server flag: no torch.compile")
    ap.add_argument("--no-stage-profiler", dest="stage_profiler", action="store_false",
                    help="do not pass --enable-diffusion-pipeline-profiler (no per-stage durations)")
    ap.add_argument("--server-args", default="", help="more `vllm serve` flags, one string")
    ap.add_argument("--negative-prompt", default=" ", help="sent with CFG requests (Qwen's advice: a space)")
    ap.add_argument("--port", type=int, default=8091)
    ap.add_argument("--model-dir", default=None, help="default /tmp/omni_bench/<model>[_tiny]")
    ap.add_argument("--vllm-cli", default="auto", help="auto | module | path to a vllm script")
    ap.add_argument("--health-timeout", type=float, default=480.0)
    ap.add_argument("--dry-run", action="store_true", help="print what would run; start nothing")
    a = ap.parse_args(argv)

    t0 = time.monotonic()
    deadline = t0 + a.max_minutes * 60.0
    if a.since_parent:
        age = parent_age_s()
        if age is not None and age < 300:
            deadline -= age
    plan = MODELS[a.model]
    try:
        steps = tuple(int(x) for x in a.steps.split(",") if x.strip())
        law = WorkloadLaw.from_yaml(a.workload, steps, a.max_side)
    except ValueError as e:
        ap.error(str(e))
    runs: list[RunSpec] = []
    for r in [x.strip() for x in a.runs.split(",") if x.strip()]:
        if r not in RUN_CATALOG:
            ap.error(f"--runs: unknown run {r!r}; known: {list(RUN_CATALOG)}")
        runs.append(RUN_CATALOG[r])
    suffix = f"__{a.tag}" if a.tag else ""
    # files of this server start (log, stage log, summary, warm-up) carry the start time, so the
    # calls of one session never overwrite each other's; validation runs keep stable names
    call_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    shapes = TINY_SHAPES[a.model] if a.shapes == "tiny" else None
    model_dir = Path(a.model_dir or f"/tmp/omni_bench/{a.model}{'_tiny' if shapes else ''}")
    staging = Path(f"/tmp/omni_bench/staging{suffix}")
    out = Path(a.out)
    cli = vllm_cli(a.vllm_cli)
    srv_cmd = bench_serve_command(cli, model_dir, a.port, a)
    capacity = a.capacity or 1.0 / plan.assumed_service_s
    base_url = f"http://127.0.0.1:{a.port}"

    if a.dry_run:
        print(f"# model dir: {model_dir} (profiler.omni_models.write_model_dir({a.model!r}, shapes={shapes}))")
        print(f"# plugin: {staging}/plugin (vllm_omni.general_plugins -> profiler.omni_plugin:register)")
        print(f"PYTHONPATH={staging}/plugin:{ROOT}:$PYTHONPATH MMSIM_OMNI_STAGELOG={staging}/stagelog_{a.model}.jsonl \\")
        print("  " + shlex.join(srv_cmd) + f" > {out}/server_{a.model}{suffix}__{call_id}.log 2>&1 &")
        print(f"# wait for {base_url}/health (<= {a.health_timeout:.0f} s)")
        print(f"# workload {law.name}: image {law.image}, prompt words {law.prompt_tokens}, steps {law.steps}")
        print(f"# rates below assume capacity {capacity:.3f} req/s; a real run calibrates from 'probe'")
        for run in runs:
            rr = size_run(run, capacity, a.target_s)
            reqs = (warmup_requests(plan, law, a.seed + rr.seed) if rr.name == "warmup" else
                    draw_requests(plan.task, rr.n, rr.rate, rr.burstiness, a.seed + rr.seed, law,
                                  plan.cfg, plan.max_prompt_words))
            kind = "one at a time" if rr.sequential else f"rate {rr.rate:.3f}/s k={rr.burstiness}"
            print(f"run {rr.name}: {rr.n} {plan.task} requests, {kind}, ~{est_seconds(rr, capacity):.0f} s "
                  f"-> {out}/{a.model}__{rr.name}{suffix}.json.gz")
            for r in reqs[:3]:
                print(f"    t={r.arrival_s:7.2f}s {r.width}x{r.height} steps={r.steps} cfg={r.cfg} "
                      f"words={r.prompt_words}" + (f" input={r.input_width}x{r.input_height}" if r.input_height else ""))
        return 0

    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[omni_bench {time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    tq = torch_gpu_name_proc()
    prep = prepare(a.model, model_dir, staging, shapes)
    manifest, stagelog = prep["manifest"], prep["stagelog"]
    log(f"model dir {model_dir}: {manifest['pipeline']}, shapes {a.shapes}")
    srv_env = server_env(prep["plugin_dir"], stagelog)
    server_log = out / f"server_{a.model}{suffix}__{call_id}.log"
    base: dict[str, Any] = dict(
        model=a.model, model_yaml=manifest["model_yaml"], pipeline=manifest["pipeline"],
        shapes=a.shapes, shapes_override=shapes, model_dir=str(model_dir),
        weights="vLLM dummy init uniform(-1e-3, 1e-3) on the GPU (profiler/omni_pipelines.py)",
        server_command=shlex.join(srv_cmd), bench_command=shlex.join([sys.executable, "-m",
                                                                     "profiler.omni_bench"] + (argv or sys.argv[1:])),
        engine="vllm-omni", engine_version=pkg_version("vllm-omni") or pkg_version("vllm_omni"),
        vllm_version=pkg_version("vllm"), diffusers_version=pkg_version("diffusers"),
        torch_version=pkg_version("torch"), transformers_version=pkg_version("transformers"),
        git_sha=git_sha(), hostname=os.uname().nodename, server_settings=server_settings(a),
        workload=law.name, image_law=law.image, prompt_words_law=law.prompt_tokens,
        steps_choices=list(law.steps), cfg=plan.cfg, negative_prompt=a.negative_prompt if plan.cfg else None,
        root_seed=a.seed, tag=a.tag or None, call_id=call_id)
    base.update(gpu_info())
    if tq is not None:
        try:
            so, _ = tq.communicate(timeout=90)
            base.update(json.loads(so.strip().splitlines()[-1]))
        except Exception:  # noqa: BLE001
            tq.kill()
            tq.wait()
    summary: dict[str, Any] = {"model": a.model, "runs": [], "skipped": []}
    srv = OmniServer(srv_cmd, srv_env, server_log, a.port, a.health_timeout, log)
    try:
        base["server_start_s"] = srv.start(ready_by=deadline - 30)
        base["server_log_facts"] = srv.facts
        log(f"server healthy after {base['server_start_s']} s; {base['server_log_facts']}")
        calibrated = a.capacity is not None
        for run in runs:
            rr = size_run(run, capacity, a.target_s)
            left = deadline - time.monotonic() - SERVER_STOP_S
            fit = shrink_to(rr, capacity, left)
            if fit is None:
                log(f"skip {rr.name}: ~{est_seconds(rr, capacity):.0f} s estimated, {left:.0f} s left")
                summary["skipped"].append(rr.name)
                continue
            if fit.n != rr.n:
                log(f"shrinking {rr.name} from {rr.n} to {fit.n} requests to fit {left:.0f} s")
            rr = fit
            seed = a.seed + rr.seed
            reqs = (warmup_requests(plan, law, seed) if rr.name == "warmup" else
                    draw_requests(plan.task, rr.n, rr.rate, rr.burstiness, seed, law, plan.cfg,
                                  plan.max_prompt_words))
            kind = "one at a time" if rr.sequential else f"{rr.rate:.3f} req/s, k={rr.burstiness}"
            log(f"run {rr.name}: {len(reqs)} requests, {kind}")
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            wall0 = time.time()
            res = run_one(base_url, plan, rr, reqs, max(1.0, deadline - time.monotonic() - SERVER_STOP_S),
                          a.negative_prompt)
            wall1 = time.time()
            batches = read_stagelog(stagelog, wall0, wall1 + 1.0)
            prov = dict(base, run=rr.name, measured_at=started, wall_span=[round(wall0, 3), round(wall1, 3)],
                        client_t0_wall=round(res["t0_wall"], 6), run_seed=seed,
                        calibrated_capacity_rps=round(capacity, 5),
                        capacity_source="--capacity" if a.capacity else ("probe" if calibrated else "assumed"),
                        server_alive=srv.alive())
            obj = build_result(a.model, plan, rr, reqs, res, batches, prov)
            fname = f"{a.model}__{rr.name}{suffix}.json.gz"
            if not rr.validation or (out / fname).exists():
                if rr.validation:
                    log(f"{fname} exists (same run, no new --tag): writing this one beside it")
                fname = f"{a.model}__{rr.name}{suffix}__{call_id}.json.gz"
            write_json_gz(obj, out / fname)
            log(f"run {rr.name}: {obj['completed']}/{obj['num_prompts']} ok, {obj['failed']} failed, "
                f"{obj['request_throughput']:.3f} req/s, median {obj['median_e2el_ms']:.0f} ms, "
                f"p99 {obj['p99_e2el_ms']:.0f} ms, {len(batches)} batches logged")
            summary["runs"].append({"run": rr.name, "file": fname, "num_prompts": rr.n,
                                    "request_rate": obj["request_rate"], "completed": obj["completed"],
                                    "failed": obj["failed"], "request_throughput": obj["request_throughput"],
                                    "median_e2el_ms": obj["median_e2el_ms"]})
            if rr.name == "probe" and not calibrated and obj["completed"] >= 4:
                lats = [x for x, s in zip(obj["requests"]["latency_s"], obj["requests"]["status"]) if s == 200]
                capacity = len(lats) / sum(lats)
                calibrated = True
                log(f"calibrated capacity {capacity:.4f} req/s (1 / mean zero-load latency)")
            if not srv.alive():
                raise RuntimeError(f"server exited with {srv.returncode} during {rr.name}; see {server_log}")
    except Exception as e:  # noqa: BLE001 - report, stop the server, keep finished runs
        log(f"error: {e}")
        summary["error"] = str(e)
    finally:
        srv.stop()
        gzip_file(stagelog, out / f"stagelog_{a.model}{suffix}__{call_id}.jsonl.gz")
        summary["capacity_rps"] = round(capacity, 5)
        summary["provenance"] = base
        summary["elapsed_s"] = round(time.monotonic() - t0, 1)
        (out / f"omni_bench_{a.model}{suffix}__{call_id}.json").write_text(json.dumps(summary, indent=2))
        log(f"done: {len(summary['runs'])} runs, skipped {summary['skipped']}; capacity {capacity:.4f} req/s "
            f"(pass --capacity {capacity:.4f} to size later calls and replicates alike)")
    return 0 if summary["runs"] and "error" not in summary else 1


if __name__ == "__main__":
    sys.exit(main())
