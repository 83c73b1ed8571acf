"""Ground truth for disaggregated serving on one host: several `vllm serve` instances pinned to
GPUs, profiler.disagg_proxy in front, profiler.chat_bench's image + text runs through the proxy.

Runs ON THE GPU HOST (vLLM importable, e.g. PYTHONPATH=/tmp/site:$PWD):

    python -m profiler.disagg_bench --layout 1e1pd --gpus 0,1 --out $OUT/h100x2 [--dry-run]
    python -m profiler.serve_bench --model qwen2_5_vl_7b --layout 1e1pd --gpus 0,1 --out ...  (same)

Layouts (LAYOUTS; one instance per role, `--gpus` one index per role in order, or per replica):
- `1e1pd`: an encoder instance (`--mm-encoder-only`, encoder-cache producer) feeding a
  prefill+decode instance (consumer) through vLLM 0.26's encoder-cache connector;
- `1e1p1d`: the same encoder feeding a prefill instance, whose KV goes to a decode instance;
- `1p1d`: prefill/decode disaggregation through a KV connector;
- `replicas`: N plain instances behind the same proxy (round-robin): the comparison on the same GPUs.
A GPU index repeated (`--gpus 0,0`) puts two instances on one card: what one GPU can measure of a
connector's hand-off between two processes. Instances on one card start one after the other
(vLLM's memory profiling must not see another process's context appear); on separate cards
they start together.

Connectors (vLLM 0.26.0: vllm/distributed/ec_transfer/ec_connector/factory.py,
vllm/distributed/kv_transfer/kv_connector/factory.py):
- encoder cache: ECExampleConnector (safetensors files under --ec-path, written by the encoder,
  read onto the GPU by the consumer; ECCPUConnector only offloads within one instance), run as
  profiler.connector_timing's TimedECExampleConnector, which logs every save and load (bytes, s);
- KV: NixlConnector (kv_both; needs the `nixl` package; its transfer times and bytes are the
  decode instance's /metrics histograms), else ExampleConnector (files under --kv-path, timed the
  same way). `--kv-connector` picks; the default is NixlConnector when nixl imports.
NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1), as the multi-GPU kinds require.

Runs: serve_bench's image + text catalog (VLM_RUN_CATALOG: inf first, which calibrates the
capacity C of this layout, then sat 0.9 C, bursty_k0.5 / k0.25 at 0.6 C, poisson_low 0.35 C, ...).
Each result <out>/<model>__<layout>__<run>[__tag].json is a chat_bench result (vllm bench serve's
keys) whose provenance adds: `layout` (name, roles with GPU, port, connector role; `pools`: the
simulator's cluster.layout, GPU indices renumbered 0..k-1 in order of first use), `connectors`,
per-instance /metrics deltas (`server_metrics_by_instance`), the proxy's per-hop times
(`proxy_hops`: median / p90 of the encoder, prefill and decode hops, ms) and the measured hand-off
(`handoff`: per connector and op, items, bytes, seconds, GB/s; from the timing logs or NIXL's
histograms). sim.tools.validate replays it with the layout pinned (`modality: disaggregated`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

from profiler import serve_bench as sb

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
# role -> (proxy role, simulator pool role, encoder-cache role, takes a KV role)
ROLES: dict[str, tuple[str, str, Optional[str], Optional[str]]] = {
    "encoder": ("encode", "encoder", "ec_producer", None),
    "pd": ("decode", "llm", "ec_consumer", None),
    "prefill": ("prefill", "prefill", None, "producer"),
    "decode": ("decode", "decode", None, "consumer"),
    "replica": ("decode", "replica", None, None),
}
LAYOUTS: dict[str, tuple[str, ...]] = {
    "1e1pd": ("encoder", "pd"),
    "1e1p1d": ("encoder", "prefill", "decode"),
    "1p1d": ("prefill", "decode"),
    "replicas": ("replica",),          # one per --gpus entry
}
EC_CONNECTORS = ("ECExampleConnector",)
KV_CONNECTORS = ("NixlConnector", "ExampleConnector")
ENCODER_MEM = 0.10          # gpu_memory_utilization of an encoder-only instance sharing a card
BASE_PORT = 8100
NIXL_BASE_PORT = 5600


@dataclass
class Instance:
    role: str
    gpu: int
    port: int
    index: int
    gpu_mem: float = 0.9
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: Any = None
    log: Optional[Path] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"{self.role}{self.index}" if self.role == "replica" else self.role


def plan_instances(layout: str, gpus: list[int], base_port: Optional[int] = None) -> list[Instance]:
    """The instances of a layout on the given GPUs (ports base_port, base_port + 1, ...), with
    their memory share of each card."""
    base_port = BASE_PORT if base_port is None else base_port
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r} is unknown; allowed: {sorted(LAYOUTS)}")
    roles = list(LAYOUTS[layout]) * (len(gpus) if layout == "replicas" else 1)
    if len(gpus) != len(roles):
        raise ValueError(f"--gpus {gpus}: layout {layout} needs {len(roles)} GPU indices, one per "
                         f"role {roles} in order (repeat an index to share a card)")
    if layout == "replicas" and len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {gpus}: replicas need distinct GPUs")
    out = [Instance(r, g, base_port + i, i) for i, (r, g) in enumerate(zip(roles, gpus))]
    for g in set(gpus):
        here = [x for x in out if x.gpu == g]
        if len(here) == 1:
            continue
        enc = [x for x in here if x.role == "encoder"]
        rest = [x for x in here if x.role != "encoder"]
        for x in enc:
            x.gpu_mem = ENCODER_MEM
        share = round((0.88 - ENCODER_MEM * len(enc)) / max(len(rest), 1), 3)
        for x in rest:
            x.gpu_mem = share
    return out


def sim_pools(model: str, instances: list[Instance]) -> dict[str, list[int]]:
    """cluster.layout.pools for the simulator: GPU indices renumbered 0..k-1 by first use."""
    renum: dict[int, int] = {}
    for x in instances:
        renum.setdefault(x.gpu, len(renum))
    pools: dict[str, list[int]] = {}
    for x in instances:
        pools.setdefault(f"{ROLES[x.role][1]}:{model}", []).append(renum[x.gpu])
    return pools


def ec_config(role: str, path: Path, timing_dir: Path) -> dict[str, Any]:
    return {"ec_connector": "TimedECExampleConnector",
            "ec_connector_module_path": "profiler.connector_timing",
            "ec_role": role,
            "ec_connector_extra_config": {"shared_storage_path": str(path),
                                          "timing_log": str(timing_dir)}}


def kv_config(connector: str, side: str, path: Path, timing_dir: Path) -> dict[str, Any]:
    if connector == "NixlConnector":            # as vLLM's 1e1p1d example: producer / consumer
        return {"kv_connector": "NixlConnector", "kv_role": f"kv_{side}"}
    return {"kv_connector": "TimedExampleConnector",
            "kv_connector_module_path": "profiler.connector_timing",
            "kv_role": f"kv_{side}",
            "kv_connector_extra_config": {"shared_storage_path": str(path),
                                          "timing_log": str(timing_dir)}}


def ec_role_of(role: str, has_encoder: bool) -> Optional[str]:
    """The encoder-cache role: the encoder produces; the instance that prefills consumes (pd, or
    prefill under 1e1p1d, as vLLM's example); nothing without an encoder instance."""
    if not has_encoder:
        return None
    return "ec_consumer" if role == "prefill" else ROLES[role][2]


def instance_command(cli: list[str], model: str, model_dir: Path, x: Instance, kv_connector: str,
                     ec_path: Path, kv_path: Path, timing_dir: Path, max_images: int,
                     max_model_len: Optional[int] = None, has_encoder: bool = True) -> list[str]:
    """`vllm serve` for one instance: serve_bench's settings (dummy weights, prefix caching off,
    chunked prefill with the H100 defaults) plus the role's connector flags."""
    cmd = sb.serve_command(cli, model_dir, x.port, max_model_len, gpu_mem=x.gpu_mem, max_images=max_images)
    cmd += ["--enable-request-id-headers"]
    _, _, _, kv_side = ROLES[x.role]
    ec_role = ec_role_of(x.role, has_encoder)
    if x.role == "encoder":
        cmd += ["--mm-encoder-only", "--enforce-eager"]      # as vLLM's 1E1PD example runs it
    if ec_role:
        cmd += ["--ec-transfer-config", json.dumps(ec_config(ec_role, ec_path, timing_dir))]
    if kv_side:
        cmd += ["--kv-transfer-config", json.dumps(kv_config(kv_connector, kv_side, kv_path, timing_dir))]
    return cmd


def instance_env(x: Instance, root: Path) -> dict[str, str]:
    env = dict(MULTICAST_OFF)
    env["CUDA_VISIBLE_DEVICES"] = str(x.gpu)
    env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(NIXL_BASE_PORT + x.index)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def layout_record(layout: str, model: str, instances: list[Instance], kv_connector: Optional[str]) -> dict[str, Any]:
    roles = []
    enc = any(x.role == "encoder" for x in instances)
    for x in instances:
        kv_side = ROLES[x.role][3]
        roles.append({"instance": x.name, "role": x.role, "gpu": x.gpu, "port": x.port,
                      "gpu_memory_utilization": x.gpu_mem, "ec_role": ec_role_of(x.role, enc),
                      "kv_connector": kv_connector if kv_side else None,
                      "kv_role": f"kv_{kv_side}" if kv_side else None})
    return {"name": layout, "roles": roles, "pools": sim_pools(model, instances),
            "gpus": sorted({x.gpu for x in instances}), "router": "round_robin",
            "colocated": len({x.gpu for x in instances}) < len(instances)}


# ----------------------------------------------------------------------------- measured hand-offs

def handoff_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per connector ("ec", "kv") and op ("save", "load"): items, bytes, seconds, and the
    effective GB/s (total bytes / total seconds) with the median per-call time. KV records are
    per layer call; `calls` counts them."""
    out: dict[str, Any] = {}
    for conn in ("ec", "kv"):
        for op in ("save", "load"):
            rs = [r for r in records if r.get("conn") == conn and r.get("op") == op]
            if not rs:
                continue
            b = np.array([r["bytes"] for r in rs], float)
            s = np.array([r["s"] for r in rs], float)
            out.setdefault(conn, {})[op] = {
                "calls": len(rs), "items": int(sum(r["items"] for r in rs)),
                "bytes_total": int(b.sum()), "seconds_total": float(s.sum()),
                "gb_s": float(b.sum() / s.sum() / 1e9) if s.sum() > 0 else None,
                "median_call_ms": float(np.median(s) * 1e3), "median_call_bytes": float(np.median(b))}
    return out


def nixl_summary(server_metrics: dict[str, Any]) -> dict[str, Any]:
    """NIXL's own figures from an instance's per-run /metrics histogram deltas."""
    h = (server_metrics or {}).get("histograms") or {}
    t, b = h.get("nixl_xfer_time_seconds"), h.get("nixl_bytes_transferred")
    if not t or not b:
        return {}
    return {"transfers": int(t["count"]), "seconds_total": float(t["sum"]), "bytes_total": float(b["sum"]),
            "mean_transfer_ms": float(t["mean"] * 1e3), "mean_bytes": float(b["mean"]),
            "gb_s": float(b["sum"] / t["sum"] / 1e9) if t["sum"] > 0 else None}


def hop_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median / p90 of each proxy hop (ms) over a run's requests, and how many took it."""
    out: dict[str, Any] = {}
    for role in ("encode", "prefill", "decode"):
        d = [(h["end_s"] - h["start_s"]) * 1e3 for r in records for h in r.get("hops", ())
             if h.get("role") == role and h.get("end_s") is not None]
        if d:
            out[role] = {"requests": len(d), "median_ms": float(np.median(d)),
                         "p90_ms": float(np.percentile(d, 90))}
    fb = [r["first_byte_s"] * 1e3 for r in records if r.get("first_byte_s") is not None]
    if fb:
        out["first_byte_median_ms"] = float(np.median(fb))
    out["errors"] = sum(1 for r in records if r.get("status") not in (200, None) or r.get("error"))
    return out


def read_proxy_log(path: Path, prefix: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if str(r.get("rid", "")).startswith(prefix):
            out.append(r)
    return out


# ----------------------------------------------------------------------------- driver

def wait_healthy(xs: list[Instance], deadline: float, log) -> None:
    pending = list(xs)
    while pending:
        for x in list(pending):
            if x.proc is not None and x.proc.poll() is not None:
                raise RuntimeError(f"{x.name} (GPU {x.gpu}) exited with {x.proc.returncode}; see {x.log}")
            if sb.http_get(f"{x.url}/health", 2.0)[0] == 200:
                log(f"{x.name} on GPU {x.gpu} healthy")
                pending.remove(x)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"not healthy in time: {[x.name for x in pending]}")
        if pending:
            time.sleep(0.5)


def start_groups(instances: list[Instance]) -> list[list[Instance]]:
    """Start waves: instances on separate cards start together; a card's next instance waits for
    the wave of its previous one (encoders first, so their small share is taken before the big
    one's memory profiling)."""
    order = sorted(instances, key=lambda x: (x.role != "encoder", x.index))
    waves: list[list[Instance]] = []
    last: dict[int, int] = {}
    for x in order:
        k = last.get(x.gpu, -1) + 1
        while len(waves) <= k:
            waves.append([])
        waves[k].append(x)
        last[x.gpu] = k
    return waves


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.disagg_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2_5_vl_7b", choices=sorted(m for m, s in sb.MODEL_SETTINGS.items()
                                                                      if s.get("kind") == "vlm"))
    ap.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    ap.add_argument("--gpus", required=True, help="comma list of GPU indices, one per role in order "
                    "(1e1pd: encoder,pd; 1e1p1d: encoder,prefill,decode; 1p1d: prefill,decode; replicas: "
                    "one per replica); repeat an index to put two instances on one card")
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="inf,sat,bursty_k0.5,poisson_low",
                    help=f"comma list, in order, from {','.join(sb.VLM_RUN_CATALOG)}")
    ap.add_argument("--kv-connector", default="auto", choices=("auto",) + KV_CONNECTORS)
    ap.add_argument("--ec-path", default="/tmp/mmsim_ec", help="ECExampleConnector storage (cleared per run)")
    ap.add_argument("--kv-path", default="/tmp/mmsim_kv", help="KV ExampleConnector storage (cleared per run)")
    ap.add_argument("--max-minutes", type=float, default=9.0)
    ap.add_argument("--since-parent", action="store_true",
                    help="count --max-minutes from the start of the parent shell (as serve_bench)")
    ap.add_argument("--target-s", type=float, default=28.0)
    ap.add_argument("--capacity", type=float, default=None, help="req/s to size runs (default: the inf run's)")
    ap.add_argument("--num-prompts-inf", type=int, default=None)
    ap.add_argument("--port", type=int, default=8000, help="the proxy's port")
    ap.add_argument("--base-port", type=int, default=BASE_PORT, help="the instances' ports: this, +1, ...")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--vllm-cli", default="auto")
    ap.add_argument("--health-timeout", type=float, default=420.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)

    t0 = time.monotonic()
    deadline = t0 + a.max_minutes * 60.0
    if a.since_parent:
        age = sb.parent_age_s()
        if age is not None and age < 300:
            deadline -= age
    try:
        gpus = [int(g) for g in a.gpus.split(",") if g.strip()]
        instances = plan_instances(a.layout, gpus, a.base_port)
    except ValueError as e:
        ap.error(str(e))
    st = dict(sb.MODEL_SETTINGS[a.model])
    names = [x.strip() for x in a.runs.split(",") if x.strip()]
    for r in names:
        if r not in sb.VLM_RUN_CATALOG:
            ap.error(f"unknown run {r!r}; known: {list(sb.VLM_RUN_CATALOG)}")
    runs = [sb.VLM_RUN_CATALOG[r] for r in names]
    stems = sb.run_stems(names)
    kv_needed = any(ROLES[x.role][3] for x in instances)
    kv_conn = a.kv_connector
    if kv_conn == "auto":
        import importlib.util
        kv_conn = "NixlConnector" if importlib.util.find_spec("nixl") is not None else "ExampleConnector"
    if not kv_needed:
        kv_conn = None
    out = Path(a.out)
    model_dir = Path(a.model_dir or f"/tmp/serve_bench/{a.model}")
    staging = Path(f"/tmp/serve_bench/{a.model}_{a.layout}_staging")
    timing_dir = staging / "connector_timing"
    cli = sb.vllm_cli(a.vllm_cli)
    ec_path, kv_path = Path(a.ec_path), Path(a.kv_path)
    for x in instances:
        x.command = instance_command(cli, a.model, model_dir, x, kv_conn or "", ec_path, kv_path,
                                     timing_dir, st["max_images"], st.get("max_model_len"),
                                     has_encoder=any(y.role == "encoder" for y in instances))
        x.env = instance_env(x, sb.ROOT)
    proxy_log = out / f"proxy_{a.model}__{a.layout}{'__' + a.tag if a.tag else ''}.jsonl"
    roles = {"encode": [x.url for x in instances if ROLES[x.role][0] == "encode"],
             "prefill": [x.url for x in instances if ROLES[x.role][0] == "prefill"],
             "decode": [x.url for x in instances if ROLES[x.role][0] == "decode"]}
    proxy_cmd = [sys.executable, "-m", "profiler.disagg_proxy", "--port", str(a.port),
                 "--encode", ",".join(roles["encode"]), "--prefill", ",".join(roles["prefill"]),
                 "--decode", ",".join(roles["decode"]), "--log", str(proxy_log)]
    capacity = a.capacity or st["assumed_capacity"] * (len(instances) if a.layout == "replicas" else 1)
    n_inf = a.num_prompts_inf or st["n_inf"]
    suffix = f"__{a.layout}" + (f"__{a.tag}" if a.tag else "")
    lay = layout_record(a.layout, a.model, instances, kv_conn)

    def bench_cmd(rr: sb.RunSpec, fname: str, stem: str) -> list[str]:
        return sb.chat_bench_command(model_dir, a.port, rr, staging, fname, a.model) + [
            "--request-id-prefix", f"{stem}-"]

    if a.dry_run:
        print(f"# layout {a.layout}: " + ", ".join(f"{x.name}=GPU{x.gpu}:{x.port} (mem {x.gpu_mem})" for x in instances))
        print(f"# simulator cluster.layout.pools: {json.dumps(lay['pools'])}")
        conns = ([f"encoder cache TimedECExampleConnector (profiler.connector_timing) at {ec_path}"]
                 if any(x.role == "encoder" for x in instances) else [])
        if kv_conn:
            conns.append(f"KV {kv_conn}" + (f" (timed) at {kv_path}" if kv_conn == "ExampleConnector" else ""))
        print(f"# connectors: {'; '.join(conns) or 'none (plain replicas)'}")
        print(f"# model dir: {model_dir} (profiler/vlm_model.py, as serve_bench --model {a.model})")
        for w, wave in enumerate(start_groups(instances)):
            for x in wave:
                env = " ".join(f"{k}={v}" for k, v in x.env.items() if k != "PYTHONPATH")
                print(f"{env} {shlex.join(x.command)} > {out}/server_{a.model}{suffix}_{x.name}.log 2>&1 &"
                      + (f"   # wave {w}" if w else ""))
            print(f"# wait for /health of {[x.name for x in wave]}")
        print(shlex.join(proxy_cmd) + " &")
        print(f"# rates below assume capacity {capacity} req/s; a real run calibrates them from 'inf'")
        total = 0.0
        for r, stem in zip(runs, stems):
            rr = sb.size_run(r, capacity, n_inf, a.target_s)
            total += sb.est_seconds(rr, capacity)
            fname = f"{a.model}__{a.layout}__{stem}{'__' + a.tag if a.tag else ''}.json"
            print(shlex.join(bench_cmd(rr, fname, stem)))
        print(f"# estimated run time {total:.0f} s after the servers start")
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.update(MULTICAST_OFF)
    out.mkdir(parents=True, exist_ok=True)
    staging.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(timing_dir, ignore_errors=True)
    for pth in (ec_path, kv_path):
        shutil.rmtree(pth, ignore_errors=True)
        pth.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[disagg_bench {time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    missing = sb.preflight(cli, True)
    if kv_conn == "NixlConnector" and cli[-1] == "vllm.entrypoints.cli.main":
        import importlib.util
        if importlib.util.find_spec("nixl") is None:
            missing.append("nixl")
    if missing:
        print(f"[disagg_bench] error: modules missing: {missing}", file=sys.stderr)
        return 2
    if cli[-1] == "vllm.entrypoints.cli.main":        # (a fake CLI in tests brings its own)
        from profiler import vlm_model
        cfg = vlm_model.write_vlm_model_dir(a.model, model_dir)
        vlm_model.check_vlm_tokenizer(sb.tokenizer_dir(model_dir), int(cfg["text_config"]["vocab_size"]))
    base: dict[str, Any] = dict(model=a.model, model_dir=str(model_dir), engine="vllm",
                                engine_version=sb.pkg_version("vllm"), torch_version=sb.pkg_version("torch"),
                                git_sha=sb.git_sha(), hostname=os.uname().nodename, layout=lay,
                                connectors={"encoder_cache": "ECExampleConnector (timed: profiler.connector_timing)"
                                            if any(x.role == "encoder" for x in instances) else None,
                                            "kv": kv_conn, "ec_path": str(ec_path),
                                            "kv_path": str(kv_path) if kv_conn == "ExampleConnector" else None},
                                server_commands={x.name: shlex.join(x.command) for x in instances},
                                proxy_command=shlex.join(proxy_cmd), multicast_env=MULTICAST_OFF,
                                max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=False,
                                load_format="dummy", dtype="bfloat16", client="profiler.chat_bench",
                                limit_mm_per_prompt={"image": st["max_images"], "video": 0})
    base.update(sb.gpu_info())
    summary: dict[str, Any] = {"model": a.model, "layout": a.layout, "runs": [], "skipped": []}
    proxy = None
    bench_env = dict(os.environ)
    bench_env["PYTHONPATH"] = os.pathsep.join([str(sb.ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        for wave in start_groups(instances):
            for x in wave:
                x.log = out / f"server_{a.model}{suffix}_{x.name}.log"
                log(f"starting {x.name} on GPU {x.gpu}: " + shlex.join(x.command))
                x.proc = subprocess.Popen(x.command, stdout=open(x.log, "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True, env={**os.environ, **x.env})
            wait_healthy(wave, min(time.monotonic() + a.health_timeout, deadline - 60), log)
        for x in instances:
            facts = sb.parse_kv_log(x.log.read_text(errors="replace"))
            if facts:
                base.setdefault("instance_facts", {})[x.name] = facts
        pd_facts = [v for k, v in base.get("instance_facts", {}).items() if "kv_cache_tokens" in v]
        if pd_facts:
            base["kv_cache_tokens"] = int(min(v["kv_cache_tokens"] for v in pd_facts))
        base["server_start_s"] = round(time.monotonic() - t0, 1)
        proxy = subprocess.Popen(proxy_cmd, stdout=open(out / f"proxy_{a.model}{suffix}.log", "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True, env=bench_env)
        wait_healthy([Instance("proxy", -1, a.port, 0)], time.monotonic() + 30, log)
        calibrated = a.capacity is not None
        for r, stem in zip(runs, stems):
            rr = sb.size_run(r, capacity, n_inf, a.target_s)
            left = deadline - time.monotonic() - 30.0
            est = sb.est_seconds(rr, capacity)
            if est > left:
                scale = (left - sb.CHAT_CLIENT_OVERHEAD_S) / max(est - sb.CHAT_CLIENT_OVERHEAD_S, 1e-6)
                rr.num_prompts = int(rr.num_prompts * scale)
                if rr.num_prompts < (12 if rr.fixed_prompts else 30):
                    log(f"skip {stem}: {est:.0f} s estimated, {left:.0f} s left")
                    summary["skipped"].append(stem)
                    continue
            fname = f"{a.model}__{a.layout}__{stem}{'__' + a.tag if a.tag else ''}.json"
            cmd = bench_cmd(rr, fname, stem)
            log(f"run {stem}: " + shlex.join(cmd))
            before = {x.name: sb.parse_metrics(sb.http_get(f"{x.url}/metrics")[1]) for x in instances}
            wall0 = time.time()
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            with open(out / f"bench_{fname[:-5]}.log", "w") as blog:
                bp = subprocess.Popen(cmd, stdout=blog, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=bench_env)
                try:
                    bp.wait(timeout=max(5.0, deadline - time.monotonic() - 20.0))
                except subprocess.TimeoutExpired:
                    sb.stop_group(bp, grace=3.0)
                    log(f"run {stem} past the deadline: killed")
                    summary["skipped"].append(stem)
                    break
            wall1 = time.time()
            src = staging / fname
            if bp.returncode != 0 or not src.exists():
                log(f"run {stem} failed (rc {bp.returncode})")
                summary["skipped"].append(stem)
                continue
            metrics = {}
            for x in instances:
                after = sb.parse_metrics(sb.http_get(f"{x.url}/metrics")[1])
                b = before[x.name]
                d = {k.split(":", 1)[1] + "_delta": after[k] - b.get(k, 0.0) for k in after
                     if k.startswith("vllm:") and k in b and not any(k.startswith(h) for h in sb.HISTOGRAMS)}
                d["histograms"] = sb.histogram_deltas(b, after)
                metrics[x.name] = d
            from profiler.connector_timing import read_timing_logs
            handoff = handoff_summary(read_timing_logs(timing_dir, wall0, wall1 + 2.0)) if timing_dir.exists() else {}
            nixl = {k: s for k, s in ((k, nixl_summary(v)) for k, v in metrics.items()) if s}
            if nixl:
                handoff["kv_nixl"] = nixl
            main_inst = next((x.name for x in instances if ROLES[x.role][0] == "decode"), instances[-1].name)
            prov = dict(base, run=stem, dataset_name=f"chat_{rr.image_law}",
                        request_rate=rr.request_rate if rr.request_rate is not None else "inf",
                        burstiness=rr.burstiness, num_prompts=rr.num_prompts, seed=rr.seed,
                        calibrated_capacity_rps=round(capacity, 4), bench_command=shlex.join(cmd),
                        max_concurrency=rr.max_concurrency, measured_at=started,
                        server_metrics=metrics.get(main_inst, {}), server_metrics_by_instance=metrics,
                        proxy_hops=hop_summary(read_proxy_log(proxy_log, f"{stem}-")),
                        handoff=handoff, wall_span=[round(wall0, 3), round(wall1, 3)],
                        text_frac=rr.text_frac, image_law=rr.image_law)
            obj = sb.finalize_result(src, out / fname, prov)
            log(f"run {stem}: {obj.get('completed')} done, {obj.get('request_throughput', 0):.2f} req/s, "
                f"median TTFT {obj.get('median_ttft_ms', 0):.0f} ms; hand-off {json.dumps(handoff)[:300]}")
            summary["runs"].append({"run": stem, "file": fname, "request_throughput": obj.get("request_throughput")})
            for pth in (ec_path, kv_path):          # the connectors never delete: keep the disk free
                shutil.rmtree(pth, ignore_errors=True)
                pth.mkdir(parents=True, exist_ok=True)
            if r.rate_frac is None and not r.fixed_prompts and not calibrated and obj.get("request_throughput"):
                capacity, calibrated = float(obj["request_throughput"]), True
                log(f"calibrated capacity {capacity:.2f} req/s")
    except Exception as e:  # noqa: BLE001 - report, stop everything, keep finished runs
        log(f"error: {e}")
        summary["error"] = str(e)
    finally:
        if proxy is not None:
            sb.stop_group(proxy, grace=5.0)
        for x in instances:
            if x.proc is not None:
                sb.stop_group(x.proc)
        if timing_dir.exists():          # the connectors' raw records travel with the results
            shutil.copytree(timing_dir, out / f"connector_timing{suffix}", dirs_exist_ok=True)
        summary["provenance"] = base
        summary["elapsed_s"] = round(time.monotonic() - t0, 1)
        (out / f"disagg_bench_{a.model}{suffix}.json").write_text(json.dumps(summary, indent=2, default=str))
        log(f"done: {len(summary['runs'])} runs, skipped {summary['skipped']}")
    return 0 if summary["runs"] and "error" not in summary else 1


if __name__ == "__main__":
    sys.exit(main())
