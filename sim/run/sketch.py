"""A mergeable quantile sketch (DDSketch-style) for streams too long to keep.

Why: inter-token latencies arrive once per engine step for every running sequence, which is
billions of values in a long run. Exact percentiles would need all of them; this sketch keeps one
counter per logarithmic bucket (a few thousand at most for latencies from 1 us to 1 h) and still
answers percentiles with a *relative* error bound, which is what latency percentiles need.

Error bound (positive values): with relative accuracy ``alpha``, bucket ``i`` holds values in
``(gamma**(i-1), gamma**i]`` where ``gamma = (1 + alpha) / (1 - alpha)``, and is reported as
``2 * gamma**i / (gamma + 1)``. For a quantile ``q`` the sketch returns ``x~`` with
``|x~ - x| <= alpha * x`` where ``x`` is the exact weighted *lower* quantile, i.e. the item at
rank ``floor(q * (W - 1))`` of the sorted stream (``numpy.quantile(..., method="lower")`` when all
weights are 1; ``W`` = total weight). Results are clamped to the exact [min, max].
Values ``<= min_value`` (zero, negative, or sub-nanosecond) go to a zero bucket reported as 0.0
(clamped to [min, max]), so no relative guarantee applies to them. ``mean``, ``std``, ``count``,
``min`` and ``max`` are exact (tracked outside the buckets).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

ZERO_KEY = -(1 << 62)       # `_key` of the values the zero bucket holds (below every real key)


class QuantileSketch:
    """Log-bucketed histogram with relative-accuracy quantiles; ``add`` is O(1)."""

    __slots__ = ("alpha", "gamma", "_inv_log_gamma", "min_value", "_buckets", "_zero",
                 "_count", "_mean", "_m2", "_min", "_max")

    def __init__(self, alpha: float = 0.005, min_value: float = 1e-9) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha={alpha!r} is invalid; allowed: 0 < alpha < 1")
        self.alpha = float(alpha)
        self.gamma = (1.0 + alpha) / (1.0 - alpha)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)
        self.min_value = float(min_value)
        self._buckets: dict[int, float] = {}
        self._zero = 0.0
        self._count = 0.0
        self._mean = 0.0
        self._m2 = 0.0            # weighted sum of squared deviations (Welford / Chan)
        self._min = math.inf
        self._max = -math.inf

    # -- feeding ---------------------------------------------------------------------------
    def add(self, value: float, weight: float = 1.0) -> None:
        """Add ``value`` with multiplicity ``weight`` (> 0; zero weights are ignored)."""
        if weight <= 0:
            if weight < 0:
                raise ValueError(f"weight={weight!r} is invalid; allowed: >= 0")
            return
        value = float(value)
        if value > self.min_value:
            k = math.ceil(math.log(value) * self._inv_log_gamma)
            b = self._buckets
            b[k] = b.get(k, 0.0) + weight
        else:
            self._zero += weight
        n = self._count + weight
        delta = value - self._mean
        self._mean += delta * weight / n
        self._m2 += weight * delta * (value - self._mean)
        self._count = n
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value

    def add_many(self, values: Iterable[float] | np.ndarray,
                 weights: Iterable[float] | np.ndarray | None = None) -> None:
        """Vectorised ``add`` for a batch (same result as adding one by one)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
        if v.shape != w.shape:
            raise ValueError(f"values and weights differ in length: {v.size} != {w.size}")
        if np.any(w < 0):
            raise ValueError("weights must be >= 0")
        keep = w > 0
        v, w = v[keep], w[keep]
        if v.size == 0:
            return
        pos = v > self.min_value
        self._zero += float(w[~pos].sum())
        if pos.any():
            keys = np.ceil(np.log(v[pos]) * self._inv_log_gamma).astype(np.int64)
            # per-bucket sums by bincount over the (small) key range: the same sums, in the
            # same order, as np.unique + bincount, without the sort
            k0 = int(keys.min())
            sums = np.bincount(keys - k0, weights=w[pos])
            nz = np.flatnonzero(sums)
            b = self._buckets
            for k, s in zip((nz + k0).tolist(), sums[nz].tolist()):
                b[k] = b.get(k, 0.0) + s
        wb = float(w.sum())
        mb = float(np.dot(w, v) / wb)
        m2b = float(np.dot(w, (v - mb) ** 2))
        self._combine_moments(wb, mb, m2b)
        self._min = min(self._min, float(v.min()))
        self._max = max(self._max, float(v.max()))

    def _key(self, value: float) -> int:
        """The bucket of a value (ZERO_KEY: the zero bucket), as `add` computes it."""
        if value > self.min_value:
            return math.ceil(math.log(value) * self._inv_log_gamma)
        return ZERO_KEY

    def add_series(self, a: float, b: float, n: int, weight: float = 1.0,
                   scale: float = 1.0) -> None:
        """``add((a + b * m) * scale, weight)`` for m = 0, 1, ..., n - 1 (an arithmetic series:
        a linear piece of a decode jump's step times), in O(buckets crossed x log n) instead of
        O(n): each value is the same float expression as adding it alone, monotone in m, so each
        bucket's share is a range of m, found by bisection on that expression. The buckets, count,
        min and max equal adding the values one by one; mean and std are the series' closed
        forms (equal up to rounding)."""
        if weight <= 0 or n <= 0:
            if weight < 0:
                raise ValueError(f"weight={weight!r} is invalid; allowed: >= 0")
            return
        v0 = (a + b * 0.0) * scale
        v1 = (a + b * float(n - 1)) * scale
        k0 = self._key(v0)
        k1 = self._key(v1)
        lo = 0
        while k0 != k1:                 # the first m whose bucket differs from m = lo's
            l, hi = lo, n - 1
            while hi - l > 1:
                mid = (l + hi) // 2
                if self._key((a + b * float(mid)) * scale) == k0:
                    l = mid
                else:
                    hi = mid
            self._add_bucket(k0, weight * (hi - lo))
            lo = hi
            k0 = self._key((a + b * float(hi)) * scale)
        self._add_bucket(k1, weight * (n - lo))
        # moments of the series: mean a + b (n - 1) / 2, n * variance = b^2 n (n^2 - 1) / 12
        sb = b * scale
        self._combine_moments(weight * n, (a + b * (n - 1) / 2.0) * scale,
                              weight * sb * sb * (n * (n * n - 1) / 12.0))
        lo_v, hi_v = (v0, v1) if v0 <= v1 else (v1, v0)
        if lo_v < self._min:
            self._min = lo_v
        if hi_v > self._max:
            self._max = hi_v

    def _add_bucket(self, k: int, w: float) -> None:
        if k == ZERO_KEY:
            self._zero += w
        else:
            b = self._buckets
            b[k] = b.get(k, 0.0) + w

    def merge(self, other: "QuantileSketch") -> None:
        """Fold ``other`` into this sketch (same alpha required): equal to adding its stream."""
        if not math.isclose(other.alpha, self.alpha) or other.min_value != self.min_value:
            raise ValueError("cannot merge sketches with different alpha/min_value")
        b = self._buckets
        for k, s in other._buckets.items():
            b[k] = b.get(k, 0.0) + s
        self._zero += other._zero
        if other._count > 0:
            self._combine_moments(other._count, other._mean, other._m2)
            self._min = min(self._min, other._min)
            self._max = max(self._max, other._max)

    def _combine_moments(self, nb: float, mb: float, m2b: float) -> None:
        na = self._count
        n = na + nb
        delta = mb - self._mean
        self._mean += delta * nb / n
        self._m2 += m2b + delta * delta * na * nb / n
        self._count = n

    # -- reading ---------------------------------------------------------------------------
    @property
    def count(self) -> float:
        """Total weight added."""
        return self._count

    @property
    def mean(self) -> float:
        """Exact weighted mean (NaN when empty)."""
        return self._mean if self._count > 0 else math.nan

    @property
    def std(self) -> float:
        """Exact weighted population standard deviation (ddof=0, as numpy.std; NaN when empty)."""
        return math.sqrt(max(self._m2, 0.0) / self._count) if self._count > 0 else math.nan

    @property
    def min(self) -> float:
        return self._min if self._count > 0 else math.nan

    @property
    def max(self) -> float:
        return self._max if self._count > 0 else math.nan

    def quantile(self, q: float) -> float:
        """Weighted lower quantile within relative error ``alpha`` (see module doc); NaN if empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q!r} is invalid; allowed: 0 <= q <= 1")
        if self._count <= 0:
            return math.nan
        rank = q * max(self._count - 1.0, 0.0)
        if self._zero > rank:
            est = 0.0
        else:
            cum = self._zero
            est = self._max
            for k in sorted(self._buckets):
                cum += self._buckets[k]
                if cum > rank:
                    est = 2.0 * self.gamma ** k / (self.gamma + 1.0)
                    break
        return min(max(est, self._min), self._max)

    def __repr__(self) -> str:
        return (f"QuantileSketch(alpha={self.alpha}, count={self._count:g}, "
                f"buckets={len(self._buckets)})")
