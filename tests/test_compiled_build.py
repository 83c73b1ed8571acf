"""sim/compiled.py, the compiled build's bookkeeping (needs no compiler): which built files are
stale, and that `import sim` sets a stale build aside -- every hot module then comes from its
source, one line on stderr says so -- instead of running code older than the sources."""
from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import sim.compiled as C

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]      # e.g. .cpython-311-x86_64-linux-gnu.so


def _tree(tmp_path: Path) -> Path:
    """A copy of the sources without any built file."""
    root = tmp_path / "src"
    for pkg in ("sim", "profiler", "conf"):
        shutil.copytree(C.ROOT / pkg, root / pkg,
                        ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    return root


def _fake_build(root: Path, built_at: float, lib_at: float) -> tuple[Path, Path]:
    """Empty files named like the compiled ar module and the group's runtime library."""
    so = root / "sim" / "engines" / f"ar{SUFFIX}"
    lib = root / "sim" / f"mmsim__mypyc{SUFFIX}"
    for p, t in ((so, built_at), (lib, lib_at)):
        p.write_bytes(b"")
        os.utime(p, (t, t))
    os.utime(root / "sim" / "engines" / "ar.py", (2_000, 2_000))
    return so, lib


def test_stale_sources(tmp_path):
    root = _tree(tmp_path)
    assert C.built_files(root) == [] and C.stale_sources(root) == []
    so, lib = _fake_build(root, 1_000, 1_500)
    assert C.built_files(root) == sorted([so, lib])
    assert C.stale_sources(root) == ["sim/engines/ar.py"]
    # rebuilt after the edit: the code is in the runtime library, the module's shim may keep
    # its old time
    os.utime(lib, (3_000, 3_000))
    assert C.stale_sources(root) == []
    os.utime(so, (3_000, 3_000))
    os.utime(lib, (1_000, 1_000))
    assert C.stale_sources(root) == []


def test_a_stale_build_is_set_aside_at_import(tmp_path):
    root = _tree(tmp_path)
    _fake_build(root, 1_000, 1_500)
    code = ("import sim.engines.ar as a, sim.compiled as c, sim.core.gpu as g; "
            "print(a.__file__); print(g.__file__); print(c.build())")
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    # (the empty .so would fail to import: only the fallback to the sources gets here)
    assert p.returncode == 0, p.stderr[-2000:]
    ar, gpu, build = p.stdout.split("\n")[:3]
    assert ar == str(root / "sim" / "engines" / "ar.py") and gpu.endswith("gpu.py")
    assert build == "pure-stale"
    assert p.stderr.count("\n") == 1 and "older than sim/engines/ar.py: running pure Python" in p.stderr


def test_no_built_files_is_the_pure_build(tmp_path):
    root = _tree(tmp_path)
    code = "import sim.compiled as c; print(c.check(), c.build())"
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert p.returncode == 0 and p.stdout.split() == ["pure", "pure"] and p.stderr == ""
