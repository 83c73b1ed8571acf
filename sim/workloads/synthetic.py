"""Synthetic workloads: arrival processes, length and image-size laws, and the lazy `Workload`
iterator that turns a `WorkloadConfig` into a stream of `Request`s in arrival order.

Why this shape:
- Every random concern draws from its own named stream (`sim.rng.stream`), and every request
  draws every variable whether its task uses it or not. So the same seed gives the same arrival
  times whatever the task mix, and request i keeps its sizes when the mix changes (common random
  numbers: policy and mix comparisons see less noise).
- Requests are generated in numpy chunks and built into objects only as they are consumed, so a
  1,000,000-request run never holds a million `Request` objects that the simulator hasn't reached.
  All draws are element-wise sequential, so the chunk size never changes a single value.
"""
from __future__ import annotations

import gc
import math
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import numpy as np

from profiler.models import TASKS, ModelSpec, UnknownModelError, available_models, load_model
from sim.config import ConfigError, ImageSizeConfig, LengthDist, WorkloadConfig
from sim.core.records import IMAGE_IN_TASKS, IMAGE_OUT_TASKS, TEXT_OUT_TASKS, Request
from sim.rng import stream

DEFAULT_CHUNK = 65_536

# ------------------------------------------------------------------------------------------
# Arrival processes (pure functions of (params, rng))
# ------------------------------------------------------------------------------------------


def gamma_arrivals(n: int, rate: float, shape: float, rng: np.random.Generator,
                   vllm_scaling: bool = False) -> np.ndarray:
    """Arrival times with i.i.d. Gamma(shape=k, mean=1/rate) gaps (k=1 Poisson; CV = 1/sqrt(k)).

    The first arrival is the first gap (> 0), as in vLLM. With `vllm_scaling=True` this mirrors
    `vllm bench serve --request-rate R --burstiness k` of vLLM 0.26.0
    (`vllm/benchmarks/serve.py::get_request`, no ramp-up): gaps ~ Gamma(shape=k, scale=1/(R*k)),
    cumulative sum from the first request, then every time is multiplied by
    `(N / R) / cumsum[-1]` so the last request is sent at N/R ("to close the 1-2% gap ... for
    stabilizing the throughput data from different random seeds"). The rescaling makes the
    times exchangeable-but-not-independent (a Dirichlet bridge), which is why it is optional.
    `rng` may also be a legacy `np.random.RandomState(seed)`: vLLM draws from the global legacy
    generator seeded with `--seed`, so that reproduces its draws when nothing else consumed
    the global stream first.
    """
    if n <= 0:
        return np.empty(0)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    t = np.cumsum(gaps)   # add.accumulate is sequential: bit-identical to vLLM's Python loop
    if vllm_scaling and t[-1] != 0:
        t = t * ((n / rate) / t[-1])
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


class _ArrivalStream:
    """Arrival times of a synthetic config, handed out chunk by chunk in order."""

    def __init__(self, cfg: WorkloadConfig, seed: int, block: int = DEFAULT_CHUNK) -> None:
        a = self._cfg_arrival = cfg.arrival
        self._n = cfg.num_requests
        self._block = block
        self._rng = stream(seed, "arrivals")
        self._buf = np.empty(0)
        self._carry = 0.0
        self._made = 0
        self._scale = 1.0
        if a.process == "mmpp":
            self._mmpp: Optional[Iterator[np.ndarray]] = _mmpp_blocks(
                a.base_rate, a.burst_rate, a.mean_base_s, a.mean_burst_s, self._rng)
        else:
            self._mmpp = None
            if a.vllm_scaling:
                # vLLM's rescale needs the total: one pass over the same stream to find it.
                probe = stream(seed, "arrivals")
                last, left = 0.0, self._n
                while left > 0:
                    k = min(block, left)
                    last = float(np.cumsum(np.concatenate(
                        ([last], probe.gamma(a.shape, 1.0 / (a.rate * a.shape), size=k))))[-1])
                    left -= k
                self._scale = (self._n / a.rate) / last if last != 0 else 1.0

    def _gamma_block(self) -> np.ndarray:
        a = self._cfg_arrival
        k = min(self._block, self._n - self._made)
        gaps = self._rng.gamma(a.shape, 1.0 / (a.rate * a.shape), size=k)
        t = np.cumsum(np.concatenate(([self._carry], gaps)))[1:]
        self._carry = float(t[-1])
        self._made += k
        return t * self._scale if self._scale != 1.0 else t

    def take(self, k: int) -> np.ndarray:
        while len(self._buf) < k:
            nxt = next(self._mmpp) if self._mmpp is not None else self._gamma_block()
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
    elif d == "pareto":
        xm = dist.mean * (dist.alpha - 1) / dist.alpha
        xm = xm if xm >= dist.min else float(dist.min)
        x = xm * (1.0 + rng.pareto(dist.alpha, size=n))
    else:
        raise ConfigError(f"dist={d!r} is invalid; allowed: constant, uniform, lognormal, pareto, normal")
    return np.clip(np.rint(x), dist.min, dist.max).astype(np.int64)


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


