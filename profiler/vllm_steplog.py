"""A vLLM stat-logger plugin that writes one JSON line per engine step of a running `vllm serve`.

Why: the client (`vllm bench serve`) sees HTTP-level TTFT and token gaps, the /metrics histograms
only means and coarse buckets. To check the simulator's step model against the real server we need
the step timeline itself (when each step's outputs reached the API server, how many sequences
produced a token, how many prompts finished prefill, running / waiting counts) and per-request
engine times (queue, prefill, decode) of finished requests.

vLLM loads stat loggers from the entry-point group `vllm.stat_logger_plugins`
(vllm/v1/metrics/loggers.py, vllm/v1/engine/async_llm.py). `install_plugin(dir)` writes a minimal
dist-info with that entry point into `dir`; put `dir` on the server's PYTHONPATH and set
MMSIM_STEPLOG to the output path (profiler/serve_bench.py --steplog does both).

Line format: {"t": time.time() at record, "m": time.monotonic() at record, "gen": tokens produced,
"prompt": prompt tokens of requests whose prefill finished, "pre": preempted requests,
"run"/"wait": scheduler's running / waiting counts, "kv": KV usage, "ttft": [engine TTFTs of
requests whose first token is in this step, s], "fin": [[prompt, gen, queued, prefill, decode,
e2e], ...] of requests finished in this step, "mmq"/"mmh": multimodal-cache queries / hits of the
API server's processor cache since the last record (image runs; absent when there were none)}.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import time
from pathlib import Path
from typing import Optional

ENTRY_GROUP = "vllm.stat_logger_plugins"
DIST = "mmsim_steplog-0.1.dist-info"

try:   # only importable where vLLM is installed (the GPU host); the helpers below need no vLLM
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError:  # pragma: no cover - CPU machines
    StatLoggerBase = object  # type: ignore[assignment,misc]


class StepLogger(StatLoggerBase):  # type: ignore[misc,valid-type]
    def __init__(self, vllm_config=None, engine_index: int = 0):
        path = os.environ.get("MMSIM_STEPLOG")
        self.f = open(path, "a", buffering=1 << 16) if path else None

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if self.f is None:
            return
        try:                      # a logging bug must never take the server's output loop down
            self._record(scheduler_stats, iteration_stats, mm_cache_stats)
        except Exception:  # noqa: BLE001
            pass

    def _record(self, scheduler_stats, iteration_stats, mm_cache_stats=None) -> None:
        rec: dict = {"t": time.time(), "m": time.monotonic()}
        if iteration_stats is not None:
            rec["gen"] = iteration_stats.num_generation_tokens
            rec["prompt"] = iteration_stats.num_prompt_tokens
            rec["pre"] = iteration_stats.num_preempted_reqs
            if iteration_stats.time_to_first_tokens_iter:
                rec["ttft"] = [round(x, 6) for x in iteration_stats.time_to_first_tokens_iter]
            if iteration_stats.finished_requests:
                rec["fin"] = [[r.num_prompt_tokens, r.num_generation_tokens, round(r.queued_time, 6),
                               round(r.prefill_time, 6), round(r.decode_time, 6), round(r.e2e_latency, 6)]
                              for r in iteration_stats.finished_requests]
        if scheduler_stats is not None:
            rec["run"] = scheduler_stats.num_running_reqs
            rec["wait"] = scheduler_stats.num_waiting_reqs
            rec["kv"] = round(scheduler_stats.kv_cache_usage, 4)
        if mm_cache_stats is not None and getattr(mm_cache_stats, "queries", 0):
            rec["mmq"], rec["mmh"] = int(mm_cache_stats.queries), int(mm_cache_stats.hits)
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def log(self):          # called every few seconds by the server: flush what we have
        if self.f is not None:
            self.f.flush()

    def log_engine_initialized(self):
        pass

    def __del__(self):
        try:
            if self.f is not None:
                self.f.close()
        except Exception:  # noqa: BLE001
            pass


def install_plugin(directory: str | Path) -> Path:
    """Write the dist-info that registers StepLogger; returns the directory to put on PYTHONPATH."""
    d = Path(directory) / DIST
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: mmsim-steplog\nVersion: 0.1\n")
    (d / "entry_points.txt").write_text(f"[{ENTRY_GROUP}]\nmmsim_steplog = profiler.vllm_steplog:StepLogger\n")
    return Path(directory)


@functools.lru_cache(maxsize=4)
def _parse(path: str, mtime: float) -> tuple[dict, ...]:
    """All lines of one step log; cached, since every run of a server reads the same file."""
    p = Path(path)
    text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue            # a line cut by a killed server
    return tuple(out)


def gzip_steplog(path: str | Path) -> Optional[Path]:
    """Compress a finished step log next to itself (atomically) and remove the plain file."""
    p = Path(path)
    if not p.exists():
        return None
    dst = p.with_name(p.name + ".gz")
    tmp = dst.with_name(dst.name + ".tmp")
    with open(p, "rb") as src, gzip.open(tmp, "wb") as g:
        g.write(src.read())
    os.replace(tmp, dst)
    p.unlink()
    return dst


def run_steplog(path: str | Path, result: dict) -> list[dict]:
    """The step-log lines recorded during one run: its result file `path` names the log and the
    run's wall-time span in `provenance` (serve_bench --steplog); [] if it has none."""
    prov = result.get("provenance") or {}
    log = resolve_steplog(Path(path).parent, prov.get("steplog"))
    if log is None or not prov.get("wall_span"):
        return []
    return read_steplog(log, *prov["wall_span"])


def resolve_steplog(folder: str | Path, name: Optional[str]) -> Optional[Path]:
    """The step log a result's provenance names, as written (.jsonl) or gzipped after the run."""
    if not name:
        return None
    for cand in (Path(folder) / name, Path(folder) / (name + ".gz")):
        if cand.exists():
            return cand
    return None


def read_steplog(path: str | Path, t0: float | None = None, t1: float | None = None) -> list[dict]:
    """Lines of a step log (plain or .gz), optionally those recorded between wall times t0 and t1."""
    p = Path(path)
    return [r for r in _parse(str(p), p.stat().st_mtime)
            if (t0 is None or r["t"] >= t0) and (t1 is None or r["t"] <= t1)]


def outside_engine_ms(path: str | Path, result: dict) -> list[float]:
    """Per finished request of a run: vLLM's end-to-end time minus its engine-core times (queued,
    prefill, decode), ms: the API-side ingest plus the output path."""
    return [(f[5] - f[2] - f[3] - f[4]) * 1e3 for r in run_steplog(path, result) for f in r.get("fin", ())]
