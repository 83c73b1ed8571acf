"""Structured (Hydra) config schema. Each section's check() holds its range checks;
SimConfig.check() runs them all once, where a run's config is made (sim.cli.to_config, or
sim.run.runner.Run for a config built in code), so bad input fails before any simulation with a
message that names the field and the allowed values."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from sim.names import EDIT, GENERATE, IMAGE_IN_TASKS, INPAINT, OUTPAINT, TASKS, TEXT, UNDERSTAND
from sim.policies import DEFAULT_POLICY, DIFFUSION_ENGINES, POLICIES, REPLICA_ROUTERS


class ConfigError(ValueError):
    """Invalid user input; the message names the field and what is allowed."""


def _check(cond: bool, fieldname: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{fieldname}={value!r} is invalid; allowed: {allowed}")


def _choice(value: Any, fieldname: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, fieldname, value, f"one of {list(allowed)}")


class OutOfRange(str, Enum):
    error = "error"
    clamp = "clamp"
    extrapolate = "extrapolate"


ARRIVAL_PROCESSES = ("gamma", "mmpp", "trace")
LENGTH_DISTS = ("constant", "uniform", "lognormal", "pareto", "normal", "zipf")
SERVICE_LAWS = ("constant", "deterministic", "exponential", "lognormal")   # queueing scenario
SHAPE_COMPAT = ("exact", "bucket", "any")
TRACE_FORMATS = ("auto", "csv", "jsonl", "parquet", "vllm_json")
EXPERIMENTS = ("serve", "queueing", "replay", "capacity")


@dataclass
class LengthDist:
    """A length (or count) law: constant | uniform(min,max) | lognormal(mean, cv) | pareto | normal |
    zipf (P(k) ~ k^-alpha on the integers min..max; mean ignored)."""
    dist: str = "lognormal"
    mean: float = 256.0
    cv: float = 1.0            # coefficient of variation (lognormal/normal); pareto uses alpha
    alpha: float = 2.5
    min: int = 1
    max: int = 8192

    def check(self, name: str) -> None:
        _choice(self.dist, f"{name}.dist", LENGTH_DISTS)
        _check(self.mean > 0, f"{name}.mean", self.mean, "> 0")
        _check(self.cv >= 0, f"{name}.cv", self.cv, ">= 0")
        _check(1 <= self.min <= self.max, f"{name}.min/max", (self.min, self.max), "1 <= min <= max")
        _check(self.alpha > 1, f"{name}.alpha", self.alpha, "> 1")


@dataclass
class ArrivalConfig:
    process: str = "gamma"          # gamma (k=1 Poisson, k<1 bursty) | mmpp | trace
    rate: float = 2.0               # mean requests/s (gamma); ignored for trace
    shape: float = 0.5              # Gamma shape k; vLLM's --burstiness
    vllm_scaling: bool = False      # rescale so the last request lands at N/rate, as vllm bench serve
    # Markov-modulated Poisson: a base state and a burst state with exponential sojourns.
    base_rate: float = 2.0
    burst_rate: float = 12.0
    mean_base_s: float = 60.0
    mean_burst_s: float = 10.0

    def check(self) -> None:
        _choice(self.process, "workload.arrival.process", ARRIVAL_PROCESSES)
        _check(self.rate > 0, "workload.arrival.rate", self.rate, "> 0 requests/s")
        _check(self.shape > 0, "workload.arrival.shape", self.shape, "> 0 (1 = Poisson, < 1 bursty)")
        for n in ("base_rate", "burst_rate", "mean_base_s", "mean_burst_s"):
            _check(getattr(self, n) > 0, f"workload.arrival.{n}", getattr(self, n), "> 0")


@dataclass
class ImageSizeConfig:
    """Pareto image sides (heavy tail), clipped, with an aspect ratio drawn from a set."""
    alpha: float = 2.5
    x_min: int = 256
    max: int = 1328
    round_to: int = 16
    aspect_ratios: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.75, 1.333, 0.5625, 1.778])

    def check(self) -> None:
        _check(self.alpha > 0, "workload.image.alpha", self.alpha, "> 0")
        _check(16 <= self.x_min <= self.max, "workload.image.x_min/max", (self.x_min, self.max),
               "16 <= x_min <= max")
        _check(self.round_to >= 1, "workload.image.round_to", self.round_to, ">= 1")
        _check(all(a > 0 for a in self.aspect_ratios), "workload.image.aspect_ratios",
               self.aspect_ratios, "positive ratios")


@dataclass
class ImageReuseConfig:
    """Inputs that refer to an image already seen (multi-turn edits of one picture, popular
    inputs): each input image is, with probability `prob`, one of `catalog` popular images drawn
    by Zipf popularity (rank r weighs (r+1)^-alpha), else a new one. A catalog image keeps the
    size of its first appearance. Its id is in the request (image_ids), so caches can hit."""
    prob: float = 0.0
    catalog: int = 1000
    alpha: float = 1.0

    def check(self) -> None:
        _check(0 <= self.prob <= 1, "workload.image_reuse.prob", self.prob, "in [0, 1]")
        _check(self.catalog >= 1, "workload.image_reuse.catalog", self.catalog, ">= 1")
        _check(self.alpha >= 0, "workload.image_reuse.alpha", self.alpha, ">= 0")


@dataclass
class TraceConfig:
    path: Optional[str] = None
    format: str = "auto"
    time_scale: float = 1.0         # multiply trace times (speed up / slow down a replay)
    default_task: str = TEXT

    def check(self) -> None:
        _choice(self.format, "workload.trace.format", TRACE_FORMATS)
        _check(self.time_scale > 0, "workload.trace.time_scale", self.time_scale, "> 0")
        _choice(self.default_task, "workload.trace.default_task", TASKS)


@dataclass
class WorkloadConfig:
    name: str = "mixed_bursty"
    num_requests: int = 20000
    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)
    mix: dict[str, float] = field(default_factory=lambda: {
        TEXT: 0.40, UNDERSTAND: 0.25, GENERATE: 0.20, EDIT: 0.10, INPAINT: 0.03,
        OUTPAINT: 0.02})
    task_models: dict[str, str] = field(default_factory=lambda: {
        TEXT: "qwen2_5_vl_7b", UNDERSTAND: "qwen2_5_vl_7b", GENERATE: "qwen_image",
        EDIT: "qwen_image", INPAINT: "qwen_image", OUTPAINT: "qwen_image"})
    image: ImageSizeConfig = field(default_factory=ImageSizeConfig)
    images_per_request: int = 1
    # images per request of the multi_image_tasks (a count law, e.g. {dist: zipf, alpha: 2, min: 1,
    # max: 16}: ModServe's production trace has 0-16 images a request, heavy-tailed); null: every
    # image-input request has images_per_request images
    image_count: Optional[LengthDist] = None
    multi_image_tasks: list[str] = field(default_factory=lambda: [UNDERSTAND, EDIT])
    image_reuse: ImageReuseConfig = field(default_factory=ImageReuseConfig)
    prompt_tokens: LengthDist = field(default_factory=lambda: LengthDist(dist="lognormal", mean=600, cv=1.2, min=16, max=8192))
    output_tokens: LengthDist = field(default_factory=lambda: LengthDist(dist="lognormal", mean=250, cv=1.0, min=1, max=2048))
    image_prompt_tokens: LengthDist = field(default_factory=lambda: LengthDist(dist="lognormal", mean=60, cv=0.6, min=4, max=512))
    steps: Optional[int] = None     # None = each model's default
    cfg: Optional[bool] = None      # None = each model's default
    slo_classes: dict[str, str] = field(default_factory=lambda: {
        TEXT: "interactive", UNDERSTAND: "interactive", GENERATE: "standard",
        EDIT: "standard", INPAINT: "standard", OUTPAINT: "standard"})
    trace: TraceConfig = field(default_factory=TraceConfig)
    path: Optional[str] = None      # shorthand: a trace file to replay (sets process=trace)
    # closed loop, as `vllm bench serve --max-concurrency N`: at most N requests in flight; one
    # that arrives while N are out is sent (FIFO) when one finishes. None: open loop, except a
    # replayed bench result that ran with --max-concurrency (its own N is used).
    max_concurrency: Optional[int] = None

    def check(self) -> None:
        """Validate once (later calls return at once), first resolving the `path` shorthand
        (a trace file: trace.path and arrival.process=trace)."""
        if self.__dict__.get("_checked"):
            return
        if self.path:
            self.trace.path = self.path
            self.arrival.process = "trace"
        _check(self.arrival.process != "trace" or bool(self.trace.path), "workload.trace.path",
               self.trace.path, "a CSV/JSONL/parquet trace or a vllm bench serve JSON when process=trace")
        _check(self.num_requests >= 1, "workload.num_requests", self.num_requests, ">= 1")
        self.arrival.check()
        self.image.check()
        self.trace.check()
        bad = [t for t in self.mix if t not in TASKS]
        _check(not bad, "workload.mix", bad, f"task names in {list(TASKS)}")
        _check(all(v >= 0 for v in self.mix.values()) and sum(self.mix.values()) > 0,
               "workload.mix", dict(self.mix), "non-negative weights with a positive sum")
        for t, w in self.mix.items():
            _check(w == 0 or t in self.task_models, f"workload.task_models.{t}", None,
                   "a model name for every task with a positive mix weight")
        _check(self.images_per_request >= 1, "workload.images_per_request", self.images_per_request, ">= 1")
        if self.image_count is not None:
            self.image_count.check("workload.image_count")
            _check(self.image_count.min >= 1, "workload.image_count.min", self.image_count.min,
                   ">= 1 (a request of an image task has at least one image)")
        bad = [t for t in self.multi_image_tasks if t not in IMAGE_IN_TASKS]
        _check(not bad, "workload.multi_image_tasks", bad, f"image-input tasks from {list(IMAGE_IN_TASKS)}")
        self.image_reuse.check()
        self.prompt_tokens.check("workload.prompt_tokens")
        self.output_tokens.check("workload.output_tokens")
        self.image_prompt_tokens.check("workload.image_prompt_tokens")
        _check(self.steps is None or self.steps >= 1, "workload.steps", self.steps, ">= 1 or null")
        _check(self.max_concurrency is None or self.max_concurrency >= 1, "workload.max_concurrency",
               self.max_concurrency, ">= 1 or null")
        self._checked = True


LAYOUT_ROLES = ("replica", "encoder", "llm", "text_encoder", "vae", "dit", "prefill", "decode")
HANDOFF_KINDS = ("encoder", "kv")      # vision embeddings encoder -> LLM; KV cache prefill -> decode


@dataclass
class HandoffLink:
    """One hand-off's cost between two pools of a pinned layout: latency_us + bytes / gb_s. A
    measured connector (vLLM's encoder-cache or KV connector) says what it moved and how long it
    took; `source` cites the measurement (file, command)."""
    gb_s: float = 0.0
    latency_us: float = 0.0
    source: str = ""

    def check(self, name: str) -> None:
        _check(self.gb_s > 0, f"{name}.gb_s", self.gb_s, "> 0 GB/s")
        _check(self.latency_us >= 0, f"{name}.latency_us", self.latency_us, ">= 0")


@dataclass
class LayoutConfig:
    """A deployment's real layout, pinned: which GPUs (0 .. cluster.num_gpus - 1, node = index //
    gpus_per_node) hold which pool. Keys are the placement's pool keys: `replica:<model>` for
    replicas (baseline), `<role>:<model>` for stage pools (encoder, llm, text_encoder, vae, dit;
    prefill / decode under a prefill-decode split). A GPU listed in several pools holds every
    one of their engines (separate processes time-sharing one card). Pool sizes and placement
    come from here, never from offered work, and GPUs never move between pools. `handoff`
    replaces bytes / NVLink for a hand-off kind with a measured connector's figures."""
    name: str = ""
    pools: dict[str, list[int]] = field(default_factory=dict)
    handoff: dict[str, HandoffLink] = field(default_factory=dict)

    def check(self, num_gpus: int) -> None:
        f = "cluster.layout"
        _check(bool(self.pools), f"{f}.pools", dict(self.pools), "at least one pool: {role:model: [gpu, ...]}")
        used: set[int] = set()
        for key, ids in self.pools.items():
            role, _, model = str(key).partition(":")
            _check(role in LAYOUT_ROLES and bool(model), f"{f}.pools", key,
                   f"'<role>:<model>' keys, role one of {list(LAYOUT_ROLES)}")
            ids = list(ids)
            _check(len(ids) > 0 and all(isinstance(i, int) and 0 <= i < num_gpus for i in ids),
                   f"{f}.pools.{key}", ids, f"a non-empty list of GPU indices 0..{num_gpus - 1} "
                   f"(cluster.num_gpus={num_gpus})")
            _check(len(set(ids)) == len(ids), f"{f}.pools.{key}", ids, "each GPU once per pool")
            used.update(ids)
        roles = {str(k).split(":")[0] for k in self.pools}
        _check(not ("replica" in roles and len(roles) > 1), f"{f}.pools", sorted(self.pools),
               "either replica:<model> pools (baseline) or stage pools, not both")
        if "replica" in roles:
            seen: dict[int, str] = {}
            for key, ids in self.pools.items():
                for i in ids:
                    _check(i not in seen, f"{f}.pools.{key}", list(ids),
                           f"one replica per GPU (GPU {i} is also in {seen.get(i)})")
                    seen[i] = key
        missing = sorted(set(range(num_gpus)) - used)
        _check(not missing, f"{f}.pools", dict(self.pools),
               f"every GPU 0..{num_gpus - 1} in some pool (cluster.num_gpus={num_gpus}; unused: {missing})")
        for k, link in self.handoff.items():
            _choice(k, f"{f}.handoff", HANDOFF_KINDS)
            link.check(f"{f}.handoff.{k}")


