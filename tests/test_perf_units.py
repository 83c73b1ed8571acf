"""sim.core.gpu.EqualSteps (a DiT unit's step ends, computed on demand) reads exactly as the list
[t * i for i in 1..k] it replaces: items, negative items, slices, len, and bisection (how the
GPU cuts a unit)."""
from __future__ import annotations

from bisect import bisect_left, bisect_right

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.gpu import EqualSteps


@settings(max_examples=200, deadline=None)
@given(t=st.floats(1e-6, 10.0), k=st.integers(1, 80), x=st.floats(-1.0, 900.0),
       lo=st.integers(-90, 90), hi=st.integers(-90, 90))
def test_equal_steps_read_as_the_list(t, k, x, lo, hi):
    want = [t * i for i in range(1, k + 1)]
    got = EqualSteps(t, k)
    assert len(got) == k
    assert [got[i] for i in range(k)] == want
    assert [got[-i] for i in range(1, k + 1)] == [want[-i] for i in range(1, k + 1)]
    assert got[:1] == want[:1] and got[lo:hi] == want[lo:hi]
    assert bisect_left(got, x) == bisect_left(want, x)
    assert bisect_right(got, x) == bisect_right(want, x)
    for i in (k, -k - 1):
        with pytest.raises(IndexError):
            got[i]
