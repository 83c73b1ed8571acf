"""The compiled hot path (sim/compiled.py: built by `pip install`, or `python -m sim.tools.compile`).
Skipped unless it has been built: then the hot modules must really be the compiled ones, and fixed-seed runs must
give the pure-Python results bit for bit (the pure run imports a copy of the sources without
the extension modules, in a subprocess)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sim.policies import POLICIES
from sim.compiled import HOT, ROOT as REPO
from sim.tools.compile import compiled_modules

MODS = compiled_modules()
pytestmark = pytest.mark.skipif(not any(f.endswith(".so") for f in MODS.values()),
                                reason="compiled hot path not built (python -m sim.tools.compile)")

# one fixed-seed run per policy on the shipped H100 tables, requests.parquet + summary.json
RUN = """
import sys
from pathlib import Path
import sim.core.gpu
from sim.tools.bench import make_config
from sim.policies import POLICIES
from sim.run.runner import Run
assert sim.core.gpu.__file__.endswith(sys.argv[3]), sim.core.gpu.__file__
out = Path(sys.argv[1])
for policy in POLICIES:
    cfg = make_config("mixed_8gpu", policy, int(sys.argv[2]), str(Path(sys.argv[4])))
    cfg.output.write_requests = True
    Run(cfg, out / policy, keep_rows=0).run()
"""


def test_hot_modules_are_compiled():
    assert set(MODS) == {m[:-3].replace("/", ".") for m in HOT}
    for name, f in MODS.items():
        assert f.endswith(".so"), f"{name} is not compiled ({f}): rebuild with python -m sim.tools.compile"


def test_compiled_modules_find_the_repository():
    """Paths a compiled module derives at import (REPO_ROOT: relative profiles_dir and traces)."""
    from sim.run.runner import REPO_ROOT
    assert REPO_ROOT == REPO and (REPO_ROOT / "conf" / "config.yaml").is_file()


def _run(root: Path, out: Path, suffix: str) -> None:
    p = subprocess.run([sys.executable, "-c", RUN, str(out), "1500", suffix,
                        str(REPO / "traces" / "profiles")],
                       cwd=root, env={"PYTHONPATH": str(root), "OPENBLAS_NUM_THREADS": "1",
                                      "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def test_compiled_runs_equal_pure_runs_bit_for_bit(tmp_path):
    pure = tmp_path / "pure_src"
    for pkg in ("sim", "profiler", "analysis", "conf"):
        shutil.copytree(REPO / pkg, pure / pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    _run(pure, tmp_path / "pure", ".py")
    _run(REPO, tmp_path / "compiled", ".so")
    for policy in POLICIES:
        a = pd.read_parquet(tmp_path / "pure" / policy / "requests.parquet")
        b = pd.read_parquet(tmp_path / "compiled" / policy / "requests.parquet")
        assert len(a) == 1500
        assert list(a.columns) == list(b.columns) and (a.dtypes == b.dtypes).all()
        assert a.equals(b), policy          # every float identical (NaN where NaN)
        sa, sb = (json.loads((tmp_path / d / policy / "summary.json").read_text())
                  for d in ("pure", "compiled"))
        sa.pop("sim_wall_s"), sb.pop("sim_wall_s")
        assert sa == sb, policy
