"""The guard of the opt-in compiled build (sim/tools/compile.py): a run refuses to start on a
compiled module older than its source, where Python would silently import the .so and run the
old code in place of the edited .py."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GROUP = "mmsim"         # the mypyc group: its runtime library is REPO/mmsim__mypyc.*.so


def built_files() -> list[Path]:
    """Every extension module under sim/ (also of modules no longer compiled) and the runtime."""
    return sorted((REPO / "sim").rglob("*.so")) + sorted(REPO.glob(f"{GROUP}__mypyc.*.so"))


_fresh_checked = False


def check_fresh() -> None:
    """Refuse to simulate with a compiled module older than its source. Once per process."""
    global _fresh_checked
    if _fresh_checked:
        return
    stale = []
    built = built_files()
    # a module's .so is a shim whose code lives in the group's runtime library: a rebuild that
    # leaves the shim unchanged may keep its old time, so the newer of the two counts
    lib = max((p.stat().st_mtime for p in built if p.name.startswith(f"{GROUP}__mypyc.")), default=0.0)
    for so in built:
        py = so.with_name(so.name.split(".")[0] + ".py")
        if py.exists() and py.stat().st_mtime > max(so.stat().st_mtime, lib):
            stale.append(str(py.relative_to(REPO)))
    if stale:
        raise RuntimeError(f"compiled modules are older than their sources {stale}: rebuild them "
                           f"with `python -m sim.tools.compile`, or go back to pure Python with "
                           f"`python -m sim.tools.compile --clean`")
    _fresh_checked = True
