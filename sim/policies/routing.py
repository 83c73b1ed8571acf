"""Least-loaded selection in O(log n), shared by the policies' routers (baseline replicas,
disaggregated LLM engines): a 1,000-GPU cluster must not scan every engine per request."""
from __future__ import annotations

from heapq import heapify, heappop, heappush, heapreplace
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")


class LeastLoaded(Generic[T]):
    """The item with the least key, ties to the lowest position (what min(items, key=key) picks),
    in O(log n) amortised: a heap of (key, position) entries, checked lazily when they surface.

    Callers report every decrease of an item's key with changed(item); increases may go
    unreported unless `every_change` says they are all reported too. Each item then always has an
    entry at or below its key (an entry found below its item's key is re-entered at the current
    key, or just dropped under every_change, where the change pushed a fresh entry; one above it
    is dropped, since the decrease that made it so pushed a fresh entry), so the first top entry
    that matches its item is the minimum.
    """

    def __init__(self, items: Sequence[T], key: Callable[[T], float], every_change: bool = False):
        self.items = items
        self.key = key
        self.every_change = every_change
        self.pos = {id(x): i for i, x in enumerate(items)}
        self._rebuild()

    def _rebuild(self) -> None:
        key = self.key
        self.heap = [(key(x), i) for i, x in enumerate(self.items)]
        heapify(self.heap)

    def pick(self) -> T:
        heap, items, key = self.heap, self.items, self.key
        while True:
            v, i = heap[0]
            cur = key(items[i])
            if cur == v:
                return items[i]
            if cur > v and not self.every_change:
                heapreplace(heap, (cur, i))
            else:
                heappop(heap)

    def changed(self, item: T) -> None:
        """`item`'s key changed (items not routed here, e.g. moved away, are ignored)."""
        i = self.pos.get(id(item))
        if i is None:
            return
        heappush(self.heap, (self.key(item), i))
        if len(self.heap) > 4 * len(self.items) + 64:      # drop stale entries now and then
            self._rebuild()