@dataclass
class ClusterConfig:
    name: str = "h100x8"
    gpu: str = "h100"
    num_gpus: int = 8
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    nvlink_gb_s: float = 450.0       # intra-node, per direction
    network_gb_s: float = 50.0       # inter-node (400 Gb/s NIC)
    transfer_latency_us: float = 20.0
    # baseline: replicas per model (empty = split GPUs by offered work); disaggregated: GPUs per pool
    replicas: dict[str, int] = field(default_factory=dict)
    pools: dict[str, int] = field(default_factory=dict)
    # a deployment's real layout (pool sizes and GPU placement pinned); null: derived from work
    layout: Optional[LayoutConfig] = None

    def check(self) -> None:
        _check(self.num_gpus >= 1, "cluster.num_gpus", self.num_gpus, ">= 1")
        _check(self.gpus_per_node >= 1, "cluster.gpus_per_node", self.gpus_per_node, ">= 1")
        _check(self.gpu_mem_gib > 0, "cluster.gpu_mem_gib", self.gpu_mem_gib, "> 0")
        for n in ("nvlink_gb_s", "network_gb_s"):
            _check(getattr(self, n) > 0, f"cluster.{n}", getattr(self, n), "> 0")
        for k, v in {**self.replicas, **self.pools}.items():
            _check(v >= 0, f"cluster.replicas/pools.{k}", v, ">= 0")
        used = sum(self.replicas.values())
        _check(used <= self.num_gpus, "cluster.replicas", dict(self.replicas),
               f"at most cluster.num_gpus={self.num_gpus} GPUs in all")
        used = sum(self.pools.values())
        _check(used <= self.num_gpus, "cluster.pools", dict(self.pools),
               f"at most cluster.num_gpus={self.num_gpus} GPUs in all")
        if self.layout is not None:
            _check(not self.replicas and not self.pools, "cluster.layout", self.layout.name or "(pinned)",
                   "a pinned layout alone: leave cluster.replicas and cluster.pools empty")
            self.layout.check(self.num_gpus)


