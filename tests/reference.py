"""Reference formulations (oracles) of the simulator's fast paths: the plain, vectorised or
all-at-once arithmetic that a fast path in sim/ must reproduce (bit for bit, or to rounding where
the fast path sums in closed form). Tests compare the two; nothing in sim/ imports this module.

- lookup_ref: a latency-table lookup, every case (in grid, outside under each range policy),
  on the numpy grid values (sim.engines.latency: memoised Python-float lookups).
- decode_series_ref / ends_ref: a decode jump's step times and end offsets with numpy, one value
  per step and a running sum (sim.engines.latency.LatencyModel.decode_run: linear pieces and
  arithmetic series, equal to ~1e-15 relative).
- gamma_arrivals_ref: Gamma renewal arrivals drawn and summed at once, rescaled as vLLM does
  (sim.workloads.laws: block by block, streamed).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sim.config import OutOfRange
from sim.engines.latency import LatencyModel, OutOfGridError, _axis_pos


def lookup_ref(lat: LatencyModel, g: Any, xs: tuple[float, ...]) -> float:
    """An interpolated lookup with the range policy and counting of `lat`, on numpy values."""
    pos = []
    outside = False
    for a, x in zip(g.axes, xs):
        i, w = _axis_pos(a, x)
        if w < -1e-9 or w > 1 + 1e-9:
            outside = True
        pos.append((i, w))
    if outside:
        lat.outside[g.name] += 1
        if lat.mode is OutOfRange.error:
            raise OutOfGridError(f"{g.name}: {xs} outside the grid")
        if lat.mode is OutOfRange.clamp:
            pos = [(i, min(max(w, 0.0), 1.0)) for i, w in pos]
    v = g.values
    if len(pos) == 1:
        (i, w), = pos
        if v.shape[0] == 1:
            return float(v[0])
        out = (1 - w) * v[i] + w * v[i + 1]
        if g.filled[i] or g.filled[min(i + 1, len(v) - 1)]:
            lat.hole_hits[g.name] += 1
    else:
        (i, wi), (j, wj) = pos
        n0, n1 = v.shape
        i1, j1 = min(i + 1, n0 - 1), min(j + 1, n1 - 1)
        if n0 == 1:
            wi = 0.0
        if n1 == 1:
            wj = 0.0
        out = ((1 - wi) * ((1 - wj) * v[i, j] + wj * v[i, j1])
               + wi * ((1 - wj) * v[i1, j] + wj * v[i1, j1]))
        f = g.filled   # a hole counts only where it carries weight
        if ((f[i, j] and (1 - wi) * (1 - wj)) or (f[i, j1] and (1 - wi) * wj)
                or (f[i1, j] and wi * (1 - wj)) or (f[i1, j1] and wi * wj)):
            lat.hole_hits[g.name] += 1
    return max(float(out), 1e-6)


def decode_series_ref(lat: LatencyModel, model: str, batch: int, ctx0: float, k: int,
                      start_lookups: int = 1) -> np.ndarray:
    """decode(batch, ctx0 + i), i < k, vectorised: the range policy and counts of lookups at the
    start point (start_lookups times) and the end point, then numpy on the batch column."""
    for _ in range(start_lookups):
        lat.decode(model, batch, ctx0)
    lat.decode(model, batch, ctx0 + k - 1)
    g = lat._ar_grid(model, "decode")
    col = np.asarray(lat._decode_col(g, batch).vals)
    c = g.carr[1]
    ctx = ctx0 + np.arange(k, dtype=float)
    if len(c) == 1:
        return np.maximum(np.full(k, col[0]), 1e-6)
    if lat.mode is OutOfRange.clamp:
        ctx = np.clip(ctx, c[0], c[-1])
    j = np.clip(np.searchsorted(c, ctx, side="right") - 1, 0, len(c) - 2)
    w = (ctx - c[j]) / (c[j + 1] - c[j])
    return np.maximum((1 - w) * col[j] + w * col[j + 1], 1e-6)


def ends_ref(series: np.ndarray, overhead: float, host: float | None) -> list[float]:
    """A jump's step end offsets: + overhead, max(t - host, host), cumulative sum."""
    s = series + overhead if overhead else series
    if host is not None:
        s = np.maximum(s - host, host)
    return s.cumsum().tolist()


def gamma_arrivals_ref(n: int, rate: float, shape: float, rng: Any,
                       vllm_scaling: bool = False) -> np.ndarray:
    """n arrival times with i.i.d. Gamma(shape, mean 1/rate) gaps, drawn at once; with
    vllm_scaling multiplied by (n / rate) / last, as `vllm bench serve` does."""
    if n <= 0:
        return np.empty(0)
    t = np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), size=n))
    if vllm_scaling and t[-1] != 0:
        t = t * ((n / rate) / t[-1])
    return t
