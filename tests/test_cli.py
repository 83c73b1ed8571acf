"""The `python -m sim` command line (Hydra), run as a subprocess from the repo root with the
synthetic profile tables: smoke runs of every policy (both `+policy=` and bare `policy=`),
multirun sweeps (basic and joblib launchers), Hydra's mode-only composition skipped only where
it can only read None (sim.cli.main) and the collector's state at the run's start, and bad input
that must end with a non-zero exit and one clear message (field + allowed values) on stderr,
without a Python traceback."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

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


# --- Hydra's mode-only composition (sim.cli.main) -------------------------------------------------

def _dotted_keys(node: object, prefix: str):
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key
            yield from _dotted_keys(v, key)


def test_no_config_sets_hydra_mode():
    """sim.cli.main answers Hydra.get_mode with None without composing on the premise that no
    config under conf/ sets hydra.mode (nor the schema has a hydra node): each file's keys, under
    the package it is merged at, name no hydra.mode."""
    from sim.config import SimConfig
    conf = REPO_ROOT / "conf"
    found = []
    for p in sorted(conf.rglob("*.yaml")):
        text = p.read_text()
        group = "" if p.parent == conf else p.parent.relative_to(conf).as_posix().replace("/", ".")
        m = re.search(r"^#\s*@package\s+(\S+)", text, re.M)
        package = m.group(1) if m else "_group_"      # Hydra >= 1.1: a file's group by default
        package = package.replace("_global_", "").replace("_group_", group).strip(".")
        keys = _dotted_keys(yaml.safe_load(text), package)
        found += [f"{p.relative_to(REPO_ROOT)}: {k}" for k in keys if k == "hydra.mode"]
    assert found == []
    assert "hydra" not in SimConfig.__dataclass_fields__
    assert (conf / "experiment" / "capacity.yaml").is_file()    # the scan saw the experiments


@pytest.mark.parametrize("argv,unset", [
    (["+experiment=replay_vllm_bench", "model=m", "hydra.run.dir=/tmp/x", "hydra/launcher=joblib",
      "hydra.job.chdir=false"], True),
    (["--run", "seed=1"], True),
    (["-m", "seed=0,1"], False),
    (["--multirun", "seed=0,1"], False),
    (["--multi", "seed=0,1"], False),                 # argparse's abbreviation of --multirun
    (["seed=1", "hydra.mode=MULTIRUN"], False),
    (["+hydra.mode=RUN"], False),
    (["++hydra.mode=RUN"], False),
    (["~hydra.mode"], False),
    (["hydra={mode:MULTIRUN}"], False),
    (["hydra.searchpath=[file:///elsewhere]"], False),
    (["--config-dir", "/elsewhere"], False),
    (["-cp", "/elsewhere"], False),
    (["--config-name", "other"], False),
])
def test_mode_is_unset_only_for_a_plain_run(argv, unset):
    from sim.cli import mode_is_unset
    assert mode_is_unset(argv) is unset


# the sim command with Hydra.get_mode's composition reported on stderr (the one composition that
# does not validate sweep overrides); with force, sim.cli.main composes it on every command line
SPY = """
import sys
import hydra._internal.hydra as h
compose = h.Hydra.compose_config
def spy(self, *a, **k):
    if k.get("validate_sweep_overrides") is False:
        print("MODE COMPOSITION", file=sys.stderr)
    return compose(self, *a, **k)
h.Hydra.compose_config = spy
if {force}:
    import sim.cli
    sim.cli.mode_is_unset = lambda argv: False
