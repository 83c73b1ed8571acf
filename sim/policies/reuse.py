"""Image-feature reuse (the `reuse` part of a policy): caches that let a request whose input
image was seen before skip work. Registered in sim.policies.REUSE; inert (no hook on the dispatch
path) unless policy.feature_cache_gib > 0 or engine.enable_prefix_caching.

- Feature cache (policy.feature_cache_gib GiB per GPU, LRU): the outputs of the vision encoder
  (tokens x out_hidden_size x activation bytes) and the VAE latents of input images, keyed by
  (model, image id), one cache per pool (a stage pool's queue, shared by its GPUs: capacity x its
  GPUs) or per engine / replica where the encoder runs inside the AR step. A hit drops the image
  from the hop (its tokens are not encoded again); a hop whose images all hit is skipped.
- vLLM's prefix caching (engine.enable_prefix_caching): an AR engine that computed a prompt
  holding an image keeps its KV blocks after the request ends, in the free pool, until new
  allocations evict them (LRU). A later prompt that starts with the same images (a shared
  system prompt, then the images, as chat templates put them) finds their KV: the leading run of
  cached images, block-aligned, arrives computed (Job.pre_computed) and is neither prefilled nor
  encoded again. What stays cached is bounded at each lookup by the engine's free KV blocks.

Requests carry image ids (Request.image_ids, from workload.image_reuse or a trace's image_ids);
requests without ids never hit.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from profiler.models import load_model
from sim.core.records import Job
from sim.names import AR, VAE_ENCODE, VISION_ENCODE
from sim.workloads.requests import condition_image_size

GIB = 1024 ** 3


class LRU:
    """Entries key -> size, least recently used evicted first, total <= capacity."""

    def __init__(self, capacity: float):
        self.capacity = capacity
        self.d: OrderedDict[Any, float] = OrderedDict()
        self.used = 0.0
        self.evictions = 0

    def hit(self, key: Any) -> bool:
        if key in self.d:
            self.d.move_to_end(key)
            return True
        return False

    def shrink(self, capacity: float) -> None:
        while self.d and self.used > capacity:
            _, sz = self.d.popitem(last=False)
            self.used -= sz
            self.evictions += 1

    def put(self, key: Any, size: float) -> None:
        if size > self.capacity or key in self.d:
            return
        self.shrink(self.capacity - size)
        self.d[key] = size
        self.used += size


class Caches:
    """The `caches` reuse part (see the module doc)."""

    def __init__(self, policy: Any):
        self.policy = policy
        self.per_gpu = policy.cfg.policy.feature_cache_gib * GIB
        self.prefix = bool(policy.cfg.engine.enable_prefix_caching)
        self.active = self.per_gpu > 0 or self.prefix
        self.features: dict[int, LRU] = {}      # id(owner) -> its feature cache
        self.prefixes: dict[int, LRU] = {}      # id(AR engine) -> its prefix cache (tokens)
        self._owners: list[Any] = []            # keeps owners alive while their id keys a cache
        self._tokens: dict[tuple, int] = {}
        self.stats = {"feature_hits": 0, "feature_misses": 0, "prefix_hit_tokens": 0,
                      "prefix_hits": 0, "prefix_lookups": 0, "skipped_hops": 0}

    # --- sizes --------------------------------------------------------------------------------
    def image_tokens(self, model: str, h: int, w: int) -> int:
        """Vision tokens of one input image for AR model `model`'s request (the condition copy
        for an AR+DiT model's encoder is sized by the request's model: see `tokens_of`)."""
        key = (model, h, w)
        t = self._tokens.get(key)
        if t is None:
            t = self._tokens[key] = load_model(model).image_input_tokens(h, w)
        return t

    def tokens_of(self, job: Job, i: int) -> int:
        """Vision tokens of the request's i-th input image in the encoder's own tokenization."""
        req = job.req
        h, w = req.input_images[i]
        spec = load_model(req.model)
        if spec.condition_encoder and spec.condition_image_pixels:
            h, w = condition_image_size(h, w, spec.condition_image_pixels)
        return self.image_tokens(job.model, h, w)

    def feature_cache(self, owner: Any, gpus: int) -> LRU:
        c = self.features.get(id(owner))
        if c is None:
            c = self.features[id(owner)] = LRU(self.per_gpu * max(1, gpus))
            self._owners.append(owner)
        return c

    # --- the hook -------------------------------------------------------------------------------
    def apply(self, job: Job, owner: Any, gpus: int, engine: Any = None) -> bool:
        """Adjust a hop about to run for `owner` (a pool queue, replica or AR engine, over `gpus`
        GPUs) for what its caches hold; True when nothing is left to run (skip the hop)."""
        ids = job.req.image_ids
        if not ids:
            return False
        if job.stage == VISION_ENCODE or (job.stage == AR and job.vision_tokens):
            if self.per_gpu > 0 and not job.pre_generated:
                self._features(job, owner, gpus, ids)
            if job.stage == VISION_ENCODE and job.pre_computed >= job.vision_tokens:
                self.stats["skipped_hops"] += 1
                return True
        elif job.stage == VAE_ENCODE and self.per_gpu > 0:
            c = self.feature_cache(owner, gpus)
            key = (job.model, "vae", ids[job.tokens], job.height, job.width)   # tokens: image index
            if c.hit(key):
                self.stats["feature_hits"] += 1
                self.stats["skipped_hops"] += 1
                return True
            self.stats["feature_misses"] += 1
            c.put(key, load_model(job.model).latent_bytes(job.height, job.width))
        if job.stage == AR and self.prefix and engine is not None and not job.pre_generated:
            self._prefix(job, engine, ids)
        return False

    def _features(self, job: Job, owner: Any, gpus: int, ids: tuple[int, ...]) -> None:
        c = self.feature_cache(owner, gpus)
        spec = load_model(job.model)
        per_tok = spec.components["vision"]["out_hidden_size"] * spec.dtype_bytes
        for i, img in enumerate(ids):
            t = self.tokens_of(job, i)
            key = (job.model, "vision", img)
            if c.hit(key):
                self.stats["feature_hits"] += 1
                if job.stage == AR:         # encoded inside the step: that much less to encode
                    job.vision_tokens = max(0, job.vision_tokens - t)
                else:                       # an encoder hop: cached, still handed to the LLM
                    job.pre_computed = min(job.vision_tokens, job.pre_computed + t)
            else:
                self.stats["feature_misses"] += 1
                c.put(key, t * per_tok)

    def _prefix(self, job: Job, engine: Any, ids: tuple[int, ...]) -> None:
        c = self.prefixes.get(id(engine))
        if c is None:
            c = self.prefixes[id(engine)] = LRU(float("inf"))
            self._owners.append(engine)
        c.shrink(engine.free_blocks * engine.bs)     # cached blocks live in the free pool
        self.stats["prefix_lookups"] += 1
        lead = job.tokens - job.req.image_tokens_in  # text before the images (shared template)
        hit_tokens, hit_vision = 0, 0
        for i, img in enumerate(ids):
            if not c.hit((job.model, img)):
                break
            t = self.tokens_of(job, i)
            hit_tokens += t
            hit_vision += t
        bs = engine.bs
        for i, img in enumerate(ids):
            c.put((job.model, img), self.tokens_of(job, i))
        if hit_tokens:
            cached = min(((lead + hit_tokens) // bs) * bs, job.tokens - 1)
            if cached > 0:
                self.stats["prefix_hits"] += 1
                self.stats["prefix_hit_tokens"] += cached
                job.pre_computed = cached
                job.vision_tokens = max(0, job.vision_tokens - hit_vision)

    def report(self) -> dict:
        out = dict(self.stats)
        out["feature_cache_gib_per_gpu"] = self.per_gpu / GIB
        out["prefix_caching"] = self.prefix
        out["feature_evictions"] = sum(c.evictions for c in self.features.values())
        out["prefix_evictions"] = sum(c.evictions for c in self.prefixes.values())
        return out
