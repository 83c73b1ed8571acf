"""`python -m sim.tools.bench` smoke test: tiny request counts (--scale), one line per scenario in the
documented format. (Jump-ahead exactness is covered by tests/test_sim_properties.py.)"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import qwen_vl_rows, write_synthetic_profiles
from profiler.schema import write_table

REPO_ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^scenario=(\S+) policy=(\S+) requests=(\d+) gpus=(\d+) requests_per_s=(\d+) "
                  r"events_per_s=(\d+) wall_s=([\d.]+) peak_rss_mb=(\d+) build=(compiled|pure|pure-stale)$")


def test_bench_quick_smoke(tmp_path):
    prof = write_synthetic_profiles(tmp_path / "prof")
    write_table(pd.DataFrame(qwen_vl_rows("qwen2_5_7b")), prof / "h100" / "qwen2_5_7b.parquet")
    p = subprocess.run([sys.executable, "-m", "sim.tools.bench", "--quick", "--scale", "0.005",
                        "--profiles-dir", str(prof)], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2, p.stdout
    got = [LINE.match(ln) for ln in lines]
    assert all(got), lines
    assert [(m.group(1), m.group(2), m.group(3), m.group(4)) for m in got] == [
        ("llm_1gpu", "baseline", "250", "1"), ("mixed_8gpu", "baseline", "100", "8")]
    for m in got:
        assert int(m.group(5)) > 0 and int(m.group(6)) > 0 and int(m.group(8)) > 0