@dataclass
class PolicyConfig:
    name: str = DEFAULT_POLICY
    router: str = "least_loaded"
    # modality_aware knobs (ignored by the others)
    priority: bool = True            # interactive (text-out) work first in shared queues
    image_token_aware_lb: bool = True
    shape_buckets: list[int] = field(default_factory=lambda: [1024, 4096, 9216, 16384, 36864])
    autoscale_interval_s: float = 30.0
    autoscale: bool = True
    # stage-pool policies: split each LLM pool into prefill and decode pools (sim/policies/pd.py)
    pd_split: bool = False
    # image-feature cache per pool (vision-encoder outputs, VAE latents of input images), GiB per
    # GPU of the pool, LRU eviction (sim/policies/reuse.py); 0 = off
    feature_cache_gib: float = 0.0

    def check(self) -> None:
        _choice(self.name, "policy.name", tuple(POLICIES))
        _choice(self.router, "policy.router", REPLICA_ROUTERS)
        _check(self.feature_cache_gib >= 0, "policy.feature_cache_gib", self.feature_cache_gib,
               ">= 0 GiB per GPU (0 = no feature cache)")
        _check(self.autoscale_interval_s > 0, "policy.autoscale_interval_s",
               self.autoscale_interval_s, "> 0")
        _check(list(self.shape_buckets) == sorted(self.shape_buckets) and len(self.shape_buckets) > 0,
               "policy.shape_buckets", self.shape_buckets, "a non-empty increasing list")


