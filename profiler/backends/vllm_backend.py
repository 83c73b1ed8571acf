"""vLLM backend: AR stages timed as real engine steps of vLLM's V1 engine (random weights).

How: a config.json is built from the yaml shapes with transformers' config classes and saved in
a temp dir; `LLM(load_format="dummy")` gives random weights. With
VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine core runs in this process and every
`llm_engine.step()` is one scheduled batch (async scheduling off), so a step's wall-clock time is
the engine-step latency the simulator needs (scheduling + forward + sampling + output handling).
CUDA graphs and torch.compile stay on, prefix caching off.

Points:
- prefill, context 0: one prompt of N tokens (max_tokens=1) -> one step.
- prefill, context C>0: a prompt of C+N tokens; with a budget of max_num_batched_tokens per step
  the first C/budget steps are full chunks, the step timed is the last chunk (N tokens at C).
- decode (B, C): B sequences with C-token prompts are prefilled (untimed), then decode steps are
  timed. The pool for one C grows with B (sequences kept), so contexts drift by a few tokens;
  the measured mean context is stored in `extra`.
- mixed: B decoding sequences (context C) + a fresh N-token prompt in the same step
  (stage=prefill, num_decode_seqs=B).
- vision_encode: the model's own vision tower (vLLM's Qwen2_5_VisionTransformer, the module the
  engine runs for images) called through LLM.apply_model with pixel patches of the smart-resized
  size, timed with CUDA events.
KV capacity (num_gpu_blocks * block_size) is read from the engine and stored on every row.
"""
from __future__ import annotations

import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Iterator

from profiler.backends.base import Backend, RunContext, summarize

QWEN_SPECIAL = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
                151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
                151655: "<|image_pad|>", 151656: "<|video_pad|>"}
SAFE_TOKEN_MAX = 30000  # random prompt ids stay below every special token


# llm kinds beyond the hand-built qwen2 / llama below: transformers config class and the
# architecture vLLM loads; every field of the registry entry is the config field of that name
# (profiler.hf_import copies them), so they pass through unchanged
HF_LLM_CLASSES: dict[str, tuple[str, str, str]] = {
    "mistral": ("MistralConfig", "MistralForCausalLM", "silu"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "silu"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "gelu_pytorch_tanh"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "gelu_pytorch_tanh"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gelu_pytorch_tanh"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "silu"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "silu"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "silu"),
}


def hf_config(spec):
    """transformers config object for the AR part of `spec` (random-weight engine input)."""
    c = spec.llm
    common = dict(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                  num_hidden_layers=c["num_hidden_layers"],
                  num_attention_heads=c["num_attention_heads"],
                  num_key_value_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                  max_position_embeddings=c["max_position_embeddings"],
                  rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
                  tie_word_embeddings=c.get("tie_word_embeddings", False), hidden_act="silu")
    if spec.family == "vlm":
        from transformers import Qwen2_5_VLConfig
        v = spec.components["vision"]
        legacy = dict(common, architectures=["Qwen2_5_VLForConditionalGeneration"],
                      bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
                      vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
                      video_token_id=151656, max_window_layers=c["num_hidden_layers"],
                      use_sliding_window=False, sliding_window=c["max_position_embeddings"],
                      torch_dtype="bfloat16",
                      rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                      vision_config=dict(depth=v["depth"], hidden_act="silu",
                                         hidden_size=v["hidden_size"],
                                         intermediate_size=v["intermediate_size"],
                                         num_heads=v["num_heads"], in_chans=v["in_chans"],
                                         out_hidden_size=v["out_hidden_size"],
                                         patch_size=v["patch_size"],
                                         spatial_merge_size=v["spatial_merge_size"],
                                         spatial_patch_size=v["patch_size"],
                                         window_size=v["window_size"],
                                         fullatt_block_indexes=list(v["fullatt_block_indexes"]),
                                         tokens_per_second=2,
                                         temporal_patch_size=v["temporal_patch_size"]))
        return Qwen2_5_VLConfig(**legacy)
    if c["kind"] == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16",
                           use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)
    if c["kind"] == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16",
                           bos_token_id=1, eos_token_id=2)
    if c["kind"] in HF_LLM_CLASSES:
        import transformers
        cls_name, arch, act = HF_LLM_CLASSES[c["kind"]]
        fields = {k: (list(v) if isinstance(v, (list, tuple)) else v)
                  for k, v in c.items() if k != "kind"}
        act_key = "hidden_activation" if c["kind"].startswith("gemma") else "hidden_act"
        return getattr(transformers, cls_name)(**fields, architectures=[arch],
                                               torch_dtype="bfloat16", **{act_key: act})
    raise ValueError(f"vllm backend: no config builder for llm kind {c['kind']!r}; allowed: "
                     f"qwen2, llama, {', '.join(HF_LLM_CLASSES)}")


