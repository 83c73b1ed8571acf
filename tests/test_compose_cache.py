"""sim.run.compose_cache: a plain run's Hydra composition is reused only for the identical
composition, and a reused one makes the same run (files, table, summary) as a fresh one."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sim.run import compose_cache
from sim.run.compose_cache import KEEP, caching, compose_key

REPO_ROOT = Path(__file__).resolve().parents[1]

# `python -m sim` with each composition Hydra really makes reported on stderr
SPY = """
import sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
impl = ConfigLoaderImpl._load_configuration_impl
def spy(self, *a, **k):
    print("COMPOSED", file=sys.stderr)
    return impl(self, *a, **k)
ConfigLoaderImpl._load_configuration_impl = spy
sys.argv = ["sim"] + {args!r}
import sim.__main__
sim.__main__.main()
"""


def spied_sim(cache: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, int]:
    p = subprocess.run([sys.executable, "-c", SPY.format(args=list(args))], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "MMSERVE_SIM_CACHE_DIR": str(cache), **env})
    assert p.returncode == 0, p.stderr
    return p, p.stderr.count("COMPOSED")


def run_args(profiles: Path, out: Path) -> list[str]:
    return ["+policy=baseline", f"profiles_dir={profiles}", "workload.num_requests=50",
            f"hydra.run.dir={out}", "output.cache=false"]


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "compose").glob("*.pkl"))


def test_a_reused_composition_makes_the_same_run(synthetic_profiles, tmp_path):
    """The second identical command composes nothing and writes what the first wrote: Hydra's
    .hydra/ files, summary.json (less its wall time), the printed table."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    made = []
    for i in range(2):
        p, composed = spied_sim(cache, *run_args(synthetic_profiles, out))
        assert composed == (1 if i == 0 else 0)
        made.append((p.stdout, out.rename(tmp_path / f"run{i}")))
    assert len(entries(cache)) == 1
    (out_a, a), (out_b, b) = made
    assert out_a.replace("run0", "") == out_b.replace("run1", "")

    def summary(d: Path) -> dict:
        return {k: v for k, v in json.loads((d / "summary.json").read_text()).items()
                if k != "sim_wall_s"}
    assert summary(a) == summary(b)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        assert (a / ".hydra" / name).read_text() == (b / ".hydra" / name).read_text(), name
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_another_command_line_composes_again(synthetic_profiles, tmp_path):
    cache = tmp_path / "cache"
    spied_sim(cache, *run_args(synthetic_profiles, tmp_path / "a"))
    _, composed = spied_sim(cache, *run_args(synthetic_profiles, tmp_path / "a"), "seed=1")
    assert composed == 1 and len(entries(cache)) == 2