@dataclass
class EngineConfig:
    """vLLM V1 scheduler settings of each AR engine (defaults = `vllm serve` on an H100)."""
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = False
    # vLLM 0.26 admits a waiting (or preempted) request only when the free KV blocks hold its
    # whole known sequence (prompt + tokens generated so far), not just the chunk scheduled now
    # (SchedulerConfig.scheduler_reserve_full_isl, default True; v1/core/sched/scheduler.py,
    # allocate_slots(full_sequence_must_fit=...)): a long prompt cut into chunks is not started
    # until all of it fits.
    scheduler_reserve_full_isl: bool = True
    kv_capacity_tokens: Optional[int] = None   # None: from the profile's engine_settings or memory model
    max_model_len: Optional[int] = None
    step_overhead_ms: float = 0.0              # extra CPU-side time per engine step, if calibrated
    # vLLM serve schedules asynchronously: the host work of step n+1 (scheduling, input prep,
    # sampling, output processing) overlaps the GPU work of step n. The profiler times
    # synchronous steps (GPU + host), so with async_scheduling a step of B sequences costs
    # max(sync - host(B), host(B)), host(B) = base + per_seq * B. per_seq=None takes the slope
    # of the measured batch-1..64 decode steps at the shortest context, where the GPU time is
    # flat (weight-bound) and the growth is host work. base was calibrated on ONE validation run
    # (qwen2_5_7b__poisson_low); the vLLM-serve replay now uses host_overhead_by_model below,
    # measured on dedicated runs (traces/validation/README.md, item 8).
    async_scheduling: bool = True
    host_overhead_base_ms: float = 1.15
    host_overhead_per_seq_ms: Optional[float] = None
    # per model [base_ms, per_seq_ms] measured under `vllm serve` itself (sync table step minus the
    # served decode step at batch N, from the concurrency ladder: `python -m sim.tools.calibrate`); it
    # replaces the two above for that model
    host_overhead_by_model: dict[str, list[float]] = field(default_factory=dict)
    # API-server (frontend) time before a request reaches the engine core (HTTP, tokenization,
    # hand-off); it adds to TTFT and E2EL. 0 here (cluster scenarios model the engines); the
    # vLLM-serve replay (conf/experiment/replay_vllm_bench.yaml) sets the value measured with
    # zero-load probes, `python -m sim.tools.calibrate` (traces/validation/README.md).
    frontend_ms: float = 0.0
    frontend_ms_per_prompt_token: float = 0.0
    # extra time to the first step when the engine is idle at the arrival (the engine core sleeps
    # on its input queue; the first step after idle has no step to overlap its host work with)
    idle_wakeup_ms: float = 0.0
    # API-server ingest time of a request that finds the engine BUSY (API arrival -> engine-core
    # input queue: request handling and hand-off on the API server's one event loop, which also
    # processes every step's streamed outputs): base + per running sequence. It decides whether the
    # request makes the next scheduling point or waits one more step. Calibrated on the concurrency
    # ladder's CPU series (traces/validation/h100/ladder, `python -m sim.tools.calibrate`).
    api_ingest_ms: float = 0.0
    api_ingest_ms_per_running_seq: float = 0.0
    # a step's streamed tokens are handled one after another by the API server and the client, so
    # a request sees its first and last token this much per token of that step after the step
    # ends (CPU seconds per streamed token of both, from the same ladder calibration)
    stream_ms_per_token: float = 0.0

    def check(self) -> None:
        _check(self.max_num_batched_tokens >= 1, "engine.max_num_batched_tokens",
               self.max_num_batched_tokens, ">= 1")
        _check(self.max_num_seqs >= 1, "engine.max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.block_size >= 1, "engine.block_size", self.block_size, ">= 1")
        _check(0 < self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization",
               self.gpu_memory_utilization, "in (0, 1]")
        _check(self.host_overhead_base_ms >= 0, "engine.host_overhead_base_ms",
               self.host_overhead_base_ms, ">= 0")
        _check(self.host_overhead_per_seq_ms is None or self.host_overhead_per_seq_ms >= 0,
               "engine.host_overhead_per_seq_ms", self.host_overhead_per_seq_ms, ">= 0 or null")
        for m, v in self.host_overhead_by_model.items():
            _check(len(v) == 2 and min(v) >= 0, f"engine.host_overhead_by_model.{m}", list(v),
                   "[base_ms, per_seq_ms], both >= 0")
        _check(self.frontend_ms >= 0 and self.frontend_ms_per_prompt_token >= 0, "engine.frontend_ms",
               (self.frontend_ms, self.frontend_ms_per_prompt_token), ">= 0")
        _check(self.idle_wakeup_ms >= 0, "engine.idle_wakeup_ms", self.idle_wakeup_ms, ">= 0")
        _check(self.api_ingest_ms >= 0, "engine.api_ingest_ms", self.api_ingest_ms, ">= 0")
        _check(self.api_ingest_ms_per_running_seq >= 0, "engine.api_ingest_ms_per_running_seq",
               self.api_ingest_ms_per_running_seq, ">= 0")
        _check(self.stream_ms_per_token >= 0, "engine.stream_ms_per_token", self.stream_ms_per_token, ">= 0")
        _check(self.kv_capacity_tokens is None or self.kv_capacity_tokens > 0,
               "engine.kv_capacity_tokens", self.kv_capacity_tokens, "> 0 or null")


@dataclass
class DiffusionConfig:
    # the baseline's diffusion engine (sim.policies.DIFFUSION_ENGINES): vLLM-Omni's request
    # scheduler (its default), its step scheduler (`--step-execution`), or step-level DiT
    # batching of identical shapes (the step_level_same_shape part the other policies use)
    engine: str = "omni_request"
    max_num_seqs: int = 1            # omni engines: `--max-num-seqs` (vLLM-Omni's default 1)
    request_batch_max_wait_ms: float = 0.0   # omni_request: `--request-batch-max-wait-ms`
    # table set of vLLM-Omni's own stage costs under profiles_dir ({gpu}: the run's table set);
    # read where it holds the model and stage, else the diffusers / vLLM tables; "" = never
    omni_tables: str = "{gpu}-vllm-omni"
    # omni engines' work per request: "pipeline" (vLLM-Omni's pipelines: condition encode per
    # prompt, CFG as two transformer passes, an edit's ~1 MP condition) or "hops" (an ablation:
    # the work plan_hops gives every policy, so only the scheduling differs)
    omni_work: str = "pipeline"
    # omni engines: the API server's time around the engine (the vLLM-Omni table's preprocess /
    # postprocess api rows: before the queue, after the batch; not GPU time). On in replays of
    # served runs (+experiment=replay_omni_bench), off elsewhere, as engine.frontend_ms for text
    omni_api_delays: bool = False
    # omni engines: output sizes [height, width] every replica's VAE has decoded at the start
    # (vLLM-Omni's start-up warm-up decodes one 512 x 512 image); the first decode of another
    # size pays the vLLM-Omni table's first_use_ms
    omni_warm_sizes: list[list[int]] = field(default_factory=lambda: [[512, 512]])
    # step-level DiT batching (step_level_same_shape, bucketed_if_faster)
    max_batch: int = 8               # transformer batch incl. CFG doubling
    shape_compat: str = "exact"      # exact: same sequence; bucket: pad to policy.shape_buckets; any
    step_jump: bool = True           # advance a stable batch's steps in one event (exact)

    def check(self) -> None:
        _choice(self.engine, "diffusion.engine", DIFFUSION_ENGINES)
        _check(self.max_num_seqs >= 1, "diffusion.max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.request_batch_max_wait_ms >= 0, "diffusion.request_batch_max_wait_ms",
               self.request_batch_max_wait_ms, ">= 0 ms")
        _check(self.request_batch_max_wait_ms == 0 or self.engine == "omni_request",
               "diffusion.request_batch_max_wait_ms", self.request_batch_max_wait_ms,
               f"0 with diffusion.engine={self.engine} (only vLLM-Omni's request scheduler, "
               "omni_request, waits for a fuller batch)")
        _choice(self.omni_work, "diffusion.omni_work", ("pipeline", "hops"))
        _check(all(isinstance(x, (list, tuple)) and len(x) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in x) for x in self.omni_warm_sizes),
               "diffusion.omni_warm_sizes", self.omni_warm_sizes, "a list of [height, width] pairs of integers >= 16")
        _check(self.max_batch >= 1, "diffusion.max_batch", self.max_batch, ">= 1")
        _choice(self.shape_compat, "diffusion.shape_compat", SHAPE_COMPAT)


