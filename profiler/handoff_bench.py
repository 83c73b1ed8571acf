"""What one GPU can measure of a disaggregated hand-off: vLLM 0.26.0's encoder-cache connector
moving vision embeddings between two processes on the same card, by size; and the fit of any
connector timing records into the simulator's hand-off links (latency + bytes / bandwidth).

    python -m profiler.handoff_bench sweep --out $OUT/handoff [--tokens 64,256,...] [--dry-run]
    python -m profiler.handoff_bench fit <records dir or .jsonl ...> --out traces/validation/h100_handoff/handoff.json

`sweep` starts two processes on GPU 0 (CUDA_VISIBLE_DEVICES as given): a producer holding
vLLM's own ECExampleConnector as an `ec_producer` and a consumer holding one as an
`ec_consumer` (the roles of the encoder and prefill/decode instances of 1E1PD). For every size
(image tokens x the model's out_hidden_size, bf16) and repeat, the producer makes the embedding
on the GPU and calls save_caches (device -> host, safetensors file under --path), then hands the
mm hash to the consumer through a pipe; the consumer binds the connector metadata vLLM's
scheduler would build (ECExampleConnectorMetadata with the hash and token count) and calls
start_load_caches (file -> GPU) and synchronises. Each side times its own call; the records are
profiler.connector_timing's (conn ec, op save / load) plus `pair` (the hand-off as the request
sees it: save + the pipe + load, wall clock). --path on /dev/shm measures the connector without
the disk; the default /tmp is where disagg_bench puts it.

`fit` reads timing records (this sweep's, or those disagg_bench's servers wrote while serving)
and fits, per connector, seconds = a + bytes / B over save + load per item (KV: per request, its
layers' saves summed by step), least squares; it writes {"links": {"encoder": {gb_s, latency_us,
source}, "kv": ...}, "fits": ...}, the file sim.tools.validate --handoff and cluster.layout.handoff
take.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

DEFAULT_TOKENS = (64, 256, 1024, 2304, 4096, 9216, 16384)   # 224^2 .. 1792^2 images (Qwen2.5-VL)
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ----------------------------------------------------------------------------- fit (CPU)

def fit_line(nbytes: np.ndarray, seconds: np.ndarray) -> dict[str, Any]:
    """seconds = a + nbytes / B by least squares; the bandwidth B in GB/s, the intercept a in us,
    and the relative error of the line on each point (median / max |err|)."""
    x, y = np.asarray(nbytes, float), np.asarray(seconds, float)
    if len(x) < 2 or np.ptp(x) == 0:
        b = float(y.sum() / x.sum()) if x.sum() > 0 else float("nan")
        a = 0.0
    else:
        b, a = np.polyfit(x, y, 1)
        if a < 0:                         # a negative floor is noise: refit through the origin
            a, b = 0.0, float((x @ y) / (x @ x))
    pred = a + b * x
    err = (pred - y) / np.where(y > 0, y, np.nan)
    return {"gb_s": float(1.0 / b / 1e9) if b > 0 else None, "latency_us": float(a * 1e6),
            "points": int(len(x)), "median_abs_rel_err": float(np.nanmedian(np.abs(err))) if len(x) else None,
            "max_abs_rel_err": float(np.nanmax(np.abs(err))) if len(x) else None}


def handoff_items(records: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(bytes, seconds) per hand-off item and connector: `pair` records where the sweep wrote
    them (one per item, the whole hand-off), else save + load per item matched in order (EC:
    one save and one load per embedding of the same size), KV: per prefill step (consecutive
    layer saves of one process) plus the matching load."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for conn in ("ec", "kv"):
        rs = [r for r in records if r.get("op") == "pair" and r.get("conn") == conn]
        if rs:
            out[conn] = (np.array([r["bytes"] for r in rs], float), np.array([r["s"] for r in rs], float))
    ec_s = [r for r in records if r.get("conn") == "ec" and r.get("op") == "save"]
    ec_l = [r for r in records if r.get("conn") == "ec" and r.get("op") == "load"]
    if ec_s and ec_l and "ec" not in out:
        s_per_b = sum(r["s"] for r in ec_l) / max(sum(r["bytes"] for r in ec_l), 1)
        b = np.array([r["bytes"] for r in ec_s], float)
        out["ec"] = (b, np.array([r["s"] for r in ec_s], float) + b * s_per_b)
    kv_s = sorted((r for r in records if r.get("conn") == "kv" and r.get("op") == "save"),
                  key=lambda r: (r.get("pid", 0), r["t"]))
    kv_l = [r for r in records if r.get("conn") == "kv" and r.get("op") == "load"]
    if kv_s and kv_l and "kv" not in out:
        steps: list[list[dict]] = []
        for r in kv_s:                    # a step's layer saves are back to back in one process
            if steps and steps[-1][-1].get("pid") == r.get("pid") and r["t"] - steps[-1][-1]["t"] < 0.05 \
                    and r.get("layer") not in {x.get("layer") for x in steps[-1]}:
                steps[-1].append(r)
            else:
                steps.append([r])
        s_per_b = sum(r["s"] for r in kv_l) / max(sum(r["bytes"] for r in kv_l), 1)
        b = np.array([sum(r["bytes"] for r in st) for st in steps], float)
        out["kv"] = (b, np.array([sum(r["s"] for r in st) for st in steps], float) + b * s_per_b)
    return out


def read_records(paths: list[str | Path]) -> list[dict[str, Any]]:
    out = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        for f in files:
            for line in f.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def fit_links(records: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """The hand-off links (cluster.layout.handoff) fitted on timing records."""
    links, fits = {}, {}
    for conn, (b, s) in handoff_items(records).items():
        f = fit_line(b, s)
        fits[conn] = f
        if f["gb_s"]:
            links["encoder" if conn == "ec" else "kv"] = {
                "gb_s": round(f["gb_s"], 4), "latency_us": round(f["latency_us"], 1),
                "source": f"{source}: {f['points']} hand-offs, least squares, median |err| "
                          f"{f['median_abs_rel_err'] * 100:.1f}%"}
    return {"links": links, "fits": fits}


# ----------------------------------------------------------------------------- sweep (GPU)

def _ec_connector(role: str, path: str):
    import types

    from vllm.config import ECTransferConfig
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole
    from vllm.distributed.ec_transfer.ec_connector.example_connector import ECExampleConnector
    cfg = ECTransferConfig(ec_connector="ECExampleConnector", ec_role=role,
                           ec_connector_extra_config={"shared_storage_path": path})
    return ECExampleConnector(types.SimpleNamespace(ec_transfer_config=cfg), ECConnectorRole.WORKER)


def _consumer(conn_pipe, path: str, log_dir: str) -> None:
    import torch

    from profiler.connector_timing import TimingLog, nbytes
    from vllm.distributed.ec_transfer.ec_connector.example_connector import (
        ECExampleConnectorMetadata, MMMeta)
    torch.cuda.init()
    con = _ec_connector("ec_consumer", path)
    log = TimingLog(log_dir, "ec")
    conn_pipe.send("ready")
    while True:
        msg = conn_pipe.recv()
        if msg is None:
            break
        mm_hash, tokens, t_sent = msg
        meta = ECExampleConnectorMetadata()
        meta.add_mm_data(MMMeta.make_meta(mm_hash, tokens))
        con.bind_connector_metadata(meta)
        cache: dict[str, Any] = {}
        t = time.perf_counter()
        con.start_load_caches(encoder_cache=cache)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        con.clear_connector_metadata()
        log.write("load", 1, nbytes(cache[mm_hash]), dt, tokens=tokens)
        conn_pipe.send((time.time(), dt, nbytes(cache[mm_hash])))


def run_sweep(out: Path, tokens: list[int], hidden: int, repeats: int, path: str, warmup: int = 3) -> dict[str, Any]:
    import multiprocessing as mp

    import torch

    from profiler.connector_timing import TimingLog, nbytes
    log_dir = out / "records"
    log_dir.mkdir(parents=True, exist_ok=True)
    Path(path).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    cons = ctx.Process(target=_consumer, args=(b, path, str(log_dir)), daemon=True)
    cons.start()
    assert a.recv() == "ready"
    prod = _ec_connector("ec_producer", path)
    log = TimingLog(str(log_dir), "ec")
    rows = []
    for n in tokens:
        for rep in range(warmup + repeats):
            h = f"hb_{n}_{rep}_{os.getpid()}"
            x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0w, t = time.time(), time.perf_counter()
            prod.save_caches(encoder_cache={h: x}, mm_hash=h)
            save_s = time.perf_counter() - t
            a.send((h, n, t0w))
            t_end, load_s, nb = a.recv()
            pair_s = time.time() - t0w
            if rep >= warmup:
                log.write("save", 1, nbytes(x), save_s, tokens=n)
                log.write("pair", 1, nbytes(x), pair_s, tokens=n)
                rows.append({"tokens": n, "bytes": nbytes(x), "save_s": save_s, "load_s": load_s, "pair_s": pair_s})
    a.send(None)
    cons.join(30)
    return {"rows": rows, "gpu": torch.cuda.get_device_name(0), "torch_version": torch.__version__}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.handoff_bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="encoder-cache hand-off between two processes on one GPU")
    s.add_argument("--out", required=True)
    s.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    s.add_argument("--model", default="qwen2_5_vl_7b", help="conf/model entry: vision out_hidden_size")
    s.add_argument("--repeats", type=int, default=8)
    s.add_argument("--path", default="/tmp/mmsim_ec_bench", help="the connector's shared_storage_path")
    s.add_argument("--dry-run", action="store_true")
    f = sub.add_parser("fit", help="hand-off links from timing records")
    f.add_argument("records", nargs="+", help="folders of *.jsonl or .jsonl files (connector_timing records)")
    f.add_argument("--out", required=True, help="JSON: {links, fits} for sim.tools.validate --handoff")
    f.add_argument("--source", default=None, help="what the records are (cited in each link)")
    a = ap.parse_args(argv)
    if a.cmd == "fit":
        recs = read_records(a.records)
        if not recs:
            print(f"error: no timing records in {a.records}", file=sys.stderr)
            return 2
        res = fit_links(recs, a.source or ", ".join(map(str, a.records)))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, a.out)
        for k, v in res["links"].items():
            print(f"{k}: {v['gb_s']:.3f} GB/s + {v['latency_us']:.0f} us   ({v['source']})")
        return 0
    from profiler.models import load_model
    hidden = int(load_model(a.model).components["vision"]["out_hidden_size"])
    tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    if a.dry_run:
        mb = [t * hidden * 2 / 1e6 for t in tokens]
        print(f"# {a.model}: embeddings of {tokens} image tokens x {hidden} x bf16 = "
              f"{', '.join(f'{m:.1f}' for m in mb)} MB; {a.repeats} repeats (+3 warm-up) each")
        print(f"# producer (this process) and consumer (spawned) on GPU {os.environ.get('CUDA_VISIBLE_DEVICES', '0')}, "
              f"vLLM's ECExampleConnector at {a.path}; records -> {a.out}/records/ec_<pid>.jsonl")
        print(shlex.join([sys.executable, "-m", "profiler.handoff_bench", "fit", f"{a.out}/records",
                          "--out", f"{a.out}/handoff.json"]))
        return 0
    os.environ.update(MULTICAST_OFF)
    out = Path(a.out)
    t0 = time.monotonic()
    res = run_sweep(out, tokens, hidden, a.repeats, a.path)
    res.update(model=a.model, hidden=hidden, path=a.path, elapsed_s=round(time.monotonic() - t0, 1),
               command=shlex.join(sys.argv))
    (out / "sweep.json").write_text(json.dumps(res, indent=2))
    fit = fit_links(read_records([out / "records"]), f"profiler.handoff_bench sweep on {res['gpu']} ({a.path})")
    (out / "handoff.json").write_text(json.dumps(fit, indent=2))
    for r in res["rows"][:: a.repeats]:
        print(f"tokens {r['tokens']:6d}  {r['bytes'] / 1e6:7.1f} MB  save {r['save_s'] * 1e3:7.2f} ms  "
              f"load {r['load_s'] * 1e3:7.2f} ms  hand-off {r['pair_s'] * 1e3:7.2f} ms")
    for k, v in fit["links"].items():
        print(f"{k}: {v['gb_s']:.3f} GB/s + {v['latency_us']:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