# ------------------------------------------------------------------------------------------
# Image tokens: the single definition everyone imports
# ------------------------------------------------------------------------------------------


def condition_image_size(h: int, w: int, target_pixels: int) -> tuple[int, int]:
    """Qwen-Image-Edit's condition copy: same aspect ratio, area ~ target_pixels, sides rounded
    to multiples of 32 (diffusers `calculate_dimensions`)."""
    ratio = w / h
    cw = math.sqrt(target_pixels * ratio)
    ch = cw / ratio
    return max(32, round(ch / 32) * 32), max(32, round(cw / 32) * 32)


def image_tokens(spec: ModelSpec, task: str, input_images: tuple[tuple[int, int], ...],
                 output_image: tuple[int, int] | None) -> tuple[int, int]:
    """(image_tokens_in, image_tokens_out) of a request in the serving model's own tokenization.

    In: VLMs (an `image_tokenizer`): Qwen2-VL smart_resize tokens of each input image. AR+DiT
    models with a `condition_encoder` (Qwen-Image-Edit): the encoder's tokens of a copy resized
    to `condition_image_pixels`. DiT-only models (FLUX, SD3): latent patches of each input.
    Out: latent patches of the output image (0 for text output). `task` is part of the
    signature so task-specific rules can be added without changing callers.
    """
    tin = 0
    if input_images:
        if spec.image_tokenizer:
            tin = sum(spec.image_input_tokens(h, w) for h, w in input_images)
        elif spec.condition_encoder:
            enc = load_model(spec.condition_encoder)
            px = spec.condition_image_pixels
            for h, w in input_images:
                ch, cw = condition_image_size(h, w, px) if px else (h, w)
                tin += enc.image_input_tokens(ch, cw)
        elif spec.latent:
            tin = sum(spec.latent_tokens(h, w) for h, w in input_images)
        else:
            raise ValueError(f"model {spec.name} cannot take input images (task {task})")
    tout = spec.latent_tokens(*output_image) if output_image is not None and spec.latent else 0
    return tin, tout


# ------------------------------------------------------------------------------------------
# Validation and per-task constants
# ------------------------------------------------------------------------------------------


def resolve_model(name: str, fieldname: str) -> ModelSpec:
    """load_model with a ConfigError naming the field and the available models."""
    try:
        return load_model(name)
    except UnknownModelError:
        raise ConfigError(f"{fieldname}={name!r} is invalid; allowed: one of "
                          f"{list(available_models())}") from None


def check_task_model(task: str, spec: ModelSpec, fieldname: str) -> None:
    """Refuse a (task, model) pair the model cannot serve, before any simulation."""
    if task not in TASKS:
        raise ConfigError(f"{fieldname}: task={task!r} is invalid; allowed: one of {list(TASKS)}")
    if task not in spec.tasks:
        raise ConfigError(f"{fieldname}={spec.name!r} cannot serve task {task!r}; allowed: a model "
                          f"whose tasks include {task!r} (this one serves {list(spec.tasks)})")
    if task in IMAGE_IN_TASKS and not (spec.image_tokenizer or spec.condition_encoder or spec.latent):
        raise ConfigError(f"{fieldname}={spec.name!r} has no image tokenizer for task {task!r}")
    if task in IMAGE_OUT_TASKS and not spec.latent:
        raise ConfigError(f"{fieldname}={spec.name!r} has no latent spec for image task {task!r}")


