"""Sweeps: `python -m sim.tools.gather` on a tiny fake multirun dir (parquet and comparison
table), a sweep that ends with that table, and an interrupted sweep re-launched into the same
folder that simulates only the runs without a finished result (sim/run/cache.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from sim.run.sweep import comparison_rows, gather
from sim.tools.gather import main as gather_main

REPO_ROOT = Path(__file__).resolve().parents[1]


def fake_sweep(root: Path) -> Path:
    for i, (pol, rate) in enumerate([("baseline", 2.0), ("modality_aware", 4.0)]):
        d = root / f"{i}_{pol}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            f"- +policy={pol}\n- workload.arrival.rate={rate}\n")
        (d / "summary.json").write_text(json.dumps({
            "policy": pol, "completed": 10 + i, "p99_e2el_ms": 100.0 * (i + 1),
            "mean_ttft_ms": None if i else 5.0,
            "per_task": {"text": {"p99_e2el_ms": 7.0 + i}},
            "utilization": {"mean_gpu": 0.5, "per_gpu": {"gpu0": 0.5, "gpu1": 0.5}},
            "layout": {"replicas": {"qwen_image": 1}}, "run_key": f"abc{i}",
            "slo_attainment": 0.5 + 0.25 * i, "median_e2el_ms": 1500.0,
            "latency_model": {"out_of_grid_lookups": {"qwen_image/dit_step": 7} if i else {}}}))
    (root / "2_unfinished" / ".hydra").mkdir(parents=True)     # no summary.json: skipped
    return root


def test_gather_fake_sweep(tmp_path):
    root = fake_sweep(tmp_path / "sweep")
    df = gather(root)
    assert len(df) == 2
    assert list(df["override.policy"]) == ["baseline", "modality_aware"]
    assert list(df["override.workload.arrival.rate"]) == ["2.0", "4.0"]
    assert list(df["p99_e2el_ms"]) == [100.0, 200.0]
    assert list(df["per_task.text.p99_e2el_ms"]) == [7.0, 8.0]
    assert "utilization.mean_gpu" in df and not any(c.startswith("utilization.per_gpu") for c in df)
    assert df["mean_ttft_ms"].isna().tolist() == [False, True]
    out = tmp_path / "g.parquet"
    assert gather_main([str(root), "--out", str(out)]) == 0
    back = pd.read_parquet(out)
    assert len(back) == 2 and back["run_dir"].tolist() == ["0_baseline", "1_modality_aware"]
    assert gather_main([str(tmp_path / "nope")]) == 2


def sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_comparison_table(tmp_path):
    df = gather(fake_sweep(tmp_path / "sweep"))
    head, rows = comparison_rows(df)
    assert head[:3] == ["run", "policy", "workload.arrival.rate"]
    assert "SLO att." in head and "E2EL p99 s" in head and head[-1] == "latency tables"
    i, j = head.index("SLO att."), head.index("E2EL p99 s")
    assert [r[0] for r in rows] == ["0_baseline", "1_modality_aware"]
    assert [r[i] for r in rows] == ["50.0%", "75.0%"]
    assert [r[j] for r in rows] == ["0.10", "0.20"]                # ms -> s
    assert [r[-1] for r in rows] == ["measured grid", "EXTRAPOLATED (7 lookups)"]


def test_sweep_ends_with_the_comparison_table(synthetic_profiles, tmp_path):
    sweep = tmp_path / "sweep"
    p = sim("--multirun", f"profiles_dir={synthetic_profiles}", "workload.num_requests=40",
            f"hydra.sweep.dir={sweep}", "+policy=baseline,modality_aware")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"sweep {sweep}: 2 runs" in out
    rows = [ln for ln in out.splitlines() if "0_baseline" in ln or "1_modality_aware" in ln]
    assert len(rows) == 2 and "modality_aware" in rows[1]
    assert (sweep / "sweep.parquet").is_file()
    assert len(list(sweep.glob("*/report.html"))) == 2


def test_cache_resumes_interrupted_joblib_sweep(synthetic_profiles, tmp_path):
    """An interrupted sweep re-launched into the same sweep dir re-simulates only the runs
    without a finished summary.json; gather then sees every run."""
    sweep = tmp_path / "sweep"
    args = ["--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"profiles_dir={synthetic_profiles}", "workload.num_requests=40",
            "output.progress=off", f"hydra.sweep.dir={sweep}", "seed=0,1"]
    p1 = sim(*args)
    assert p1.returncode == 0, p1.stderr
    runs = sorted(sweep.glob("*/summary.json"))
    assert len(runs) == 2
    runs[1].unlink()                                   # "interrupted" before run 1 finished
    m0 = runs[0].stat().st_mtime_ns
    p2 = sim(*args)
    assert p2.returncode == 0, p2.stderr
    assert runs[0].stat().st_mtime_ns == m0 and runs[1].exists()
    df = gather(sweep)
    assert sorted(df["override.seed"]) == ["0", "1"] and df["run_key"].nunique() == 2
