"""Routers (the `routing` part of a policy): which replica or LLM engine of a model a request
goes to. Registered by name in sim.policies.ROUTERS; the least-loaded ones pick in O(log n)
(a 1,000-GPU cluster must not scan every engine per request), least_tokens scans."""
from __future__ import annotations

from heapq import heapify, heappop, heappush, heapreplace
from operator import attrgetter, methodcaller
from typing import Any, Callable, Generic, Sequence, TypeVar

from sim.core.mypyc_compat import mypyc_attr
from sim.engines.ar import AREngine
from sim.policies.parts import Router

T = TypeVar("T")

# up to this many items a pick scans them (cheaper than keeping the heap: a pick pops the stale
# entries every change pushed, each a key call and a few tuple comparisons)
SCAN_MAX = 16


def first_least(items: Sequence[T], key: Callable[[T], float]) -> T:
    """min(items, key=key): the first of the least, in one loop (a few items: cheaper than a
    heap)."""
    best = items[0]
    least = key(best)
    for k in range(1, len(items)):
        v = key(items[k])
        if v < least:
            best, least = items[k], v
    return best


class LeastLoaded(Generic[T]):
    """The item with the least key, ties to the lowest position (what min(items, key=key) picks),
    in O(log n) amortised: a heap of (key, position) entries, checked lazily when they surface
    (up to `scan_max` items: a scan).

    Callers report every decrease of an item's key with changed(item); increases may go
    unreported. Each item then always has an entry at or below its key (an entry found below its
    item's key is re-entered at the current key; one above it is dropped, since the decrease that
    made it so pushed a fresh entry), so the first top entry that matches its item is the minimum.
    Where every change is reported, `ReportedLeast` keeps no stale entries.
    """

    def __init__(self, items: Sequence[T], key: Callable[[T], float], scan_max: int = SCAN_MAX):
        self.items = items
        self.key = key
        self.scan = len(items) <= scan_max      # few items: min() itself, no heap to keep
        self.pos = {id(x): i for i, x in enumerate(items)}
        self.heap: list[tuple[float, int]] = []
        if not self.scan:
            self._rebuild()

    def _rebuild(self) -> None:
        key = self.key
        self.heap = [(key(x), i) for i, x in enumerate(self.items)]
        heapify(self.heap)

    def pick(self) -> T:
        heap, items, key = self.heap, self.items, self.key
        if self.scan:
            return first_least(items, key)
        while True:
            v, i = heap[0]
            cur = key(items[i])
            if cur == v:
                return items[i]
            if cur > v:
                heapreplace(heap, (cur, i))
            else:
                heappop(heap)

    def changed(self, item: T) -> None:
        """`item`'s key changed (items not routed here, e.g. moved away, are ignored)."""
        if self.scan:
            return
        i = self.pos.get(id(item))
        if i is None:
            return
        heappush(self.heap, (self.key(item), i))
        if len(self.heap) > 4 * len(self.items) + 64:      # drop stale entries now and then
            self._rebuild()


class ReportedLeast(Generic[T]):
    """The item with the least key, ties to the lowest position (what min(items, key=key) picks),
    when callers report every change of a key with changed(item): a binary heap of positions
    ordered by (key, position) that knows each item's slot, so a change moves its item up or down
    in place (O(log n)) and a pick reads the top. Up to `scan_max` items: a scan."""

    def __init__(self, items: Sequence[T], key: Callable[[T], float], scan_max: int = SCAN_MAX):
        self.items = items
        self.key = key
        self.scan = len(items) <= scan_max
        self.pos = {id(x): i for i, x in enumerate(items)}
        self.keys: list[float] = []
        self.heap: list[int] = []
        self.slot: list[int] = []       # slot[position] = its index in heap
        if not self.scan:
            self.keys = [key(x) for x in items]
            # a list sorted by (key, position) is a heap
            self.heap = sorted(range(len(items)), key=lambda i: (self.keys[i], i))
            self.slot = [0] * len(items)
            for j, i in enumerate(self.heap):
                self.slot[i] = j

    def pick(self) -> T:
        if self.scan:
            return first_least(self.items, self.key)
        return self.items[self.heap[0]]

    def changed(self, item: T) -> None:
        """`item`'s key changed (items not routed here, e.g. moved away, are ignored)."""
        if self.scan:
            return
        i = self.pos.get(id(item))
        if i is None:
            return
        k: float = self.key(item)
        old = self.keys[i]
        self.keys[i] = k
        if k < old:
            self._up(self.slot[i])
        elif k > old:
            self._down(self.slot[i])

    def _before(self, a: int, b: int) -> bool:
        """Position a comes before position b: (key, position) order."""
        ka, kb = self.keys[a], self.keys[b]
        return ka < kb or (ka == kb and a < b)

    def _up(self, j: int) -> None:
        heap, slot = self.heap, self.slot
        i = heap[j]
        while j > 0:
            parent = (j - 1) >> 1
            p = heap[parent]
            if not self._before(i, p):
                break
            heap[j] = p
            slot[p] = j
            j = parent
        heap[j] = i
        slot[i] = j

    def _down(self, j: int) -> None:
        heap, slot = self.heap, self.slot
        n = len(heap)
        i = heap[j]
        while True:
            child = 2 * j + 1
            if child >= n:
                break
            right = child + 1
            if right < n and self._before(heap[right], heap[child]):
                child = right
            c = heap[child]
            if not self._before(c, i):
                break
            heap[j] = c
            slot[c] = j
            j = child
        heap[j] = i
        slot[i] = j


@mypyc_attr(allow_interpreted_subclasses=True)
class RoundRobin(Router):
    """Replicas in turn."""

    def __init__(self, items: list):
        super().__init__(items)
        self.i = 0

    def pick(self, now: float) -> Any:
        i = self.i
        self.i = (i + 1) % len(self.items)
        return self.items[i]


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastOutstanding(Router):
    """The replica with the least outstanding work (seconds of its unfinished requests' hops);
    every change is reported (on routing and on completion)."""

    def __init__(self, items: list):
        super().__init__(items)
        self.ll: ReportedLeast[Any] = ReportedLeast(items, attrgetter("outstanding"))

    def pick(self, now: float) -> Any:
        return self.ll.pick()

    def changed(self, item: Any) -> None:
        self.ll.changed(item)


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastRequests(Router):
    """The LLM engine with the fewest outstanding requests (queued + running); a count falls
    only when a request leaves its engine (reported by hop_done)."""

    def __init__(self, items: list):
        super().__init__(items)
        self.ll: LeastLoaded[Any] = LeastLoaded(items, methodcaller("num_requests"))

    def pick(self, now: float) -> Any:
        return self.ll.pick()

    def changed(self, item: Any) -> None:
        self.ll.changed(item)


@mypyc_attr(allow_interpreted_subclasses=True)
class LeastTokens(Router):
    """The LLM engine with the fewest outstanding tokens, text and image (AREngine.load): a few
    image-heavy prompts do not pile onto one engine. A scan: an engine's load also falls while
    it decodes, unreported."""

    def pick(self, now: float) -> Any:
        return AREngine.least_loaded(self.items, now)
