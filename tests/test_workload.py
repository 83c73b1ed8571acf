"""Synthetic workload: arrival laws, length / size laws, task mix, determinism, laziness."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiler.models import load_model
from sim.config import (ArrivalConfig, ConfigError, ImageSizeConfig, LengthDist, WorkloadConfig)
from sim.rng import stream
from reference import gamma_arrivals_ref
from sim.workloads import request_source
from sim.workloads.laws import (gamma_arrivals, mmpp_arrivals, sample_image_sizes, sample_lengths)
from sim.workloads.requests import image_tokens


def fields(r):
    return (r.id, r.arrival, r.task, r.model, r.prompt_tokens, r.output_tokens, r.input_images,
            r.output_image, r.steps, r.cfg, r.slo_class, r.image_tokens_in, r.image_tokens_out)


def wl(n=2000, **kw) -> WorkloadConfig:
    return WorkloadConfig(num_requests=n, **kw)


# --- arrivals --------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0.25, 0.5, 1.0, 4.0])
def test_gamma_mean_and_cv(k):
    n, rate = 200_000, 5.0
    t = gamma_arrivals(n, rate, k, stream(1, f"g{k}"))
    gaps = np.diff(np.concatenate(([0.0], t)))
    assert t[0] > 0 and np.all(gaps >= 0)
    cv = 1 / math.sqrt(k)
    # CLT: mean has relative s.e. cv/sqrt(n); the variance estimate has relative s.e.
    # sqrt((kurtosis-1)/n) with Gamma kurtosis 3 + 6/k, so the CV has about half that.
    tol_mean = 4 * cv / math.sqrt(n)
    tol_cv = 4 * 0.5 * math.sqrt((2 + 6 / k) / n)
    assert gaps.mean() * rate == pytest.approx(1.0, rel=tol_mean)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=tol_cv)


def test_vllm_scaling_last_arrival_is_n_over_rate():
    for n, rate, k in [(1, 3.0, 0.5), (1000, 4.0, 0.5), (5000, 0.7, 2.0)]:
        t = gamma_arrivals(n, rate, k, stream(0, "arrivals"), vllm_scaling=True)
        assert t[-1] == pytest.approx(n / rate, rel=1e-12)
        assert np.all(np.diff(t) >= 0) and t[0] > 0


def test_vllm_scaling_matches_vllm_loop_with_legacy_rng():
    """Mirror of vllm/benchmarks/serve.py::get_request (0.26.0), global legacy np.random."""
    n, rate, k, seed = 300, 2.5, 0.5, 42
    np.random.seed(seed)
    delay = [np.random.gamma(shape=k, scale=1.0 / (rate * k)) for _ in range(n)]
    for i in range(1, n):
        delay[i] += delay[i - 1]
    f = (n / rate) / delay[-1]
    delay = [d * f for d in delay]
    ours = gamma_arrivals(n, rate, k, np.random.RandomState(seed), vllm_scaling=True)
    assert np.array_equal(ours, np.array(delay))


def test_workload_vllm_scaling_equals_pure_function_and_is_chunk_invariant():
    cfg = wl(5000, arrival=ArrivalConfig(rate=3.0, shape=0.5, vllm_scaling=True))
    ref = gamma_arrivals_ref(5000, 3.0, 0.5, stream(9, "arrivals"), vllm_scaling=True)
    assert np.array_equal(gamma_arrivals(5000, 3.0, 0.5, stream(9, "arrivals"), vllm_scaling=True), ref)
    for chunk in (777, 65536):
        got = np.array([r.arrival for r in request_source(cfg, 9, chunk_size=chunk)])
        assert np.array_equal(got, ref)


def test_mmpp_long_run_rate():
    b, u, mb, mu = 2.0, 12.0, 6.0, 1.0
    t = mmpp_arrivals(200_000, b, u, mb, mu, stream(3, "arrivals"))
    assert np.all(np.diff(t) >= 0) and t[0] >= 0
    expect = (b * mb + u * mu) / (mb + mu)
    # ~3300 sojourn cycles: relative s.e. of the rate ~0.6%; allow ~5 sigma
    assert len(t) / t[-1] == pytest.approx(expect, rel=0.03)
    # bursty: index of dispersion of counts in 1 s windows well above Poisson's 1
    counts = np.bincount(t.astype(int))
    assert counts.var() / counts.mean() > 2.0


def test_mmpp_prefix_stable_and_matches_workload():
    a = mmpp_arrivals(1000, 2, 12, 6, 1, stream(3, "arrivals"))
    b = mmpp_arrivals(150_000, 2, 12, 6, 1, stream(3, "arrivals"))
    assert np.array_equal(a, b[:1000])
    cfg = wl(150_000, arrival=ArrivalConfig(process="mmpp", base_rate=2, burst_rate=12,
                                            mean_base_s=6, mean_burst_s=1))
    w = request_source(cfg, 3, chunk_size=40_000)
    got = np.concatenate([[r.arrival for r in c] for c in w.chunks()])
    assert np.array_equal(got, b)


# --- lengths and sizes ----------------------------------------------------------------------

def test_pareto_image_sizes_tail_and_mean():
    alpha, xm = 2.5, 256
    cfg = ImageSizeConfig(alpha=alpha, x_min=xm, max=10_000_000, round_to=1, aspect_ratios=[1.0])
    h, w = sample_image_sizes(cfg, 200_000, stream(5, "images"))
    assert np.array_equal(h, w)
    hill = len(h) / np.log(h / xm + 1e-12).clip(min=0).sum()
    assert hill == pytest.approx(alpha, rel=4 / math.sqrt(len(h)) + 0.01)
    assert h.mean() == pytest.approx(alpha * xm / (alpha - 1), rel=0.02)


def test_image_sizes_clipped_and_rounded():
    cfg = ImageSizeConfig(alpha=1.2, x_min=256, max=2010, round_to=16)
    h, w = sample_image_sizes(cfg, 50_000, stream(5, "images"))
    for s in (h, w):
        assert s.min() >= 16 and s.max() <= 2010
        assert np.all(s % 16 == 0)
    assert h.max() == 2000 and h.min() == 256          # heavy tail reaches the clip
    small = h < 1000     # no clipping: w is h * a configured ratio, up to rounding
    err = np.min([np.abs(w[small] - h[small] * a) for a in cfg.aspect_ratios], axis=0)
    assert err.max() <= 8 * (1 + max(cfg.aspect_ratios)) + 1e-9   # both sides rounded to 16


@pytest.mark.parametrize("dist", ["constant", "uniform", "lognormal", "pareto", "normal"])
def test_length_means(dist):
    d = LengthDist(dist=dist, mean=300, cv=0.5, alpha=3.0, min=1, max=100_000)
    x = sample_lengths(d, 100_000, stream(2, "lengths"))
    assert x.dtype == np.int64 and x.min() >= 1 and x.max() <= 100_000
    if dist == "uniform":
        assert x.mean() == pytest.approx(50_000.5, rel=0.02)
    else:
        assert x.mean() == pytest.approx(300, rel=0.02)
    if dist == "constant":
        assert np.all(x == 300)


def test_pareto_length_xmin_falls_back_to_min():
    d = LengthDist(dist="pareto", mean=10, alpha=2.5, min=50, max=10_000)
    x = sample_lengths(d, 10_000, stream(2, "lengths"))
    assert x.min() >= 50 and np.quantile(x, 0.01) < 52


@settings(max_examples=40, deadline=None)
@given(dist=st.sampled_from(["constant", "uniform", "lognormal", "pareto", "normal"]),
       mean=st.floats(1, 5000), cv=st.floats(0, 3), lo=st.integers(1, 100),
       span=st.integers(0, 5000), seed=st.integers(0, 2**31))
def test_lengths_within_bounds(dist, mean, cv, lo, span, seed):
    d = LengthDist(dist=dist, mean=mean, cv=cv, alpha=2.5, min=lo, max=lo + span)
    x = sample_lengths(d, 500, stream(seed, "lengths"))
    assert len(x) == 500 and x.min() >= lo and x.max() <= lo + span


@settings(max_examples=30, deadline=None)
@given(process=st.sampled_from(["gamma", "mmpp"]), rate=st.floats(0.01, 1000),
       shape=st.floats(0.05, 20), scale=st.booleans(), n=st.integers(1, 3000),
       seed=st.integers(0, 2**31))
def test_arrivals_sorted_nonnegative(process, rate, shape, scale, n, seed):
    a = ArrivalConfig(process=process, rate=rate, shape=shape, vllm_scaling=scale,
                      base_rate=rate, burst_rate=rate * 5, mean_base_s=10, mean_burst_s=2)
    t = np.array([r.arrival for r in request_source(wl(n, arrival=a), seed, chunk_size=997)])
    assert len(t) == n and t.min() >= 0 and np.all(np.diff(t) >= 0)


# --- requests --------------------------------------------------------------------------------

def test_mix_proportions_and_fields():
    cfg = wl(60_000)
    reqs = list(request_source(cfg, 4))
    tasks = np.array([r.task for r in reqs])
    tot = sum(cfg.mix.values())
    for t, wt in cfg.mix.items():
        p = wt / tot
        assert (tasks == t).mean() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / len(reqs)) + 1e-9)
    qi = load_model("qwen_image")
    for r in reqs[:3000]:
        if r.text_out:
            assert r.steps == 0 and not r.cfg and r.output_tokens >= 1 and r.output_image is None
            assert r.slo_class == "interactive" and r.model == "qwen2_5_vl_7b"
        else:
            assert r.steps == qi.request_defaults["steps"] and r.cfg is True and r.output_tokens == 0
            assert r.image_tokens_out == qi.latent_tokens(*r.output_image)
        assert bool(r.input_images) == (r.task in ("understand", "edit", "inpaint", "outpaint"))
        if r.task in ("edit", "inpaint"):
            assert r.output_image == r.input_images[0]
        if r.task == "outpaint":
            (h, w), (oh, ow) = r.input_images[0], r.output_image
            cap = WorkloadConfig().image.max   # outpaint cannot grow past the clip
            assert (oh >= h and ow >= w) and (oh, ow) != (h, w) or min(h, w) * 1.5 > cap
        assert 4 <= r.prompt_tokens <= 8192
    assert [r.id for r in reqs] == list(range(len(reqs)))


def test_zero_weight_tasks_never_drawn():
    mix = {"text": 1.0, "understand": 0.0, "generate": 1.0, "edit": 0, "inpaint": 0, "outpaint": 0}
    tasks = {r.task for r in request_source(wl(5000, mix=mix), 0)}
    assert tasks == {"text", "generate"}


def test_images_per_request_and_overrides():
    cfg = wl(500, images_per_request=3, steps=7, cfg=False,
             mix={"understand": 1.0, "edit": 1.0})
    for r in request_source(cfg, 1):
        assert len(r.input_images) == 3
        if r.task == "edit":
            assert r.steps == 7 and r.cfg is False


def test_image_tokens_rules():
    vl, qi, fx = load_model("qwen2_5_vl_7b"), load_model("qwen_image"), load_model("flux1_dev")
    assert image_tokens(vl, "understand", ((448, 448),), None) == (256, 0)
    assert image_tokens(vl, "understand", ((448, 448), (448, 448)), None) == (512, 0)
    # Qwen-Image-Edit: the VL encoder sees a 384x384-area copy -> smart_resize 392x392 -> 196
    assert image_tokens(qi, "edit", ((1024, 1024),), (1024, 1024)) == (196, 4096)
    assert image_tokens(qi, "generate", (), (1328, 1328)) == (0, 83 * 83)
    assert image_tokens(fx, "edit", ((1024, 768),), (1024, 768)) == (64 * 48, 64 * 48)
    assert image_tokens(vl, "text", (), None) == (0, 0)


def test_determinism_and_seed_sensitivity():
    a = [fields(r) for r in request_source(wl(3000), 11)]
    b = [fields(r) for r in request_source(wl(3000), 11)]
    c = [fields(r) for r in request_source(wl(3000), 12)]
    assert a == b and a != c
    w = request_source(wl(100), 3)
    assert [fields(r) for r in w] == [fields(r) for r in w]     # re-iterable


def test_streams_independent_of_mix_and_lengths():
    base = request_source(wl(3000), 5)
    other = request_source(wl(3000, mix={"text": 1.0, "generate": 3.0},
                        prompt_tokens=LengthDist(dist="uniform", min=1, max=10)), 5)
    ra, rb = list(base), list(other)
    assert [r.arrival for r in ra] == [r.arrival for r in rb]
    # common random numbers: a generate request keeps its size when the mix changes
    for x, y in zip(ra, rb):
        if x.task == y.task == "generate":
            assert x.output_image == y.output_image


@pytest.mark.parametrize("process", ["gamma", "mmpp"])
def test_chunking_invariant(process):
    cfg = wl(5000, arrival=ArrivalConfig(process=process, mean_base_s=5, mean_burst_s=1))
    one = [fields(r) for r in request_source(cfg, 8, chunk_size=10**6)]
    many = [fields(r) for r in request_source(cfg, 8, chunk_size=333)]
    assert one == many
    w = request_source(cfg, 8, chunk_size=1000)
    assert [len(c) for c in w.chunks()] == [1000] * 5 and len(w) == 5000


def test_model_override():
    cfg = wl(200, mix={"text": 1.0, "understand": 1.0})
    assert {r.model for r in request_source(cfg, 0, model_override="qwen2_5_vl_7b")} == {"qwen2_5_vl_7b"}
    with pytest.raises(ConfigError, match="model='qwen_image' cannot serve task 'text'"):
        request_source(cfg, 0, model_override="qwen_image")
    with pytest.raises(ConfigError, match=r"model='nope'.*qwen2_5_vl_7b"):
        request_source(cfg, 0, model_override="nope")


@pytest.mark.parametrize("mut, field", [
    (lambda c: c.task_models.update(text="gpt5"), "workload.task_models.text"),
    (lambda c: c.task_models.update(generate="qwen2_5_vl_7b"), "workload.task_models.generate"),
    (lambda c: c.task_models.update(understand="llama2_7b"), "workload.task_models.understand"),
    (lambda c: setattr(c.arrival, "rate", 0.0), "workload.arrival.rate"),
    (lambda c: (c.mix.update(edit=0.0), c.task_models.update(edit="qwen_imgae")),
     "workload.task_models.edit"),
    (lambda c: setattr(c.arrival, "process", "weibull"), "workload.arrival.process"),
    (lambda c: c.mix.update(video=1.0), "workload.mix"),
    (lambda c: setattr(c.prompt_tokens, "dist", "weibull"), "workload.prompt_tokens.dist"),
    (lambda c: setattr(c.image, "x_min", 8), "workload.image.x_min"),
    (lambda c: setattr(c, "num_requests", 0), "workload.num_requests"),
])
def test_bad_config_names_field(mut, field):
    cfg = wl(10)
    mut(cfg)
    with pytest.raises(ConfigError) as e:
        request_source(cfg, 0)
    assert field in str(e.value)


def test_unknown_model_lists_available():
    cfg = wl(10)
    cfg.task_models["text"] = "gpt5"
    with pytest.raises(ConfigError, match=r"allowed: one of \[.*'qwen_image'.*\]"):
        request_source(cfg, 0)


def test_config_dataclass_roundtrip_unchanged():
    """The workload never mutates the config it was given."""
    cfg = wl(100)
    before = dataclasses.asdict(cfg)
    list(request_source(cfg, 0))
    assert dataclasses.asdict(cfg) == before


# --- settings that must take effect ------------------------------------------------------------

@pytest.mark.parametrize("ratios", [[1.0, 2.0, 0.5], [1.0, 1.0, 2.0], [0.75]])
def test_aspect_ratios_drawn_uniformly_from_the_list(ratios):
    """w = h x ratio with ratio uniform over the list (a repeated ratio weighs double)."""
    cfg = ImageSizeConfig(alpha=2.5, x_min=64, max=100_000, round_to=1, aspect_ratios=ratios)
    n = 6000
    h, w = sample_image_sizes(cfg, n, stream(4, "images.output"))
    got = w / h
    distinct = sorted(set(ratios))
    nearest = np.array(distinct)[np.argmin(np.abs(got[:, None] - np.array(distinct)[None, :]), axis=1)]
    assert np.all(np.abs(got - nearest) <= 1.0 / h + 1e-12)      # rounding of w to an integer
    for r in distinct:
        p = ratios.count(r) / len(ratios)
        frac = float(np.mean(nearest == r))
        assert frac == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n) + 1e-12), (r, frac)


def test_mmpp_starts_in_its_stationary_state():
    """P(burst at t=0) = mean_burst / (mean_base + mean_burst): with a silent base state and a
    dense burst state, the first arrival comes at once exactly when the process starts in the
    burst state (or the base sojourn is very short)."""
    base, burst, mb, mu, tau = 0.0, 200.0, 4.0, 1.0, 0.05
    p = mu / (mb + mu)                               # 0.2
    n = 600
    soon = sum(mmpp_arrivals(1, base, burst, mb, mu, stream(s, "arrivals"))[0] < tau
               for s in range(n))
    # from a burst start: an arrival before tau and before the sojourn ends; from a base start
    # (silent): at most the chance that its sojourn ends before tau
    p_burst = burst / (burst + 1 / mu) * (1 - math.exp(-(burst + 1 / mu) * tau))
    lo, hi = p * p_burst, p * p_burst + (1 - p) * (1 - math.exp(-tau / mb))
    sd = 0.5 / math.sqrt(n)
    assert lo - 4 * sd <= soon / n <= hi + 4 * sd


def test_mmpp_sojourn_means_and_alternation():
    """Counts per sojourn follow the state that is on: the share of time spent in the burst
    state (dense arrivals) is mean_burst / (mean_base + mean_burst)."""
    t = mmpp_arrivals(400_000, 0.0, 100.0, 3.0, 1.0, stream(8, "arrivals"))
    gaps = np.diff(t)
    # gaps inside a burst are ~Exp(100); a gap > 0.2 s is (almost surely) a base sojourn
    burst_time = gaps[gaps < 0.2].sum()
    base_time = gaps[gaps >= 0.2].sum()
    assert burst_time / (burst_time + base_time) == pytest.approx(1.0 / 4.0, abs=0.03)
    # base sojourns are Exp(3 s): their mean, from the long gaps (each one sojourn, or a few)
    assert 2.5 < gaps[gaps >= 0.2].mean() < 4.5


def test_image_input_task_needs_an_image_tokenizer():
    from sim.workloads.requests import check_task_model
    vl = load_model("qwen2_5_vl_7b")
    check_task_model("understand", vl, "workload.task_models.understand")     # accepted
    check_task_model("text", vl, "workload.task_models.text")
    blind = dataclasses.replace(vl, image_tokenizer={})
    with pytest.raises(ConfigError, match="no image tokenizer for task 'understand'"):
        check_task_model("understand", blind, "workload.task_models.understand")
    check_task_model("text", blind, "workload.task_models.text")              # text is fine
    qi = load_model("qwen_image")
    check_task_model("edit", qi, "workload.task_models.edit")                 # via its condition encoder
    with pytest.raises(ConfigError, match="no latent spec"):
        check_task_model("generate", dataclasses.replace(qi, latent={}), "workload.task_models.generate")
    with pytest.raises(ConfigError, match="cannot serve task 'generate'"):
        check_task_model("generate", vl, "workload.task_models.generate")
    with pytest.raises(ConfigError, match="task='paint' is invalid"):
        check_task_model("paint", vl, "workload.task_models.paint")


def test_outpaint_canvas_and_condition_copy_sizes():
    from sim.workloads.laws import outpaint_size
    from sim.workloads.requests import condition_image_size
    cfg = ImageSizeConfig(max=2048, round_to=16)
    h, w = outpaint_size(np.array([512, 768, 640]), np.array([768, 512, 640]), cfg)
    assert h.tolist() == [768, 768, 960] and w.tolist() == [768, 768, 640]   # short side x1.5
    h, w = outpaint_size(np.array([1600]), np.array([1024]), cfg)
    assert (h.tolist(), w.tolist()) == ([1600], [1536])
    h, w = outpaint_size(np.array([1024]), np.array([1600]), cfg)          # 1536, clipped: no
    assert (h.tolist(), w.tolist()) == ([1536], [1600])
    # Qwen-Image-Edit's condition copy: ~target area, ratio kept, sides multiples of 32
    assert condition_image_size(1024, 768, 1024 * 1024) == (1184, 896)
    assert condition_image_size(512, 512, 384 * 384) == (384, 384)
    assert condition_image_size(100, 4000, 1024) == (32, 192)


def test_image_tokens_of_several_inputs_add_up():
    vl, qi = load_model("qwen2_5_vl_7b"), load_model("qwen_image")
    one = image_tokens(qi, "edit", ((1024, 1024),), (1024, 1024))[0]
    two = image_tokens(qi, "edit", ((1024, 1024), (1024, 1024)), (1024, 1024))[0]
    assert (one, two) == (196, 392)
    assert image_tokens(vl, "understand", ((448, 448), (896, 448)), None) == (256 + 512, 0)
    assert image_tokens(qi, "generate", (), None) == (0, 0)


def test_workload_chunk_size_one_and_mix_weights():
    cfg = wl(300, mix={"text": 3.0, "understand": 1.0})
    a = [fields(r) for r in request_source(cfg, 2, chunk_size=1)]
    assert a == [fields(r) for r in request_source(cfg, 2)]
    with pytest.raises(ConfigError, match="chunk_size=0"):
        request_source(cfg, 2, chunk_size=0)
    text = sum(f[2] == "text" for f in a)
    assert text / 300 == pytest.approx(0.75, abs=4 * math.sqrt(0.75 * 0.25 / 300))
    assert request_source(cfg, 2).max_concurrency is None
    assert request_source(wl(10, max_concurrency=4), 2).max_concurrency == 4


def test_uniform_lengths_give_every_integer_of_the_range_equal_weight():
    dist = LengthDist(dist="uniform", min=1, max=4)
    n = 20_000
    x = sample_lengths(dist, n, stream(6, "lengths.prompt"))
    counts = np.bincount(x, minlength=5)[1:]
    assert counts.sum() == n and x.min() == 1 and x.max() == 4
    assert np.all(np.abs(counts / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n))


# --- edges of the laws and the per-task plan -------------------------------------------------

def test_no_requests_no_arrivals():
    assert gamma_arrivals(0, 5.0, 1.0, stream(1, "g")).shape == (0,)
    assert gamma_arrivals(-3, 5.0, 1.0, stream(1, "g"), vllm_scaling=True).shape == (0,)


class Recording:
    """A numpy Generator that records the sizes of its exponential draws (the MMPP's sojourns)."""

    def __init__(self, seed: int):
        self.g = np.random.default_rng(seed)
        self.sojourns: list[int] = []

    def exponential(self, scale, size):
        self.sojourns.append(size)
        return self.g.exponential(scale, size=size)

    def __getattr__(self, name):
        return getattr(self.g, name)


@pytest.mark.parametrize("base, burst, mb, mu, periods", [
    (100.0, 1000.0, 10.0, 1.0, 66),     # 2000 arrivals a pair of sojourns: 33 pairs ~ 65,536
    (10.0, 100.0, 2.0, 0.5, 256),       # 70 a pair: capped at 128 pairs
    (1e4, 1e5, 10.0, 10.0, 2),          # 1.1M a pair: at least one pair
])
def test_mmpp_blocks_hold_about_65k_arrivals(base, burst, mb, mu, periods):
    from sim.workloads.laws import _mmpp_blocks
    rng = Recording(3)
    blocks = _mmpp_blocks(base, burst, mb, mu, rng)
    next(blocks)
    next(blocks)
    assert rng.sojourns == [periods, periods]


def test_condition_copy_sides_are_at_least_32():
    from sim.workloads.requests import condition_image_size
    assert condition_image_size(100, 4000, 1024) == (32, 192)
    assert condition_image_size(4000, 100, 1024) == (192, 32)
    assert condition_image_size(10, 10, 16) == (32, 32)


def test_a_model_without_default_steps_needs_workload_steps():
    from sim.workloads.synthetic import TaskPlan
    qi = load_model("qwen_image")
    nosteps = dataclasses.replace(qi, request_defaults={"height": 1024, "width": 1024})
    plan = TaskPlan(wl(10, mix={"text": 1.0}), ["text"], None)
    with pytest.raises(ConfigError, match="workload.steps=None is invalid for f='qwen_image'"):
        plan.add("generate", nosteps, wl(10), "f")
    plan.add("generate", nosteps, wl(10, steps=7), "f")
    assert plan.steps["generate"] == 7
    bad = dataclasses.replace(qi, request_defaults={"steps": 0})
    with pytest.raises(ConfigError, match="workload.steps=None is invalid"):
        plan.add("generate", bad, wl(10), "f")
    plan.add("generate", qi, wl(10, cfg=False), "f")
    assert plan.steps["generate"] == qi.request_defaults["steps"] and plan.cfg["generate"] is False


def reuse_cfg(**kw):
    from sim.config import ImageReuseConfig
    return ImageReuseConfig(**kw)


def test_reused_images_follow_the_zipf_popularity_of_the_catalog():
    """prob=1: every image is a catalog image; rank r (0-based) weighs (r+1)^-alpha."""
    from sim.workloads.synthetic import ImageIds
    ids = ImageIds(reuse_cfg(prob=1.0, catalog=4, alpha=1.0), 5)
    n = 40_000
    got, _ = ids.assign(((64, 64),) * n)
    counts = np.bincount(got, minlength=4)
    assert counts.sum() == n and len(counts) == 4
    p = np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (1 + 1 / 2 + 1 / 3 + 1 / 4)
    assert np.all(np.abs(counts / n - p) < 4 * np.sqrt(p * (1 - p) / n))
    flat = ImageIds(reuse_cfg(prob=1.0, catalog=4, alpha=0.0), 5).assign(((64, 64),) * n)[0]
    assert np.all(np.abs(np.bincount(flat, minlength=4) / n - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n))


def test_new_images_get_consecutive_ids_after_the_catalog_and_catalog_sizes_stick():
    from sim.workloads.synthetic import ImageIds
    ids = ImageIds(reuse_cfg(prob=0.0, catalog=10), 1)
    assert ids.assign(((64, 64), (32, 32)))[0] == (10, 11)
    assert ids.assign(((64, 64),))[0] == (12,)
    always = ImageIds(reuse_cfg(prob=1.0, catalog=1), 1)
    got, sizes = always.assign(((64, 64), (128, 32), (16, 16)))
    assert got == (0, 0, 0) and sizes == ((64, 64),) * 3       # the first appearance's size


def test_a_catalog_pick_past_the_last_cdf_value_is_the_last_image():
    """The Zipf CDF's last value may round below 1: a uniform above it still picks an image of
    the catalog (ids 0..catalog-1), never the first new id."""
    from sim.workloads.synthetic import ImageIds
    ids = ImageIds(reuse_cfg(prob=1.0, catalog=2), 1)
    ids.cdf = np.array([0.5, 0.9])

    class Fixed:
        def random(self, shape):
            return np.array([[0.0, 0.95]])
    ids.rng = Fixed()
    assert ids.assign(((8, 8),))[0] == (1,) and ids.next_new == 2


@pytest.mark.parametrize("dist, want", [
    (LengthDist(dist="normal", mean=100, cv=0.3, min=1, max=1000), [114, 119, 114, 94, 159, 103]),
    (LengthDist(dist="lognormal", mean=100, cv=1.0, min=1, max=1000), [105, 119, 104, 60, 364, 77]),
    (LengthDist(dist="pareto", mean=100, alpha=2.5, min=1, max=1000), [97, 62, 82, 72, 80, 107]),
    (LengthDist(dist="uniform", min=1, max=1000), [721, 165, 411, 650, 568, 514]),
    (LengthDist(dist="zipf", min=1, max=1000, alpha=1.2), [34, 1, 4, 19, 10, 7]),
])
def test_length_draws_of_a_fixed_seed_are_pinned(dist, want):
    """Every run's figures follow from these draws (the golden runs use the default laws only);
    a law whose distribution is unchanged can still change its draws -- the normal law with its
    sign flipped, say -- and only a pinned draw sees that."""
    assert sample_lengths(dist, 6, stream(0, "lengths.prompt")).tolist() == want


# --- mutation survivors (issue 22) ------------------------------------------------------------------

def test_zipf_ints_stay_in_range_at_both_ends_of_the_unit_interval():
    """u = 0 gives lo; u = 1 (the CDF's last value, 1 exactly) gives hi, not hi + 1."""
    from sim.workloads.laws import zipf_ints
    assert zipf_ints(3, 6, 1.0, np.array([0.0, 1.0])).tolist() == [3, 6]
    assert zipf_ints(1, 1, 2.0, np.array([0.0, 0.5, 1.0])).tolist() == [1, 1, 1]


def test_cfg_defaults_to_off_for_a_model_without_a_cfg_default():
    from sim.workloads.synthetic import TaskPlan
    qi = load_model("qwen_image")
    nocfg = dataclasses.replace(qi, request_defaults={"steps": 4})
    plan = TaskPlan(wl(10, mix={"text": 1.0}), ["text"], None)
    plan.add("generate", nocfg, wl(10), "f")
    assert plan.cfg["generate"] is False and plan.steps["generate"] == 4


def test_a_zero_weight_task_needs_no_model_that_serves_it():
    """With model_override, tasks of weight 0 are not in the workload: a VLM can be run on a mix
    that lists image tasks at 0."""
    mix = {"text": 1.0, "understand": 0.0, "generate": 0.0, "edit": 0, "inpaint": 0, "outpaint": 0}
    reqs = list(request_source(wl(50, mix=mix), 0, model_override="qwen2_5_vl_7b"))
    assert {r.task for r in reqs} == {"text"} and {r.model for r in reqs} == {"qwen2_5_vl_7b"}


def test_without_generate_no_request_gets_a_generated_image():
    """A mix of text and understand only: no output image anywhere (the generate index must
    match no task)."""
    reqs = list(request_source(wl(400, mix={"text": 1.0, "understand": 1.0}), 2))
    assert {r.task for r in reqs} == {"text", "understand"}
    assert all(r.output_image is None and r.image_tokens_out == 0 for r in reqs)


# --- boundaries of the laws and the synthetic source, pinned with hand-made draws --------------

class _Draws:
    """A numpy Generator stand-in: fixed gamma gaps, an optional fixed scalar uniform, and a
    record of the sojourn counts (exponential sizes) and Poisson means it is asked for."""

    def __init__(self, gap: float = 0.5, u0=None, seed: int = 0):
        self.gap, self.u0, self.rng = gap, u0, np.random.default_rng(seed)
        self.sizes: list = []
        self.lams: list = []

    def gamma(self, shape, scale, size):
        return np.full(size, self.gap)

    def random(self, size=None):
        if size is None and self.u0 is not None:
            return self.u0
        return self.rng.random(size)

    def exponential(self, scale, size):
        self.sizes.append(size)
        return self.rng.exponential(scale, size)

    def poisson(self, lam):
        self.lams.append(np.asarray(lam))
        return self.rng.poisson(lam)


def test_vllm_scale_puts_the_last_arrival_at_n_over_rate():
    from sim.workloads.laws import vllm_scale
    assert vllm_scale(4, 2.0, 1.0) == 2.0            # last at 1 s, 4 requests at 2/s: x2
    assert vllm_scale(4, 2.0, 4.0) == 0.5
    assert vllm_scale(0, 2.0, 0.0) == 1.0            # nothing drawn: no rescale


def test_gamma_arrivals_rescale_only_when_asked():
    """Unscaled by default: the cumulative sums of the gaps; vllm_scaling=True rescales them so
    the last is at n / rate (gaps of 0.5 s, 4 requests at 1/s: a factor of exactly 2)."""
    t = gamma_arrivals(5, 1.0, 1.0, np.random.default_rng(3))
    np.testing.assert_array_equal(t, np.cumsum(np.random.default_rng(3).gamma(1.0, 1.0, 5)))
    np.testing.assert_array_equal(gamma_arrivals(4, 1.0, 2.0, _Draws(0.5)), [0.5, 1.0, 1.5, 2.0])
    np.testing.assert_array_equal(gamma_arrivals(4, 1.0, 2.0, _Draws(0.5), vllm_scaling=True),
                                  [1.0, 2.0, 3.0, 4.0])


def test_arrival_stream_applies_the_vllm_scale(monkeypatch):
    from sim.workloads import laws
    monkeypatch.setattr(laws, "stream", lambda seed, name: _Draws(0.5))
    a = ArrivalConfig(rate=1.0, shape=2.0, vllm_scaling=True)
    s = laws.ArrivalStream(a, 4, 0)
    np.testing.assert_array_equal(np.concatenate([s.take(3), s.take(1)]), [1.0, 2.0, 3.0, 4.0])
    a = ArrivalConfig(rate=1.0, shape=2.0)
    np.testing.assert_array_equal(laws.ArrivalStream(a, 4, 0).take(4), [0.5, 1.0, 1.5, 2.0])


def test_mmpp_block_size_and_first_state():
    """A block holds `periods` sojourns: 2 * clip(round(DEFAULT_CHUNK / per_pair), 1, 128),
    per_pair = base_rate * mean_base_s + burst_rate * mean_burst_s (the arrivals of one base and
    one burst sojourn on average). The first state is burst when its uniform u < p_burst."""
    from sim.workloads.laws import DEFAULT_CHUNK, _mmpp_blocks
    assert DEFAULT_CHUNK == 65_536
    # per_pair = 0 * 0.01 + 100 * 0.01 = 1: 65536 pairs, capped at 128; u = p_burst = 0.5: base
    # first (burst_rate / mean_burst_s = 1e4 would give round(6.55) = 7 pairs)
    d = _Draws(u0=0.5)
    next(_mmpp_blocks(0.0, 100.0, 0.01, 0.01, d))
    assert d.sizes == [256]
    assert d.lams[0][0] == 0.0 and d.lams[0][1] > 0.0      # base (rate 0), then burst
    d = _Draws(u0=0.4999)
    next(_mmpp_blocks(0.0, 100.0, 0.01, 0.01, d))
    assert d.lams[0][0] > 0.0 and d.lams[0][1] == 0.0      # burst first
    # per_pair = 26214.43: 65536 / per_pair = 2.4999971 rounds to 2 pairs (65537 would give 3)
    d = _Draws(u0=0.9)
    next(_mmpp_blocks(26214.43, 0.0, 1.0, 1.0, d))
    assert d.sizes == [4]


def test_mmpp_arrivals_of_nothing_is_empty():
    assert mmpp_arrivals(0, 2.0, 12.0, 60.0, 10.0, np.random.default_rng(0)).shape == (0,)


def test_zipf_ints_inverts_the_cdf_of_lo_to_hi():
    """P(1) : P(2) = 1 : 1/2 on [1, 2]: CDF (2/3, 1), so u = 0.6 gives 1 and u = 0.7 gives 2."""
    from sim.workloads.laws import zipf_ints
    assert zipf_ints(1, 2, 1.0, np.array([0.0, 0.6, 0.7, 0.999])).tolist() == [1, 1, 2, 2]


def test_image_sides_are_clipped_at_16_before_rounding():
    from sim.workloads.laws import outpaint_size
    cfg = ImageSizeConfig(round_to=1, max=1024)
    h, w = outpaint_size(np.array([8, 100]), np.array([10, 40]), cfg)
    assert h.tolist() == [16, 100] and w.tolist() == [16, 60]


def test_one_denoising_step_is_allowed():
    from sim.workloads.synthetic import TaskPlan
    plan = TaskPlan(wl(10, mix={"text": 1.0}), ["text"], None)
    plan.add("generate", load_model("qwen_image"), wl(10, steps=1), "f")
    assert plan.steps["generate"] == 1


def test_an_image_is_a_catalog_image_when_its_uniform_is_below_prob():
    """u < prob (probability prob for u uniform on [0, 1)): at u == prob the image is new."""
    from sim.workloads.synthetic import ImageIds
    ids = ImageIds(reuse_cfg(prob=0.5, catalog=10), 0)
    ids.rng = type("U", (), {"random": lambda self, size: np.array([[0.5, 0.0], [0.25, 0.0]])})()
    assert ids.assign(((64, 64), (32, 32))) == ((10, 0), ((64, 64), (32, 32)))
