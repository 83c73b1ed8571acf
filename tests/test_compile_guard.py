"""The compiled build's guard (sim/run/build_guard.py check_fresh): a compiled module older than its
source must stop a run, never silently simulate the old code. Needs no compiler."""
from __future__ import annotations

import os

import pytest

import sim.run.build_guard as SC
from sim.run.runner import Run


def test_stale_compiled_module_stops_the_run(tmp_path, monkeypatch, cfg_factory):
    so = tmp_path / "sim" / "engines" / "ar.cpython-311-x86_64-linux-gnu.so"
    so.parent.mkdir(parents=True)
    so.write_bytes(b"")
    py = so.with_name("ar.py")
    py.write_text("# edited after the build\n")
    os.utime(so, (1_000, 1_000))
    os.utime(py, (2_000, 2_000))
    monkeypatch.setattr(SC, "REPO", tmp_path)
    monkeypatch.setattr(SC, "built_files", lambda: [so])
    monkeypatch.setattr(SC, "_fresh_checked", False)
    with pytest.raises(RuntimeError, match=r"older than their sources \['sim/engines/ar.py'\].*sim.tools.compile"):
        Run(cfg_factory())
    lib = tmp_path / "mmsim__mypyc.cpython-311-x86_64-linux-gnu.so"
    lib.write_bytes(b"")
    os.utime(lib, (1_500, 1_500))
    monkeypatch.setattr(SC, "built_files", lambda: [so, lib])
    with pytest.raises(RuntimeError, match="older than their sources"):
        Run(cfg_factory())
    os.utime(lib, (3_000, 3_000))     # rebuilt after the edit: the code is in the runtime
    Run(cfg_factory())                # library, the module's shim may keep its old time
    assert SC._fresh_checked


def test_no_compiled_modules_is_fine(monkeypatch, cfg_factory):
    monkeypatch.setattr(SC, "built_files", lambda: [])
    monkeypatch.setattr(SC, "_fresh_checked", False)
    Run(cfg_factory())
    assert SC._fresh_checked
