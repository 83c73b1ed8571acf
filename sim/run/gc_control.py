"""The cyclic garbage collector around the phases of a run: the objects a phase finds already
made are frozen out of it, so its collections scan only what the phase itself makes. Finished
requests die by refcount (no cycles), so nothing that needs collecting is frozen."""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

GC_YOUNG_THRESHOLD = 100_000    # allocations between young collections while simulating


@contextmanager
def gc_frozen() -> Iterator[None]:
    """The objects made before the block frozen out of the cyclic GC while it runs (a caller's
    own frozen set is left alone: then nothing is frozen or unfrozen here)."""
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


@contextmanager
def gc_tuned_for_simulation() -> Iterator[None]:
    """While a run simulates: the set-up (tables, policy, engines) frozen, and young
    collections rarer (GC_YOUNG_THRESHOLD allocations apart)."""
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], GC_YOUNG_THRESHOLD), *threshold[1:])
    try:
        with gc_frozen():
            yield
    finally:
        gc.set_threshold(*threshold)
