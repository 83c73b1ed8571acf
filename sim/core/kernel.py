"""The simulation's event loop and its cheapest timer: SimPy's order, less of SimPy's overhead.

`timeout(env, delay, callback, value)` schedules what `env.timeout(delay, value).callbacks.append(
callback)` does -- an already-triggered event at `env.now + delay`, priority NORMAL, the next
event id from the environment's counter, so the same (time, priority, id) heap entry -- as a
`Timer`, a minimal event with the attributes `simpy.Environment.step` reads (callbacks, _ok,
_value): no Timeout.__init__, no Environment.schedule call. `run(env)` pops and processes the
heap exactly as `env.run()` does (one env.step per event) without a method call per event, and
counts the events. Any SimPy event (processes, plain timeouts) runs through either loop.

Compiled with the hot path (sim.tools.compile); the results are the same bit for bit either way.
"""
from __future__ import annotations

from heapq import heappop, heappush
from typing import Any, Callable

NORMAL = 1          # simpy.events.NORMAL
INF = float("inf")


class Timer:
    """A triggered event carrying `value`, processed by `callbacks` (a SimPy event's protocol)."""
    __slots__ = ("callbacks", "_value", "_ok")

    def __init__(self, callback: Callable[[Any], None], value: Any):
        self.callbacks: list[Callable[[Any], None]] | None = [callback]
        self._value = value
        self._ok = True

    @property
    def value(self) -> Any:
        return self._value


def timeout(env: Any, delay: float, callback: Callable[[Any], None], value: Any = None) -> Timer:
    """`callback(event)` after `delay` seconds: env.timeout(delay, value) + a callback, cheaper."""
    if delay < 0:
        raise ValueError(f"Negative delay {delay}")
    ev = Timer(callback, value)
    heappush(env._queue, (env._now + delay, NORMAL, next(env._eid), ev))
    return ev


def run(env: Any) -> int:
    """Process every scheduled event, in order, as env.run() does; returns how many."""
    return run_until(env, INF)


def run_until(env: Any, until: float) -> int:
    """Process the events scheduled before `until` (the rest stay queued, in order); returns how
    many. The one event loop: `run` is this with no bound."""
    q: list = env._queue
    n = 0
    while q and q[0][0] < until:
        now, _, _, ev = heappop(q)
        env._now = now
        callbacks = ev.callbacks
        ev.callbacks = None
        for cb in callbacks:
            cb(ev)
        n += 1
        if not ev._ok and not hasattr(ev, "_defused"):
            _crash(ev)
    return n


def _crash(ev: Any) -> None:
    """A failed, undefused event crashes the run (as simpy.Environment.step)."""
    exc = type(ev._value)(*ev._value.args)
    exc.__cause__ = ev._value
    raise exc
