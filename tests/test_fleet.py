"""The fleet plan (sim/studies/fleet.py): policy x GPU x precision x split, cheapest fleet and
runner-up per dimension, measured vs estimated tables labelled, analytic figures alongside."""
from __future__ import annotations

import json

import pytest

from conftest import make_cfg
from profiler.schema import read_table, write_table
from sim.studies import fleet as F
from sim.studies.capacity import ProbeRunner, format_result, run_capacity


@pytest.fixture(scope="module")
def profiles(synthetic_profiles, tmp_path_factory):
    """The synthetic h100 tables (measured) and an h200-est set: the same tables at 0.6x the
    latency, engine = analytic (an estimate)."""
    root = tmp_path_factory.mktemp("fleet_profiles")
    for m in ("qwen2_5_vl_7b", "qwen_image"):
        df = read_table(synthetic_profiles / "h100" / f"{m}.parquet")
        write_table(df, root / "h100" / f"{m}.parquet")
        est = df.copy()
        est["engine"] = "analytic"
        for c in ("latency_ms_median", "latency_ms_p10", "latency_ms_p90"):
            est[c] *= 0.6
        write_table(est, root / "h200-est" / f"{m}.parquet")
    return root


def _cfg(profiles, **over):
    return make_cfg(profiles, {"experiment": "capacity", "workload.num_requests": 200,
                               "capacity.num_requests": 200, "capacity.target_qps": 1.0,
                               "capacity.slo_p99_ms": 60000.0, "capacity.n_jobs": 1,
                               "capacity.max_gpus": 64, "capacity.max_drain_factor": None,
                               "capacity.min_throughput_ratio": None, **over})


def test_candidates_skip_split_for_replicas(profiles):
    cfg = _cfg(profiles, **{"capacity.policies": ["baseline", "disaggregated"],
                            "capacity.gpus": ["h100", "h200"], "capacity.pd_split": [False, True]})
    got = {c.label for c in F.candidates(cfg)}
    assert got == {"baseline/h100/bf16", "baseline/h200/bf16", "disaggregated/h100/bf16",
                   "disaggregated/h200/bf16", "disaggregated/h100/bf16/split",
                   "disaggregated/h200/bf16/split"}


def test_fleet_plan_picks_cheapest_and_labels_tables(profiles, tmp_path):
    cfg = _cfg(profiles, **{"capacity.policies": ["baseline", "disaggregated"],
                            "capacity.gpus": ["h100", "h200"], "capacity.pd_split": [False, True]})
    runner = ProbeRunner(cfg, n_jobs=1)
    res = F.plan_fleet(cfg, runner)
    rows = {r["label"]: r for r in res["candidates"]}
    assert all(r["found"] for r in rows.values())
    # the answer is each candidate's min GPUs: one fewer misses the SLO (when probed)
    for r in rows.values():
        c = next(c for c in F.candidates(cfg) if c.label == r["label"])
        assert runner.cache[(c, r["num_gpus"], 1.0)]["meets_slo"]
        below = runner.cache.get((c, r["num_gpus"] - 1, 1.0))
        assert below is None or not below["meets_slo"]
        assert r["usd_per_hour"] == pytest.approx(r["num_gpus"] * cfg.cost.usd_per_gpu_hour[r["gpu"]])
        assert r["tables"] == ("measured" if r["gpu"] == "h100" else "estimated")
        assert r["bound_gpus"] >= 1 and r["memory"]["qwen2_5_vl_7b"]["kv_capacity_tokens_used"] > 0
    best = res["best"]
    assert best["usd_per_hour"] == min(r["usd_per_hour"] for r in rows.values())
    for d, ru in res["runner_up"].items():
        other = [r for r in rows.values() if r[d] != best[d]]
        assert ru["usd_per_hour"] == min(r["usd_per_hour"] for r in other)
        assert rows[ru["label"]][d] != best[d]
    text = F.format_fleet(res)
    assert "cheapest:" in text and "runner-up on gpu" in text
    if best["tables"] != "measured":
        assert "NOT MEASURED" in text
    paths = F.write_outputs(res, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_h200_memory_gives_more_kv(profiles):
    cfg = _cfg(profiles, **{"capacity.policies": ["baseline"], "capacity.gpus": ["h100", "h200"]})
    v = {c.gpu: F.analytic_view(cfg, c) for c in F.candidates(cfg)}
    k1 = v["h100"]["memory"]["qwen2_5_vl_7b"]["kv_capacity_tokens_model"]
    k2 = v["h200"]["memory"]["qwen2_5_vl_7b"]["kv_capacity_tokens_model"]
    from profiler.models import load_model
    assert k2 - k1 == pytest.approx(60 * 2**30 * 0.9 / load_model("qwen2_5_vl_7b").kv_bytes_per_token(), abs=2)


def test_run_capacity_writes_fleet_outputs(profiles, tmp_path):
    cfg = _cfg(profiles, **{"capacity.policies": ["baseline"], "capacity.gpus": ["h100"],
                            "capacity.precisions": ["bf16"]})
    res = run_capacity(cfg, tmp_path)
    assert res["plan"] == "fleet"
    assert json.loads((tmp_path / "capacity.json").read_text())["best"]["label"] == "baseline/h100/bf16"
    assert (tmp_path / "fleet_plan.png").exists() and "cheapest" in format_result(cfg, res)
