"""Closed-loop clients (`workload.max_concurrency`, as `vllm bench serve --max-concurrency`):
never more than N in flight, FIFO sends, work-conserving, and bench results that ran closed
loop replay closed loop."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from sim.config import ArrivalConfig, ConfigError, TraceConfig, WorkloadConfig
from sim.run.runner import Run
from sim.workloads.trace import load_vllm_bench
from sim.workloads import request_source


def text_cfg(cfg_factory, n: int, conc, rate: float = 40.0, seed: int = 0):
    cfg = cfg_factory({"workload.mix": {"text": 1.0}, "workload.num_requests": n,
                       "workload.arrival.rate": rate, "workload.max_concurrency": conc,
                       "cluster.num_gpus": 1, "seed": seed,
                       # the client sees the last token after the step ends: its slot frees then
                       "engine.stream_ms_per_token": 0.5})
    return cfg


def ready_times(cfg) -> dict[int, float]:
    return {r.id: r.arrival for r in request_source(cfg.workload, cfg.seed)}


def in_flight(reqs, t: float) -> int:
    return sum(1 for q in reqs if q.arrival <= t < q.finish)


def test_max_concurrency_must_be_positive():
    with pytest.raises(ConfigError, match="workload.max_concurrency"):
        WorkloadConfig(max_concurrency=0).check()


@pytest.mark.parametrize("conc,seed", [(1, 0), (3, 1), (7, 2)])
def test_limit_fifo_and_work_conserving(cfg_factory, conc, seed):
    cfg = text_cfg(cfg_factory, 60, conc, seed=seed)
    ready = ready_times(cfg)
    r = Run(cfg)
    s = r.run()
    reqs = sorted(r.requests, key=lambda q: q.id)
    assert s["completed"] == 60 and len(reqs) == 60
    held = 0
    for q in reqs:
        assert q.arrival >= ready[q.id]                     # never sent before it is ready
        assert q.first_token >= q.arrival and q.finish >= q.first_token
        assert in_flight(reqs, q.arrival) <= conc
        if q.arrival > ready[q.id]:                         # it waited for a slot ...
            held += 1
            assert in_flight(reqs, ready[q.id]) == conc     # ... because all were taken
            assert any(p.finish == q.arrival for p in reqs)  # and went when one finished
    assert held > 0, "the load never hit the limit: the test checks nothing"
    sends = [q.arrival for q in reqs]
    assert sends == sorted(sends), "sends out of request order (FIFO)"


def test_one_client_is_sequential(cfg_factory):
    cfg = text_cfg(cfg_factory, 30, 1)
    ready = ready_times(cfg)
    r = Run(cfg)
    r.run()
    reqs = sorted(r.requests, key=lambda q: q.id)
    for a, b in zip(reqs, reqs[1:]):
        assert b.arrival == max(ready[b.id], a.finish)


def test_limit_above_the_load_is_open_loop(cfg_factory):
    runs = []
    for conc in (None, 1000):
        r = Run(text_cfg(cfg_factory, 80, conc))
        s = r.run()
        runs.append((s, {q.id: (q.arrival, q.first_token, q.finish) for q in r.requests}))
    assert runs[0][1] == runs[1][1]
    assert runs[0][0]["median_e2el_ms"] == runs[1][0]["median_e2el_ms"]


def bench_json(path, rate, conc, starts):
    n = len(starts)
    path.write_text(json.dumps({"request_rate": rate, "max_concurrency": conc, "start_times": starts,
                                "input_lens": [100] * n, "output_lens": [10] * n,
                                "errors": [""] * n, "ttfts": [0.01] * n,
                                "itls": [[0.005] * 9] * n}))
    return path


def test_bench_replay_brings_its_limit_and_ready_times(tmp_path):
    # rate inf, 2 clients: the client had every request ready once it dispatched the first wave;
    # the later send times waited for the measured server and must not be replayed
    p = bench_json(tmp_path / "c.json", "inf", 2, [10.0, 10.001, 10.5, 10.9, 11.3])
    df = load_vllm_bench(p)
    assert np.allclose(df["arrival"], [0.0, 0.001, 0.001, 0.001, 0.001])
    assert df.max_concurrency == 2
    wcfg = WorkloadConfig(arrival=ArrivalConfig(process="trace"), trace=TraceConfig(path=str(p)))
    w = request_source(wcfg, 0)
    assert w.max_concurrency == 2
    assert [r.arrival for r in w] == pytest.approx([0.0, 0.001, 0.001, 0.001, 0.001])
    wcfg.max_concurrency = 3                                 # an explicit setting wins
    assert request_source(wcfg, 0).max_concurrency == 3
    # open-loop results (no max_concurrency) keep their send times and stay open loop
    p2 = bench_json(tmp_path / "o.json", 4.0, None, [0.0, 0.2, 0.5])
    assert request_source(WorkloadConfig(arrival=ArrivalConfig(process="trace"),
                                   trace=TraceConfig(path=str(p2))), 0).max_concurrency is None
    # a finite rate with a limit: the ready times were not saved; send times are kept, said so
    p3 = bench_json(tmp_path / "f.json", 4.0, 2, [0.0, 0.2, 0.5, 0.9])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        df3 = load_vllm_bench(p3)
    assert any("ready times" in str(x.message) for x in rec)
    assert np.allclose(df3["arrival"], [0.0, 0.2, 0.5, 0.9])