@dataclass
class LatencyConfig:
    out_of_range: OutOfRange = OutOfRange.error
    tables: Optional[str] = None    # table set under profiles_dir (default: cluster.gpu), e.g. h100-analytic
    # One rule per (gpu, model), first found wins (sim.engines.latency.LatencyModel.table_sets):
    # measured <gpu>/, then this estimated set ({gpu} = the table set's GPU; <gpu>-est holds
    # measured tables scaled by roofline ratios to precision variants and to GPUs not measured
    # yet, engine = analytic), then the roofline set <gpu>-analytic/. Each model's source
    # (measured / estimated / analytic) is in the summary (profile_tables, estimated_tables,
    # analytic_tables, latency_model.tables) and the printed table; null = no estimated set
    fallback: Optional[str] = "{gpu}-est"

    def check(self) -> None:
        _check(self.tables is None or bool(self.tables.strip()), "latency.tables", self.tables,
               "a table-set folder under profiles_dir, or null")
        _check(self.fallback is None or bool(str(self.fallback).strip()), "latency.fallback",
               self.fallback, "a table-set folder under profiles_dir ({gpu} = cluster.gpu), or null")

    def fallback_set(self, gpu: str) -> Optional[str]:
        return None if self.fallback is None else str(self.fallback).replace("{gpu}", gpu)


