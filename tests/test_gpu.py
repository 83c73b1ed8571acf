"""The simulated GPU (sim/core/gpu.py) with scripted engines: a multi-step unit is committed once at
its end, cut at the next step boundary (or `lag` steps later) when work arrives, engines on one
GPU take turns step by step (round robin), busy time is counted per stage, and EqualSteps
behaves as the list of step ends it stands for."""
from __future__ import annotations

import pytest

from sim.core.gpu import GPU, Engine, EqualSteps, Unit
from sim.core.kernel import Kernel


class Scripted(Engine):
    """An engine that plans the units it is given, in order; log = [(name, k, commit time)]."""

    def __init__(self, name: str, units: list, log: list, stage: str = "s"):
        super().__init__()
        self.name, self.units, self.log, self.stage = name, list(units), log, stage

    def has_work(self) -> bool:
        return bool(self.units)

    def plan(self, now: float):
        if not self.units:
            return None
        ends = self.units[0]
        return Unit(ends if isinstance(ends, EqualSteps) else list(ends), self._commit,
                    self.stage, self)

    def _commit(self, k: int, now: float) -> None:
        ends = self.units[0]
        self.log.append((self.name, k, round(now, 9)))
        n = len(ends)
        if k >= n:
            self.units.pop(0)
        else:                           # the rest of the unit, from the cut on
            base = ends[k - 1]
            self.units[0] = [e - base for e in list(ends)[k:]]


def rig(*engines_units, step_jump: bool = True, stages=None):
    env = Kernel()
    g = GPU(env, 3, 0, step_jump=step_jump)
    log: list = []
    engines = []
    for i, units in enumerate(engines_units):
        e = Scripted("ABCD"[i], units, log, (stages or "abcd")[i])
        g.add(e)
        engines.append(e)
    return env, g, engines, log


def test_equal_steps_is_the_list_of_step_ends():
    e = EqualSteps(0.25, 5)
    ref = [0.25 * i for i in range(1, 6)]
    assert len(e) == 5 and list(e) == ref
    assert [e[i] for i in range(5)] == ref and e[-1] == 1.25 and e[-5] == 0.25
    assert e[1:3] == ref[1:3] and e[:] == ref and e[:1] == [0.25]
    for bad in (5, -6):
        with pytest.raises(IndexError):
            e[bad]


@pytest.mark.parametrize("ends", [[1.0, 2.0, 3.0, 4.0], EqualSteps(1.0, 4)])
def test_a_unit_is_committed_once_at_its_end(ends):
    env, g, _, log = rig([ends])
    assert g.name == "gpu3" and g.cur is None
    g.kick()
    assert g.cur is not None and g.has_work()
    env.run()
    assert log == [("A", 4, 4.0)]
    assert g.busy_time == 4.0 and dict(g.busy_by_stage) == {"a": 4.0} and g.events == 1
    assert g.cur is None and not g.has_work()


@pytest.mark.parametrize("ends", [[1.0, 2.0, 3.0, 4.0], EqualSteps(1.0, 4)])
@pytest.mark.parametrize("at, lag, k", [(1.5, 0, 2), (2.0, 0, 2), (0.5, 0, 1), (1.5, 1, 3),
                                        (1.5, 5, 4), (3.5, 0, 4)])
def test_a_kick_cuts_the_unit_at_the_next_step_boundary(ends, at, lag, k):
    env, g, _, log = rig([ends])
    g.kick()
    env.run(until=at)
    g.kick(lag)
    env.run()
    assert log[0] == ("A", k, float(k))
    assert log[-1][2] == 4.0 and sum(x[1] for x in log) == 4      # the rest runs after
    assert g.busy_time == pytest.approx(4.0)


def test_a_single_step_unit_is_never_cut():
    env, g, _, log = rig([[2.0]])
    g.kick()
    env.run(until=1.0)
    g.kick()
    env.run()
    assert log == [("A", 1, 2.0)]


def test_engines_sharing_a_gpu_take_turns_step_by_step():
    """A 3-step unit and a 2-step unit on one GPU: while the other engine has work each runs
    one step at a time, round robin; alone again, the rest runs in one unit."""
    env, g, _, log = rig([[1.0, 2.0, 3.0]], [[0.5, 1.0]])
    g.kick()
    env.run()
    assert log == [("A", 1, 1.0), ("B", 1, 1.5), ("A", 1, 2.5), ("B", 1, 3.0), ("A", 1, 4.0)]
    assert dict(g.busy_by_stage) == {"a": 3.0, "b": 1.0} and g.busy_time == 4.0


def test_round_robin_starts_after_the_engine_that_ran_last():
    env, g, _, log = rig([[1.0], [1.0]], [[1.0], [1.0]], [[1.0]])
    g.kick()
    env.run()
    assert [x[0] for x in log] == ["A", "B", "C", "A", "B"]


def test_without_step_jump_every_unit_is_one_step():
    env, g, _, log = rig([EqualSteps(0.5, 3)], step_jump=False)
    g.kick()
    env.run()
    assert log == [("A", 1, 0.5), ("A", 1, 1.0), ("A", 1, 1.5)] and g.events == 3


def test_an_unavailable_gpu_starts_nothing_and_resumes_when_kicked():
    env, g, _, log = rig([[1.0]])
    g.available = False
    g.kick()
    env.run(until=5.0)
    assert log == [] and g.cur is None and g.has_work()
    g.available = True
    g.kick()
    env.run()
    assert log == [("A", 1, 6.0)]


