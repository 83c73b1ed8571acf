"""The analysis notebooks execute headless on a SMALL sweep (MMSIM_SMALL=1, synthetic profile
tables) and write their PNGs (into a temp MMSIM_FIG_DIR, so the committed figures stay)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
EXPECTED = {
    "compare_policies.ipynb": ["latency_cdf_8gpu.png", "qps_latency_8gpu.png",
                               "slo_attainment_8gpu.png", "utilization_8gpu.png",
                               "stage_breakdown_8gpu.png", "stage_occupancy_8gpu.png",
                               "cost_by_policy.png", "scale_comparison.png"],
    "capacity_planning.ipynb": ["capacity_probes.png"],
    "theory_vs_sim.ipynb": ["theory_vs_sim.png", "analytic_stages.png"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes(name, synthetic_profiles, tmp_path, monkeypatch):
    figs = tmp_path / "figures"
    monkeypatch.setenv("MMSIM_SMALL", "1")
    monkeypatch.setenv("MMSIM_PROFILES", str(synthetic_profiles))
    monkeypatch.setenv("MMSIM_FIG_DIR", str(figs))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for k in ("MMSIM_HEADLINE_DIR", "MMSIM_CAPACITY_JSON"):
        monkeypatch.delenv(k, raising=False)
    nb = nbformat.read(ANALYSIS / name, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ANALYSIS)}}).execute()
    wall = time.perf_counter() - t0
    missing = [f for f in EXPECTED[name] if not (figs / f).is_file() or (figs / f).stat().st_size == 0]
    assert not missing, f"{name} did not write {missing}; wrote {sorted(p.name for p in figs.glob('*'))}"
    assert wall < 60, f"{name} took {wall:.0f} s"
