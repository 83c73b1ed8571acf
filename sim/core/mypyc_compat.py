"""`mypyc_attr` for the modules mypyc compiles (sim/compiled.py): the real
decorator when mypy is installed (mypyc reads it), else a no-op (pure Python needs nothing)."""
from __future__ import annotations

from typing import Any

try:
    from mypy_extensions import mypyc_attr
except ImportError:                                          # pragma: no cover
    def mypyc_attr(*_a: Any, **_k: Any) -> Any:  # type: ignore[no-redef,misc]
        return lambda c: c

__all__ = ["mypyc_attr"]