@dataclass
class SLOConfig:
    """Per-task latency targets in ms (null = no target on that metric)."""
    targets: dict[str, dict[str, float]] = field(default_factory=lambda: {
        TEXT: {"ttft_ms": 2000.0, "tpot_ms": 100.0},
        UNDERSTAND: {"ttft_ms": 4000.0, "tpot_ms": 100.0},
        GENERATE: {"e2el_ms": 60000.0},
        EDIT: {"e2el_ms": 90000.0},
        INPAINT: {"e2el_ms": 90000.0},
        OUTPAINT: {"e2el_ms": 90000.0},
    })

    def check(self) -> None:
        for task, t in self.targets.items():
            _choice(task, "slo.targets", TASKS)
            for k, v in t.items():
                _choice(k, f"slo.targets.{task}", ("ttft_ms", "tpot_ms", "e2el_ms"))
                _check(v is None or v > 0, f"slo.targets.{task}.{k}", v, "> 0 or null")


@dataclass
class CostConfig:
    usd_per_gpu_hour: dict[str, float] = field(default_factory=lambda: {"h100": 2.99, "h200": 3.79})

    def check(self) -> None:
        _check(all(v >= 0 for v in self.usd_per_gpu_hour.values()), "cost.usd_per_gpu_hour",
               dict(self.usd_per_gpu_hour), ">= 0 per GPU kind")


