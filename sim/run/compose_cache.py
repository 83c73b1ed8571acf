"""Hydra's composition of a plain run's command line, reused for the identical composition.

Hydra composes `python -m sim ...` into one DictConfig in about 0.13 s (the defaults tree, the
YAML files, the override grammar, the merges into sim.config's schema), and registering that
schema in Hydra's ConfigStore takes 0.04 s more: a third of a small run's process. The result
depends only on what goes into the composition, so it is kept (pickled, a few tens of KB) under
a key over all of it:
- the command line's config name, overrides and run mode, and the working directory;
- the versions of Python, hydra-core and omegaconf (Hydra's own configs and schema);
- the simulator's code and conf/ (`sim.run.cache.code_sha`: sim.config's schema among it);
- every config source on Hydra's search path, by content: each file:// directory and pkg://
  package, and the hydra_plugins packages (whose code registers structured configs);
- the same for any further source named by a config's `hydra.searchpath`: a composition whose
  config sets it is not kept (that source is known only once composed).
A composition that raised, or warned, is not kept either (a reuse would not warn again).
Interpolations (`${now:...}`, `${unique_dir:...}`, `${oc.env:...}`) are kept unresolved, as
Hydra returns them: they resolve when the run reads them, as after a fresh composition.

Only a plain run uses it (sim.cli.main: no --multirun, no config of its own, no override of
hydra.searchpath); sweeps compose as Hydra does. The entries live in
`$XDG_CACHE_HOME/mmserve-sim/compose/` (default `~/.cache/...`; `MMSERVE_SIM_CACHE_DIR`
moves them), the newest KEEP of them; MMSERVE_SIM_NO_CACHE=1 composes every time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from sim.run.cache import CACHE_ENV, code_sha

DIR_ENV = "MMSERVE_SIM_CACHE_DIR"
KEEP = 64          # entries kept (the newest by use)


def cache_dir() -> Path:
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]) / "compose"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmserve-sim" / "compose"


def enabled() -> bool:
    return os.environ.get(CACHE_ENV, "") in ("", "0")


def _hash_tree(h: Any, root: Path) -> None:
    """Every file under `root` (bytecode caches aside), by relative path and content."""
    if root.is_file():
        h.update(root.read_bytes())
        return
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")


def _source_dirs(path: str) -> list[Path]:
    """The directories a search-path entry reads: file://DIR, pkg://PACKAGE (structured://, the
    ConfigStore, is code: the key's versions and code_sha)."""
    if path.startswith("file://"):
        return [Path(path[len("file://"):])]
    if path.startswith("pkg://"):
        spec = importlib.util.find_spec(path[len("pkg://"):].replace("/", "."))
        return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return []


def compose_key(search_path: list[tuple[str, str]], config_name: str | None,
                overrides: list[str], run_mode: Any, from_shell: bool,
                validate_sweep_overrides: bool) -> str:
    """The key of one composition: sha256 over everything it reads (the module docstring)."""
    import hydra
    import omegaconf
    h = hashlib.sha256()
    h.update(repr((sys.version, hydra.__version__, omegaconf.__version__, code_sha(), os.getcwd(),
                   config_name, list(overrides), str(run_mode), from_shell,
                   validate_sweep_overrides, search_path)).encode())
    plugins = importlib.util.find_spec("hydra_plugins")
    dirs = [d for _, path in search_path for d in _source_dirs(path)]
    dirs += [Path(p) for p in (plugins.submodule_search_locations or [])] if plugins else []
    for d in dirs:
        h.update(str(d).encode() + b"\0")
        if d.exists():
            _hash_tree(h, d)
    return h.hexdigest()


def _read(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            cfg = pickle.load(f)
        os.utime(path)                          # (KEEP keeps the newest by use)
        return cfg
    except FileNotFoundError:
        return None
    except Exception:                           # a damaged or foreign entry: compose again
        return None


def _write(path: Path, cfg: Any) -> None:
    """Atomically (temp file + rename); then the oldest entries beyond KEEP are removed. A cache
    that cannot be written (read-only home, full disk) is only not kept."""
    from sim.run.output import temp_beside
    try:
        tmp = temp_beside(path)                 # (makes the folder)
        try:
            with open(tmp, "wb") as f:
                pickle.dump(cfg, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        entries = sorted(path.parent.glob("*.pkl"), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[:-KEEP]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def caching(load_configuration: Callable[..., Any], before_compose: Callable[[], None]
            ) -> Callable[..., Any]:
    """Hydra's ConfigLoaderImpl.load_configuration, answered from the cache for a key seen
    before; `before_compose` runs before a composition (registers what it needs)."""

    def load(self: Any, config_name: str | None, overrides: list[str], run_mode: Any,
             from_shell: bool = True, validate_sweep_overrides: bool = True) -> Any:
        search_path = [(e.provider, e.path) for e in self.get_search_path().get_path()]
        try:
            key = compose_key(search_path, config_name, overrides, run_mode, from_shell,
                              validate_sweep_overrides)
            path: Path | None = cache_dir() / f"{key}.pkl"
        except (OSError, RuntimeError):         # a source or the home folder unreadable
            path = None
        cfg = _read(path) if path is not None else None
        if cfg is not None:
            return cfg
        before_compose()
        with warnings.catch_warnings(record=True) as caught:    # (the filters still apply)
            cfg = load_configuration(self, config_name, overrides, run_mode,
                                     from_shell=from_shell,
                                     validate_sweep_overrides=validate_sweep_overrides)
        for w in caught:                        # shown as Hydra would have shown them
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        if path is not None and not caught and not cfg.hydra.get("searchpath"):
            _write(path, cfg)
        return cfg

    return load