def test_no_reuse_with_the_cache_off_nor_for_a_sweep(synthetic_profiles, tmp_path):
    cache = tmp_path / "cache"
    args = run_args(synthetic_profiles, tmp_path / "a")
    for _ in range(2):
        _, composed = spied_sim(cache, *args, MMSERVE_SIM_NO_CACHE="1")
        assert composed == 1
    assert entries(cache) == []
    _, composed = spied_sim(cache, "-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert composed >= 2 and entries(cache) == []      # the sweep's and its job's


def test_a_damaged_entry_is_composed_again(synthetic_profiles, tmp_path):
    cache = tmp_path / "cache"
    args = run_args(synthetic_profiles, tmp_path / "a")
    spied_sim(cache, *args)
    (entry,) = entries(cache)
    entry.write_bytes(b"not a pickle")
    _, composed = spied_sim(cache, *args)
    assert composed == 1 and entry.read_bytes() != b"not a pickle"


# --- the key -----------------------------------------------------------------------------------

def key(conf: Path, overrides=("a=1",), **kw) -> str:
    args = dict(search_path=[("main", f"file://{conf}"), ("hydra", "pkg://hydra.conf"),
                             ("schema", "structured://")],
                config_name="config", overrides=list(overrides), run_mode="RUN",
                from_shell=True, validate_sweep_overrides=True)
    args.update(kw)
    return compose_key(**args)


def test_the_key_sees_everything_a_composition_reads(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "group").mkdir(parents=True)
    (conf / "config.yaml").write_text("x: 1\n")
    (conf / "group" / "a.yaml").write_text("y: 2\n")
    k0 = key(conf)
    assert key(conf) == k0                                    # deterministic
    (conf / "group" / "a.yaml").write_text("y: 3\n")          # a config file's content
    k1 = key(conf)
    assert k1 != k0
    (conf / "group" / "b.yaml").write_text("z: 0\n")          # a new option in a group
    k2 = key(conf)
    assert k2 != k1
    assert len({k2, key(conf, overrides=("a=2",)), key(conf, config_name="other"),
                key(conf, run_mode="MULTIRUN"), key(conf, from_shell=False),
                key(conf, search_path=[("main", f"file://{conf}")])}) == 6
    monkeypatch.chdir(tmp_path)                              # the working directory
    k3 = key(conf)
    assert k3 != k2
    monkeypatch.setattr(compose_cache, "code_sha", lambda: "edited")   # sim's code or conf/
    k4 = key(conf)
    assert k4 != k3
    import hydra
    monkeypatch.setattr(hydra, "__version__", "0.0.0")       # Hydra's own configs and schema
    assert key(conf) != k4


# --- what is kept ------------------------------------------------------------------------------

class Loader:
    def get_search_path(self):
        class Path_:
            def get_path(self):
                return []
        return Path_()


def test_a_composition_that_warns_or_sets_a_searchpath_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSERVE_SIM_CACHE_DIR", str(tmp_path))
    made = []

    def compose(self, name, overrides, mode, **kw):
        made.append(name)
        if name == "warns":
            warnings.warn("a composition warning")
        return OmegaConf.create({"hydra": {"searchpath": ["file:///x"] if name == "sp" else []}})

    load = caching(compose, lambda: None)
    for name in ("warns", "sp", "plain"):
        for _ in range(2):
            if name == "warns":
                with pytest.warns(UserWarning, match="a composition warning"):
                    load(Loader(), name, [], "RUN")
            else:
                load(Loader(), name, [], "RUN")
    assert made == ["warns", "warns", "sp", "sp", "plain"]
    assert len(entries(tmp_path)) == 1


def test_the_newest_entries_are_kept(tmp_path, monkeypatch):
    """Beyond KEEP entries the least recently used go: those compose again, the others not."""
    monkeypatch.setenv("MMSERVE_SIM_CACHE_DIR", str(tmp_path))
    made = []

    def compose(self, name, *a, **k):
        made.append(name)
        return OmegaConf.create({"hydra": {}, "n": name})

    load = caching(compose, lambda: None)
    for i in range(KEEP + 3):
        load(Loader(), f"c{i}", [], "RUN")
        (e,) = [p for p in entries(tmp_path) if pickle.loads(p.read_bytes()).n == f"c{i}"]
        os.utime(e, (1_000_000 + i, 1_000_000 + i))          # used a second apart
    assert len(entries(tmp_path)) == KEEP and len(made) == KEEP + 3
    assert load(Loader(), f"c{KEEP + 2}", [], "RUN").n == f"c{KEEP + 2}"   # kept
    assert load(Loader(), "c3", [], "RUN").n == "c3"
    assert len(made) == KEEP + 3
    load(Loader(), "c0", [], "RUN")                                        # dropped
    assert made[-1] == "c0" and len(made) == KEEP + 4


def test_a_cache_that_cannot_be_written_only_composes(tmp_path, monkeypatch):
    """A cache folder that cannot be made (here a file stands in its way) costs the reuse, not
    the run: every call composes."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MMSERVE_SIM_CACHE_DIR", str(blocker))
    made = []

    def compose(self, name, *a, **k):
        made.append(name)
        return OmegaConf.create({"hydra": {}})

    load = caching(compose, lambda: None)
    for _ in range(2):
        assert load(Loader(), "c", [], "RUN") == {"hydra": {}}
    assert made == ["c", "c"]
