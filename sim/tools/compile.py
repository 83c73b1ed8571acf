"""Opt-in compiled hot path: `python -m sim.tools.compile [--clean] [--list]`.

Compiles the simulator's hot-path modules (HOT below) with mypyc into C extension modules
placed next to their .py files (`sim/core/gpu.cpython-311-x86_64-linux-gnu.so`, ...) plus one
shared runtime library `mmsim__mypyc.*.so` at the repository root. Python imports an
extension module before the .py of the same name, so every later `python -m sim ...` (from
the repository root, or through the editable install) runs the compiled code; the sources
are unchanged and stay the reference. `--clean` removes the built files (back to pure
Python). Needs a C compiler, the Python headers and `pip install "mypy[mypyc]"`; the default
install never compiles anything (the built files are git-ignored).

Same results bit for bit (tests/test_compiled.py): the compiled modules run the same float
operations in the same order.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from sim.run.build_guard import GROUP, REPO, built_files

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
    "sim/policies/parts.py",
    "sim/policies/policy.py",
    "sim/policies/routing.py",
    "sim/policies/placement.py",
)


def compiled_modules() -> dict[str, str]:
    """{module: __file__} of the HOT modules as imported now (an .so file when compiled)."""
    import importlib
    mods = {}
    for m in HOT:
        name = m[:-3].replace("/", ".")
        mods[name] = importlib.import_module(name).__file__ or ""
    return mods


def clean() -> int:
    n = 0
    for p in built_files():
        p.unlink()
        n += 1
    shutil.rmtree(REPO / "build" / "mypyc", ignore_errors=True)   # C sources, objects
    print(f"removed {n} compiled module files")
    return 0


def build() -> int:
    try:
        from mypyc.build import mypycify
    except ImportError:
        print('mypyc is missing: python -m pip install "mypy[mypyc]"', file=sys.stderr)
        return 1
    from setuptools import Distribution
    os.chdir(REPO)
    t0 = time.perf_counter()
    for p in built_files():                 # stale modules (one dropped from HOT) must go
        p.unlink()
    # imported modules that are not compiled (simpy, numpy, pandas, sim.config...) are only
    # read for their types; untyped third-party ones count as Any
    flags = ["--ignore-missing-imports", "--follow-imports=silent"]
    exts = mypycify(flags + list(HOT), opt_level="3", group_name=GROUP, target_dir="build/mypyc")
    dist = Distribution({"name": "mmsim-compiled", "ext_modules": exts})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = "build/mypyc/temp"
    cmd.build_lib = "build/mypyc/lib"
    cmd.parallel = os.cpu_count() or 1
    dist.run_command("build_ext")
    for p in built_files():                 # the build time, for check_fresh
        os.utime(p)
    print(f"compiled {len(HOT)} modules in {time.perf_counter() - t0:.1f} s")
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
            print(f"{name}: {'compiled' if f.endswith('.so') else 'pure'} ({f})")
        return 0
    return build()


if __name__ == "__main__":
    sys.exit(main())
