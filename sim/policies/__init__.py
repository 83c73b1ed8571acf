"""Serving policies, registered by name in one place. Each is a module with one class."""
from __future__ import annotations

from sim.config import ConfigError

REGISTRY: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def get_policy(name: str) -> type:
    _load()
    if name not in REGISTRY:
        raise ConfigError(f"policy.name={name!r} is unknown; allowed: {sorted(REGISTRY)}")
    return REGISTRY[name]


def _load() -> None:
    from sim.policies import baseline, disaggregated, modality_aware  # noqa: F401  (registers)
