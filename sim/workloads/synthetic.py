"""The synthetic request source: a `WorkloadConfig`'s task mix, arrival process, length and
image-size laws (sim.workloads.laws) turned into a lazy stream of `Request`s in arrival order.

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

from collections.abc import Iterator
from typing import Optional

import numpy as np

from profiler.models import TASKS, ModelSpec, available_models
from sim.config import ConfigError, WorkloadConfig
from sim.core.records import Request
from sim.names import GENERATE, IMAGE_IN_TASKS, OUTPAINT, TEXT_OUT_TASKS, UNDERSTAND
from sim.rng import stream
from sim.workloads.laws import (DEFAULT_CHUNK, ArrivalStream, outpaint_size, sample_image_sizes,
                                sample_lengths)
from sim.workloads.requests import (TokenCache, build_requests, check_task_model,
                                    resolve_model)


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
        steps = cfg.steps if cfg.steps is not None else spec.request_defaults.get("steps")
        if steps is None or int(steps) < 1:
            raise ConfigError(f"workload.steps=None is invalid for {field}={spec.name!r} (no "
                              f"request_defaults.steps); allowed: an integer >= 1")
        self.steps[t] = int(steps)
        self.cfg[t] = bool(cfg.cfg if cfg.cfg is not None else spec.request_defaults.get("cfg", False))


class SyntheticWorkload:
    """Requests of a synthetic `WorkloadConfig` (process gamma or mmpp) in arrival order,
    generated lazily chunk by chunk. `len()` is `num_requests`; iterating twice gives the same
    requests. A `RequestSource` (sim.workloads)."""

    def __init__(self, cfg: WorkloadConfig, seed: int, model_override: Optional[str] = None,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        self.cfg, self.seed, self.model_override, self.chunk_size = cfg, int(seed), model_override, chunk_size
        self.max_concurrency: Optional[int] = cfg.max_concurrency   # None: open loop
        mix = {t: float(w) for t, w in cfg.mix.items() if float(w) > 0}
        self.tasks = [t for t in TASKS if t in mix]          # fixed order: stable task indices
        wts = np.array([mix[t] for t in self.tasks])
        self.cum = np.cumsum(wts / wts.sum())
        self.cum[-1] = 1.0
        self.plan = TaskPlan(cfg, self.tasks, model_override)

    def __len__(self) -> int:
        return self.cfg.num_requests

    def __iter__(self) -> Iterator[Request]:
        for chunk in self.chunks():
            chunk.reverse()             # hand requests out without the chunk keeping them
            while chunk:                # alive: a finished request is freed at once
                yield chunk.pop()

    def chunks(self) -> Iterator[list[Request]]:
        """Lists of at most chunk_size Requests, in arrival order."""
        cfg, seed = self.cfg, self.seed
        arr = ArrivalStream(cfg.arrival, cfg.num_requests, seed, self.chunk_size)
        r_task, r_prompt = stream(seed, "tasks"), stream(seed, "lengths.prompt")
        r_out, r_iprompt = stream(seed, "lengths.output"), stream(seed, "lengths.image_prompt")
        r_img_in, r_img_out = stream(seed, "images.input"), stream(seed, "images.output")
        plan, cache, k_img = self.plan, TokenCache(), cfg.images_per_request
        counts_law = cfg.image_count
        if counts_law is not None:          # a count law: draw sizes for the most images a request
            k_img = int(counts_law.max)     # can have, keep the first count of them
            r_count = stream(seed, "images.count")
            multi = [i for i, t in enumerate(self.tasks) if t in cfg.multi_image_tasks]
        reuse = ImageIds(cfg.image_reuse, seed) if cfg.image_reuse.prob > 0 else None
        specs = {plan.model[t]: plan.spec[t] for t in self.tasks}
        tnames = np.array(self.tasks, dtype=object)
        idx_text_out = [i for i, t in enumerate(self.tasks) if t in TEXT_OUT_TASKS]
        idx_img_in = [i for i, t in enumerate(self.tasks) if t in IMAGE_IN_TASKS]
        idx_gen = self.tasks.index(GENERATE) if GENERATE in self.tasks else -1
        done, n = 0, cfg.num_requests
        while done < n:
            k = min(self.chunk_size, n - done)
            t_arr = arr.take(k)
            # cum[-1] is 1.0, above every uniform: the index is at most len(tasks) - 1
            tidx = np.searchsorted(self.cum, r_task.random(k), side="right")
            p_text = sample_lengths(cfg.prompt_tokens, k, r_prompt)
            p_img = sample_lengths(cfg.image_prompt_tokens, k, r_iprompt)
            o_text = sample_lengths(cfg.output_tokens, k, r_out)
            ih, iw = sample_image_sizes(cfg.image, k * k_img, r_img_in)
            ih, iw = ih.reshape(k, k_img), iw.reshape(k, k_img)
            gh, gw = sample_image_sizes(cfg.image, k, r_img_out)
            n_img = None
            if counts_law is not None:
                n_img = np.where(np.isin(tidx, multi), sample_lengths(counts_law, k, r_count), 1)
            ph, pw = outpaint_size(ih[:, 0], iw[:, 0], cfg.image)

            task_names = tnames[tidx]
            text_out = np.isin(tidx, idx_text_out)
            prompt = np.where(text_out, p_text, p_img).tolist()
            output = np.where(text_out, o_text, 0).tolist()
            tl = task_names.tolist()
            inputs: list[tuple[tuple[int, int], ...]] = [()] * k
            outs: list[tuple[int, int] | None] = [None] * k
            img_in = np.flatnonzero(np.isin(tidx, idx_img_in)).tolist()
            ids: list[tuple[int, ...]] | None = None
            if img_in:
                sel = np.asarray(img_in)
                in_pairs = _pairs(ih[sel], iw[sel])
                if n_img is not None:
                    cnt = n_img[sel].tolist()
                    in_pairs = [pr[:c] for pr, c in zip(in_pairs, cnt)]
                if reuse is not None:
                    ids = [()] * k
                    for j, i in enumerate(img_in):
                        ids[i], in_pairs[j] = reuse.assign(in_pairs[j])
                oph, opw = ph[sel].tolist(), pw[sel].tolist()
                for j, i in enumerate(img_in):
                    t, pr = tl[i], in_pairs[j]
                    inputs[i] = pr
                    outs[i] = (None if t == UNDERSTAND else
                               (oph[j], opw[j]) if t == OUTPAINT else pr[0])
            for i in np.flatnonzero(tidx == idx_gen).tolist():
                outs[i] = (int(gh[i]), int(gw[i]))
            yield build_requests(
                done, t_arr.tolist(), tl, [plan.model[t] for t in tl], prompt, output, inputs, outs,
                [plan.steps[t] for t in tl], [plan.cfg[t] for t in tl], [plan.slo[t] for t in tl],
                specs, cache, ids)
            done += k


class ImageIds:
    """Image identities under an ImageReuseConfig, assigned in request order: each image is, with
    probability prob, a catalog image (Zipf rank, ids 0..catalog-1, its size fixed at its first
    appearance), else a new id (catalog, catalog+1, ...). Draws from the named streams
    "images.reuse" (two uniforms per image), so other draws are unchanged."""

    def __init__(self, cfg, seed: int) -> None:
        self.p = float(cfg.prob)
        self.catalog = int(cfg.catalog)
        ranks = np.arange(1, self.catalog + 1, dtype=float) ** -float(cfg.alpha)
        self.cdf = np.cumsum(ranks) / ranks.sum()
        self.rng = stream(seed, "images.reuse")
        self.sizes: dict[int, tuple[int, int]] = {}
        self.next_new = self.catalog

    def assign(self, pairs: tuple[tuple[int, int], ...]
               ) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        u = self.rng.random((len(pairs), 2)).tolist()
        ids, out = [], []
        for (reuse, pick), hw in zip(u, pairs):
            if reuse < self.p:
                i = min(int(np.searchsorted(self.cdf, pick, side="right")), self.catalog - 1)
                hw = self.sizes.setdefault(i, hw)
            else:
                i = self.next_new
                self.next_new += 1
            ids.append(i)
            out.append(hw)
        return tuple(ids), tuple(out)


def _pairs(h: np.ndarray, w: np.ndarray) -> list[tuple[tuple[int, int], ...]]:
    """Rows of (k, m) size arrays as tuples of (h, w) pairs."""
    hl: list[list[int]] = h.tolist()
    wl: list[list[int]] = w.tolist()
    out: list[tuple[tuple[int, int], ...]] = []
    for r in range(len(hl)):            # (by index: compiled, native list reads)
        a, b = hl[r], wl[r]
        if len(a) == 1:                 # one image a request, the common case
            out.append(((a[0], b[0]),))
        else:
            out.append(tuple([(a[m], b[m]) for m in range(len(a))]))
    return out
