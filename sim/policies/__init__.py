"""Serving policies, registered by name in one place (POLICIES). Each is a module with one class."""
from __future__ import annotations

from importlib import import_module

from sim.config import ConfigError

# name -> "module:class" (the class's `name` is the same)
POLICIES: dict[str, str] = {
    "baseline": "sim.policies.baseline:Baseline",
    "disaggregated": "sim.policies.placement:Disaggregated",
    "modality_aware": "sim.policies.scaling:ModalityAware",
}

REGISTRY: dict[str, type] = {}     # name -> class, filled from POLICIES on first use


def get_policy(name: str) -> type:
    _load()
    if name not in REGISTRY:
        raise ConfigError(f"policy.name={name!r} is unknown; allowed: {sorted(REGISTRY)}")
    return REGISTRY[name]


def _load() -> None:
    for name, where in POLICIES.items():
        if name not in REGISTRY:
            mod, cls = where.split(":")
            REGISTRY[name] = getattr(import_module(mod), cls)
            assert REGISTRY[name].name == name, (where, REGISTRY[name].name)
