"""The kernel (sim.core.kernel.Kernel) against SimPy itself: the same schedule run through
`env.timeout(...)` + `env.run()` and through `Kernel.timer(...)` + `Kernel.run_all()` gives the
same events, in the same order, at the same times (processes, ties, zero delays, nested
scheduling, urgent calls, failures)."""
from __future__ import annotations

import random

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.kernel import Kernel


def scenario(env: simpy.Environment, fast: bool, delays: list[float], log: list) -> None:
    """Timers that schedule more timers, two SimPy processes, urgent calls, and ties at equal
    times."""
    def later(delay: float, cb, value=None) -> None:
        if fast:
            env.timer(delay, cb, value)
        else:
            env.timeout(delay, value).callbacks.append(cb)

    def soon(cb) -> None:
        if fast:
            env.call_soon(cb)
        else:
            ev = simpy.Event(env)
            ev.callbacks.append(cb)
            ev._ok, ev._value = True, None
            env.schedule(ev, simpy.events.URGENT)

    def tick(ev) -> None:
        log.append((env.now, "tick", ev.value))
        if ev.value is not None and ev.value < len(delays):
            later(delays[ev.value], tick, ev.value + 1)
            later(0.0, lambda e: log.append((env.now, "zero", None)))
            soon(lambda e: log.append((env.now, "urgent", None)))

    def proc(name: str, gaps: list[float]):
        for g in gaps:
            yield env.timeout(g)
            log.append((env.now, name, None))
            later(g / 2, lambda e, n=name: log.append((env.now, n + "-timer", None)))

    for i, d in enumerate(delays[:3]):
        later(d, tick, i)
    env.process(proc("p", [d + 0.5 for d in delays[:4]]))
    env.process(proc("q", [1.0, 1.0, 0.0, 2.0]))


def run_both(delays: list[float]) -> tuple[list, list, int]:
    slow_env, fast_env = simpy.Environment(), Kernel()
    slow, fast = [], []
    scenario(slow_env, False, delays, slow)
    slow_env.run()
    scenario(fast_env, True, delays, fast)
    n = fast_env.run_all()
    return slow, fast, n


def simpy_steps(delays: list[float]) -> int:
    """How many events SimPy processes for the scenario (one env.step() each)."""
    env, n = simpy.Environment(), 0
    scenario(env, False, delays, [])
    while env.peek() < float("inf"):
        env.step()
        n += 1
    return n


def test_same_events_same_order():
    delays = [1.0, 1.0, 0.5, 2.0, 0.0, 1.5, 1.0]
    slow, fast, n = run_both(delays)
    assert fast == slow and len(slow) > 20
    assert n == simpy_steps(delays)          # every processed event is counted, process steps too


def test_run_until_counts_the_events_it_processed():
    delays = [0.5, 1.0, 0.0, 1.5, 1.0]
    env, log = Kernel(), []
    scenario(env, True, delays, log)
    first = env.run_until(2.0)
    assert first > 0 and env.run_until(2.0) == 0            # nothing left before 2.0
    rest = env.run_all()
    assert first + rest == simpy_steps(delays) and env.run_all() == 0


def test_timer_and_call_soon_return_the_event_they_schedule():
    env, seen = Kernel(), []
    ev = env.timer(1.5, seen.append, "v")
    urgent = env.call_soon(seen.append)
    normal = env.timer(0.0, seen.append, "n")
    assert ev.value == "v" and urgent.value is None and normal.value == "n"
    assert env.run_all() == 3
    assert seen == [urgent, normal, ev] and env.now == 1.5   # urgent before a NORMAL at `now`


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5]), min_size=4, max_size=12))
def test_same_order_for_any_delays(delays):
    slow, fast, _ = run_both(delays)
    assert fast == slow


def test_run_until_leaves_the_rest_queued_in_order():
    rng = random.Random(3)
    delays = [rng.choice([0.0, 0.5, 1.0]) for _ in range(10)]
    env_a, env_b = Kernel(), Kernel()
    a, b = [], []
    scenario(env_a, True, delays, a)
    scenario(env_b, True, delays, b)
    env_a.run_until(2.0)
    assert all(t < 2.0 for t, _, _ in a)
    env_a.run_all()
    env_b.run_all()
    assert a == b


@pytest.mark.parametrize("loop", ["run_all", "run"])    # the kernel's loop, SimPy's own on entries
def test_a_failed_event_crashes_the_run_as_simpy_does(loop):
    env = Kernel()

    def boom(env):
        yield env.timeout(1.0)
        raise KeyError("bad")

    env.process(boom(env))
    with pytest.raises(KeyError):
        getattr(env, loop)()


def test_negative_delay_is_refused():
    with pytest.raises(ValueError, match="Negative delay"):
        Kernel().timer(-1.0, lambda e: None)


def test_simpys_own_loop_runs_on_the_kernel_as_on_simpy():
    """env.run() / step() / peek() (SimPy's loop, over the kernel's entries) give what SimPy
    gives: the same log, the same clock, peek = the next event's time then inf."""
    delays = [0.5, 0.0, 1.0, 0.25, 1.5]
    ref, got = [], []
    a, b = simpy.Environment(), Kernel()
    scenario(a, False, delays, ref)
    scenario(b, False, delays, got)
    assert b.peek() == a.peek() == 0.0
    while a.peek() < float("inf"):
        a.step()
        b.step()
        assert b.peek() == a.peek() and b.now == a.now
    assert got == ref and b.peek() == float("inf")
    with pytest.raises(simpy.core.EmptySchedule):
        b.step()
    c, log = Kernel(), []
    scenario(c, False, delays, log)
    c.run()
    assert log == ref


