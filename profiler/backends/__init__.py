"""Backend registry: the one place where backends are registered by name.

Backends import their heavy engines lazily (torch, diffusers, vllm), so `import profiler` stays
light and the analytic backend runs anywhere.
"""
from __future__ import annotations

from importlib import import_module

from profiler.backends.base import Backend

# name -> "module:Class"
BACKENDS: dict[str, str] = {
    "vllm": "profiler.backends.vllm_backend:VllmBackend",
    "diffusers": "profiler.backends.diffusers_backend:DiffusersBackend",
    "vllm_omni": "profiler.backends.vllm_omni_backend:VllmOmniBackend",
    "analytic": "profiler.backends.analytic:AnalyticBackend",
}


def backend_for(name: str, family: str) -> str:
    """`auto` -> the engine that serves a model of this family (vllm: llm / vlm; diffusers:
    dit / ar_dit, whose AR condition encoder is its own registry entry)."""
    if name != "auto":
        return name
    return "vllm" if family in ("llm", "vlm") else "diffusers"


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise KeyError(f"backend={name!r} is unknown; allowed values: {sorted(BACKENDS)}")
    mod, cls = BACKENDS[name].split(":")
    return getattr(import_module(mod), cls)()


__all__ = ["BACKENDS", "Backend", "backend_for", "get_backend"]