sys.argv = ["sim"] + {args!r}
import sim.__main__
sim.__main__.main()
"""


def spied_sim(*args: str, force: bool = False) -> tuple[subprocess.CompletedProcess, int]:
    p = subprocess.run([sys.executable, "-c", SPY.format(args=list(args), force=force)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    return p, p.stderr.count("MODE COMPOSITION")


@pytest.mark.parametrize("extra,composed", [([], 0), (["hydra.mode=RUN"], 1), (["-m"], 1)],
                         ids=["plain", "hydra.mode", "multirun"])
def test_the_mode_composition_is_skipped_only_for_a_plain_run(synthetic_profiles, tmp_path,
                                                              extra, composed):
    out, sweep = tmp_path / "run", tmp_path / "sweep"
    _, n = spied_sim("+policy=baseline", *base_args(synthetic_profiles, out),
                     f"hydra.sweep.dir={sweep}", *extra)
    assert n == composed
    check_run_dir(sweep / "0_baseline" if "-m" in extra else out, "baseline")


def test_a_plain_run_writes_what_it_wrote_with_the_mode_composition(synthetic_profiles, tmp_path):
    """Skipping the composition changes nothing a run writes or prints: Hydra's .hydra/ files,
    summary.json (less its wall time) and the printed table."""
    out = tmp_path / "run"
    made = {}
    for force in (False, True):
        p, n = spied_sim("+policy=baseline", *base_args(synthetic_profiles, out), force=force)
        assert n == int(force)
        made[force] = (p.stdout, out.rename(tmp_path / f"force_{force}"))
    (stdout, a), (stdout_forced, b) = made[False], made[True]
    assert stdout == stdout_forced
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        assert (a / ".hydra" / name).read_text() == (b / ".hydra" / name).read_text(), name
    assert "mode: RUN" in (a / ".hydra" / "hydra.yaml").read_text()

    def summary(d: Path) -> dict:
        s = json.loads((d / "summary.json").read_text())
        return {k: v for k, v in s.items() if k != "sim_wall_s"}
    assert summary(a) == summary(b)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_a_run_starts_with_nothing_frozen(synthetic_profiles, tmp_path):
    """sim.__main__ freezes the imported program out of the cyclic GC while Hydra composes the
    config; hydra_main unfreezes it, so the run's own GC tuning (sim.run.gc_control) applies."""
    code = f"""
import gc, sys
import sim.cli
execute = sim.cli.execute
def spy(*a, **k):
    print("FROZEN", gc.get_freeze_count(), gc.isenabled())
    return execute(*a, **k)
sim.cli.execute = spy
sys.argv = ["sim", "+policy=baseline", *{base_args(synthetic_profiles, tmp_path / "run")!r}]
import sim.__main__
sim.__main__.main()
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr
    assert "FROZEN 0 True" in p.stdout.splitlines()


@pytest.mark.parametrize("report", ["false", "true"])
def test_a_replay_imports_no_pandas(tmp_path, report):
    """A single run imports only what it needs: replaying a `vllm bench serve` result -- the
    trace, the profile tables, the simulation, summary.json and requests.parquet, and with
    output.report=true timeline.parquet and report.html (matplotlib) -- loads no pandas (0.3 s
    of a small run's start-up)."""
    code = f"""
import atexit, sys
atexit.register(lambda: print("PANDAS", "pandas" in sys.modules))
sys.argv = ["sim", "+experiment=replay_vllm_bench", "model=qwen2_5_7b",
            "workload.path=traces/validation/h100/qwen2_5_7b__poisson_low.json.gz",
            "output.report={report}", "hydra.run.dir={tmp_path / 'run'}"]
import sim.__main__
sim.__main__.main()
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "summary.json").is_file()
    assert (tmp_path / "run" / "requests.parquet").is_file()
    for made in ("timeline.parquet", "report.html"):
        assert (tmp_path / "run" / made).is_file() == (report == "true"), made
    assert p.stdout.splitlines()[-1] == "PANDAS False"


def test_hydra_main_leaves_a_callers_frozen_set_alone():
    """Only what sim.__main__ froze is unfrozen by the run: a caller's own gc.freeze() stays."""
    import gc
    import sim.cli
    assert sim.cli.FROZEN_AT_IMPORT is False       # (this process did not start as `python -m sim`)
    gc.freeze()
    try:
        n = gc.get_freeze_count()
        with pytest.raises(BaseException):
            sim.cli.hydra_main.__wrapped__(None)   # the task function itself, no config: fails
        assert gc.get_freeze_count() == n > 0
    finally:
        gc.unfreeze()


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
