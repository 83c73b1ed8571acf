"""sim.studies.capacity: the searches find known answers; the experiment runs end to end."""
from __future__ import annotations

import json
import math

import pytest

from sim.studies import capacity as C
from sim.config import ConfigError, SimConfig


def _answer(gen, ok):
    try:
        pts = next(gen)
        while True:
            pts = gen.send({p: ok(p) for p in pts})
    except StopIteration as e:
        return e.value


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("answer", [1, 2, 7, 37, 64, 65, 1000])
def test_min_gpus_search_finds_threshold(k, answer):
    assert _answer(C.min_gpus_search(1, 4096, k, 100), lambda n: n >= answer) == answer


def test_min_gpus_search_none_when_max_fails():
    assert _answer(C.min_gpus_search(1, 50, 2, 100), lambda n: n >= 51) is None
    assert _answer(C.min_gpus_search(1, 50, 2, 100), lambda n: n >= 50) == 50


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("answer", [0.3, 4.0, 13.7, 250.0])
def test_max_rate_bisection(k, answer):
    lo, hi = _answer(C.max_rate_search(4.0, k, 0.02, 200), lambda r: r <= answer)
    assert lo <= answer < hi
    assert hi - lo <= 0.02 * hi


def _erlang_c_p99_wait(c: int, lam: float, mu: float) -> float:
    """p99 waiting time of M/M/c (inf when unstable)."""
    a = lam / mu
    if a >= c:
        return math.inf
    s = sum(a ** k / math.factorial(k) for k in range(c))
    top = a ** c / math.factorial(c) * c / (c - a)
    pw = top / (s + top)
    if pw <= 0.01:
        return 0.0
    return math.log(pw / 0.01) / (c * mu - lam)


def test_search_on_queueing_model_matches_brute_force():
    """Monotone p99 vs servers (M/M/c): doubling + bisection = exhaustive minimum."""
    lam, mu, slo = 30.0, 1.0, 0.05
    ok = lambda n: _erlang_c_p99_wait(n, lam, mu) <= slo  # noqa: E731
    brute = next(n for n in range(1, 200) if ok(n))
    for k in (1, 2, 4):
        assert _answer(C.min_gpus_search(1, 1024, k, 100), ok) == brute
    # and the max rate 40 servers sustain, by bisection on lambda
    lo, hi = _answer(C.max_rate_search(1.0, 2, 0.01, 200), lambda r: _erlang_c_p99_wait(40, r, mu) <= slo)
    assert _erlang_c_p99_wait(40, lo, mu) <= slo < _erlang_c_p99_wait(40, hi, mu)


def test_drive_runs_searches_in_lockstep():
    calls = []

    def evaluate(batch):
        calls.append(len(batch))
        return [x >= 9 if key == "a" else x <= 5.0 for key, x in batch]

    out = C.drive({"a": C.min_gpus_search(1, 64, 2), "b": C.max_rate_search(1.0, 2, 0.05)}, evaluate)
    assert out["a"] == 9
    lo, hi = out["b"]
    assert lo <= 5.0 < hi
    assert max(calls) == 4          # both searches' points went out together


def test_capacity_config_validation():
    cfg = SimConfig()
    cfg.capacity.target_qps = 0
    with pytest.raises(ConfigError, match="capacity.target_qps"):
        cfg.check()
    cfg = SimConfig()
    cfg.capacity.policies = ["baseline", "nope"]
    with pytest.raises(ConfigError, match="capacity.policies"):
        cfg.check()


def test_capacity_end_to_end(cfg_factory, tmp_path):
    cfg = cfg_factory()
    cap = cfg.capacity
    cfg.experiment = "capacity"
    cap.target_qps, cap.slo_p99_ms = 1.0, 60000.0
    cap.policies = ["baseline", "modality_aware"]
    cap.num_requests, cap.max_gpus, cap.num_gpus = 120, 32, 4
    cap.max_probes, cap.qps_rel_tol, cap.n_jobs = 12, 0.25, 2
    res = C.run_capacity(cfg, tmp_path)
    out = C.format_table(res)
    assert "min GPUs" in out and "baseline" in out
    saved = json.loads((tmp_path / "capacity.json").read_text())
    assert saved["results"].keys() == {"baseline", "modality_aware"}
    probes = {(p["policy"], p["num_gpus"], p["rate"]): p for p in res["probes"]}
    for pol, r in res["results"].items():
        n = r["min_gpus"]["num_gpus"]
        assert n is not None and 1 <= n <= 32
        assert probes[(pol, n, 1.0)]["meets_slo"]
        below = probes.get((pol, n - 1, 1.0))
        assert n == 1 or below is None or not below["meets_slo"]
        assert r["min_gpus"]["layout"]           # from summary['layout']
        mq = r["max_qps"]
        assert mq["num_gpus"] == 4
        if mq["max_qps"]:
            assert probes[(pol, 4, mq["max_qps"])]["meets_slo"]


def test_trace_workload_refused(cfg_factory):
    cfg = cfg_factory()
    cfg.workload.arrival.process = "trace"
    with pytest.raises(ConfigError, match="gamma or mmpp"):
        C.set_rate(cfg, 2.0)


def test_drain_guard():
    cap = SimConfig().capacity
    cap.slo_p99_ms, cap.max_drain_factor = 1000.0, 3.0
    ok = {"p99_e2el_ms": 900.0, "drain_s": 2.0}
    assert C.meets(ok, cap, 1.0)
    assert not C.meets(dict(ok, drain_s=3.5), cap, 1.0)      # backlog hidden by the p99
    cap.max_drain_factor = None
    assert C.meets(dict(ok, drain_s=3.5), cap, 1.0)
    assert not C.meets({"error": "too few GPUs"}, cap, 1.0)


def test_throughput_guard():
    cap = SimConfig().capacity
    cap.slo_p99_ms = 1000.0
    ok = {"p99_e2el_ms": 900.0, "drain_s": 0.5, "window_throughput_ratio": 0.97}
    assert C.meets(ok, cap, 1.0)
    assert not C.meets(dict(ok, window_throughput_ratio=0.7), cap, 1.0)   # sustained overload
    cap.min_throughput_ratio = None
    assert C.meets(dict(ok, window_throughput_ratio=0.7), cap, 1.0)
