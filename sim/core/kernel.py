"""The simulation kernel: a SimPy `Environment` with a cheaper timer and event loop.

SimPy stays the kernel: its heap, its (time, priority, event id) order and its events. `Kernel`
adds what the simulator's hot paths need, and is the one place (with the GPU executor in this
package, which inlines `timer`) that reads or writes SimPy's private fields (`_queue`, `_eid`,
`_now`, an event's `_value` / `_ok`):

- its heap holds `Entry` objects instead of SimPy's (time, priority, event id, event) tuples:
  the same order, compared natively (the heap's comparisons were a tenth of a large run);
  `schedule`, `step` and `peek` are SimPy's, for entries, so SimPy's own events and processes
  run on it unchanged;

- `timer(delay, callback, value)` schedules what `env.timeout(delay, value).callbacks.append(
  callback)` schedules -- an already-triggered event at `now + delay`, priority NORMAL, the next
  event id, so the same heap entry -- as a `Timer`, a minimal event with the attributes
  `Environment.step` reads;
- `call_soon(callback)` schedules `callback` urgently at the current time (as a process's
  initialisation is scheduled);
- `clock(env)` reads the time as `env.now` does, without SimPy's property call;
- `run_until(until)` pops and processes the heap exactly as `env.run(until)` does (one
  `env.step()` per event) without a method call per event, and returns how many events it
  processed; `run_all()` is that with no bound.

Any SimPy event (processes, plain timeouts) runs through either loop; tests/test_eventloop.py
checks the kernel against SimPy itself (same events, same order, same times).
"""
from __future__ import annotations

from heapq import heappop, heappush
from typing import Any, Callable, Final

from simpy.core import EmptySchedule, Environment, StopSimulation

from sim.core.mypyc_compat import mypyc_attr

NORMAL: Final = 1   # simpy.events.NORMAL
URGENT: Final = 0   # simpy.events.URGENT
INF: Final = float("inf")


class Entry:
    """A scheduled event in the kernel's heap, ordered as SimPy's (time, priority, event id,
    event) tuple is: by time, then priority, then event id (ids are unique: the event itself is
    never compared)."""
    __slots__ = ("time", "priority", "eid", "event")

    def __init__(self, time: float, priority: int, eid: int, event: Any):
        self.time = time
        self.priority = priority
        self.eid = eid
        self.event = event

    def __lt__(self, other: "Entry") -> bool:
        if self.time != other.time:
            return self.time < other.time
        if self.priority != other.priority:
            return self.priority < other.priority
        return self.eid < other.eid


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


@mypyc_attr(native_class=False)      # (compiled: a plain class, as a subclass of SimPy's must be)
class Kernel(Environment):
    """SimPy's environment plus the timer, urgent call and event loop the simulator uses."""

    def timer(self, delay: float, callback: Callable[[Any], None], value: Any = None) -> Timer:
        """`callback(event)` after `delay` seconds, `event.value` = value (env.timeout + a
        callback, cheaper). NOTE: inlined in sim.core.gpu.GPU._schedule for speed."""
        if delay < 0:
            raise ValueError(f"Negative delay {delay}")
        ev = Timer(callback, value)
        q: Any = self._queue
        heappush(q, Entry(self._now + delay, NORMAL, next(self._eid), ev))
        return ev

    def call_soon(self, callback: Callable[[Any], None]) -> Timer:
        """`callback(event)` now, before the NORMAL events of this instant (priority URGENT)."""
        ev = Timer(callback, None)
        q: Any = self._queue
        heappush(q, Entry(self._now, URGENT, next(self._eid), ev))
        return ev

    # --- SimPy's own scheduling, on entries -------------------------------------------------
    def schedule(self, event: Any, priority: int = NORMAL, delay: float = 0) -> None:
        """Schedule an *event* with a given *priority* and a *delay* (simpy.Environment's)."""
        q: Any = self._queue
        heappush(q, Entry(self._now + delay, priority, next(self._eid), event))

    def peek(self) -> float:
        """The time of the next scheduled event, inf when there is none (simpy.Environment's)."""
        q: Any = self._queue
        if not q:
            return INF
        e: Entry = q[0]
        return e.time

    def step(self) -> None:
        """Process the next event; EmptySchedule when there is none (simpy.Environment's)."""
        q: Any = self._queue
        if not q:
            raise EmptySchedule
        e: Entry = heappop(q)
        self._now = e.time
        event = e.event
        callbacks, event.callbacks = event.callbacks, None
        try:
            for callback in callbacks:
                callback(event)
        except StopSimulation:
            # as SimPy: the remaining callbacks stay with the event, which runs again first
            event.callbacks = callbacks[callbacks.index(callback) + 1:]
            self.schedule(event, -1)
            raise
        if not event._ok and not hasattr(event, "_defused"):
            _crash(event)

    def run_all(self) -> int:
        """Process every scheduled event, in order, as env.run() does; returns how many."""
        return run_until(self, INF)

    def run_until(self, until: float) -> int:
        """Process the events scheduled before `until` (the rest stay queued, in order);
        returns how many."""
        return run_until(self, until)


def clock(env: Any) -> float:
    """`env.now` without SimPy's property (an interpreted call per read): the current time of a
    Kernel (or any SimPy environment), for the once-per-request reads of compiled callers."""
    t: float = env._now
    return t


def run_until(env: Any, until: float) -> int:
    """The event loop of `Kernel.run_until` (a function: compiled, a native loop). A Timer (the
    simulator's own events: one callback, never failed) takes the short path."""
    q: list = env._queue
    n = 0
    while q:
        entry: Entry = q[0]
        now = entry.time
        if not now < until:
            break
        heappop(q)
        env._now = now
        ev = entry.event
        n += 1
        if type(ev) is Timer:
            t: Timer = ev
            cbs = t.callbacks
            t.callbacks = None
            if cbs is not None:
                for cb in cbs:
                    cb(t)
            continue
        callbacks = ev.callbacks
        ev.callbacks = None
        for cb in callbacks:
            cb(ev)
        if not ev._ok and not hasattr(ev, "_defused"):
            _crash(ev)
    return n


def _crash(ev: Any) -> None:
    """A failed, undefused event crashes the run (as simpy.Environment.step)."""
    exc = type(ev._value)(*ev._value.args)
    exc.__cause__ = ev._value
    raise exc