def test_a_kick_while_committing_is_ignored():
    env, g, engines, log = rig([[1.0, 2.0]])
    g.kick()
    g.committing = True
    env.run(until=0.5)
    g.kick()
    g.committing = False
    env.run()
    assert log == [("A", 2, 2.0)]


def test_cut_search_on_equal_steps_is_bisect_left_on_their_ends():
    """The GPU finds the step to cut at by bisecting the unit's ends; on EqualSteps it computes
    the ends in place and must agree with bisect_left on the list, ties included."""
    from bisect import bisect_left
    from bisect import bisect_right
    from sim.core.gpu import steps_before, steps_through
    for t, k in ((0.25, 7), (0.1, 10), (1 / 3, 6), (2.0, 1)):
        e = EqualSteps(t, k)
        ends = list(e)
        probes = ends + [x + t / 2 for x in ends] + [0.0, -1.0, ends[-1] * 2]
        for x in probes:
            assert steps_before(e, x) == bisect_left(ends, x), (t, k, x)
            assert steps_through(e, x) == bisect_right(ends, x), (t, k, x)
        assert steps_before(ends, ends[0]) == 0 and steps_through(tuple(ends), ends[0]) == 1


def test_a_two_step_unit_is_cut_for_a_joiner_after_its_first_step():
    """kick() cuts any unit of two or more steps: a DiT job arriving during the first of its
    batch's last two steps joins at that boundary, not after both."""
    from sim.core.records import Job, Request
    from sim.engines.dit import DiTEngine
    from sim.engines.queues import StageQueue

    class Linear:
        def dit_step(self, model, batch, seq):
            return 1e-4 * batch * seq / 16

    env = Kernel()
    q = StageQueue("dit_step:m")
    eng = DiTEngine("m", q, Linear(), max_batch=8)
    gpu = GPU(env, 0, 0)
    done = {}

    def put(i):
        j = Job(Request(i, 0.0, "generate", "m", 10), "dit_step", "m",
                on_done=lambda job, now: done.__setitem__(job.req.id, now), seq_len=1024, steps=2)
        q.put(j, env.now)

    put(0)
    gpu.add(eng)
    gpu.kick()
    t1, t2 = Linear().dit_step("m", 1, 1024), Linear().dit_step("m", 2, 1024)
    env.run(until=0.5 * t1)
    put(1)
    env.run()
    assert done[0] == pytest.approx(t1 + t2, rel=1e-12)
    assert done[1] == pytest.approx(t1 + t2 + t1, rel=1e-12)


def test_step_jump_is_on_by_default():
    """GPU(env, gid, node) jumps: a 4-step unit of a lone engine is one event, not four."""
    env, log = Kernel(), []
    g = GPU(env, 0, 0)
    g.add(Scripted("A", [[1.0, 2.0, 3.0, 4.0]], log, "a"))
    g.kick()
    env.run()
    assert log == [("A", 4, 4.0)] and g.events == 1


def test_a_lone_engine_leaves_the_round_robin_at_the_first_engine():
    """While one engine has a GPU, the round robin stays at position 0 (what the loop's
    (rr + i + 1) % 1 gives): an engine added later is asked after the first one."""
    env, log = Kernel(), []
    g = GPU(env, 0, 0, step_jump=True)
    a = Scripted("A", [[1.0]], log, "a")
    g.add(a)
    g.kick()
    env.run()
    a.units.append([1.0])
    g.add(Scripted("B", [[1.0]], log, "b"))
    g.kick()
    env.run()
    assert log == [("A", 1, 1.0), ("A", 1, 2.0), ("B", 1, 3.0)]


def test_a_kick_that_cannot_cut_earlier_leaves_the_pending_event_in_place():
    """A kick whose next step boundary is the unit's planned end reschedules nothing: the unit
    still ends in its place among the events of that instant (before a unit of another GPU
    scheduled after it to end at the same time)."""
    env, log = Kernel(), []
    g1, g2 = GPU(env, 1, 0, step_jump=True), GPU(env, 2, 0, step_jump=True)
    g1.add(Scripted("A", [[1.0, 2.0]], log, "a"))
    g2.add(Scripted("B", [[2.0]], log, "b"))
    g1.kick()
    g2.kick()
    env.timer(1.5, lambda _e: g1.kick())            # next boundary: 2.0, the planned end
    env.run()
    assert log == [("A", 2, 2.0), ("B", 1, 2.0)] and g1.events == 1


class Kicking(Scripted):
    """Commits by putting work back and kicking its GPU (as an engine feeding its own queue);
    notes any plan() made while a commit is under way."""
    inside = False
    nested = 0

    def plan(self, now: float):
        if self.inside:
            self.nested += 1
        return super().plan(now)

    def _commit(self, k: int, now: float) -> None:
        self.inside = True
        super()._commit(k, now)
        self.gpu.kick()
        self.inside = False


def test_no_unit_is_planned_while_a_commit_is_under_way():
    """A kick from inside a commit (engine state mid-update) plans nothing; the GPU plans the
    next unit once the commit is done."""
    env, log = Kernel(), []
    g = GPU(env, 0, 0, step_jump=True)
    e = Kicking("A", [[1.0], [1.0]], log, "a")
    g.add(e)
    g.kick()
    env.run()
    assert log == [("A", 1, 1.0), ("A", 1, 2.0)] and e.nested == 0 and g.events == 2
