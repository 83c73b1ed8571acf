"""The sweep runner: plan -> skip done points -> measure -> append each row as it completes.

Owns resume (point keys already in the table are skipped), the time budget (`max_minutes`, checked
between points), provenance columns, and progress display. Backends only measure.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable


from profiler import schema
from profiler.backends import backend_for, get_backend
from profiler.backends.base import RunContext
from profiler.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def git_sha(override: str = "") -> str:
    if override:
        return str(override)
    env = os.environ.get("PROFILER_GIT_SHA")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def command_line() -> str:
    return "python -m profiler " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def finalize_row(row: dict, prov: dict) -> dict:
    """Fills provenance, serialises dict columns, moves non-schema keys into `extra`."""
    out = {k: row.get(k) for k in schema.COLUMNS}
    extra = {k: v for k, v in row.items() if k not in schema.COLUMNS}
    if row.get("extra"):
        extra.update(json.loads(row["extra"]) if isinstance(row["extra"], str) else row["extra"])
    out["extra"] = json.dumps(extra, sort_keys=True, default=str) if extra else None
    if isinstance(out.get("engine_settings"), dict):
        out["engine_settings"] = schema.settings_json(out["engine_settings"])
    for k, v in prov.items():
        if out.get(k) is None:
            out[k] = v
    out["status"] = out.get("status") or "ok"
    out["measured_at"] = out.get("measured_at") or now_iso()
    return out


def done_keys(path: Path) -> set:
    if not path.exists():
        return set()
    df = schema.read_table(path)
    return {schema.point_key(r) for _, r in df.iterrows()}


def table_for(cfg, model: str, backend: str | None = None) -> Path:
    """<out_dir>/<gpu>/<model>.parquet for a measuring backend (vLLM, diffusers); vLLM-Omni tables
    sit in <gpu>-vllm-omni/ beside them; the analytic backend writes <gpu_spec>-analytic/
    (roofline) or <gpu_spec>-est/ (analytic.method=scaled: estimates from a measured table).
    sim.engines.latency reads measured, estimated, analytic, in that order of preference. A
    tensor-parallel sweep (tp > 1) of a measuring backend writes its own set <gpu>-tp<N>/, so TP
    rows never mix with the one-GPU grid the simulator reads."""
    backend = backend or str(cfg.backend)
    if backend == "vllm_omni":
        gpu = f"{cfg.gpu}-vllm-omni"
    elif backend != "analytic":
        gpu = str(cfg.gpu)
    else:
        method = str((cfg.get("analytic") or {}).get("method", "roofline"))
        gpu = f"{cfg.gpu_spec}-{'est' if method == 'scaled' else 'analytic'}"
    tp = int(getattr(cfg, "tp", 1) or 1)
    if tp > 1 and backend != "analytic":
        gpu = f"{gpu}-tp{tp}"
    return schema.table_path(cfg.out_dir, gpu, model)


def seed_unquantized(spec, path: Path) -> int:
    """A precision variant's new table starts with the measured rows of its base model's
    components that the variant does not quantize (a DiT's VAE and text encoders stay bf16):
    the same modules, so the same latencies; `extra.copied_from` says where they come from, and
    the sweep then skips those points. Returns the rows copied (0: not a variant, table exists,
    or no base table beside it)."""
    from profiler.models import QUANTIZED
    base = path.parent / f"{spec.base}.parquet"
    if spec.name == spec.base or path.exists() or not base.exists():
        return 0
    df = schema.read_table(base)
    keep = df[(df["status"] == "ok") & df["component"].notna() & ~df["component"].isin(QUANTIZED)].copy()
    if keep.empty:
        return 0
    keep["model"] = spec.name
    keep["extra"] = [json.dumps({**(json.loads(e) if isinstance(e, str) and e else {}),
                                 "copied_from": f"{base.name} (component not quantized)"})
                     for e in keep["extra"]]
    schema.write_table(keep, path)
    return len(keep)


def run_sweep(cfg, log: Callable[[str], None] = print,
              fault_injector: Callable[[dict], None] | None = None,
              spec_loader: Callable[[str], Any] = load_model) -> dict[str, Any]:
    """Runs the configured sweep; returns {model: {"path", "planned", "measured", ...}}."""
    t_start = time.monotonic()
    budget = float(cfg.max_minutes or 0) * 60.0
    stop = (lambda: time.monotonic() - t_start > budget) if budget > 0 else (lambda: False)
    backends: dict[str, Any] = {}
    device = str(cfg.device)
    models = list(cfg.models) if not isinstance(cfg.models, str) else [cfg.models]
    stages = set(cfg.stages or [])
    summary: dict[str, Any] = {}
    for name in models:
        spec = spec_loader(name)
        bname = backend_for(str(cfg.backend), spec.family)
        if bname not in backends:
            backends[bname] = get_backend(bname)
            if hasattr(backends[bname], "configure"):
                backends[bname].configure(cfg)
        backend = backends[bname]
        pts = backend.plan(spec, cfg.grid)
        if stages:
            pts = [p for p in pts if p["stage"] in stages]
        for p in pts:                     # the point key carries the TP size it is measured at
            p["tp"] = int(getattr(cfg, "tp", 1) or 1)
        path = table_for(cfg, name, bname)
        if bname != "analytic" and not cfg.dry_run:
            seed_unquantized(spec, path)
        have = done_keys(path) if cfg.resume else set()
        todo = [p for p in pts if schema.point_key(p) not in have]
        info = {"path": str(path), "planned": len(pts), "already": len(pts) - len(todo),
                "measured": 0, "oom": 0, "error": 0, "stopped": False}
        summary[name] = info
        log(f"[profiler] {name}: backend={bname} planned={len(pts)} "
            f"done={info['already']} todo={len(todo)} -> {path}")
        if cfg.dry_run:
            for p in todo:
                log("  " + " ".join(f"{k}={v}" for k, v in p.items() if v is not None and not k.startswith("_")))
            continue
        if not todo:
            continue
        if stop():
            info["stopped"] = True
            break
        if not cfg.resume and path.exists():
            path.unlink()
        import importlib
        try:
            torch_version = importlib.import_module("torch").__version__
        except Exception:
            torch_version = "none"
        prov = {"engine": backend.name, "engine_version": backend.engine_version(),
                "torch_version": torch_version, "gpu": backend.gpu_name(device),
                # the weights' dtype of a precision variant (activations stay in cfg.dtype)
                "dtype": spec.quant_dtype or str(cfg.dtype), "tp": int(cfg.tp), "git_sha": git_sha(cfg.git_sha),
                "command": command_line()}
        ctx = RunContext(cfg=cfg, device=device, should_stop=stop, done_keys=have, log=log,
                         fault_injector=fault_injector)
        bar = None
        if cfg.progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=len(todo), desc=name, unit="pt", file=sys.stderr,
                           mininterval=2.0, disable=not sys.stderr.isatty())
            except Exception:
                bar = None
        pending: list[dict] = []
        flush_every = int(getattr(backend, "flush_every", 1))
        try:
            for row in backend.iter_rows(spec, todo, ctx):
                row = finalize_row(row, prov)
                pending.append(row)
                if len(pending) >= flush_every:
                    schema.append_rows(path, pending)
                    pending = []
                _report(row, info, log, t_start, bar)
        finally:
            if pending:  # a crash or Ctrl-C still keeps every finished point
                schema.append_rows(path, pending)
        if bar is not None:
            bar.close()
        if hasattr(backend, "release"):
            backend.release()
        if stop():
            info["stopped"] = True
            log(f"[profiler] time budget of {cfg.max_minutes} min reached; stopping cleanly")
            break
    return summary


def _report(row: dict, info: dict, log, t_start: float, bar) -> None:
    st = row.get("status", "ok")
    key = "measured" if st == "ok" else st
    info[key] = info.get(key, 0) + 1
    lat = row.get("latency_ms_median")
    axes = " ".join(f"{k}={row[k]}" for k in ("stage", "component", "batch_size", "num_tokens",
                    "context_len", "num_decode_seqs", "height", "width", "seq_len")
                    if row.get(k) is not None)
    log(f"  [{time.monotonic() - t_start:6.0f}s] {axes} -> {st}"
        + (f" {lat:.3f} ms" if lat is not None and st == "ok" else f" ({row.get('error')})"))
    if bar is not None:
        bar.update(1)
