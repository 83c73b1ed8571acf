"""QuantileSketch: relative-error bound vs exact numpy quantiles, merge, weights, edge cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.run.sketch import QuantileSketch

QS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0)


def _check_bound(sk: QuantileSketch, data: np.ndarray) -> None:
    for q in QS:
        exact = float(np.quantile(data, q, method="lower"))
        got = sk.quantile(q)
        assert abs(got - exact) <= sk.alpha * abs(exact) * (1 + 1e-9) + 1e-300, (q, got, exact)


@pytest.mark.parametrize("alpha", [0.005, 0.02])
@pytest.mark.parametrize("dist", ["lognormal", "exponential"])
def test_relative_error_bound(dist: str, alpha: float) -> None:
    rng = np.random.default_rng(1)
    data = rng.lognormal(-3.0, 1.5, 50_000) if dist == "lognormal" else rng.exponential(0.02, 50_000)
    sk = QuantileSketch(alpha=alpha)
    sk.add_many(data)
    _check_bound(sk, data)
    assert sk.count == data.size
    assert sk.mean == pytest.approx(data.mean(), rel=1e-12)
    assert sk.std == pytest.approx(data.std(), rel=1e-9)
    assert sk.min == data.min() and sk.max == data.max()
    # also close to numpy's default (linear) percentiles on a dense sample
    for q in (0.5, 0.9, 0.99):
        assert sk.quantile(q) == pytest.approx(np.quantile(data, q), rel=alpha * 1.5)


def test_add_equals_add_many() -> None:
    rng = np.random.default_rng(2)
    data = rng.lognormal(0, 1, 2000)
    w = rng.integers(1, 5, 2000)
    a, b = QuantileSketch(), QuantileSketch()
    for x, k in zip(data, w):
        a.add(x, int(k))
    b.add_many(data, w)
    assert [a.quantile(q) for q in QS] == [b.quantile(q) for q in QS]
    assert a.mean == pytest.approx(b.mean, rel=1e-12)
    assert a.std == pytest.approx(b.std, rel=1e-9)


def test_merge_equals_adding_all() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.exponential(1.0, 3000), rng.lognormal(1, 2, 5000)
    a, b, both = QuantileSketch(), QuantileSketch(), QuantileSketch()
    a.add_many(x)
    b.add_many(y)
    both.add_many(np.concatenate([x, y]))
    a.merge(b)
    assert [a.quantile(q) for q in QS] == [both.quantile(q) for q in QS]
    assert a.count == both.count
    assert a.mean == pytest.approx(both.mean, rel=1e-12)
    assert a.std == pytest.approx(both.std, rel=1e-9)
    assert (a.min, a.max) == (both.min, both.max)
    a.merge(QuantileSketch())            # merging an empty sketch is a no-op
    assert a.count == both.count
    with pytest.raises(ValueError):
        a.merge(QuantileSketch(alpha=0.01))


def test_weights_behave_like_repetition() -> None:
    rng = np.random.default_rng(4)
    data = rng.lognormal(-4, 1, 500)
    w = rng.integers(1, 40, 500)
    a, b = QuantileSketch(), QuantileSketch()
    a.add_many(data, w)
    b.add_many(np.repeat(data, w))
    assert [a.quantile(q) for q in QS] == [b.quantile(q) for q in QS]
    assert a.count == b.count == w.sum()
    assert a.mean == pytest.approx(b.mean, rel=1e-12)
    assert a.std == pytest.approx(b.std, rel=1e-9)
    _check_bound(a, np.repeat(data, w))


def test_zero_negative_and_empty() -> None:
    sk = QuantileSketch()
    assert math.isnan(sk.quantile(0.5)) and math.isnan(sk.mean) and sk.count == 0
    sk.add(0.0, 3)
    sk.add(2.0)
    assert sk.quantile(0.0) == 0.0 and sk.quantile(0.5) == 0.0
    assert sk.quantile(1.0) == 2.0
    sk.add(-1.0)
    assert sk.min == -1.0 and sk.quantile(0.0) == 0.0
    neg = QuantileSketch()
    neg.add(-5.0)
    assert neg.quantile(0.5) == -5.0          # clamped to [min, max]
    sk.add(1.0, 0)                             # zero weight ignored
    assert sk.count == 5
    with pytest.raises(ValueError):
        sk.add(1.0, -1)
    with pytest.raises(ValueError):
        sk.quantile(1.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=300),
       st.floats(min_value=0.001, max_value=0.05))
def test_bound_property(values: list[float], alpha: float) -> None:
    sk = QuantileSketch(alpha=alpha)
    for v in values:
        sk.add(v)
    _check_bound(sk, np.asarray(values))
    qs = [sk.quantile(q) for q in QS]
    assert qs == sorted(qs)


def _one_by_one(a: float, b: float, n: int, w: float, scale: float) -> QuantileSketch:
    sk = QuantileSketch()
    for m in range(n):
        sk.add((a + b * float(m)) * scale, w)
    return sk


@settings(max_examples=300, deadline=None)
@given(a=st.floats(1e-7, 0.5), b=st.floats(-1e-3, 1e-3), n=st.integers(1, 3000),
       w=st.integers(1, 300), scale=st.sampled_from([1.0, 1000.0]))
def test_add_series_equals_adding_each_value(a: float, b: float, n: int, w: int,
                                             scale: float) -> None:
    """A decode jump's linear piece folded in at once: the same buckets, count, min and max as
    adding its n values one by one; mean and std to rounding."""
    one = _one_by_one(a, b, n, w, scale)
    sk = QuantileSketch()
    sk.add_series(a, b, n, w, scale)
    assert sk._buckets == one._buckets and sk._zero == one._zero
    assert sk.count == one.count and sk.min == one.min and sk.max == one.max
    v = (a + b * np.arange(n, dtype=np.float64)) * scale      # (equal weights)
    assert sk.mean == pytest.approx(v.mean(), rel=1e-12)
    assert sk.std == pytest.approx(v.std(), rel=1e-6, abs=1e-12 * abs(v.mean()))
    for q in QS:
        assert sk.quantile(q) == one.quantile(q)


def test_add_series_crosses_many_buckets_and_the_zero_bucket() -> None:
    # from 2e-12 (zero bucket at min_value=1e-9 after scaling) up across ~1,000 buckets
    for a, b, n in ((2e-12, 1e-6, 5000), (5e-3, -1e-6, 5000), (1.0, 0.0, 10)):
        one = _one_by_one(a, b, n, 3.0, 1000.0)
        sk = QuantileSketch()
        sk.add_series(a, b, n, 3.0, 1000.0)
        assert sk._buckets == one._buckets and sk._zero == one._zero and sk.count == one.count
        assert sk.mean == pytest.approx(one.mean, rel=1e-12)