def test_run_until_an_event_stops_and_resumes_as_simpy_does():
    """env.run(until=event) (SimPy's StopSimulation path through step) on the kernel: it stops
    at the event with its value, and the callbacks added after the stop's run first when the run
    resumes, before the other events of that instant."""
    def run(env):
        log = []

        def waiter(env, ev, wait, name):
            yield env.timeout(wait)
            v = yield ev                # waiting from `wait` on: after run(until=ev)'s callback
            log.append((env.now, name, v))

        ev = env.timeout(2.0, "done")
        env.process(waiter(env, ev, 0.0, "early"))
        env.process(waiter(env, ev, 1.0, "late"))
        env.timeout(2.0).callbacks.append(lambda e: log.append((env.now, "same instant", None)))
        env.timeout(3.0).callbacks.append(lambda e: log.append((env.now, "later", None)))
        v = env.run(until=ev)
        log.append((env.now, "stopped", v))
        env.run()
        return log

    assert run(Kernel()) == run(simpy.Environment())


def test_a_defused_failure_does_not_crash_simpys_own_loop():
    defused = Kernel()
    ev = defused.event()
    ev.fail(ValueError("handled"))
    ev.defused = True
    defused.run()                        # a defused failure does not crash the run
    assert defused.now == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, float("inf")]), st.sampled_from([-1, 0, 1]),
                          st.integers(0, 3)), min_size=2, max_size=2))
def test_entries_order_as_simpys_tuples(pair):
    """Entry(t, p, id) < Entry(t', p', id') exactly when (t, p, id) < (t', p', id'), equal ids
    included (an entry is not less than its equal)."""
    from sim.core.kernel import Entry
    (t0, p0, e0), (t1, p1, e1) = pair
    a, b = Entry(t0, p0, e0, None), Entry(t1, p1, e1, None)
    assert (a < b) == ((t0, p0, e0) < (t1, p1, e1))
    assert (b < a) == ((t1, p1, e1) < (t0, p0, e0))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.sampled_from([-1, 0, 1])),
                          st.none()), max_size=80))
def test_the_agendas_heap_is_heapqs(ops):
    """heap_push / heap_pop build and pop the very heap heapq builds from the same pushes and pops
    (SimPy's tuples): the same list, item for item, after every operation."""
    import heapq

    from sim.core.kernel import Entry, heap_pop, heap_push
    q: list = []
    ref: list = []
    for i, op in enumerate(ops):
        if op is None:                          # a pop (of an empty heap: IndexError in both)
            if not ref:
                with pytest.raises(IndexError):
                    heap_pop(q)
                continue
            e, t = heap_pop(q), heapq.heappop(ref)
            assert (e.time, e.priority, e.eid) == t[:3]
        else:
            heap_push(q, Entry(op[0], op[1], i, None))
            heapq.heappush(ref, (op[0], op[1], i))
        assert [(e.time, e.priority, e.eid) for e in q] == ref


def test_the_heap_holds_simpys_entries():
    """Scheduled and not yet run, the kernel's heap holds SimPy's own entries, item for item:
    the same times, priorities and event ids (0, 1, 2, ... in scheduling order, as SimPy's
    counter), whichever call scheduled them."""
    slow_env, fast_env = simpy.Environment(), Kernel()
    for env, fast in ((slow_env, False), (fast_env, True)):
        scenario(env, fast, [1.0, 0.0, 2.0, 0.5], [])
    want = [t[:3] for t in slow_env._queue]
    assert len(want) == 5                        # 3 timers, 2 processes starting
    assert [(e.time, e.priority, e.eid) for e in fast_env.agenda.queue] == want


def test_timers_run_in_simpys_own_loop():
    """A kernel timer is a succeeded event: SimPy's `run` (through `step`) processes it and does
    not take it for a failure."""
    env, log = Kernel(), []
    env.timer(1.0, lambda ev: log.append((env.now, ev.value)), "a")
    env.call_soon(lambda ev: log.append((env.now, ev.value)))
    env.run()
    assert log == [(0.0, None), (1.0, "a")]


@pytest.mark.parametrize("loop", ["run_all", "run"])    # the kernel's loop, SimPy's own
def test_unit_ends_run_in_either_loop(loop):
    """A GPU's unit end (a Call event) commits the unit at its end in SimPy's own `run` as in
    the kernel's loop."""
    from sim.core.gpu import GPU, Engine, Unit

    class Once(Engine):
        def __init__(self) -> None:
            super().__init__()
            self.log: list = []
            self.left = 1

        def plan(self, now: float):
            if not self.left:
                return None
            self.left = 0
            return Unit([1.0, 2.5], lambda k, t: self.log.append((k, t)), "s", self)

        def has_work(self) -> bool:
            return self.left > 0

    env, eng = Kernel(), Once()
    GPU(env, 0, 0).add(eng)
    eng.placed().kick()
    getattr(env, loop)()
    assert eng.log == [(2, 2.5)]
