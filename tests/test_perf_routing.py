"""The indexed structures behind routing and queueing pick exactly what the scans they replace
pick: the lazy least-loaded heap (sim.policies.routing), the free-GPU heap of a shared queue
(sim.engines.queues.FreeEngines), the hrrn (highest response ratio next) order, and, end to end,
whole disaggregated / modality_aware runs against the same runs with scanning routers plugged
in as parts (sim.policies.ROUTERS)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_cfg
from sim import policies
from sim.core.gpu import Engine, PoolGPU, Unit
from sim.core.kernel import Kernel
from sim.core.records import Job, Request
from sim.engines.ar import AREngine
from sim.engines.queues import StageQueue
from sim.policies.parts import Router
from sim.policies.routing import LeastLoaded, ReportedLeast
from sim.run.runner import Run


class Item:
    def __init__(self, load: int):
        self.load = load


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10),
       ops=st.lists(st.tuples(st.integers(0, 9), st.integers(-3, 3), st.booleans()), max_size=200),
       scan_max=st.sampled_from([0, 16]))
def test_least_loaded_with_unreported_increases(n, ops, scan_max):
    """Decreases are reported, increases only sometimes: picks still equal min() (first index
    among ties), from the heap (scan_max=0) and from the scan of a few items."""
    items = [Item(0) for _ in range(n)]
    ll = LeastLoaded(items, lambda x: x.load, scan_max=scan_max)
    for i, delta, report in ops:
        x = items[i % n]
        x.load += delta
        if delta < 0 or report:
            ll.changed(x)
        assert ll.pick() is min(items, key=lambda y: y.load)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40),
       ops=st.lists(st.tuples(st.integers(0, 39), st.sampled_from([-2.5, -1.0, 0.0, 0.5, 1.0, 3.0])),
                    max_size=200),
       scan_max=st.sampled_from([0, 16]))
def test_reported_least_is_min_under_reported_changes(n, ops, scan_max):
    """Every change reported, up or down or none (ties on purpose: keys on a coarse grid): the
    pick equals min() (first position among ties), and the heap stays a heap of every position."""
    items = [Item(float(i % 3)) for i in range(n)]
    rl = ReportedLeast(items, lambda x: x.load, scan_max=scan_max)
    rl.changed(Item(-1.0))                      # an item not routed here: ignored
    for i, delta in ops:
        x = items[i % n]
        x.load += delta
        rl.changed(x)
        assert rl.pick() is min(items, key=lambda y: y.load)
        if not rl.scan:                         # a heap of every position, by (key, position)
            h = rl.heap
            assert all(not rl._before(h[c], h[(c - 1) // 2]) for c in range(1, n))
    if not rl.scan:
        assert sorted(rl.heap) == list(range(n))
        assert all(rl.slot[p] == j for j, p in enumerate(rl.heap))


class FakeEngine(Engine):
    """An engine on a GPU of its own that reports unit ends (a PoolGPU)."""

    def __init__(self, queue: StageQueue):
        super().__init__()
        self.queue = queue
        PoolGPU(ENV, len(queue.engines), 0).add(self)
        queue.engines.append(self)


ENV = Kernel()
BUSY = Unit([1.0], lambda k, now: None, "s")


def scan(engines):
    return next((e for e in engines if e.gpu.cur is None and e.gpu.available), None)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 12),
       ops=st.lists(st.tuples(st.sampled_from(["busy", "free", "away", "back", "add", "drop"]),
                              st.integers(0, 40)), max_size=150))
def test_free_engines_match_the_scan(n, ops):
    """GPUs turn busy silently and report when they can be free again (as PoolGPU does at the
    end of every unit); engines join and leave the queue."""
    q = StageQueue("q")
    for _ in range(n):
        FakeEngine(q)
    for op, k in ops:
        if op == "add":
            FakeEngine(q)
        elif op == "drop" and len(q.engines) > 1:
            q.unsubscribe(q.engines[k % len(q.engines)])
        else:
            e = q.engines[k % len(q.engines)]
            g = e.gpu
            if op == "busy":
                g.cur = BUSY
            elif op == "away":
                g.available = False
            else:                               # a unit ends / the GPU comes back
                if op == "free":
                    g.cur = None
                else:
                    g.available = True
                q.free.hint(e)
        assert q.free.first() is scan(q.engines)


def _job(i: int, enqueued: float, work: float, prio: int) -> Job:
    j = Job(Request(i, 0.0, "generate", "m", 1), "dit_step", "m", priority=prio, work=work)
    j.enqueued = enqueued
    return j


@settings(max_examples=200, deadline=None)
@given(jobs_=st.lists(st.tuples(st.sampled_from([0.0, 1.0, 2.5, 3.0]),
                                st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]), st.integers(0, 2)),
                      max_size=12),
       now=st.sampled_from([3.0, 4.0, 10.0]), priority=st.booleans())
def test_hrrn_order_matches_a_stable_sort(jobs_, now, priority):
    """Ties (equal ratios) keep arrival order, as the stable sort did."""
    q = StageQueue("q", priority, "hrrn", lambda: now)
    for i, (enq, work, prio) in enumerate(jobs_):
        j = _job(i, enq, work, prio)
        q.levels[min(prio, len(q.levels) - 1) if priority else 0].append(j)
        q.n += 1

    def key(j):
        return -(now - j.enqueued + j.work) / max(j.work, 1e-9)
    want = [j for lvl in q.levels for j in sorted(lvl, key=key)]
    assert list(q) == want
    assert q.head() is (want[0] if want else None)


# --- end to end: the same runs with the scans put back ------------------------------------------

def _reference_scans(monkeypatch):
    # GPUs that do not report unit ends: every shared queue's FreeEngines scans its engines
    monkeypatch.setattr(PoolGPU, "reports_unit_end", False)
    # the scanning routers in place of the indexed ones, by name (a router is a part)
    monkeypatch.setitem(policies.ROUTERS, "least_requests", _ScanRequests)
    monkeypatch.setitem(policies.ROUTERS, "least_tokens", _ScanTokens)


SCANS = [0]     # reference picks made (the parts must really be called, compiled or not)


class _ScanRequests(Router):
    """least_requests as the plain min() over request counts."""

    def pick(self, now):
        SCANS[0] += 1
        return min(self.items, key=lambda e: e.num_requests())


class _ScanTokens(Router):
    """least_tokens as the plain min() over AREngine.load."""

    def pick(self, now):
        SCANS[0] += 1
        return min(self.items, key=AREngine.load)


def _run(cfg_kw):
    r = Run(make_cfg(None, cfg_kw))
    r.run()
    return r


MOVES = {"llm": 9, "dit": 4, "encoder": 2, "vae": 1}   # too few DiT GPUs: the autoscaler moves some


@pytest.mark.parametrize("policy,lb,pools", [
    ("disaggregated", True, {}), ("modality_aware", True, {}),
    ("modality_aware", False, MOVES), ("modality_aware", True, MOVES)])
def test_runs_equal_the_scanning_reference(synthetic_profiles, monkeypatch, policy, lb, pools):
    """16 GPUs at 60 req/s: several LLM engines, DiT queueing, co-located engines (modality_aware),
    and with MOVES, GPUs changing pool (queues and routers re-index)."""
    cfg_kw = {"profiles_dir": str(synthetic_profiles), "policy.name": policy,
              "policy.image_token_aware_lb": lb, "policy.autoscale_interval_s": 1.0,
              "cluster.pools": pools, "workload.num_requests": 600,
              "workload.arrival.rate": 40.0 if pools else 60.0, "seed": 7, "cluster.num_gpus": 16}
    fast = _run(cfg_kw)
    assert fast.policy.notes["pools"]["llm:qwen2_5_vl_7b"] > 1, "the test needs several LLM engines"
    assert bool(pools) == bool(getattr(fast.policy, "moves", None)), "MOVES should move GPUs"
    with monkeypatch.context() as m:
        _reference_scans(m)
        SCANS[0] = 0
        ref = _run(cfg_kw)
        assert ref.policy.router_class.__name__.startswith("_Scan") and SCANS[0] >= 600
    assert _outcomes(fast) == _outcomes(ref)


def _outcomes(run) -> dict:
    def f(x):
        return None if x != x else x            # NaN (no first token for image output) -> None
    return {q.id: (f(q.first_token), q.finish, q.preemptions,
                   [(s.stage, s.server, f(s.start), f(s.end)) for s in q.stages])
            for q in run.requests}