@dataclass
class QueueingConfig:
    """Single-stage G/G/c validation scenario with synthetic service laws."""
    servers: int = 1
    arrival_rate: float = 0.8
    arrival_shape: float = 1.0
    service_law: str = "exponential"
    service_mean_s: float = 1.0
    service_cv: float = 1.0
    num_requests: int = 20000

    def check(self) -> None:
        _check(self.servers >= 1, "queueing.servers", self.servers, ">= 1")
        _check(self.arrival_rate > 0, "queueing.arrival_rate", self.arrival_rate, "> 0")
        _check(self.arrival_shape > 0, "queueing.arrival_shape", self.arrival_shape, "> 0")
        _choice(self.service_law, "queueing.service_law", SERVICE_LAWS)
        _check(self.service_mean_s > 0, "queueing.service_mean_s", self.service_mean_s, "> 0")
        _check(self.service_cv >= 0, "queueing.service_cv", self.service_cv, ">= 0")
        _check(self.num_requests >= 1, "queueing.num_requests", self.num_requests, ">= 1")


@dataclass
class CapacityConfig:
    """Capacity planning (`+experiment=capacity`, sim/studies/capacity.py): per policy, the fewest GPUs
    meeting the SLO at target_qps, and the max QPS a cluster of `num_gpus` sustains under it.
    The SLO is p99 E2EL <= slo_p99_ms (all tasks), or, when slo_p99_ms is null, goodput-based:
    slo_attainment (per-task targets of `slo`) >= min_attainment."""
    target_qps: float = 4.0
    slo_p99_ms: Optional[float] = 120000.0
    min_attainment: float = 0.95
    # stability guard: a probe also fails when the run drains for longer than this many SLOs after
    # the last arrival (a backlog the p99 hides, e.g. starved large jobs); null = off
    max_drain_factor: Optional[float] = 3.0
    # and when, over the second half of the arrival window, completions fall below this fraction
    # of arrivals (sustained overload that a short finite run would hide); null = off
    min_throughput_ratio: Optional[float] = 0.9
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    num_requests: int = 3000          # requests per probe simulation
    num_gpus: Optional[int] = None    # cluster for the max-QPS search (null = cluster.num_gpus)
    min_gpus: int = 1
    max_gpus: int = 4096
    qps_rel_tol: float = 0.05         # max-QPS bisection stops at hi/lo - 1 <= this
    max_probes: int = 40              # per policy and search
    n_jobs: int = 2                   # joblib workers (loky, as hydra's joblib launcher)
    search: list[str] = field(default_factory=lambda: ["min_gpus", "max_qps"])
    # the fleet plan (sim/studies/fleet.py): any non-empty list searches policies x gpus x
    # precisions x pd_split for the cheapest fleet meeting the SLO at target_qps (an empty list:
    # the run's own cluster.gpu / precision / policy.pd_split)
    gpus: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)
    pd_split: list[bool] = field(default_factory=list)

    def check(self) -> None:
        _check(self.target_qps > 0, "capacity.target_qps", self.target_qps, "> 0 requests/s")
        _check(self.slo_p99_ms is None or self.slo_p99_ms > 0, "capacity.slo_p99_ms",
               self.slo_p99_ms, "> 0 ms or null (goodput-based SLO)")
        _check(0 < self.min_attainment <= 1, "capacity.min_attainment", self.min_attainment, "in (0, 1]")
        _check(self.max_drain_factor is None or self.max_drain_factor > 0, "capacity.max_drain_factor",
               self.max_drain_factor, "> 0 or null (no stability guard)")
        _check(self.min_throughput_ratio is None or 0 < self.min_throughput_ratio <= 1,
               "capacity.min_throughput_ratio", self.min_throughput_ratio, "in (0, 1] or null")
        _check(len(self.policies) > 0 and all(p in POLICIES for p in self.policies),
               "capacity.policies", list(self.policies), f"a non-empty list from {list(POLICIES)}")
        _check(self.num_requests >= 10, "capacity.num_requests", self.num_requests, ">= 10")
        _check(self.num_gpus is None or self.num_gpus >= 1, "capacity.num_gpus", self.num_gpus,
               ">= 1 or null")
        _check(1 <= self.min_gpus <= self.max_gpus, "capacity.min_gpus/max_gpus",
               (self.min_gpus, self.max_gpus), "1 <= min_gpus <= max_gpus")
        _check(0 < self.qps_rel_tol < 1, "capacity.qps_rel_tol", self.qps_rel_tol, "in (0, 1)")
        _check(self.max_probes >= 2, "capacity.max_probes", self.max_probes, ">= 2")
        _check(self.n_jobs >= 1 or self.n_jobs == -1, "capacity.n_jobs", self.n_jobs, ">= 1 or -1 (all cores)")
        from profiler.models import PRECISIONS
        _check(all(p in PRECISIONS for p in self.precisions), "capacity.precisions",
               list(self.precisions), f"a list from {sorted(PRECISIONS)}")
        _check(len(set(self.gpus)) == len(self.gpus), "capacity.gpus", list(self.gpus),
               "GPU kinds without repeats, e.g. [h100, h200]")
        _check(len(self.search) > 0 and all(s in ("min_gpus", "max_qps") for s in self.search),
               "capacity.search", list(self.search), "a non-empty list from ['min_gpus', 'max_qps']")


