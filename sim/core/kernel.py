"""The simulation kernel: a SimPy `Environment` with a cheaper timer and event loop.

SimPy stays the kernel: its (time, priority, event id) order and its events. `Kernel` adds what
the simulator's hot paths need, and is the one place that reads or writes SimPy's private fields
(an event's `_value` / `_ok`):

- its pending events, clock and event ids live in an `Agenda`, a native object (the compiled
  hot path reads the time and schedules with attribute loads, not dictionary lookups on the
  environment): a heap of `Entry` objects ordered as SimPy's (time, priority, event id, event)
  tuples, compared natively. `Kernel` overrides everything of SimPy's `Environment` that touches
  its heap and clock (`now`, `schedule`, `step`, `peek`), so SimPy's own events, processes and
  `run` work on it unchanged; SimPy's `_now`, `_queue` and `_eid` are removed, so nothing can
  read a second, stale clock;
- `timer(delay, callback, value)` schedules what `env.timeout(delay, value).callbacks.append(
  callback)` schedules -- an already-triggered event at `now + delay`, priority NORMAL, the next
  event id, so the same heap entry -- as a `Timer`, a minimal event with the attributes
  `Environment.step` reads; `Agenda.timer` is the same, for callers that hold the agenda;
- a `Call` event calls `target.on_call(value)`: a GPU's unit ends, the most frequent event, as
  one object and a native call (a `Timer` is two objects and a call through the interpreter);
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
        return _before(self, other)


def _before(a: Entry, b: Entry) -> bool:
    """a < b in the kernel's order (SimPy's tuple order)."""
    if a.time != b.time:
        return a.time < b.time
    if a.priority != b.priority:
        return a.priority < b.priority
    return a.eid < b.eid


# The agenda's heap: heapq's push and pop (the same algorithm, the same heap), on entries, so a
# comparison is a native call instead of a rich comparison through the interpreter (a large
# run compares entries some 50 times per request). tests/test_eventloop.py checks them against
# heapq.

def heap_push(q: list[Entry], e: Entry) -> None:
    """heapq.heappush(q, e)."""
    q.append(e)
    _sift_up(q, len(q) - 1, e)


def _sift_up(q: list[Entry], pos: int, e: Entry) -> None:
    """Put e at q[pos] or above it, moving the later entries above it down (heapq's _siftdown)."""
    while pos > 0:
        parentpos = (pos - 1) >> 1
        parent = q[parentpos]
        if _before(e, parent):
            q[pos] = parent
            pos = parentpos
            continue
        break
    q[pos] = e


def heap_pop(q: list[Entry]) -> Entry:
    """heapq.heappop(q): the first entry; IndexError when q is empty."""
    last = q.pop()
    if not q:
        return last
    first = q[0]
    # heapq's _siftup(q, 0): move the smaller child up until a leaf, put `last` there, then
    # sift it back up (heapq's _siftdown)
    end = len(q)
    pos = 0
    child = 1
    while child < end:
        right = child + 1
        if right < end and not _before(q[child], q[right]):
            child = right
        q[pos] = q[child]
        pos = child
        child = 2 * pos + 1
    _sift_up(q, pos, last)
    return first


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


@mypyc_attr(allow_interpreted_subclasses=True)     # (compiled: tests subclass GPU)
class Target:
    """What a `Call` calls (sim.core.gpu.GPU: its unit ends)."""

    def on_call(self, value: int) -> None:
        raise NotImplementedError


class Call:
    """An event that calls `target.on_call(value)` when processed: the simulator's most frequent
    event (a GPU's unit end) as one object and a native method call, where a Timer is two objects
    (itself and its callback list) and a call through the interpreter. It never fails."""
    __slots__ = ("target", "value")

    def __init__(self, target: Target, value: int) -> None:
        self.target = target
        self.value = value


class Agenda:
    """A kernel's pending events (a heap of `Entry`), its clock and its next event id."""
    __slots__ = ("queue", "now", "next_id")

    def __init__(self, now: float) -> None:
        self.queue: list[Entry] = []
        self.now = now
        self.next_id = 0

    def push(self, delay: float, priority: int, event: Any) -> None:
        """Schedule `event` `delay` seconds from now (simpy.Environment.schedule)."""
        i = self.next_id
        self.next_id = i + 1
        heap_push(self.queue, Entry(self.now + delay, priority, i, event))

    def timer(self, delay: float, callback: Callable[[Any], None], value: Any = None) -> Timer:
        """`callback(event)` after `delay` seconds, `event.value` = value (Kernel.timer)."""
        if delay < 0:
            raise ValueError(f"Negative delay {delay}")
        ev = Timer(callback, value)
        self.push(delay, NORMAL, ev)
        return ev


@mypyc_attr(native_class=False)      # (compiled: a plain class, as a subclass of SimPy's must be)
class Kernel(Environment):
    """SimPy's environment plus the timer, urgent call and event loop the simulator uses."""

    def __init__(self, initial_time: float = 0) -> None:
        super().__init__(initial_time)
        self.agenda = Agenda(initial_time)
        # SimPy's own heap, clock and counter: unused here (every method of Environment that
        # reads them is overridden), removed so that nothing reads a second, stale clock
        del self._now, self._queue, self._eid

    @property
    def now(self) -> float:
        """The current simulation time (simpy.Environment.now)."""
        a: Agenda = self.agenda
        return a.now

    def timer(self, delay: float, callback: Callable[[Any], None], value: Any = None) -> Timer:
        """`callback(event)` after `delay` seconds, `event.value` = value (env.timeout + a
        callback, cheaper)."""
        a: Agenda = self.agenda
        return a.timer(delay, callback, value)

    def call_soon(self, callback: Callable[[Any], None]) -> Timer:
        """`callback(event)` now, before the NORMAL events of this instant (priority URGENT)."""
        ev = Timer(callback, None)
        a: Agenda = self.agenda
        a.push(0.0, URGENT, ev)
        return ev

    # --- SimPy's own scheduling, on the agenda ----------------------------------------------
    def schedule(self, event: Any, priority: int = NORMAL, delay: float = 0) -> None:
        """Schedule an *event* with a given *priority* and a *delay* (simpy.Environment's)."""
        a: Agenda = self.agenda
        a.push(delay, priority, event)

    def peek(self) -> float:
        """The time of the next scheduled event, inf when there is none (simpy.Environment's)."""
        a: Agenda = self.agenda
        q = a.queue
        if not q:
            return INF
        return q[0].time

    def step(self) -> None:
        """Process the next event; EmptySchedule when there is none (simpy.Environment's)."""
        a: Agenda = self.agenda
        q = a.queue
        if not q:
            raise EmptySchedule
        e = heap_pop(q)
        a.now = e.time
        event = e.event
        if type(event) is Call:
            c: Call = event
            c.target.on_call(c.value)
            return
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
    Kernel, for the once-per-request reads of compiled callers that do not hold its agenda."""
    a: Agenda = env.agenda
    return a.now


def run_until(env: Any, until: float) -> int:
    """The event loop of `Kernel.run_until` (a function: compiled, a native loop). A Timer (the
    simulator's own events: one callback, never failed) takes the short path."""
    a: Agenda = env.agenda
    q = a.queue
    n = 0
    while q:
        entry = q[0]
        now = entry.time
        if not now < until:
            break
        heap_pop(q)
        a.now = now
        ev = entry.event
        n += 1
        if type(ev) is Call:
            c: Call = ev
            c.target.on_call(c.value)
            continue
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
