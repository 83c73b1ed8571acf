"""GPU memory model: weights + KV cache + activations + framework overhead, and the KV capacity
(hence max concurrency) it leaves. Where the profiler recorded vLLM's own KV capacity
(engine_settings.num_gpu_blocks on an LLM-only GPU), that measurement wins and the model is only
used for what differs (weights of other stages placed on the same GPU)."""
from __future__ import annotations

from dataclasses import dataclass

from profiler.models import load_model

GIB = 1024 ** 3
# vLLM's non-KV reservation beyond weights: activations of a max_num_batched_tokens step, CUDA
# graphs, allocator slack. Measured by the profiler where available (see kv_capacity_tokens).
FRAMEWORK_OVERHEAD_BYTES = int(2.5 * GIB)
DIFFUSION_STATE_BYTES_PER_TOKEN = 64 * 1024     # DiT activations per image token in a step


@dataclass(frozen=True)
class GPUContents:
    """What a GPU holds: (model, component) pairs."""
    parts: tuple[tuple[str, str], ...]

    def weights_bytes(self) -> int:
        return sum(load_model(m).component_bytes(c) for m, c in self.parts)   # weight dtype per component


def kv_capacity_tokens(llm_model: str, placement: GPUContents, gpu_mem_gib: float, util: float,
                       measured: dict | None = None) -> int:
    spec = load_model(llm_model)
    kvpt = spec.kv_bytes_per_token()
    own = GPUContents(tuple((llm_model, c) for c in spec.components)).weights_bytes()
    extra = placement.weights_bytes() - own
    if measured and measured.get("num_gpu_blocks") and measured.get("block_size"):
        base = int(measured["num_gpu_blocks"]) * int(measured["block_size"])
        scale = util / float(measured.get("gpu_memory_utilization", util))
        base = int(base * scale) if scale != 1 else base
        return max(0, base - max(0, extra) // kvpt)
    free = gpu_mem_gib * GIB * util - placement.weights_bytes() - FRAMEWORK_OVERHEAD_BYTES
    return max(0, int(free // kvpt))
