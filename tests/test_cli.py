"""The `python -m sim` command line (Hydra), run as a subprocess from the repo root with the
synthetic profile tables: smoke runs of every policy (both `+policy=` and bare `policy=`),
multirun sweeps (basic and joblib launchers), and bad input that must end with a non-zero exit
and one clear message (field + allowed values) on stderr, without a Python traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_cfg, rel_close
from sim.run.runner import Run
from sim.policies import POLICIES as POLICY_CONFIGS

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICIES = tuple(POLICY_CONFIGS)
N = 200
VLLM_KEYS = ("duration", "completed", "total_input_tokens", "total_output_tokens",
             "request_throughput", "output_throughput", "total_token_throughput",
             "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
             "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms",
             "median_e2el_ms", "p99_e2el_ms")


def sim(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def base_args(profiles: Path, outdir: Path) -> list[str]:
    return [f"profiles_dir={profiles}", f"workload.num_requests={N}", f"hydra.run.dir={outdir}"]


def check_run_dir(d: Path, policy: str, n: int = N) -> dict:
    s = json.loads((d / "summary.json").read_text())
    missing = [k for k in VLLM_KEYS if k not in s]
    assert not missing, f"summary.json lacks vLLM keys {missing}"
    assert s["policy"] == policy and s["completed"] == n
    assert s["request_throughput"] > 0 and s["total_token_throughput"] >= s["output_throughput"] > 0
    df = pd.read_parquet(d / "requests.parquet")
    assert len(df) == n and df["id"].is_unique and sorted(df["id"]) == list(range(n))
    assert {"arrival", "task", "ttft_ms", "e2el_ms", "finish"} <= set(df.columns)
    return s


@pytest.mark.parametrize("form", ["+policy", "policy"])
@pytest.mark.parametrize("policy", POLICIES)
def test_smoke_each_policy(synthetic_profiles, tmp_path, policy, form):
    out = tmp_path / "run"
    p = sim(f"{form}={policy}", *base_args(synthetic_profiles, out))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    check_run_dir(out, policy)


def test_cli_matches_python_api(synthetic_profiles, tmp_path):
    """The default Hydra composition (conf/config.yaml + workload/mixed_bursty + cluster/h100x8)
    and the schema's defaults describe the same scenario: same summary numbers."""
    out = tmp_path / "run"
    p = sim("+policy=baseline", *base_args(synthetic_profiles, out))
    assert p.returncode == 0, p.stderr
    s_cli = json.loads((out / "summary.json").read_text())
    s_py = Run(make_cfg(synthetic_profiles, {"workload.num_requests": N})).run()
    for k in ("duration", "mean_e2el_ms", "p99_e2el_ms", "median_ttft_ms", "total_input_tokens"):
        assert rel_close(float(s_cli[k]), float(s_py[k]), 1e-9), (k, s_cli[k], s_py[k])


@pytest.mark.parametrize("launcher", [None, "joblib"])
def test_multirun_two_policies(synthetic_profiles, tmp_path, launcher):
    sweep = tmp_path / "sweep"
    args = ["-m", "+policy=baseline,modality_aware", f"profiles_dir={synthetic_profiles}",
            f"workload.num_requests={N}", f"hydra.sweep.dir={sweep}"]
    if launcher:
        args.append(f"hydra/launcher={launcher}")
    p = sim(*args, timeout=240)
    assert p.returncode == 0, p.stderr
    summaries = sorted(sweep.rglob("summary.json"))
    assert len(summaries) == 2, summaries
    got = {check_run_dir(s.parent, json.loads(s.read_text())["policy"])["policy"]
           for s in summaries}
    assert got == {"baseline", "modality_aware"}


# --- bad input ----------------------------------------------------------------------------------

def _bad(p: subprocess.CompletedProcess) -> list[str]:
    assert p.returncode != 0, f"expected failure; stdout:\n{p.stdout}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines, "no message on stderr"
    return lines


def test_negative_rate(synthetic_profiles, tmp_path):
    lines = _bad(sim("workload.arrival.rate=-1", *base_args(synthetic_profiles, tmp_path / "r")))
    assert len(lines) == 1, lines
    assert "workload.arrival.rate" in lines[0] and "allowed" in lines[0] and "> 0" in lines[0]
    assert not (tmp_path / "r" / "summary.json").exists()


def test_unknown_policy(synthetic_profiles, tmp_path):
    # Hydra's own message for an unknown config-group option: it lists the available options
    err = "\n".join(_bad(sim("+policy=nope", *base_args(synthetic_profiles, tmp_path / "r"))))
    assert "policy" in err and "nope" in err
    for name in POLICIES:
        assert name in err, f"message does not list {name}: {err}"


def test_unknown_policy_bare_form(synthetic_profiles, tmp_path):
    err = "\n".join(_bad(sim("policy=nope", *base_args(synthetic_profiles, tmp_path / "r"))))
    assert all(name in err for name in POLICIES), err


def test_unknown_model(synthetic_profiles, tmp_path):
    lines = _bad(sim("workload.task_models.text=nope", *base_args(synthetic_profiles, tmp_path / "r")))
    assert len(lines) == 1, lines
    msg = lines[0]
    assert "workload.task_models.text" in msg and "nope" in msg and "allowed" in msg
    assert "qwen2_5_vl_7b" in msg      # lists the known models


def test_missing_profile(tmp_path):
    empty = tmp_path / "empty_profiles"
    empty.mkdir()
    lines = _bad(sim(*base_args(empty, tmp_path / "r")))
    assert len(lines) == 1, lines
    msg = lines[0]
    assert "qwen2_5_vl_7b" in msg and "h100" in msg and str(empty) in msg
    assert "profile" in msg


def test_trace_missing_columns(synthetic_profiles, tmp_path):
    trace = tmp_path / "bad_trace.csv"
    trace.write_text("task,prompt_tokens,output_tokens\ntext,10,10\ntext,20,5\n")
    lines = _bad(sim("workload.arrival.process=trace", f"workload.trace.path={trace}",
                     *base_args(synthetic_profiles, tmp_path / "r")))
    assert len(lines) == 1, lines
    msg = lines[0]
    assert "arrival" in msg and str(trace) in msg
    assert "arrival_time" in msg       # names the accepted column names


def test_unknown_field_value_choice(synthetic_profiles, tmp_path):
    lines = _bad(sim("diffusion.shape_compat=nope", *base_args(synthetic_profiles, tmp_path / "r")))
    assert len(lines) == 1, lines
    assert "diffusion.shape_compat" in lines[0] and "bucket" in lines[0]
