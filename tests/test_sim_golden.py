"""Golden fixed-seed runs: a 300-request default-mix run per policy on the synthetic profile
tables (tests/conftest.py), seed 0, compared with tests/golden/golden_summary.json to a relative
tolerance of 1e-9 -- every key of summary.json (per task, per stage, utilization, layout,
autoscaler moves, token rates), not only the headline figures; the same run through the
large-run recording path (keep_rows=0) must match it too; plus determinism, seed sensitivity,
and common random numbers across policies.

A golden mismatch means the simulator's numbers changed. If the change is intended (a policy,
engine or workload change, or a change to the synthetic tables in conftest.py), regenerate the
file from the repo root and commit it with the change that caused it:

    REGEN_GOLDEN=1 python -m pytest -q tests/test_sim_golden.py

(the regenerating run rewrites the file and skips the comparison). Review the diff of
tests/golden/golden_summary.json: it shows which numbers moved and by how much.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_cfg, rel_close
from sim.run.runner import Run
from sim.policies import POLICIES as POLICY_CONFIGS

GOLDEN = Path(__file__).resolve().parent / "golden" / "golden_summary.json"
POLICIES = tuple(POLICY_CONFIGS)
VOLATILE = ("sim_wall_s",)      # wall-clock time: not a simulated figure
N = 300
REGEN = os.environ.get("REGEN_GOLDEN") == "1"


def golden_cfg(profiles, policy: str, seed: int = 0):
    return make_cfg(profiles, {"policy.name": policy, "seed": seed, "workload.num_requests": N})


@pytest.fixture(scope="module")
def golden_runs(synthetic_profiles, tmp_path_factory):
    out = {}
    for pol in POLICIES:
        d = tmp_path_factory.mktemp(f"golden_{pol}")
        s = Run(golden_cfg(synthetic_profiles, pol), d).run()
        out[pol] = (s, d)
    return out


def flat(x, prefix: str = "", root: str | None = None) -> dict:
    """A summary as {dotted.key: leaf value} (lists by index); `root` (the run's profiles_dir, a
    temporary folder) is written as <profiles_dir> in the table paths the summary names."""
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not prefix and k in VOLATILE:
                continue
            out.update(flat(v, f"{prefix}{k}.", root))
        return out
    if isinstance(x, list):
        out = {}
        for i, v in enumerate(x):
            out.update(flat(v, f"{prefix}{i}.", root))
        return out or {prefix[:-1]: []}
    if root and isinstance(x, str):
        x = x.replace(root, "<profiles_dir>")
    return {prefix[:-1]: x}


def differences(got: dict, want: dict, label: str) -> list[str]:
    bad = [f"{label}.{k}: missing (golden {want[k]!r})" for k in want if k not in got]
    bad += [f"{label}.{k}: not in golden ({got[k]!r})" for k in got if k not in want]
    for k in sorted(set(got) & set(want)):
        a, b = got[k], want[k]
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        if numbers and not rel_close(float(a), float(b), 1e-9):
            bad.append(f"{label}.{k}: {a!r} vs golden {b!r} (rel {abs(a - b) / max(abs(b), 1e-300):.2e})")
        elif not numbers and a != b:
            bad.append(f"{label}.{k}: {a!r} vs golden {b!r}")
    return bad


def test_golden_summary(golden_runs, synthetic_profiles):
    got = {pol: flat(s, root=str(synthetic_profiles)) for pol, (s, _) in golden_runs.items()}
    if REGEN:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        doc = {"_about": f"{N}-request default-mix run per policy, seed 0, synthetic profile tables "
                         "of tests/conftest.py, every summary key flattened; regenerate: "
                         "REGEN_GOLDEN=1 python -m pytest -q tests/test_sim_golden.py",
               **got}
        GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    assert GOLDEN.exists(), f"{GOLDEN} missing: run REGEN_GOLDEN=1 python -m pytest -q {__file__}"
    want = json.loads(GOLDEN.read_text())
    bad = []
    for pol in POLICIES:
        assert pol in want, f"golden file lacks policy {pol}"
        bad += differences(got[pol], want[pol], pol)
    assert not bad, ("simulated numbers changed (if intended, regenerate with REGEN_GOLDEN=1, "
                     "see the module docstring):\n  " + "\n  ".join(bad[:40]))


@pytest.mark.parametrize("policy", ["modality_aware"])
def test_large_run_recording_path_matches_golden(synthetic_profiles, golden_runs, policy):
    """keep_rows=0 (what every run past 20,000 requests does for the rest, and bench runs do for
    all): requests are recorded without their row (MetricsCollector._record_fast); the summary
    must be the golden one, key for key."""
    r = Run(golden_cfg(synthetic_profiles, policy), keep_rows=0)
    assert r.requests is None
    s = r.run()
    bad = differences(flat(s), flat(golden_runs[policy][0]), policy)
    assert not bad, "\n  ".join(bad[:40])


def test_golden_runs_are_complete_and_sane(golden_runs):
    for pol, (s, d) in golden_runs.items():
        assert s["completed"] == N and s["policy"] == pol
        assert s["duration"] > 0 and s["request_throughput"] == pytest.approx(N / s["duration"])
        assert s["p99_e2el_ms"] >= s["mean_e2el_ms"] > 0
        assert s["latency_model"]["out_of_grid_lookups"] == {}
        assert s["latency_model"]["engines"] and all(
            v == ["synthetic"] for v in s["latency_model"]["engines"].values())
        df = pd.read_parquet(d / "requests.parquet")
        assert len(df) == N and sorted(df["id"]) == list(range(N))
        assert json.loads((d / "summary.json").read_text())["completed"] == N


def _strip(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in ("sim_wall_s",)}


@pytest.mark.parametrize("policy", POLICIES)
def test_deterministic(synthetic_profiles, golden_runs, policy):
    """The same config twice (fresh Run objects) gives an identical summary and identical
    per-request times."""
    s2 = Run(golden_cfg(synthetic_profiles, policy)).run()
    assert _strip(golden_runs[policy][0]) == _strip(s2)


def test_deterministic_per_request(synthetic_profiles):
    runs = []
    for _ in range(2):
        r = Run(golden_cfg(synthetic_profiles, "modality_aware"))
        r.run()
        runs.append({q.id: (q.arrival, q.first_token, q.finish, len(q.stages)) for q in r.requests})
    a, b = runs
    assert a.keys() == b.keys()
    for i in a:
        assert repr(a[i]) == repr(b[i]), i


@pytest.mark.parametrize("policy", POLICIES)
def test_seeds_differ(synthetic_profiles, golden_runs, policy):
    s0 = golden_runs[policy][0]
    s1 = Run(golden_cfg(synthetic_profiles, policy, seed=1)).run()
    assert s1["completed"] == N
    assert s0["mean_e2el_ms"] != s1["mean_e2el_ms"]
    assert s0["duration"] != s1["duration"]


def test_policies_see_identical_arrivals(golden_runs):
    """Common random numbers: every policy is fed the same requests (arrival, task, sizes)."""
    cols = ["id", "arrival", "task", "model", "prompt_tokens", "output_tokens", "input_h",
            "input_w", "output_h", "output_w", "steps", "cfg", "image_tokens_in"]
    frames = {pol: pd.read_parquet(d / "requests.parquet").sort_values("id").reset_index(drop=True)
              for pol, (_, d) in golden_runs.items()}
    ref = frames["baseline"][cols]
    for pol, df in frames.items():
        pd.testing.assert_frame_equal(df[cols], ref, check_exact=True, obj=f"{pol} vs baseline")
    # ...but they serve them differently
    e2e = {pol: df["e2el_ms"].to_numpy() for pol, df in frames.items()}
    assert not (e2e["baseline"] == e2e["disaggregated"]).all()
