"""The per-run result cache: a run folder's saved result is reused only for the same computation.

A run into a folder that already holds a finished result (an interrupted sweep re-launched with
the same `hydra.sweep.dir`, a command re-run with a fixed `hydra.run.dir`) reuses that result
when its `run_key` equals the new run's. The key is a sha256 over
- the code: every source file of the `sim` and `profiler` packages and every YAML file of
  `conf/` (the model registry is read from there), by content;
- the resolved config, less the keys that only change what is displayed (`output.progress`,
  `output.cache`, `output.report`);
- the content of every input file the run reads: the profile tables of every table set it may
  read (measured, estimated, roofline) and the trace it replays.
So an edited source constant, trace cell or profile table gives another key and a fresh run.
`output.cache=false` (or the environment variable MMSERVE_SIM_NO_CACHE=1) always re-simulates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from sim.config import SimConfig
from sim.run.runner import REPO_ROOT, resolve

SOURCE_PACKAGES = ("sim", "profiler")
CACHE_ENV = "MMSERVE_SIM_NO_CACHE"          # set to 1 to always re-simulate
DISPLAY_ONLY = ("progress", "cache", "report")   # output.* keys that do not change a result
RESULT_FILE = {"capacity": "capacity.json"}     # the file that marks a finished run (else summary.json)


def _sha_file(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


@lru_cache(maxsize=None)
def code_sha() -> str:
    """sha256 of the simulator's code: the .py files of sim/ and profiler/ and conf/'s YAML."""
    h = hashlib.sha256()
    files: list[Path] = []
    for pkg in SOURCE_PACKAGES:
        files += (REPO_ROOT / pkg).rglob("*.py")
    files += (REPO_ROOT / "conf").rglob("*.yaml")
    for p in sorted(files):
        h.update(str(p.relative_to(REPO_ROOT)).encode() + b"\0")
        _sha_file(p, h)
        h.update(b"\0")
    return h.hexdigest()


@lru_cache(maxsize=256)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    _sha_file(Path(path), h)
    return h.hexdigest()


def file_sha(path: Path) -> str:
    """sha256 of a file's content (memoised per path, size and mtime within a process)."""
    st = path.stat()
    return _file_sha(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit, for provenance only (the key uses code_sha, which also sees
    uncommitted edits); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def input_files(cfg: SimConfig) -> list[Path]:
    """Every file the run reads besides code and config: the profile tables of every table set
    the latency model may read (measured, estimated, roofline: LatencyModel.table_sets), the
    vLLM-Omni set of the omni engines (diffusion.omni_tables) and, for a trace replay, the trace."""
    from sim.engines.latency import LatencyModel
    cfg.check()
    root, tset = resolve(cfg.profiles_dir), cfg.latency.tables or cfg.cluster.gpu
    sets = [name for name, _ in LatencyModel(root, tset, fallback=cfg.latency.fallback_set(tset)).table_sets()]
    omni = cfg.diffusion.omni_tables.replace("{gpu}", tset)
    if omni:                                # vLLM-Omni's own stage tables (sim.engines.omni)
        sets.append(omni)
    files = sorted(p for d in (root / name for name in sets) if d.is_dir()
                   for p in d.glob("*.parquet"))
    w = cfg.workload
    if w.arrival.process == "trace" and w.trace.path:
        trace = Path(w.trace.path)          # as sim.workloads.trace opens it (from the cwd)
        if trace.is_file():                 # (else the run stops on it before simulating)
            files.append(trace.resolve())
    return files


def _config_dict(cfg: SimConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for k in DISPLAY_ONLY:
        d.get("output", {}).pop(k, None)
    return d


def run_key(cfg: SimConfig) -> tuple[str, dict[str, Any]]:
    """(key, provenance): the key of the computation `cfg` describes, and what it was made of
    (kept in the result as `provenance`, so a reader can tell which code and inputs made it)."""
    inputs = {_display(p): file_sha(p) for p in input_files(cfg)}
    blob = json.dumps({"code": code_sha(), "config": _config_dict(cfg), "inputs": inputs},
                      sort_keys=True, default=str)
    prov = {"code_sha": code_sha(), "git_commit": git_commit(), "inputs": inputs}
    return hashlib.sha256(blob.encode()).hexdigest(), prov


def _display(p: Path) -> str:
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


def enabled(cfg: SimConfig) -> bool:
    return bool(cfg.output.cache) and os.environ.get(CACHE_ENV, "") in ("", "0")


def result_file(cfg: SimConfig, outdir: Path) -> Path:
    return outdir / RESULT_FILE.get(cfg.experiment, "summary.json")


def cached_result(cfg: SimConfig, outdir: Path, key: str) -> dict[str, Any] | None:
    """The saved result in outdir when a finished run of the same key wrote it (and the
    requests.parquet it promised is there), else None."""
    if not enabled(cfg):
        return None
    try:
        s = json.loads(result_file(cfg, outdir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(s, dict) or s.get("run_key") != key:
        return None
    if (cfg.experiment != "capacity" and cfg.output.write_requests
            and not (outdir / "requests.parquet").is_file()):
        return None
    return s
