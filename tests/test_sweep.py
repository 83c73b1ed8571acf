"""Sweeps: `python -m sim.tools.gather` on a tiny fake multirun dir, and the per-run result cache
(a second run of the same config into the same directory reuses summary.json)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from sim.tools.gather import gather, main as gather_main

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
            "layout": {"replicas": {"qwen_image": 1}}, "config_sha": f"abc{i}"}))
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


def test_cache_skips_second_run(synthetic_profiles, tmp_path):
    out = tmp_path / "run"
    args = [f"profiles_dir={synthetic_profiles}", "workload.num_requests=60",
            f"hydra.run.dir={out}", "output.progress=off"]
    p1 = sim(*args)
    assert p1.returncode == 0, p1.stderr
    s1 = json.loads((out / "summary.json").read_text())
    assert len(s1["config_sha"]) == 64 and "cached:" not in p1.stdout
    m1 = (out / "summary.json").stat().st_mtime_ns
    m1p = (out / "requests.parquet").stat().st_mtime_ns
    p2 = sim(*args)                                   # same config, same dir: reused
    assert p2.returncode == 0, p2.stderr
    assert "cached:" in p2.stdout and "not re-simulated" in p2.stdout
    assert (out / "summary.json").stat().st_mtime_ns == m1
    assert (out / "requests.parquet").stat().st_mtime_ns == m1p
    p3 = sim(*args[:-1], "output.progress=off", "seed=1")   # another config: simulated again
    assert p3.returncode == 0, p3.stderr
    assert "cached:" not in p3.stdout
    s3 = json.loads((out / "summary.json").read_text())
    assert s3["config_sha"] != s1["config_sha"] and s3["seed"] == 1


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
    assert sorted(df["override.seed"]) == ["0", "1"] and df["config_sha"].nunique() == 2