def write_model_dir(spec, d: str | os.PathLike) -> Path:
    """config.json (+ for the VLM a word-level tokenizer and the image processor config)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    hf_config(spec).save_pretrained(d)
    if spec.family == "vlm":
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        V = spec.llm["vocab_size"]
        vocab = {QWEN_SPECIAL.get(i, f"t{i}"): i for i in range(V)}
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tk, unk_token="t0", eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=[v for k, v in QWEN_SPECIAL.items() if k != 151643])
        fast.save_pretrained(d)
        t = spec.image_tokenizer
        (d / "preprocessor_config.json").write_text(json.dumps({
            "min_pixels": t["min_pixels"], "max_pixels": t["max_pixels"],
            "patch_size": t["patch_size"], "temporal_patch_size": 2, "merge_size": t["merge_size"],
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"}, indent=1))
    return d


def _rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, SAFE_TOKEN_MAX) for _ in range(n)]


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = None
        self.settings: dict = {}
        self.rng = random.Random(0)
        self._rid = 0

    def engine_version(self) -> str:
        try:
            import vllm
            return vllm.__version__
        except Exception:
            return "not-installed"

    def plan(self, spec, grid) -> list[dict]:
        from profiler.grid import plan_vllm
        return plan_vllm(spec, grid)

    # ------------------------------------------------------------------ engine
    def start_engine(self, spec, ctx: RunContext, with_images: bool = True):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if int(ctx.cfg.tp) > 1:
            # TP workers are processes (vLLM's multiproc executor): LLM.apply_model sends the
            # vision-timing closure to them pickled, which vLLM allows only with this set; NVLink
            # multicast stays off (the multi-GPU kinds require it)
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
            for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                         ("NVSHMEM_DISABLE_NVLS", "1")):
                os.environ.setdefault(k, v)
        from vllm import LLM
        v = ctx.cfg.vllm
        d = write_model_dir(spec, tempfile.mkdtemp(prefix=f"vllm-{spec.name}-"))
        kw = dict(model=str(d), load_format="dummy", dtype=str(ctx.cfg.dtype), seed=0,
                  tensor_parallel_size=int(ctx.cfg.tp),
                  # vllm.max_model_len caps it (a model whose full context's KV does not fit
                  # beside its weights, e.g. a 32B at TP 1); null = the config's context
                  max_model_len=int(getattr(v, "max_model_len", None) or spec.llm["max_position_embeddings"]),
                  max_num_batched_tokens=int(v.max_num_batched_tokens),
                  max_num_seqs=int(v.max_num_seqs), block_size=int(v.block_size),
                  enable_prefix_caching=bool(v.enable_prefix_caching),
                  enable_chunked_prefill=True,
                  gpu_memory_utilization=float(v.gpu_memory_utilization),
                  async_scheduling=bool(v.async_scheduling), disable_log_stats=True)
        # a precision variant (profiler.models.PRECISIONS): vLLM's dynamic FP8 quantizes the dummy
        # bf16 weights of every linear layer (LLM and vision tower) after loading; fp8kv adds an
        # FP8 KV cache
        if spec.quant_dtype == "fp8":
            kw["quantization"] = "fp8"
        if spec.kv_dtype == "fp8":
            kw["kv_cache_dtype"] = "fp8"
        if spec.family == "vlm":
            kw["skip_tokenizer_init"] = False
            kw["limit_mm_per_prompt"] = ({"image": 4, "video": 0} if with_images
                                         else {"image": 0, "video": 0})
        else:
            kw["skip_tokenizer_init"] = True
        t0 = time.monotonic()
        self.llm = LLM(**kw)
        startup = time.monotonic() - t0
        eng = self.llm.llm_engine
        vc = eng.vllm_config
        nblocks = vc.cache_config.num_gpu_blocks
        if not nblocks:
            try:
                nblocks = eng.engine_core.engine_core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks
            except Exception:
                nblocks = None
        bs = int(vc.cache_config.block_size)
        comp = vc.compilation_config
        self.settings = {
            "engine": "vllm", "vllm_version": self.engine_version(), "v1_in_process": True,
            "load_format": "dummy", "max_model_len": int(vc.model_config.max_model_len),
            "max_num_batched_tokens": int(vc.scheduler_config.max_num_batched_tokens),
            "max_num_seqs": int(vc.scheduler_config.max_num_seqs), "block_size": bs,
            "enable_prefix_caching": bool(vc.cache_config.enable_prefix_caching),
            "chunked_prefill": True, "async_scheduling": bool(v.async_scheduling),
            "gpu_memory_utilization": float(vc.cache_config.gpu_memory_utilization),
            "num_gpu_blocks": nblocks,
            "kv_capacity_tokens": (nblocks * bs) if nblocks else None,
            "kv_bytes_per_token": spec.kv_bytes_per_token(),
            "enforce_eager": bool(vc.model_config.enforce_eager),
            "cudagraph_mode": str(getattr(comp, "cudagraph_mode", None)),
            "compilation_mode": str(getattr(comp, "mode", getattr(comp, "level", None))),
            "cudagraph_capture_sizes_max": max(getattr(comp, "cudagraph_capture_sizes", None)
                                               or [0]),
            "attention_backend": os.environ.get("VLLM_ATTENTION_BACKEND", "auto"),
            "quantization": kw.get("quantization"),
            "kv_cache_dtype": str(getattr(vc.cache_config, "cache_dtype", kw.get("kv_cache_dtype", "auto"))),
            "startup_s": round(startup, 1), "sampling": "greedy, ignore_eos",
            "timing": "wall clock of LLMEngine.step() (one scheduled batch)",
        }
        if spec.family == "vlm":
            self.settings["limit_mm_per_prompt"] = kw["limit_mm_per_prompt"]
        ctx.log(f"[vllm] engine up in {startup:.0f}s; settings {json.dumps(self.settings)}")
        return self.llm

    def release(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
        self.llm = None
        gc.collect()
        try:
            import torch
            torch.cuda.empty_cache()
        except Exception:
            pass

    # ------------------------------------------------------------------ helpers
    @property
    def eng(self):
        return self.llm.llm_engine

    def _sp(self, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                              detokenize=False, output_kind=RequestOutputKind.DELTA)

    def _add(self, n_tokens: int, max_tokens: int) -> str:
        try:
            from vllm.inputs.engine import tokens_input
            prompt = tokens_input(_rand_ids(self.rng, n_tokens))
        except Exception:
            prompt = {"prompt_token_ids": _rand_ids(self.rng, n_tokens)}
        self._rid += 1
        rid = f"p{self._rid}"
        self.eng.add_request(rid, prompt, self._sp(max_tokens))
        return rid

    def _step(self) -> tuple[float, list]:
        t0 = time.perf_counter()
        outs = self.eng.step()
        return (time.perf_counter() - t0) * 1e3, outs

    def _drain(self, ids: list[str] | None = None) -> None:
        eng = self.eng
        if ids:
            eng.abort_request(list(ids))
        n = 0
        while eng.has_unfinished_requests() and n < 10000:
            eng.step()
            n += 1

    def _row(self, p: dict, samples: list[float], **extra) -> dict:
        import torch
        row = dict(p)
        row.update(summarize(samples))
        row.update(status="ok", engine_settings=dict(self.settings),
                   peak_mem_bytes=int(torch.cuda.max_memory_allocated())
                   if torch.cuda.is_available() else None)
        row.update(extra)
        return row

    def _kv_fits(self, B: int, C: int, margin: int) -> bool:
        cap = self.settings.get("num_gpu_blocks")
        if not cap:
            return True
        bs = self.settings["block_size"]
        need = B * (-(-(C + margin) // bs))
        return need <= 0.95 * cap

    def _oom_row(self, spec, p: dict, B: int, C: int) -> dict:
        row = dict(p)
        need = B * C * spec.kv_bytes_per_token()
        row.update(status="oom", mem_requested_bytes=need, engine_settings=dict(self.settings),
                   error=f"KV cache: {B}x{C} tokens need {need / 2**30:.1f} GiB; engine holds "
                         f"{self.settings.get('kv_capacity_tokens')} tokens")
        return row

    # ------------------------------------------------------------------ stages
    def measure_prefill(self, p: dict, ctx: RunContext) -> dict:
        v = ctx.cfg.vllm
        N, C, nseq = p["num_tokens"], p["context_len"] or 0, p["batch_size"] or 1
        budget = self.settings["max_num_batched_tokens"]
        if C % budget:
            raise ValueError(f"context_len={C} must be a multiple of max_num_batched_tokens="
                             f"{budget} (chunks line up with the scheduler's budget)")
        samples = []
        for r in range(1 + int(v.prefill_repeats)):
            ids = [self._add(C + N // nseq + (1 if i < N % nseq else 0), 1) for i in range(nseq)]
            for _ in range(C // budget):
                self._step()
            ms, outs = self._step()
            done = {o.request_id for o in outs if o.finished}
            if not set(ids) <= done:
                self._drain(ids)
                raise RuntimeError(f"prefill step did not finish its prompt(s) ({len(done)} of "
                                   f"{len(ids)}): scheduler split differs from the plan")
            if r:
                samples.append(ms)
            self._drain()
        return self._row(p, samples)

    def iter_decode_group(self, spec, C: int, pts: list[dict], ctx: RunContext
                          ) -> Iterator[dict]:
        """Decode points (and mixed points) at context C, growing one pool of sequences."""
        v = ctx.cfg.vllm
        L = self.settings["max_model_len"]
        nsteps = int(v.decode_steps)
        # planned sequences: B for decode points, num_decode_seqs for mixed ones
        def pool_size(p):
            return p["batch_size"] if p["stage"] == "decode" else p["num_decode_seqs"]
        pts = sorted(pts, key=lambda p: (pool_size(p), p["stage"] != "decode",
                                         p.get("num_tokens") or 0))
        pool: list[str] = []
        tokens_done: dict[str, int] = {}
        max_new = max(8, L - C - 8)
        margin = 8 * nsteps + 64 + sum(1 for _ in pts)
        full = False
        for p in pts:
            if ctx.should_stop():
                break
            B = pool_size(p)
            if full or not self._kv_fits(B, C, margin):
                full = True
                yield self._oom_row(spec, p, B, C)
                continue
            try:
                # grow the pool to B sequences (prefill them, untimed)
                new = [self._add(C, max_new) for _ in range(B - len(pool))]
                pool += new
                pending = set(new)
                guard = 0
                while pending and guard < 100000:
                    _, outs = self._step()
                    for o in outs:
                        k = len(o.outputs[0].token_ids)
                        tokens_done[o.request_id] = tokens_done.get(o.request_id, 0) + k
                        if k:
                            pending.discard(o.request_id)
                    guard += 1
                if p["stage"] == "decode":
                    samples, nout = [], []
                    for i in range(2 + nsteps):
                        ms, outs = self._step()
                        k = 0
                        for o in outs:
                            n_new = len(o.outputs[0].token_ids)
                            tokens_done[o.request_id] = tokens_done.get(o.request_id, 0) + n_new
                            k += 1 if n_new else 0
                        if i >= 2:
                            samples.append(ms)
                            nout.append(k)
                    if min(nout) != B:
                        raise RuntimeError(f"decode step ran {min(nout)} of {B} sequences "
                                           "(a sequence finished or was preempted)")
                    mean_ctx = C + sum(tokens_done[r] for r in pool) / len(pool)
                    yield self._row(p, samples, measured_mean_context=round(mean_ctx, 1),
                                    decode_context=C)
                else:  # mixed: B decodes + one fresh N-token prompt
                    N = p["num_tokens"]
                    samples = []
                    for r in range(1 + int(v.prefill_repeats)):
                        rid = self._add(N, 1)
                        ms, outs = self._step()
                        k = 0
                        for o in outs:
                            n_new = len(o.outputs[0].token_ids)
                            k += 1 if n_new else 0
                            if o.request_id in tokens_done:
                                tokens_done[o.request_id] += n_new
                        fin = any(o.request_id == rid and o.finished for o in outs)
                        if not fin or k < B + 1:
                            self._drain([rid])
                            raise RuntimeError(f"mixed step did not hold {B} decodes + the "
                                               f"{N}-token prompt ({k} outputs)")
                        if r:
                            samples.append(ms)
                    mean_ctx = C + sum(tokens_done[r] for r in pool) / len(pool)
                    yield self._row(p, samples, decode_context=C,
                                    measured_mean_context=round(mean_ctx, 1))
            except Exception as e:  # noqa: BLE001
                row = dict(p)
                from profiler.backends.base import is_oom, oom_requested_bytes
                if is_oom(e):
                    row.update(status="oom", mem_requested_bytes=oom_requested_bytes(e))
                else:
                    row.update(status="error")
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}",
                           engine_settings=dict(self.settings))
                yield row
        self._drain(pool)

    def measure_vision(self, spec, p: dict, ctx: RunContext) -> dict:
        import torch
        v = spec.components["vision"]
        n, H, W = p["batch_size"], p["height"], p["width"]
        ps, tp = v["patch_size"], v["temporal_patch_size"]
        gh, gw = H // ps, W // ps
        warm, reps = int(ctx.cfg.warmup), int(ctx.cfg.repeats)

        # (tp > 1: the closure below is pickled to the worker processes, so it must not hold
        # the engine's config; the workers use their own current config)
        vllm_config = self.eng.vllm_config if int(ctx.cfg.tp) == 1 else None

        def call(visual, pix, grid):
            try:
                return visual(pix, grid_thw=grid)
            except Exception:  # some attention layers want a forward context
                from vllm.config import get_current_vllm_config
                from vllm.forward_context import set_forward_context
                with set_forward_context(None, vllm_config or get_current_vllm_config()):
                    return visual(pix, grid_thw=grid)

        def fn(model):
            m = model
            for _ in range(3):
                if hasattr(m, "visual"):
                    break
                m = getattr(m, "runnable", getattr(m, "model", m))
            visual = m.visual
            dev = next(visual.parameters()).device
            g = torch.Generator(device="cpu").manual_seed(0)
            pix = torch.randn(n * gh * gw, v["in_chans"] * tp * ps * ps, generator=g).to(
                dev, visual.dtype)
            grid = [[1, gh, gw]] * n
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = []
            with torch.inference_mode():
                for i in range(warm + reps):
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record()
                    emb = call(visual, pix, grid)
                    b.record()
                    b.synchronize()
                    if i >= warm:
                        out.append(a.elapsed_time(b))
            return out, int(torch.cuda.max_memory_allocated()), tuple(emb.shape)

        res = self.llm.apply_model(fn)[0]
        samples, peak, shape = res
        expect = n * p["num_tokens"]
        if shape[0] != expect:
            raise RuntimeError(f"vision tower returned {shape[0]} embeddings, expected {expect}")
        row = self._row(p, samples, embedding_shape=list(shape),
                        method="LLM.apply_model -> model.visual(pixel_values, grid_thw)")
        row["peak_mem_bytes"] = peak
        return row

    # ------------------------------------------------------------------ driver
    def iter_rows(self, spec, points: list[dict], ctx: RunContext) -> Iterator[dict]:
        if not points:
            return
        vision = [p for p in points if p["stage"] == "vision_encode"]
        try:
            self.start_engine(spec, ctx, with_images=True)
        except Exception as e:  # noqa: BLE001
            if spec.family != "vlm":
                raise
            ctx.log(f"[vllm] engine with images failed ({type(e).__name__}: {e}); "
                    "retrying text-only (vision points recorded as error)")
            self.release()
            self.start_engine(spec, ctx, with_images=False)
            for p in vision:
                yield dict(p, status="error", error=f"engine with images failed: {e}"[:300])
            vision = []
        for p in vision:
            if ctx.should_stop():
                return
            yield self.guarded(spec, p, ctx)
        pre0 = [p for p in points if p["stage"] == "prefill" and not p.get("num_decode_seqs")
                and not p.get("context_len")]
        for p in pre0:
            if ctx.should_stop():
                return
            yield self.guarded(spec, p, ctx)
        groups: dict[int, list[dict]] = {}
        for p in points:
            if p["stage"] == "decode":
                groups.setdefault(p["context_len"], []).append(p)
            elif p["stage"] == "prefill" and p.get("num_decode_seqs"):
                groups.setdefault(p["decode_context"], []).append(p)
        for C in sorted(groups):
            if ctx.should_stop():
                return
            yield from self.iter_decode_group(spec, C, groups[C], ctx)
        prec = [p for p in points if p["stage"] == "prefill" and not p.get("num_decode_seqs")
                and p.get("context_len")]
        for p in prec:
            if ctx.should_stop():
                return
            yield self.guarded(spec, p, ctx)

    def measure_point(self, spec, p: dict, ctx: RunContext) -> dict:
        if p["stage"] == "vision_encode":
            return self.measure_vision(spec, p, ctx)
        if p["stage"] == "prefill":
            return self.measure_prefill(p, ctx)
        raise ValueError(f"vllm backend measures {p['stage']!r} only inside decode groups")

    def cleanup_after_error(self, ctx: RunContext) -> None:
        try:
            if self.llm is not None:
                self._drain()
        except Exception:
            pass
        super().cleanup_after_error(ctx)
