"""vllm_omni backend: per-stage tables measured inside vLLM-Omni 0.26.0 as it serves.

Every point is measured by requests to a real `vllm serve <dir> --omni` (profiler/omni_server.py:
random weights of the real architecture, vLLM-Omni's own pipeline, runner, regional
torch.compile, attention backend and VAE), with vLLM-Omni's pipeline profiler on
(`--enable-diffusion-pipeline-profiler`: a device-synchronized timer around `text_encoder.forward`,
`diffuse`, `vae.decode`, `vae.encode`, and T5 for FLUX). The stage log of the random-weight
pipelines gives those durations per executed batch, with the batch's size and seeds, so a row
is only built from batches that really ran at the point's batch size.

A point's request shape (`served`, `batch` B, output size, prompt `words`): B same-shape requests
sent together (the server runs with max_num_seqs = the largest B and an admission wait, so they
form one batch), one warm-up batch, then `omni_repeats` batches at each of the two `omni_steps`:
- dit_step = (diffuse(n_hi) - diffuse(n_lo)) / (n_hi - n_lo): one transformer forward at batch B
  plus the scheduler step, without CFG (no negative prompt; with CFG vLLM-Omni runs two of them
  one after the other); the per-request constant part of `diffuse` cancels;
- text_encode, vae_decode, vae_encode: the profiler's durations of every timed batch.
Rows carry engine = vllm-omni and land in <out_dir>/<gpu>-vllm-omni/<model>.parquet.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional

from profiler.backends.base import Backend, RunContext, summarize

STAGE_KEYS = {  # row (stage, component) -> suffix of vLLM-Omni's profiler stage name
    ("text_encode", "text_encoder"): ".text_encoder.forward",
    ("text_encode", "text_encoder_vl"): ".text_encoder.forward",
    ("text_encode", "clip_l"): ".text_encoder.forward",
    ("text_encode", "t5_xxl"): ".text_encoder_2.forward",
    ("vae_decode", None): ".vae.decode",
    ("vae_encode", None): ".vae.encode",
}
SHAPE_KEYS = ("served", "batch", "req_height", "req_width", "words")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    try:
        v = cfg[key]
    except (KeyError, TypeError, AttributeError):
        v = getattr(cfg, key, default)
    return default if v is None else v


def shape_of(p: dict) -> tuple:
    return tuple(p.get(k) for k in SHAPE_KEYS)


def stage_value(rec: dict, suffix: str) -> Optional[float]:
    """The duration (s) of the stage named `<Pipeline>{suffix}` in one stage-log record."""
    for k, v in (rec.get("stage_durations") or {}).items():
        if k.endswith(suffix):
            return float(v)
    return None


class VllmOmniBackend(Backend):
    name = "vllm-omni"

    def __init__(self) -> None:
        self.servers_started: list[dict] = []

    def engine_version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("vllm-omni")
        except PackageNotFoundError:
            return "unknown"

    def gpu_name(self, device: str) -> str:
        """From nvidia-smi: this process must not hold a CUDA context while the server runs."""
        from profiler.serve_bench import gpu_info
        return gpu_info().get("nvidia_smi_name") or "unknown"

    def plan(self, spec, grid) -> list[dict]:
        from profiler.grid import plan_vllm_omni
        return plan_vllm_omni(spec, grid)

    # ------------------------------------------------------------------ measuring
    def iter_rows(self, spec, points: list[dict], ctx: RunContext) -> Iterator[dict]:
        from profiler.omni_server import OmniServer, gzip_file, prepare, serve_command, server_env
        from profiler.serve_bench import vllm_cli
        cfg = ctx.cfg
        oc = _get(cfg, "vllm_omni", {})
        grid = _get(cfg, "grid", {})
        only = list(_get(oc, "served", []) or [])
        by_server: dict[str, list[dict]] = defaultdict(list)
        for p in points:
            if not only or p["served"] in only:
                by_server[p["served"]].append(p)
        log_dir = Path(_get(oc, "log_dir", None) or "/tmp/omni_profile")
        steps = sorted(int(x) for x in _get(grid, "omni_steps", [2, 6]))
        repeats = int(_get(grid, "omni_repeats", 3))
        for served, pts in by_server.items():
            if ctx.should_stop():
                return
            max_b = max(int(p["batch"]) for p in pts)
            staging = Path("/tmp/omni_profile") / served
            tiny = _get(oc, "shapes", "full") == "tiny"
            from profiler.omni_bench import TINY_SHAPES
            model_dir = staging / ("model_tiny" if tiny else "model")
            prep = prepare(served, model_dir, staging, TINY_SHAPES[served] if tiny else None)
            port = int(_get(oc, "port", 8092))
            cmd = serve_command(vllm_cli(str(_get(oc, "vllm_cli", "auto"))), model_dir,
                                port, max_num_seqs=max_b if max_b > 1 else None,
                                request_batch_max_wait_ms=float(_get(oc, "max_wait_ms", 1000)) if max_b > 1 else None,
                                stage_profiler=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            srv = OmniServer(cmd, server_env(prep["plugin_dir"], prep["stagelog"]),
                             log_dir / f"server_{served}__{stamp}.log", port,
                             float(_get(oc, "health_timeout", 480)), ctx.log)
            settings = {"server_command": " ".join(cmd), "steps": steps, "repeats": repeats, "cfg": False,
                        "timer": "vLLM-Omni --enable-diffusion-pipeline-profiler (synchronized)",
                        "dit_step": "slope of diffuse between the two step counts",
                        "compile": "vLLM-Omni default (regional torch.compile, dynamic shapes)",
                        "weights": "vLLM dummy uniform(-1e-3, 1e-3)"}
            try:
                try:
                    settings["server_start_s"] = srv.start()
                    settings["server_log_facts"] = srv.facts
                except RuntimeError as e:
                    for p in pts:
                        yield dict(p, status="error", error=f"server: {e}"[:300])
                    continue
                self.servers_started.append({"served": served, "start_s": srv.start_s})
                shapes: dict[tuple, list[dict]] = defaultdict(list)
                for p in pts:
                    shapes[shape_of(p)].append(p)
                for key in sorted(shapes, key=lambda k: (k[1] * k[2] * k[3], k[4])):
                    if ctx.should_stop():
                        return
                    group = shapes[key]
                    meas = self.measure_shape(srv, prep["stagelog"], group[0], steps, repeats)
                    for p in group:
                        yield self.row(p, meas, steps, settings)
                    if not srv.alive():
                        ctx.log(f"[vllm_omni] server exited ({srv.returncode}); rest of {served} not measured")
                        break
            finally:
                srv.stop()
                gzip_file(prep["stagelog"], log_dir / f"stagelog_{served}__{stamp}.jsonl.gz")

    def measure_shape(self, srv: Any, stagelog: Path, p: dict, steps: list[int], repeats: int) -> dict:
        """One warm-up batch, then `repeats` timed batches per step count. Returns
        {"batches": {n_steps: [stage-log record, ...]}, "errors": [...], "peak_mb": float|None}."""
        from profiler.omni_bench import make_images
        from profiler.omni_client import ImageRequest, make_prompt, run_requests
        import numpy as np
        task = "edit" if p["served"] == "qwen_image_edit" else "generate"
        B, H, W, words = int(p["batch"]), int(p["req_height"]), int(p["req_width"]), int(p["words"])
        rng = np.random.default_rng(B * 1_000_003 + H * 1009 + W + words)
        prompt = make_prompt(words, rng)
        out: dict[str, Any] = {"batches": defaultdict(list), "errors": [], "peak_mb": None, "sizes": []}
        plan = [(steps[0], False)] + [(n, True) for n in steps for _ in range(repeats)]
        seed = int(time.time() * 1000) % 10_000_000 * 10
        for n, timed in plan:
            reqs = []
            for i in range(B):
                seed += 1
                r = ImageRequest(index=i, task=task, arrival_s=0.0, height=H, width=W, steps=n, cfg=False,
                                 prompt_words=words, seed=seed, prompt=prompt)
                if task == "edit":
                    r.input_height, r.input_width = H, W
                reqs.append(r)
            wall0 = time.time()
            res = asyncio.run(run_requests(srv.base_url, reqs, images=make_images(reqs)))
            bad = [row for row in res["rows"] if row["status"] != 200 or row["error"]]
            if bad:
                out["errors"].extend(f"{row['status']}: {row['error']}" for row in bad)
                break
            for row in res["rows"]:
                if row.get("peak_memory_mb"):
                    out["peak_mb"] = max(out["peak_mb"] or 0.0, float(row["peak_memory_mb"]))
            seeds = {r.seed for r in reqs}
            recs = [rec for rec in _read_since(stagelog, wall0) if set(rec.get("seeds") or []) & seeds]
            out["sizes"].append([rec.get("batch_size") for rec in recs])
            if timed:
                out["batches"][n].extend(rec for rec in recs if rec.get("batch_size") == B)
        return out

    def row(self, p: dict, meas: dict, steps: list[int], settings: dict) -> dict:
        row = {k: v for k, v in p.items()}
        row["engine_settings"] = settings
        if meas["errors"]:
            err = meas["errors"][0]
            row.update(status="oom" if "out of memory" in err.lower() else "error", error=err[:300])
            return row
        lo, hi = steps[0], steps[-1]
        b_lo, b_hi = meas["batches"].get(lo, []), meas["batches"].get(hi, [])
        if not b_lo or not b_hi:
            row.update(status="error", error=f"no batch of {p['batch']} ran (batch sizes seen "
                                             f"{meas['sizes']}); raise vllm_omni.max_wait_ms")
            return row
        if p["stage"] == "dit_step":
            d_lo = [stage_value(r, ".diffuse") for r in b_lo]
            d_hi = [stage_value(r, ".diffuse") for r in b_hi]
            if None in d_lo or None in d_hi:
                row.update(status="error", error="no `diffuse` duration in the stage log (profiler off?)")
                return row
            samples = [(h - l) * 1e3 / (hi - lo) for l, h in zip(d_lo, d_hi)]
            row["diffuse_ms"] = {str(lo): [round(x * 1e3, 3) for x in d_lo], str(hi): [round(x * 1e3, 3) for x in d_hi]}
        else:
            suffix = STAGE_KEYS.get((p["stage"], p["component"])) or STAGE_KEYS.get((p["stage"], None))
            vals = [stage_value(r, suffix) for r in b_lo + b_hi]
            vals = [v for v in vals if v is not None]
            if not vals:
                row.update(status="error", error=f"no `{suffix}` duration in the stage log")
                return row
            samples = [v * 1e3 for v in vals]
        if any(x <= 0 for x in samples):
            row.update(status="error", error=f"non-positive samples {samples} (noise larger than the steps' time)")
            return row
        row.update(summarize(samples))
        row["status"] = "ok"
        if meas["peak_mb"]:
            row["peak_mem_bytes"] = int(meas["peak_mb"] * 2 ** 20)
        return row


def _read_since(path: Path, wall0: float) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if float(rec.get("t_end", 0)) >= wall0:
            out.append(rec)
    return out
