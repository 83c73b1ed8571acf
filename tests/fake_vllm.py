"""A small stand-in for vLLM's V1 engine (scheduler semantics only) for CPU tests.

It mimics what the vllm backend relies on: chunked prefill under a token budget, decode first,
max_num_seqs, DELTA outputs, abort, KV capacity in cache_config.num_gpu_blocks.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field


@dataclass
class _Req:
    rid: str
    prompt: int
    max_tokens: int
    computed: int = 0
    out: int = 0
    finished: bool = False


@dataclass
class CompletionOutput:
    token_ids: list


@dataclass
class RequestOutput:
    request_id: str
    outputs: list
    finished: bool


class SamplingParams:
    def __init__(self, max_tokens=16, **kw):
        self.max_tokens = max_tokens
        self.kw = kw


class RequestOutputKind:
    DELTA = "delta"
    CUMULATIVE = "cumulative"


class _NS(types.SimpleNamespace):
    pass


class FakeEngine:
    def __init__(self, max_model_len, budget, max_num_seqs, block_size, num_blocks):
        self.reqs: dict[str, _Req] = {}
        self.order: list[str] = []
        self.budget, self.max_num_seqs = budget, max_num_seqs
        self.steps = []  # (decodes, prefill_tokens) per step, for tests
        self.vllm_config = _NS(
            cache_config=_NS(num_gpu_blocks=num_blocks, block_size=block_size,
                             enable_prefix_caching=False, gpu_memory_utilization=0.9),
            scheduler_config=_NS(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs),
            model_config=_NS(max_model_len=max_model_len, enforce_eager=False),
            compilation_config=_NS(cudagraph_mode="FULL_AND_PIECEWISE", mode=3,
                                   cudagraph_capture_sizes=[1, 2, 4, 8]))

    def add_request(self, rid, prompt, params):
        ids = prompt["prompt_token_ids"]
        self.reqs[rid] = _Req(rid, len(ids), params.max_tokens)
        self.order.append(rid)

    def abort_request(self, ids, internal=False):
        for r in ids:
            if r in self.reqs:
                self.reqs[r].finished = True

    def has_unfinished_requests(self):
        return any(not r.finished for r in self.reqs.values())

    def step(self):
        live = [self.reqs[r] for r in self.order if not self.reqs[r].finished]
        running = live[: self.max_num_seqs]
        budget = self.budget
        out = []
        dec = [r for r in running if r.computed >= r.prompt]
        ndec = 0
        for r in dec:
            if budget <= 0:
                break
            budget -= 1
            r.computed += 1
            r.out += 1
            ndec += 1
            out.append(r)
        pre_tokens = 0
        for r in running:
            if r.computed >= r.prompt or budget <= 0:
                continue
            take = min(budget, r.prompt - r.computed)
            r.computed += take
            budget -= take
            pre_tokens += take
            if r.computed == r.prompt:
                r.out += 1
                out.append(r)
        self.steps.append((ndec, pre_tokens))
        res = []
        for r in out:
            if r.out >= r.max_tokens:
                r.finished = True
            res.append(RequestOutput(r.rid, [CompletionOutput([1])], r.finished))
        self.order = [x for x in self.order if not self.reqs[x].finished]
        return res


class LLM:
    last = None
    num_blocks = 4096

    def __init__(self, model, max_model_len, max_num_batched_tokens, max_num_seqs, block_size,
                 **kw):
        self.kw = kw
        self.llm_engine = FakeEngine(max_model_len, max_num_batched_tokens, max_num_seqs,
                                     block_size, num_blocks=LLM.num_blocks)
        LLM.last = self

    def apply_model(self, fn):
        raise NotImplementedError("no vision tower in the fake engine")


def install(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.__version__ = LLM, SamplingParams, "fake"
    sp = types.ModuleType("vllm.sampling_params")
    sp.RequestOutputKind = RequestOutputKind
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp)
    monkeypatch.setitem(sys.modules, "vllm.inputs", None)
    monkeypatch.setitem(sys.modules, "vllm.inputs.engine", None)
