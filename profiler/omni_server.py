"""One `vllm serve <dir> --omni` process with random weights: folder, plugin, start, stop.

Shared by the serving ground truth (profiler.omni_bench) and the per-stage profiler backend
(profiler.backends.vllm_omni_backend), so both measure the same server: the folder from
profiler.omni_models, the random-weight plugin from profiler.omni_plugin on the server's
PYTHONPATH, the stage log (one JSON line per executed batch) in MMSIM_OMNI_STAGELOG.
"""
from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

from profiler.serve_bench import http_get, stop_group

ROOT = Path(__file__).resolve().parents[1]
HF_OFFLINE_ENV = (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"),
                  ("DO_NOT_TRACK", "1"))

LOG_FACTS = {
    "request_batch_init": r"\[RequestBatch\] engine init max_num_seqs=(\S+) max_wait_ms=(\S+)",
    "attention_backend": r"(?:Using|Defaulting to) diffusion attention backend[^\n]*",
    "model_loading": r"Model loading took ([\d.]+) GiB and ([\d.]+) seconds",
    "compile": r"configured for lazy \w+ torch\.compile[^\n]*",
    "registered": r"Registered diffusion model \S+ -> [^\n]*",
}


def log_facts(text: str) -> dict[str, Any]:
    """A few facts the server log states: the first line matching each pattern (all for
    `registered`), as text."""
    out: dict[str, Any] = {}
    for k, pat in LOG_FACTS.items():
        if k == "registered":
            found = sorted({m.group(0).strip() for m in re.finditer(pat, text)})
            if found:
                out[k] = found
            continue
        m = re.search(pat, text)
        if m:
            out[k] = m.group(0).strip()
    return out


def serve_command(cli: list[str], model_dir: Path, port: int, *, max_num_seqs: Optional[int] = None,
                  request_batch_max_wait_ms: Optional[float] = None, step_execution: bool = False,
                  stage_profiler: bool = True, enforce_eager: bool = False,
                  extra: str = "") -> list[str]:
    """`vllm serve <dir> --omni` with only the flags asked for: everything else stays vLLM-Omni's
    default, which is what the serving ground truth is about."""
    cmd = cli + ["serve", str(model_dir), "--omni", "--host", "127.0.0.1", "--port", str(port)]
    if max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    if request_batch_max_wait_ms is not None:
        cmd += ["--request-batch-max-wait-ms", str(request_batch_max_wait_ms)]
    if step_execution:
        cmd += ["--step-execution"]
    if stage_profiler:
        cmd += ["--enable-diffusion-pipeline-profiler"]
    if enforce_eager:
        cmd += ["--enforce-eager"]
    return cmd + shlex.split(extra or "")


def prepare(served: str, model_dir: Path, staging: Path, shapes: Optional[dict] = None) -> dict[str, Any]:
    """Writes the model folder and the plugin; returns {"manifest", "plugin_dir", "stagelog"}."""
    from profiler.omni_models import write_model_dir
    from profiler.omni_plugin import install_plugin
    staging.mkdir(parents=True, exist_ok=True)
    manifest = write_model_dir(served, model_dir, shapes=shapes)
    plugin_dir = install_plugin(staging / "plugin")
    stagelog = staging / f"stagelog_{served}.jsonl"
    stagelog.unlink(missing_ok=True)
    return {"manifest": manifest, "plugin_dir": plugin_dir, "stagelog": stagelog}


def server_env(plugin_dir: Path, stagelog: Path, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for k, v in HF_OFFLINE_ENV:
        env.setdefault(k, v)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(plugin_dir), str(ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    env["MMSIM_OMNI_STAGELOG"] = str(stagelog)
    return env


def gzip_file(src: Path, dst: Path, remove: bool = False) -> Optional[Path]:
    if not src.exists():
        return None
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        shutil.copyfileobj(f, g)
    if remove:
        src.unlink()
    return dst


class OmniServer:
    """The server process: `start()` waits for /health (raising with the log's path if the
    process exits or the time runs out); `stop()` (also on leaving a `with`) stops the process
    group and gzips the log next to itself."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, port: int,
                 health_timeout: float = 480.0, log: Callable[[str], None] = print) -> None:
        self.cmd, self.env, self.log_path, self.port = cmd, env, Path(log_path), port
        self.health_timeout, self.log = health_timeout, log
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: Optional[subprocess.Popen] = None
        self._logf = None
        self.start_s: Optional[float] = None
        self.facts: dict[str, Any] = {}

    def start(self, ready_by: Optional[float] = None) -> float:
        """Starts the server; returns the seconds to healthy. `ready_by`: a time.monotonic()
        deadline that tightens the health timeout."""
        t0 = time.monotonic()
        limit = t0 + self.health_timeout if ready_by is None else min(t0 + self.health_timeout, ready_by)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log_path, "w")
        self.log("starting: " + shlex.join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.env)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve --omni exited with {self.proc.returncode}; see {self.log_path}")
            if http_get(f"{self.base_url}/health", 2.0)[0] == 200:
                break
            if time.monotonic() > limit:
                raise RuntimeError(f"vllm serve --omni not healthy after {time.monotonic() - t0:.0f} s; "
                                   f"see {self.log_path}")
            time.sleep(2.0)
        self.start_s = round(time.monotonic() - t0, 1)
        self._logf.flush()
        self.facts = log_facts(self.log_path.read_text(errors="replace"))
        return self.start_s

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> Optional[Path]:
        if self.proc is not None:
            stop_group(self.proc)
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        return gzip_file(self.log_path, self.log_path.with_name(self.log_path.name + ".gz"), remove=True)

    def __enter__(self) -> "OmniServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
