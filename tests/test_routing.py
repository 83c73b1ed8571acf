"""The O(log n) least-loaded replica router picks exactly what min(replicas, key=outstanding)
picks."""
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.policies.placement import Replica
from sim.policies.routing import LeastOutstanding


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
