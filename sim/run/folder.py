"""A run's folder: unique by default, written by one run at a time, never a mix of two runs.

- `unique_dir` (the Hydra resolver `${unique_dir:...}` of conf/config.yaml): the default run and
  sweep folders are named by date, time and policy; a second run started in the same second
  gets `<name>-2`, and so on: the folder is created exclusively when its name is resolved.
- `RunFolder`: while a run writes a folder it holds `.hydra/run.lock` (filelock), so a second
  run into the same folder waits for the first; it removes temp files a killed run left, and,
  before a run that does not reuse the saved result, the previous run's result files, so an
  interrupted run never leaves old results beside a new config.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback

# every file a run writes into its folder (besides Hydra's .hydra/)
RESULT_FILES = ("summary.json", "requests.parquet", "timeline.parquet", "report.html",
                "capacity.json", "fleet_plan.csv", "fleet_plan.png")
TEMP_GLOB = ".*.tmp"            # sim.run.output.temp_beside's names
LOCK = Path(".hydra") / "run.lock"

_made: dict[str, str] = {}
# where this process's command writes ("run" or "sweep" -> folder), for the interrupt message
WRITING: dict[str, Path] = {}


def unique_dir(base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... : the first name not taken, created now. The same
    `base` gives the same folder for the rest of the process (Hydra resolves names again)."""
    if base in _made:
        return _made[base]
    p = Path(base)
    p.parent.mkdir(parents=True, exist_ok=True)
    cand, i = p, 1
    while True:
        try:
            cand.mkdir()
            break
        except FileExistsError:
            i += 1
            cand = p.with_name(f"{p.name}-{i}")
    _made[base] = str(cand)
    return str(cand)


def register_resolver() -> None:
    from omegaconf import OmegaConf
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)


def remove_temps(folder: Path) -> None:
    """Temp files of writers killed before they could clean up (sim.run.output)."""
    for p in folder.glob(TEMP_GLOB):
        p.unlink(missing_ok=True)


class RunFolder:
    """`with RunFolder(outdir):` holds the folder's lock for one run."""

    def __init__(self, outdir: Path):
        self.outdir = Path(outdir)
        self.lock: FileLock | None = None

    def __enter__(self) -> "RunFolder":
        lock = self.outdir / LOCK
        lock.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(lock)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting: another run is writing {self.outdir}", file=sys.stderr, flush=True)
            self.lock.acquire()
        remove_temps(self.outdir)
        return self

    def clear(self) -> None:
        """Remove the previous run's results (called before simulating anew)."""
        for name in RESULT_FILES:
            (self.outdir / name).unlink(missing_ok=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        remove_temps(self.outdir)
        if self.lock is not None:
            self.lock.release()


class WhereCallback(Callback):
    """Hydra callback (conf/config.yaml): notes the run or sweep folder of this command, so an
    interrupted command can clean it and say where it was (sim/__main__.py)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        WRITING["run"] = Path(str(config.hydra.run.dir))

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        WRITING["sweep"] = Path(str(config.hydra.sweep.dir))
