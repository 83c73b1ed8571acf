"""The compiled hot path, rebuilt or removed in place: `python -m sim.tools.compile [--clean] [--list]`.

`pip install [-e] .` already compiles the hot modules (sim/compiled.py: HOT) with mypyc when a C
compiler is there (setup.py). This rebuilds them in place after a hot module was edited (until
then `import sim` sets the stale build aside and runs pure Python), by the same setup.py build
step; `--clean` removes the compiled files (back to pure Python), `--list` shows which module
this process imports from where. Needs a C compiler, the Python headers and mypyc (`pip install
mypy`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from sim.compiled import HOT_MODULES, ROOT, built_files, stale_sources


def compiled_modules() -> dict[str, str]:
    """{module: __file__} of the hot modules as imported now (an extension module when compiled)."""
    import importlib
    return {m: importlib.import_module(m).__file__ or "" for m in HOT_MODULES}


def clean() -> int:
    n = 0
    for p in built_files() + sorted(ROOT.glob("mmsim__mypyc.*")):   # (+ the old group's runtime)
        p.unlink()
        n += 1
    shutil.rmtree(ROOT / "build" / "mypyc", ignore_errors=True)     # C sources, objects
    print(f"removed {n} compiled module files")
    return 0


def build() -> int:
    t0 = time.perf_counter()
    for p in built_files():                 # stale modules (one dropped from HOT) must go
        p.unlink()
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                       env=dict(os.environ, MMSERVE_SIM_PURE=""))
    names = {f.name.split(".")[0] for f in built_files()}
    missing = [m for m in HOT_MODULES if m.rsplit(".", 1)[-1] not in names]
    if p.returncode or missing:
        print(f"compiling failed (missing: {missing}): pure Python", file=sys.stderr)
        return 1
    for f in built_files():                 # the build time: setuptools may skip unchanged ones
        os.utime(f)
    assert not stale_sources()
    print(f"compiled {len(HOT_MODULES)} modules in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.tools.compile", description=__doc__.split("\n")[0])
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules")
    ap.add_argument("--list", action="store_true", help="show which hot modules are compiled")
    a = ap.parse_args(argv)
    if a.clean:
        return clean()
    if a.list:
        for name, f in compiled_modules().items():
            print(f"{name}: {'pure' if f.endswith('.py') else 'compiled'} ({f})")
        return 0
    return build()


if __name__ == "__main__":
    sys.exit(main())
