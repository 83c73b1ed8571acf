"""The compiled hot path: which modules mypyc compiles, where the built files live, and which
build this process runs. Standard library only: setup.py loads this file by path at install time.

`pip install` (setup.py) compiles the HOT modules with mypyc into C extension modules next to
their sources (`sim/core/gpu.cpython-311-x86_64-linux-gnu.so`, ...) plus the group's runtime
library `sim/mmsim__mypyc.*.so`, when a C compiler and mypyc are there; otherwise it installs
pure Python and says so in one line. `python -m sim.tools.compile` rebuilds them in place (after
editing a hot module) or removes them (`--clean`). The sources stay the reference: the compiled
modules run the same float operations in the same order (tests/test_compiled.py).

Python imports an extension module before the .py of the same name, so a compiled module older
than its source (edited since the build) would silently run the old code. `import sim` checks
that (a few stat calls): a stale build is set aside for the whole process -- every hot module is
imported from its source -- and one line on stderr says so. MMSERVE_SIM_PURE=1 in the
environment sets a build aside the same way, silently (to compare the builds, or to debug)."""
from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

# the modules whose functions the profile of a large run spends its time in
HOT = (
    "sim/core/kernel.py",
    "sim/core/gpu.py",
    "sim/core/records.py",
    "sim/engines/latency.py",
    "sim/engines/queues.py",
    "sim/engines/ar.py",
    "sim/engines/batch.py",
    "sim/engines/dit.py",
    "sim/engines/pipeline.py",
    "sim/engines/cost.py",
    "sim/engines/omni.py",
    "sim/policies/parts.py",
    "sim/policies/policy.py",
    "sim/policies/routing.py",
    "sim/policies/placement.py",
    "sim/run/metrics.py",
    "sim/run/runner.py",
    "sim/run/sketch.py",
    "sim/workloads/requests.py",
    "sim/workloads/synthetic.py",
)
# third-party modules that compiled classes derive from: the build needs them importable
# (pyproject's build-system requires), else mypyc takes the base for Any and builds on object
BASE_MODULES = ("simpy",)
GROUP = "sim.mmsim"     # the mypyc group: its runtime library is sim/mmsim__mypyc.<suffix>
ROOT = Path(__file__).resolve().parent.parent       # the directory that holds sim/
HOT_MODULES = tuple(m[:-3].replace("/", ".") for m in HOT)


def built_files(root: Path = ROOT) -> list[Path]:
    """The extension modules under sim/ that this interpreter would import (also those of
    modules no longer in HOT), the group's runtime library among them."""
    sfx = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(p for p in (root / "sim").rglob("*.*") if p.name.endswith(sfx))


def _is_runtime(p: Path) -> bool:
    return p.name.startswith(GROUP.rsplit(".", 1)[-1] + "__mypyc.")


def stale_sources(root: Path = ROOT) -> list[str]:
    """Sources edited after their compiled module was built (repository-relative paths)."""
    built = built_files(root)
    # a module's .so is a shim whose code lives in the group's runtime library: a rebuild that
    # leaves the shim unchanged may keep its old time, so the newer of the two counts
    lib = max((p.stat().st_mtime for p in built if _is_runtime(p)), default=0.0)
    out = []
    for so in built:
        if _is_runtime(so):
            continue
        py = so.with_name(so.name.split(".")[0] + ".py")
        if py.exists() and py.stat().st_mtime > max(so.stat().st_mtime, lib):
            out.append(py.relative_to(root).as_posix())
    return out


def up_to_date(root: Path = ROOT) -> bool:
    """A complete build in place: every HOT module and the group's runtime library compiled,
    none older than its source."""
    built = built_files(root)
    names = {p.relative_to(root).as_posix().split(".")[0] for p in built}
    return (any(_is_runtime(p) for p in built) and all(m[:-3] in names for m in HOT)
            and not stale_sources(root))


class _Sources:
    """A meta path finder that imports the hot modules from their .py files (ahead of the
    extension modules of the same names)."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name not in HOT_MODULES:
            return None
        import importlib.util
        return importlib.util.spec_from_file_location(name, self.root / (name.replace(".", "/") + ".py"))


_state = "unchecked"


def check(root: Path = ROOT) -> str:
    """At `import sim`: set a stale build aside (once per process). Returns the state:
    "compiled", "pure", "stale" (compiled modules set aside) or "forced" (set aside by
    MMSERVE_SIM_PURE)."""
    global _state
    if _state != "unchecked":
        return _state
    if not any(True for _ in built_files(root)):
        _state = "pure"
        return _state
    if os.environ.get("MMSERVE_SIM_PURE", "") not in ("", "0"):
        sys.meta_path.insert(0, _Sources(root))
        _state = "forced"
        return _state
    stale = stale_sources(root)
    if stale:
        sys.meta_path.insert(0, _Sources(root))
        print(f"mmserve-sim: compiled modules are older than {', '.join(stale)}: running pure Python "
              f"(rebuild: python -m sim.tools.compile, or pip install -e . again)", file=sys.stderr)
        _state = "stale"
    else:
        _state = "compiled"
    return _state


def build() -> str:
    """Which build this process runs: "compiled" (every hot module an extension module), "pure",
    "pure-stale" (a stale compiled build set aside), "pure-forced" (set aside by
    MMSERVE_SIM_PURE) or "mixed-<n>/<of>"; hot modules are imported to tell."""
    import importlib
    files = [importlib.import_module(m).__file__ or "" for m in HOT_MODULES]
    n = sum(not f.endswith(".py") for f in files)
    if n == len(files):
        return "compiled"
    if n == 0:
        return {"stale": "pure-stale", "forced": "pure-forced"}.get(_state, "pure")
    return f"mixed-{n}/{len(files)}"
