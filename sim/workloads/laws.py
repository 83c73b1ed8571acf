"""Workload laws: arrival processes (Gamma renewal, Markov-modulated Poisson), token-length
laws and image-size laws, as pure functions of (parameters, random generator).

Every draw is element-wise sequential, so drawing in blocks (DEFAULT_CHUNK at a time, as the
synthetic source does) gives the values of one draw of everything.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from sim.config import ConfigError, ImageSizeConfig, LengthDist
from sim.rng import stream

DEFAULT_CHUNK = 65_536

# ------------------------------------------------------------------------------------------
# Arrival processes
# ------------------------------------------------------------------------------------------


def gamma_times(n: int, rate: float, shape: float, rng: Any,
                block: int = DEFAULT_CHUNK) -> Iterator[np.ndarray]:
    """The first n arrival times of a renewal process with i.i.d. Gamma(shape=k, mean=1/rate)
    gaps (k=1 Poisson; CV = 1/sqrt(k)), block by block (at most `block` times each). The first
    arrival is the first gap (> 0), as in vLLM. `rng`: a numpy Generator, or a legacy
    RandomState (vLLM draws from the global legacy generator seeded with `--seed`)."""
    carry, made = 0.0, 0
    while made < n:
        k = min(block, n - made)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=k)
        t = np.cumsum(np.concatenate(([carry], gaps)))[1:]   # sequential: blocks concatenate
        carry = float(t[-1])
        made += k
        yield t


def vllm_scale(n: int, rate: float, last: float) -> float:
    """vLLM's rescaling factor (`vllm bench serve --request-rate R`, vLLM 0.26.0
    `vllm/benchmarks/serve.py::get_request`, no ramp-up): every time is multiplied by
    `(N / R) / last` so the last request is sent at N/R ("to close the 1-2% gap ... for
    stabilizing the throughput data from different random seeds"). This makes the times
    exchangeable-but-not-independent (a Dirichlet bridge), which is why it is optional."""
    return (n / rate) / last if last != 0 else 1.0


def gamma_arrivals(n: int, rate: float, shape: float, rng: Any,
                   vllm_scaling: bool = False) -> np.ndarray:
    """All n arrival times of gamma_times; with `vllm_scaling` rescaled as vLLM does
    (vllm_scale), which mirrors `vllm bench serve --request-rate R --burstiness k`."""
    if n <= 0:
        return np.empty(0)
    t = np.concatenate(list(gamma_times(n, rate, shape, rng)))
    if vllm_scaling:
        s = vllm_scale(n, rate, float(t[-1]))
        if s != 1.0:
            t = t * s
    return t


def _mmpp_blocks(base_rate: float, burst_rate: float, mean_base_s: float, mean_burst_s: float,
                 rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless MMPP arrivals, one block of `periods` alternating sojourns at a time.

    Exact construction: sojourns are exponential; given a sojourn of length d at rate r the
    arrivals in it are Poisson(r d) many, uniform on it (order statistics). The first state is
    drawn from the stationary law, so the process is stationary from t=0. Draws come in fixed
    blocks (an even number of sojourns, set from the parameters alone so a block holds about
    65k arrivals), so how many arrivals a caller takes never changes the values.
    """
    per_pair = base_rate * mean_base_s + burst_rate * mean_burst_s
    periods = 2 * int(min(128, max(1, round(DEFAULT_CHUNK / per_pair))))
    p_burst = mean_burst_s / (mean_base_s + mean_burst_s)
    burst = bool(rng.random() < p_burst)
    t0 = 0.0
    while True:
        states = (np.arange(periods) + int(burst)) % 2 == 1       # alternate, starting at `burst`
        means = np.where(states, mean_burst_s, mean_base_s)
        dur = rng.exponential(1.0, size=periods) * means
        rates = np.where(states, burst_rate, base_rate)
        counts = rng.poisson(rates * dur)
        starts = t0 + np.concatenate(([0.0], np.cumsum(dur)[:-1]))
        u = rng.random(int(counts.sum()))
        times = np.repeat(starts, counts) + u * np.repeat(dur, counts)
        times.sort()
        t0 = starts[-1] + dur[-1]
        # `periods` is even, so the next block starts in the state this one started in
        yield times


def mmpp_arrivals(n: int, base_rate: float, burst_rate: float, mean_base_s: float,
                  mean_burst_s: float, rng: np.random.Generator) -> np.ndarray:
    """First n arrivals of a 2-state Markov-modulated Poisson process (base state / burst state
    with exponential sojourns of the given means). Long-run rate =
    (base_rate*mean_base_s + burst_rate*mean_burst_s) / (mean_base_s + mean_burst_s)."""
    out: list[np.ndarray] = []
    have = 0
    for block in _mmpp_blocks(base_rate, burst_rate, mean_base_s, mean_burst_s, rng):
        if have >= n:
            break
        out.append(block)
        have += len(block)
    return np.concatenate(out)[:n] if out else np.empty(0)


class ArrivalStream:
    """Arrival times of a synthetic workload config (process gamma or mmpp), handed out in
    order, `take(k)` at a time, from the named stream "arrivals" of the root seed."""

    def __init__(self, a: Any, n: int, seed: int, block: int = DEFAULT_CHUNK) -> None:
        self._buf = np.empty(0)
        self._scale = 1.0
        rng = stream(seed, "arrivals")
        if a.process == "mmpp":
            self._blocks: Iterator[np.ndarray] = _mmpp_blocks(
                a.base_rate, a.burst_rate, a.mean_base_s, a.mean_burst_s, rng)
        else:
            self._blocks = gamma_times(n, a.rate, a.shape, rng, block)
            if a.vllm_scaling:
                # vLLM's rescale needs the last time: one pass over the same stream to find it
                last = 0.0
                for t in gamma_times(n, a.rate, a.shape, stream(seed, "arrivals"), block):
                    last = float(t[-1])
                self._scale = vllm_scale(n, a.rate, last)

    def take(self, k: int) -> np.ndarray:
        while len(self._buf) < k:
            nxt = next(self._blocks)
            if self._scale != 1.0:
                nxt = nxt * self._scale
            self._buf = np.concatenate((self._buf, nxt))
        out, self._buf = self._buf[:k], self._buf[k:]
        return out


# ------------------------------------------------------------------------------------------
# Lengths and image sizes
# ------------------------------------------------------------------------------------------


def sample_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    """n integer lengths from `dist`, rounded and clipped to [min, max] (int64).

    constant: `mean`. uniform: integers in [min, max] (mean ignored). lognormal: mean and cv of
    the unclipped law (sigma^2 = ln(1+cv^2)). normal: N(mean, (cv*mean)^2). pareto(alpha):
    x_min chosen so the unclipped mean is `mean` (x_min = mean*(alpha-1)/alpha) when that is
    >= min, else x_min = min. Uses only element-wise draws, so chunked calls concatenate to
    the single call.
    """
    d = dist.dist
    if d == "constant":
        x = np.full(n, float(dist.mean))
    elif d == "uniform":
        x = np.floor(dist.min + rng.random(n) * (dist.max - dist.min + 1))
    elif d == "lognormal":
        s2 = math.log1p(dist.cv ** 2)
        x = rng.lognormal(math.log(dist.mean) - s2 / 2, math.sqrt(s2), size=n)
    elif d == "normal":
        x = dist.mean + dist.cv * dist.mean * rng.standard_normal(n)
    elif d == "zipf":
        return zipf_ints(dist.min, dist.max, dist.alpha, rng.random(n))
    elif d == "pareto":
        xm = dist.mean * (dist.alpha - 1) / dist.alpha
        xm = xm if xm >= dist.min else float(dist.min)
        x = xm * (1.0 + rng.pareto(dist.alpha, size=n))
    else:
        raise ConfigError(f"dist={d!r} is invalid; allowed: constant, uniform, lognormal, pareto, normal")
    return np.clip(np.rint(x), dist.min, dist.max).astype(np.int64)


def zipf_ints(lo: int, hi: int, alpha: float, u: np.ndarray) -> np.ndarray:
    """Integers k in [lo, hi] with P(k) proportional to k^-alpha, by inversion of the discrete CDF
    at the uniforms u (element-wise, so chunked draws concatenate)."""
    k = np.arange(lo, hi + 1, dtype=float)
    cdf = np.cumsum(k ** -alpha)
    cdf /= cdf[-1]
    return (lo + np.minimum(np.searchsorted(cdf, u, side="right"), hi - lo)).astype(np.int64)


def _round_side(v: np.ndarray, r: int, hi: int) -> np.ndarray:
    """Clip to [16, hi], round to a multiple of r, keep within [r, largest multiple <= hi]."""
    v = np.rint(np.clip(v, 16, hi) / r) * r
    top = max(r, (hi // r) * r)
    return np.clip(v, r, top).astype(np.int64)


def sample_image_sizes(cfg: ImageSizeConfig, n: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) int arrays. Convention: the HEIGHT is the Pareto(alpha, x_min) draw (the law of
    numpy's `x_min * (1 + pareto(alpha))`, drawn by inversion, x_min * U**(-1/alpha)) and
    w = h * ratio, ratio = width/height drawn uniformly from `cfg.aspect_ratios` (repeats weight
    a ratio). Both sides are clipped to [16, max] and rounded to multiples of round_to
    (>= round_to, <= max). One (n, 2) uniform draw per call, row-major, so chunked calls
    concatenate to the single call."""
    u = rng.random((n, 2))
    side = cfg.x_min * (1.0 - u[:, 0]) ** (-1.0 / cfg.alpha)   # 1-U in (0, 1]: finite
    ratios = np.asarray(cfg.aspect_ratios, dtype=float)
    idx = np.minimum((u[:, 1] * len(ratios)).astype(np.int64), len(ratios) - 1)
    h = _round_side(side, cfg.round_to, cfg.max)
    w = _round_side(side * ratios[idx], cfg.round_to, cfg.max)
    return h, w


def outpaint_size(h: np.ndarray, w: np.ndarray, cfg: ImageSizeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Outpaint canvas: the input enlarged 1.5x on its short side, clipped to max, rounded."""
    h = np.asarray(h, dtype=float)
    w = np.asarray(w, dtype=float)
    short_h = h <= w
    nh = np.where(short_h, h * 1.5, h)
    nw = np.where(short_h, w, w * 1.5)
    return _round_side(nh, cfg.round_to, cfg.max), _round_side(nw, cfg.round_to, cfg.max)