class TaskPlan:
    """Per-task constants (model, steps, cfg, SLO class) resolved once, validated up front."""

    def __init__(self, cfg: WorkloadConfig, tasks: list[str], model_override: Optional[str]) -> None:
        self.model: dict[str, str] = {}
        self.spec: dict[str, ModelSpec] = {}
        self.steps: dict[str, int] = {}
        self.cfg: dict[str, bool] = {}
        self.slo: dict[str, str] = {}
        if not model_override:       # typos in unused entries are still typos
            for t, name in cfg.task_models.items():
                field = f"workload.task_models.{t}"
                if t not in TASKS:
                    raise ConfigError(f"{field} is invalid; allowed: task names in {list(TASKS)}")
                check_task_model(t, resolve_model(str(name), field), field)
        for t in tasks:
            if model_override:
                name, field = model_override, "model"
            else:
                if t not in cfg.task_models:
                    raise ConfigError(f"workload.task_models.{t}=None is invalid; allowed: a model "
                                      f"name for task {t!r}, one of {list(available_models())}")
                name, field = cfg.task_models[t], f"workload.task_models.{t}"
            spec = resolve_model(name, field)
            check_task_model(t, spec, field)
            self.add(t, spec, cfg, field)

    def add(self, t: str, spec: ModelSpec, cfg: WorkloadConfig, field: str) -> None:
        self.model[t], self.spec[t] = spec.name, spec
        self.slo[t] = str(cfg.slo_classes.get(t, "standard"))
        if t in TEXT_OUT_TASKS:
            self.steps[t], self.cfg[t] = 0, False
            return
        steps = cfg.steps if cfg.steps is not None else spec.defaults.get("steps")
        if steps is None or int(steps) < 1:
            raise ConfigError(f"workload.steps=None is invalid for {field}={spec.name!r} (no "
                              f"defaults.steps); allowed: an integer >= 1")
        self.steps[t] = int(steps)
        self.cfg[t] = bool(cfg.cfg if cfg.cfg is not None else spec.defaults.get("cfg", False))


class TokenCache:
    """Memoised `image_tokens`: sizes are multiples of round_to, so few distinct shapes occur."""

    def __init__(self) -> None:
        self._d: dict[tuple[Any, ...], tuple[int, int]] = {}

    def get(self, spec: ModelSpec, task: str, ins: tuple[tuple[int, int], ...],
            out: tuple[int, int] | None) -> tuple[int, int]:
        key = (spec.name, task, ins, out)
        v = self._d.get(key)
        if v is None:
            v = self._d[key] = image_tokens(spec, task, ins, out)
        return v


def build_requests(first_id: int, arrival: list[float], task: list[str], model: list[str],
                   prompt: list[int], output: list[int],
                   inputs: list[tuple[tuple[int, int], ...]], out_img: list[tuple[int, int] | None],
                   steps: list[int], cfgf: list[bool], slo: list[str],
                   specs: Mapping[str, ModelSpec], cache: TokenCache) -> list[Request]:
    """Request objects from column lists (shared by synthetic and trace workloads).

    The cyclic GC is paused while a chunk is built: tens of thousands of fresh container
    objects otherwise trigger repeated full collections that double the cost, and nothing
    built here forms a cycle."""
    reqs: list[Request] = []
    append, get = reqs.append, cache.get
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i, (a, t, m, ins, oi) in enumerate(zip(arrival, task, model, inputs, out_img)):
            tin, tout = get(specs[m], t, ins, oi) if (ins or oi is not None) else (0, 0)
            append(Request(first_id + i, a, t, m, prompt[i], output[i], ins, oi, steps[i],
                           cfgf[i], slo[i], image_tokens_in=tin, image_tokens_out=tout))
    finally:
        if was_enabled:
            gc.enable()
    return reqs


# ------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------


