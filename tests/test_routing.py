"""The routers (sim/policies/routing.py): the O(log n) least-loaded heap picks exactly what
min(items, key) picks, round robin in turn, least requests / least tokens on bursts of LLM
requests (against a hand-run of the rule), and each router by its name."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_cfg
from sim.config import LengthDist
from sim.policies.placement import Replica
from sim.policies.routing import (LeastLoaded, LeastOutstanding, LeastRequests, LeastTokens,
                                  ReportedLeast, RoundRobin)
from sim.run.runner import Run


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 12),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 11), st.sampled_from([0.5, 1.0, 2.25, 7.0])),
                    max_size=200))
def test_least_loaded_matches_min(n, ops):
    reps = [Replica(None, "m", i) for i in range(n)]
    ll = LeastOutstanding(reps)
    held = []
    for admit, i, w in ops:
        if admit:
            r = ll.pick(0.0)
            assert r is min(reps, key=lambda x: x.outstanding)
            r.outstanding += w
            ll.changed(r)
            held.append((r, w))
        elif held:
            r, w2 = held.pop(i % len(held))
            r.outstanding -= w2
            ll.changed(r)
    assert ll.pick(0.0) is min(reps, key=lambda x: x.outstanding)


# --- the routers on small runs and on scripted items ------------------------------------------------

def test_round_robin_in_turn():
    rr = RoundRobin(["a", "b", "c"])
    assert [rr.pick(0.0) for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


class Item:
    def __init__(self, n: int):
        self.n = n

    def num_requests(self) -> int:
        return self.n


def test_least_requests_sees_reported_decreases_and_unreported_increases():
    items = [Item(3), Item(1), Item(2)]
    lr = LeastRequests(items)
    assert lr.pick(0.0) is items[1]
    items[1].n = 5                        # an increase, unreported: found when it surfaces
    assert lr.pick(0.0) is items[2]
    items[0].n = 0
    lr.changed(items[0])                  # a decrease, reported
    assert lr.pick(0.0) is items[0]
    lr.changed(Item(0))                   # an item not routed here: ignored
    assert lr.pick(0.0) is items[0]


def test_least_loaded_ties_go_to_the_first_position():
    xs = [Item(2), Item(1), Item(1)]
    ll = LeastLoaded(xs, lambda x: x.n, scan_max=0)
    assert ll.pick() is xs[1]
    xs[1].n = 1.5
    ll.changed(xs[1])
    assert ll.pick() is xs[2]
    ll2 = ReportedLeast(xs, lambda x: x.n, scan_max=0)
    xs[2].n = 3
    ll2.changed(xs[2])
    assert ll2.pick() is xs[1]


def test_least_loaded_drops_stale_entries_now_and_then():
    xs = [Item(i) for i in range(3)]
    ll = LeastLoaded(xs, lambda x: x.n, scan_max=0)
    for k in range(200):
        xs[k % 3].n = 10 - k % 7
        ll.changed(xs[k % 3])
        assert len(ll.heap) <= 4 * 3 + 64 + 1
        assert ll.pick() is min(xs, key=lambda x: x.n)


def burst(profiles, token_aware: bool, n: int = 10):
    cfg = make_cfg(profiles, {"policy.name": "modality_aware", "workload.num_requests": n,
                              "workload.mix": {"text": 1.0}, "cluster.num_gpus": 2,
                              "cluster.pools": {"llm": 2}, "workload.arrival.rate": 1e6,
                              "workload.arrival.shape": 100.0,
                              "policy.image_token_aware_lb": token_aware,
                              "workload.prompt_tokens": LengthDist(dist="uniform", min=16, max=4000),
                              "workload.output_tokens": LengthDist(dist="uniform", min=1, max=400)})
    r = Run(cfg)
    r.run()
    reqs = sorted(r.requests, key=lambda q: q.arrival)
    assert reqs[-1].arrival - reqs[0].arrival < 1e-3      # all routed before any step ends
    return r, reqs, [q.stages[0].server for q in reqs]


def test_token_aware_routing_sends_each_request_to_the_fewest_outstanding_tokens(synthetic_profiles):
    r, reqs, got = burst(synthetic_profiles, True)
    assert isinstance(r.policy.placement.llm_router("qwen2_5_vl_7b"), LeastTokens)
    load = {"gpu0": 0, "gpu1": 0}
    want = []
    for q in reqs:
        g = min(load, key=lambda k: (load[k], k))
        want.append(g)
        load[g] += q.prompt_tokens + q.output_tokens
    assert got == want
    assert got != ["gpu0", "gpu1"] * (len(reqs) // 2)     # not merely alternating


def test_least_requests_routing_alternates_on_a_burst(synthetic_profiles):
    r, _, got = burst(synthetic_profiles, False)
    assert isinstance(r.policy.placement.llm_router("qwen2_5_vl_7b"), LeastRequests)
    assert got == ["gpu0", "gpu1"] * 5


def test_llm_requests_go_to_the_engine_with_fewest_requests(synthetic_profiles):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 8,
                                        "workload.mix": {"text": 1.0}, "cluster.num_gpus": 2,
                                        "cluster.pools": {"llm": 2}, "workload.arrival.rate": 1e6,
                                        "workload.arrival.shape": 100.0})
    r = Run(cfg)
    r.run()
    reqs = sorted(r.requests, key=lambda q: q.arrival)
    assert [q.stages[0].server for q in reqs] == ["gpu0", "gpu1"] * 4
    # spaced out: every request finds both engines empty and goes to the first
    cfg = make_cfg(synthetic_profiles, {"policy.name": "disaggregated", "workload.num_requests": 5,
                                        "workload.mix": {"text": 1.0}, "cluster.num_gpus": 2,
                                        "cluster.pools": {"llm": 2}, "workload.arrival.rate": 0.05,
                                        "workload.arrival.shape": 100.0})
    r = Run(cfg)
    r.run()
    assert {q.stages[0].server for q in r.requests} == {"gpu0"}


@pytest.mark.parametrize("router", ["round_robin", "least_loaded"])
def test_replica_routers_by_name(synthetic_profiles, router):
    cfg = make_cfg(synthetic_profiles, {"policy.name": "baseline", "workload.num_requests": 2,
                                        "policy.router": router, "cluster.num_gpus": 2})
    routers = Run(cfg).policy.placement.routers
    want = RoundRobin if router == "round_robin" else LeastOutstanding
    assert routers and all(type(x) is want for x in routers.values())