@dataclass
class OutputConfig:
    progress: str = "auto"          # auto: a bar on long single runs, off in multirun
    write_requests: bool = True
    chunk_rows: int = 100_000
    # reuse a finished result already in the run folder when code, config and inputs are the
    # same (sim/run/cache.py); false: always simulate
    cache: bool = True
    report: bool = True             # report.html (and timeline.parquet) beside summary.json

    def check(self) -> None:
        _choice(self.progress, "output.progress", ("auto", "on", "off"))
        _check(self.chunk_rows >= 1, "output.chunk_rows", self.chunk_rows, ">= 1")


@dataclass
class SimConfig:
    seed: int = 0
    experiment: str = "serve"
    profiles_dir: str = "traces/profiles"
    # single-model runs (replay): overrides task_models. `model=NAME` selects conf/model/NAME.yaml
    # (a Hydra group), so this holds that file's content; check() reduces it to the name.
    model: Any = None
    # precision variant served (profiler.models.PRECISIONS: bf16 | fp8 | fp8kv): every task model
    # M (and `model`) becomes M@<precision>, whose tables are <gpu>/M@<precision>.parquet (else
    # latency.fallback's estimates, reported as not measured). null/bf16: the models as named.
    precision: Optional[str] = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    queueing: QueueingConfig = field(default_factory=QueueingConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def check(self) -> "SimConfig":
        """Validate every section once (later calls return at once: a run's config is checked
        where it is made and again, as a no-op, where it is used), first resolving the
        `model=NAME` shorthand (a conf/model/ entry) to the model's name."""
        if self.__dict__.get("_checked"):
            return self
        if isinstance(self.model, dict):
            self.model = self.model.get("name")
        _check(self.model is None or isinstance(self.model, str), "model", self.model,
               "a model name from conf/model/")
        _choice(self.experiment, "experiment", EXPERIMENTS)
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0 (the root of every random stream)")
        if self.precision is not None:
            from profiler.models import PRECISIONS, with_precision
            _choice(self.precision, "precision", tuple(PRECISIONS))
            self.workload.task_models = {t: with_precision(m, self.precision)
                                         for t, m in self.workload.task_models.items()}
            if self.model:
                self.model = with_precision(self.model, self.precision)
        for part in (self.workload, self.cluster, self.policy, self.engine, self.diffusion,
                     self.latency, self.slo, self.cost, self.queueing, self.capacity, self.output):
            part.check()
        self._checked = True
        return self