class Workload:
    """Requests of a `WorkloadConfig` in arrival order, generated lazily chunk by chunk.

    `len()` is `num_requests` (for `process: trace`, the number of usable trace rows;
    num_requests is then ignored). Iterating twice gives the same requests.
    """

    def __init__(self, cfg: WorkloadConfig, seed: int, model_override: Optional[str] = None,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        cfg.check()
        if chunk_size < 1:
            raise ConfigError(f"chunk_size={chunk_size!r} is invalid; allowed: >= 1")
        self.cfg, self.seed, self.model_override, self.chunk_size = cfg, int(seed), model_override, chunk_size
        if model_override:
            resolve_model(model_override, "model")
        self._trace = None
        if cfg.arrival.process == "trace":
            from sim.workloads.trace import TraceWorkload  # local: traces imports this module
            self._trace = TraceWorkload(cfg, self.seed, model_override, chunk_size)
            return
        mix = {t: float(w) for t, w in cfg.mix.items() if float(w) > 0}
        self.tasks = [t for t in TASKS if t in mix]          # fixed order: stable task indices
        wts = np.array([mix[t] for t in self.tasks])
        self.cum = np.cumsum(wts / wts.sum())
        self.cum[-1] = 1.0
        self.plan = TaskPlan(cfg, self.tasks, model_override)

    def __len__(self) -> int:
        return len(self._trace) if self._trace is not None else self.cfg.num_requests

    @property
    def max_concurrency(self) -> Optional[int]:
        """The client's in-flight limit (None: open loop); a replayed bench result brings its own."""
        return self._trace.max_concurrency if self._trace is not None else self.cfg.max_concurrency

    def __iter__(self) -> Iterator[Request]:
        if self._trace is not None:
            yield from self._trace
            return
        for chunk in self.chunks():
            chunk.reverse()             # hand requests out without the chunk keeping them
            while chunk:                # alive: a finished request is freed at once
                yield chunk.pop()

    def chunks(self) -> Iterator[list[Request]]:
        """Lists of at most chunk_size Requests, in arrival order."""
        if self._trace is not None:
            yield from self._trace.chunks()
            return
        cfg, seed = self.cfg, self.seed
        arr = _ArrivalStream(cfg, seed, self.chunk_size)
        r_task, r_prompt = stream(seed, "tasks"), stream(seed, "lengths.prompt")
        r_out, r_iprompt = stream(seed, "lengths.output"), stream(seed, "lengths.image_prompt")
        r_img_in, r_img_out = stream(seed, "images.input"), stream(seed, "images.output")
        plan, cache, k_img = self.plan, TokenCache(), cfg.images_per_request
        specs = {plan.model[t]: plan.spec[t] for t in self.tasks}
        tnames = np.array(self.tasks, dtype=object)
        idx_text_out = [i for i, t in enumerate(self.tasks) if t in TEXT_OUT_TASKS]
        idx_img_in = [i for i, t in enumerate(self.tasks) if t in IMAGE_IN_TASKS]
        idx_gen = self.tasks.index("generate") if "generate" in self.tasks else -1
        done, n = 0, cfg.num_requests
        while done < n:
            k = min(self.chunk_size, n - done)
            t_arr = arr.take(k)
            tidx = np.searchsorted(self.cum, r_task.random(k), side="right")
            tidx = np.minimum(tidx, len(self.tasks) - 1)
            p_text = sample_lengths(cfg.prompt_tokens, k, r_prompt)
            p_img = sample_lengths(cfg.image_prompt_tokens, k, r_iprompt)
            o_text = sample_lengths(cfg.output_tokens, k, r_out)
            ih, iw = sample_image_sizes(cfg.image, k * k_img, r_img_in)
            ih, iw = ih.reshape(k, k_img), iw.reshape(k, k_img)
            gh, gw = sample_image_sizes(cfg.image, k, r_img_out)
            ph, pw = outpaint_size(ih[:, 0], iw[:, 0], cfg.image)

            task_names = tnames[tidx]
            text_out = np.isin(tidx, idx_text_out)
            prompt = np.where(text_out, p_text, p_img).tolist()
            output = np.where(text_out, o_text, 0).tolist()
            tl = task_names.tolist()
            inputs: list[tuple[tuple[int, int], ...]] = [()] * k
            outs: list[tuple[int, int] | None] = [None] * k
            img_in = np.flatnonzero(np.isin(tidx, idx_img_in)).tolist()
            if img_in:
                sel = np.asarray(img_in)
                in_pairs = _pairs(ih[sel], iw[sel])
                oph, opw = ph[sel].tolist(), pw[sel].tolist()
                for j, i in enumerate(img_in):
                    t, pr = tl[i], in_pairs[j]
                    inputs[i] = pr
                    outs[i] = (None if t == "understand" else
                               (oph[j], opw[j]) if t == "outpaint" else pr[0])
            for i in np.flatnonzero(tidx == idx_gen).tolist():
                outs[i] = (int(gh[i]), int(gw[i]))
            yield build_requests(
                done, t_arr.tolist(), tl, [plan.model[t] for t in tl], prompt, output, inputs, outs,
                [plan.steps[t] for t in tl], [plan.cfg[t] for t in tl], [plan.slo[t] for t in tl],
                specs, cache)
            done += k


def _pairs(h: np.ndarray, w: np.ndarray) -> list[tuple[tuple[int, int], ...]]:
    """Rows of (k, m) size arrays as tuples of (h, w) pairs."""
    hl, wl = h.tolist(), w.tolist()
    return [tuple(zip(a, b)) for a, b in zip(hl, wl)]
