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


class LeastLoaded(Generic[T]):
    """The item with the least key, ties to the lowest position (what min(items, key=key) picks),
    in O(log n) amortised: a heap of (key, position) entries, checked lazily when they surface
    (up to `scan_max` items: a scan).

    Callers report every decrease of an item's key with changed(item); increases may go
    unreported unless `every_change` says they are all reported too. Each item then always has an
    entry at or below its key (an entry found below its item's key is re-entered at the current
    key, or just dropped under every_change, where the change pushed a fresh entry; one above it
    is dropped, since the decrease that made it so pushed a fresh entry), so the first top entry
    that matches its item is the minimum.
    """

    def __init__(self, items: Sequence[T], key: Callable[[T], float], every_change: bool = False,
                 scan_max: int = SCAN_MAX):
        self.items = items
        self.key = key
        self.every_change = every_change
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
        if self.scan:                   # min(items, key=key): the first of the least
            best = items[0]
            least = key(best)
            for k in range(1, len(items)):
                v = key(items[k])
                if v < least:
                    best, least = items[k], v
            return best
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
        if self.scan:
            return
        i = self.pos.get(id(item))
        if i is None:
            return
        heappush(self.heap, (self.key(item), i))
        if len(self.heap) > 4 * len(self.items) + 64:      # drop stale entries now and then
            self._rebuild()


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
        self.ll: LeastLoaded[Any] = LeastLoaded(items, attrgetter("outstanding"), every_change=True)

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
