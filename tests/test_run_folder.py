"""A run's folder and its result cache, through `python -m sim` as a user runs it: a saved result
is reused only for the same code, config and input files (and then printed as a fresh one);
an edited trace or source constant gives a fresh run; the off switch; a folder never mixes two
runs; default folders are unique; a second run into a busy folder waits; Ctrl-C and SIGTERM end
with one line and leave no partial file; result files are readable by others."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock

from sim.run import folder as F

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACE = REPO_ROOT / "traces" / "workloads" / "example_mixed.csv"


def sim(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None,
        timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def table_lines(stdout: str) -> list[str]:
    """The printed summary table and report line (what a fresh and a reused run share)."""
    return [ln for ln in stdout.splitlines() if not ln.startswith("reused:")]


def summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


@pytest.fixture
def trace(tmp_path) -> Path:
    p = tmp_path / "trace.csv"
    df = pd.read_csv(TRACE).head(120)
    df.to_csv(p, index=False)
    return p


def args(profiles: Path, trace: Path, out: Path, *more: str) -> list[str]:
    return [f"profiles_dir={profiles}", f"workload.path={trace}", f"hydra.run.dir={out}", *more]


def test_hit_prints_the_same_table_and_keeps_the_files(synthetic_profiles, trace, tmp_path):
    out = tmp_path / "run"
    p1 = sim(*args(synthetic_profiles, trace, out))
    assert p1.returncode == 0, p1.stderr
    assert "reused:" not in p1.stdout
    s1 = summary(out)
    assert len(s1["run_key"]) == 64 and len(s1["provenance"]["code_sha"]) == 64
    assert set(s1["provenance"]["inputs"]) >= {str(trace)}
    mtimes = {f: (out / f).stat().st_mtime_ns for f in F.RESULT_FILES if (out / f).exists()}
    assert set(mtimes) == {"summary.json", "requests.parquet", "timeline.parquet", "report.html"}
    p2 = sim(*args(synthetic_profiles, trace, out))
    assert p2.returncode == 0, p2.stderr
    assert p2.stdout.count("reused:") == 1
    assert table_lines(p2.stdout) == table_lines(p1.stdout)       # the same table, line by line
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes
    # the off switch: config key and environment variable
    p3 = sim(*args(synthetic_profiles, trace, out, "output.cache=false"))
    assert p3.returncode == 0 and "reused:" not in p3.stdout
    assert (out / "summary.json").stat().st_mtime_ns != mtimes["summary.json"]
    p4 = sim(*args(synthetic_profiles, trace, out), env={**os.environ, "MMSERVE_SIM_NO_CACHE": "1"})
    assert p4.returncode == 0 and "reused:" not in p4.stdout
    assert summary(out)["run_key"] == s1["run_key"]                # same computation, same key


def test_edited_trace_and_source_constant_give_fresh_results(synthetic_profiles, trace, tmp_path):
    """The key covers the content of the inputs and the package sources: run from a copy of
    the code, edit one trace cell, then one source constant; each edit is simulated anew."""
    code = tmp_path / "code"
    for d in ("sim", "profiler", "conf"):
        shutil.copytree(REPO_ROOT / d, code / d,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    df = pd.read_csv(trace)
    df["arrival_time"] += 2e8          # a clock far from 0: shifted to start at 0 (EPOCH_THRESHOLD_S)
    df.to_csv(trace, index=False)
    out = tmp_path / "run"
    run = lambda: sim(*args(synthetic_profiles, trace, out), cwd=code)  # noqa: E731
    p = run()
    assert p.returncode == 0, p.stderr
    first = summary(out)
    assert first["duration"] < 1e4
    assert "reused:" in run().stdout                                  # unchanged: reused

    df.loc[0, "prompt_tokens"] += 1000                                # edit one trace cell
    df.to_csv(trace, index=False)
    p = run()
    assert p.returncode == 0 and "reused:" not in p.stdout, p.stdout
    edited = summary(out)
    assert edited["total_input_tokens"] == first["total_input_tokens"] + 1000
    assert edited["run_key"] != first["run_key"]
    assert edited["provenance"]["code_sha"] == first["provenance"]["code_sha"]
    assert "reused:" in run().stdout

    src = code / "sim" / "workloads" / "trace.py"                    # edit one source constant
    text, n = re.subn(r"^EPOCH_THRESHOLD_S = \S+", "EPOCH_THRESHOLD_S = 1e9", src.read_text(),
                      flags=re.M)
    assert n == 1, "the constant this test edits has moved"
    src.write_text(text)
    p = run()
    assert p.returncode == 0 and "reused:" not in p.stdout, p.stdout
    rebuilt = summary(out)
    assert rebuilt["provenance"]["code_sha"] != edited["provenance"]["code_sha"]
    assert rebuilt["duration"] > 2e8           # arrivals no longer shifted: the new code ran


def test_interrupted_run_of_another_config_leaves_no_old_results(synthetic_profiles, trace, tmp_path):
    out = tmp_path / "run"
    assert sim(*args(synthetic_profiles, trace, out)).returncode == 0
    assert (out / "summary.json").exists()
    p = subprocess.Popen([sys.executable, "-m", "sim", f"profiles_dir={synthetic_profiles}",
                          f"hydra.run.dir={out}", "workload.num_requests=400000"],
                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_temp_file(out, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert sorted(x.name for x in out.iterdir()) == [".hydra"]       # old results went first


def wait_for_temp_file(out: Path, p: subprocess.Popen, limit_s: float = 120) -> None:
    """Until the run is writing (its requests.parquet temp file exists)."""
    t0 = time.monotonic()
    while not list(out.glob(F.TEMP_GLOB)):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < limit_s, "the run never started writing"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, rc, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_interrupt_ends_with_one_line_and_no_partial_file(synthetic_profiles, tmp_path, sig, rc, name):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "sim", f"profiles_dir={synthetic_profiles}",
                          f"hydra.run.dir={out}", "workload.num_requests=400000"],
                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_temp_file(out, p)
    p.send_signal(sig)
    o, err = p.communicate(timeout=120)
    assert p.returncode == rc, err
    assert err.splitlines() == [f"interrupted ({name}): no result of this run in {out}"], err
    assert "Traceback" not in o + err
    assert sorted(x.name for x in out.iterdir()) == [".hydra"]


def test_unique_dir_never_reuses_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "_made", {})
    base = str(tmp_path / "outputs" / "12-00-00_baseline")
    a = F.unique_dir(base)
    assert F.unique_dir(base) == a                       # Hydra resolves the name again
    monkeypatch.setattr(F, "_made", {})                  # another process, the same second
    b = F.unique_dir(base)
    assert (a, b) == (base, base + "-2") and Path(b).is_dir()


def test_two_runs_in_the_same_second_get_two_folders(synthetic_profiles, trace, tmp_path):
    """Both started at once with the default folder rule (the same name): two folders, each
    with its own finished result."""
    base = tmp_path / "outputs" / "same"
    cmd = [sys.executable, "-m", "sim", f"profiles_dir={synthetic_profiles}",
           f"workload.path={trace}", "hydra.run.dir=${unique_dir:" + str(base) + "}"]
    ps = [subprocess.Popen(cmd + [f"seed={s}"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    for p in ps:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    dirs = sorted(base.parent.iterdir())
    assert [d.name for d in dirs] == ["same", "same-2"]
    assert sorted(summary(d)["seed"] for d in dirs) == [0, 1]


def test_default_folders_use_unique_dir():
    text = (REPO_ROOT / "conf" / "config.yaml").read_text()
    assert "dir: ${unique_dir:outputs/" in text and "dir: ${unique_dir:multirun/" in text


def test_a_second_run_waits_for_the_folder(synthetic_profiles, trace, tmp_path):
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)
    lock = FileLock(out / F.LOCK)
    lock.acquire()
    p = subprocess.Popen([sys.executable, "-m", "sim", *args(synthetic_profiles, trace, out)],
                         cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()          # blocks until the run reports that it waits
        assert line.startswith(f"waiting: another run is writing {out}"), line
        assert not (out / "summary.json").exists()
    finally:
        lock.release()
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    assert summary(out)["completed"] == 120


def test_result_files_are_readable_by_others(synthetic_profiles, trace, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert sim(*args(synthetic_profiles, trace, out)).returncode == 0
    finally:
        os.umask(old)
    for f in ("summary.json", "requests.parquet", "timeline.parquet", "report.html"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o644, f
