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

import pytest

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


# --- the install-time build's fallback (setup.py) ------------------------------------------------
# setup.py runs here as pip runs it (`setup.py build_ext --inplace`, the editable install's step)
# on a copy of the sources, with a stand-in `mypyc` package first on the path: its mypycify
# returns two tiny C extension modules named like hot modules (or refuses, or is missing), so
# every way the build can fail is exercised in seconds, with the machine's real compiler or none.

_C_OK = """#include <Python.h>
static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "%s", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_%s(void) { return PyModule_Create(&m); }
"""

_FAKE_BUILD = """import os
from setuptools import Extension
def mypycify(paths, **kw):
    mode = os.environ["FAKE_MYPYC"]
    open("mypycify_called", "w").close()
    if mode == "refuse":
        raise SystemExit(1)
    os.makedirs("fake_c", exist_ok=True)
    for name in ("kernel", "gpu"):
        src = %r %% (name, name) if (name == "kernel" or mode != "broken") else "#error broken"
        with open(f"fake_c/{name}.c", "w") as f:
            f.write(src)
    return [Extension("sim.core.kernel", ["fake_c/kernel.c"]),
            Extension("sim.core.gpu", ["fake_c/gpu.c"])]
""" % _C_OK


def _setup_tree(tmp_path: Path, absent: bool = False) -> tuple[Path, Path]:
    root = _tree(tmp_path)
    shutil.copy(C.ROOT / "setup.py", root / "setup.py")
    shutil.copy(C.ROOT / "pyproject.toml", root / "pyproject.toml")
    fake = tmp_path / "fake" / "mypyc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no mypyc here')\n" if absent else "")
    (fake / "build.py").write_text(_FAKE_BUILD)
    return root, fake.parent


def _build(root: Path, fake: Path, mode: str, cc: str | None = None,
           pure: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(fake), "FAKE_MYPYC": mode}
    env.pop("MMSERVE_SIM_PURE", None)
    if pure:
        env["MMSERVE_SIM_PURE"] = "1"
    if cc is not None:
        env["CC"] = cc
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def _says(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("mmserve-sim:")]


def _have_cc() -> bool:
    return shutil.which(os.environ.get("CC", "cc")) is not None or shutil.which("gcc") is not None


@pytest.mark.parametrize("mode,says", [
    ("absent", "mypyc is not available: pure-Python hot path installed"),
    ("refuse", "mypyc could not translate the hot path"),
])
def test_install_without_mypyc_or_when_it_refuses_is_pure(tmp_path, mode, says):
    root, fake = _setup_tree(tmp_path, absent=mode == "absent")
    p = _build(root, fake, mode)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = _says(p)
    assert len(lines) == 1 and says in lines[0], p.stderr[-2000:]
    assert C.built_files(root) == []


def test_install_where_a_base_class_module_is_missing_is_pure(tmp_path):
    """Without simpy at build time mypyc would build the Kernel on object (no SimPy queue): the
    build must fall back instead (pip's isolated build has only the build requirements)."""
    root, fake = _setup_tree(tmp_path)
    (fake / "simpy").mkdir()
    (fake / "simpy" / "__init__.py").write_text("raise ImportError('no simpy here')\n")
    p = _build(root, fake, "ok")
    assert p.returncode == 0, p.stderr[-2000:]
    lines = _says(p)
    assert lines == ["mmserve-sim: simpy not importable at build time: pure-Python hot path "
                     "installed"], p.stderr[-2000:]
    assert not (root / "mypycify_called").exists() and C.built_files(root) == []


def test_the_build_requirements_hold_every_base_class_module():
    import tomllib
    reqs = tomllib.loads((C.ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs}
    assert set(C.BASE_MODULES) <= names


def test_the_kernel_is_a_simpy_environment():
    """Whichever build runs (compiled or pure), the Kernel is SimPy's Environment."""
    import simpy
    from sim.core.kernel import Kernel
    assert issubclass(Kernel, simpy.Environment)
    assert isinstance(Kernel().agenda.queue, list)


def test_install_without_a_c_compiler_is_pure(tmp_path):
    root, fake = _setup_tree(tmp_path)
    p = _build(root, fake, "ok", cc="/bin/false")
    assert p.returncode == 0, p.stderr[-2000:]
    lines = _says(p)
    assert len(lines) == 1 and "compiling the hot path failed" in lines[0], p.stderr[-2000:]
    assert C.built_files(root) == []


@pytest.mark.skipif(not _have_cc(), reason="no C compiler on this machine")
def test_a_partly_failed_build_leaves_no_compiled_module(tmp_path):
    """A rebuild where one module compiles and the other does not, over an earlier complete
    build: no compiled module may stay (a mixed or stale set would run unnoticed)."""
    root, fake = _setup_tree(tmp_path)
    assert _build(root, fake, "ok").returncode == 0 and len(C.built_files(root)) == 2
    p = _build(root, fake, "broken")
    assert p.returncode == 0, p.stderr[-2000:]
    lines = _says(p)
    assert len(lines) == 1 and "compiling the hot path failed" in lines[0], p.stderr[-2000:]
    assert C.built_files(root) == []


@pytest.mark.skipif(not _have_cc(), reason="no C compiler on this machine")
def test_a_working_compiler_builds_in_place(tmp_path):
    """The same harness with nothing wrong: both modules are built next to their sources (so
    the tests above would see a build that should not have happened)."""
    root, fake = _setup_tree(tmp_path)
    p = _build(root, fake, "ok")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _says(p) == []
    names = sorted(f.name.split(".")[0] for f in C.built_files(root))
    assert names == ["gpu", "kernel"]


def _complete_fake_build(root: Path, at: float) -> list[Path]:
    """Empty files named like a complete build of every HOT module and the runtime library."""
    files = [root / (m[:-3] + SUFFIX) for m in C.HOT] + [root / "sim" / f"mmsim__mypyc{SUFFIX}"]
    for f in files:
        f.write_bytes(b"")
        os.utime(f, (at, at))
    return files


def test_up_to_date_needs_every_module_and_fresh_sources(tmp_path):
    root = _tree(tmp_path)
    assert not C.up_to_date(root)
    files = _complete_fake_build(root, 4_000_000_000)      # (later than any source)
    assert C.up_to_date(root)
    files[3].unlink()                                     # one module missing
    assert not C.up_to_date(root)
    _complete_fake_build(root, 4_000_000_000)
    os.utime(root / C.HOT[0], (4_000_000_001, 4_000_000_001))   # a source edited after
    assert not C.up_to_date(root)


def test_a_reinstall_over_an_up_to_date_build_keeps_it(tmp_path):
    """pip install -e ".[extra]" after the first install: no second translation and compile."""
    root, fake = _setup_tree(tmp_path)
    files = _complete_fake_build(root, 4_000_000_000)
    p = _build(root, fake, "ok")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _says(p) == ["mmserve-sim: the compiled hot path in place is up to date: kept"]
    assert not (root / "mypycify_called").exists()
    assert sorted(C.built_files(root)) == sorted(files)


def test_a_pure_install_removes_an_earlier_build(tmp_path):
    root, fake = _setup_tree(tmp_path)
    _complete_fake_build(root, 4_000_000_000)
    p = _build(root, fake, "ok", pure=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _says(p) == ["mmserve-sim: MMSERVE_SIM_PURE is set: pure-Python hot path installed"]
    assert C.built_files(root) == [] and not (root / "mypycify_called").exists()
