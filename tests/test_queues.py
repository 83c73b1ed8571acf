"""Stage queues and jobs (sim/engines/queues.py): FCFS, SLO priority classes (interactive before
standard before batch), highest-response-ratio-next order with aging, removal and work sums,
shapes by stage (with DiT buckets), and the stage record a job opens when it starts."""
from __future__ import annotations

import pytest

from sim.core.records import Job, Request
from sim.engines.pipeline import plan_hops
from sim.engines.queues import PRIORITY, StageQueue, start_record


def job(i: int, work: float = 1.0, priority: int = 1, stage: str = "dit_step", **kw) -> Job:
    return Job(Request(i, 0.0, "generate", "m", 10), stage, "m", work=work, priority=priority, **kw)


def ids(q: StageQueue) -> list[int]:
    return [j.req.id for j in q]


def test_fifo_queue_order_length_and_work():
    q = StageQueue("q")
    assert len(q) == 0 and q.head() is None and ids(q) == []
    for i in range(4):
        q.put(job(i, work=i + 0.5), float(i))
    assert len(q) == 4 and ids(q) == [0, 1, 2, 3] and q.head().req.id == 0
    assert q.work == pytest.approx(0.5 + 1.5 + 2.5 + 3.5)
    assert [j.enqueued for j in q] == [0.0, 1.0, 2.0, 3.0]
    j2 = list(q)[2]
    q.remove(j2)
    assert ids(q) == [0, 1, 3] and len(q) == 3 and q.work == pytest.approx(0.5 + 1.5 + 3.5)
    assert q.popleft().req.id == 0 and ids(q) == [1, 3] and q.work == pytest.approx(5.0)
    q.popleft()
    q.popleft()
    assert len(q) == 0 and q.work == pytest.approx(0.0)
    with pytest.raises(IndexError):
        q.popleft()


def test_priority_classes_interactive_then_standard_then_batch():
    assert PRIORITY == {"interactive": 0, "standard": 1, "batch": 2}
    q = StageQueue("q", priority=True)
    for i, p in enumerate([2, 1, 0, 2, 1, 0, 7]):      # 7: above the last class, served last
        q.put(job(i, priority=p), 0.0)
    assert ids(q) == [2, 5, 1, 4, 0, 3, 6] and q.head().req.id == 2
    q.remove(list(q)[2])                                # job 1 (standard)
    assert ids(q) == [2, 5, 4, 0, 3, 6] and len(q) == 6
    assert [q.popleft().req.id for _ in range(6)] == [2, 5, 4, 0, 3, 6]
    # the classes a request's SLO class maps to, on every hop of its pipeline
    for slo, level in PRIORITY.items():
        req = Request(0, 0.0, "generate", "qwen_image", 10, output_image=(512, 512), steps=4,
                      slo_class=slo)
        assert {h.priority for h in plan_hops(req, True)} == {level}
    fifo = StageQueue("f")
    for i, p in enumerate([2, 0, 1]):
        fifo.put(job(i, priority=p), 0.0)
    assert ids(fifo) == [0, 1, 2]                        # priority off: arrival order


def test_hrrn_is_highest_response_ratio_next():
    now = [10.0]
    q = StageQueue("q", order="hrrn", clock=lambda: now[0])
    q.put(job(0, work=8.0), 0.0)     # ratio at 10: (10 + 8) / 8 = 2.25
    q.put(job(1, work=1.0), 9.0)     # (1 + 1) / 1 = 2.0
    q.put(job(2, work=2.0), 10.0)    # (0 + 2) / 2 = 1.0
    q.put(job(3, work=0.5), 9.5)     # (0.5 + 0.5) / 0.5 = 2.0 (a tie: queue order)
    assert ids(q) == [0, 1, 3, 2] and q.head().req.id == 0
    now[0] = 9.1                     # earlier: a long wait counts less: 2.1375 vs 1.1 and 0.55
    assert ids(q)[:2] == [0, 1]
    now[0] = 10.0
    assert q.popleft().req.id == 0 and q.popleft().req.id == 1
    assert ids(q) == [3, 2] and len(q) == 2
    assert q.work == pytest.approx(2.5)


def test_hrrn_within_priority_classes():
    q = StageQueue("q", priority=True, order="hrrn", clock=lambda: 100.0)
    q.put(job(0, work=50.0, priority=1), 90.0)     # ratio (10 + 50) / 50 = 1.2
    q.put(job(1, work=1.0, priority=1), 99.0)      # (1 + 1) / 1 = 2
    q.put(job(2, work=90.0, priority=0), 100.0)    # 1, but interactive
    assert ids(q) == [2, 1, 0]


def test_shapes_by_stage_and_buckets():
    assert job(0, stage="dit_step", seq_len=1000).shape() == (1000,)
    assert job(0, stage="dit_step", seq_len=1000).shape([512, 1024, 4096]) == (1024,)
    assert job(0, stage="dit_step", seq_len=1024).shape([512, 1024, 4096]) == (1024,)
    assert job(0, stage="dit_step", seq_len=5000).shape([512, 1024, 4096]) == (5000,)
    assert job(0, stage="vae_decode", height=512, width=768).shape() == (512, 768)
    assert job(0, stage="vae_encode", height=64, width=32).shape() == (64, 32)
    assert job(0, stage="text_encode", tokens=77).shape() == ()


def test_start_record_opens_the_stage_on_the_server():
    j = job(3, stage="ar")
    j.enqueued = 1.5
    start_record(j, "gpu7", 2.0)
    rec = j.req.stages[-1]
    assert (rec.stage, rec.server, rec.enqueue, rec.start) == ("prefill", "gpu7", 1.5, 2.0)
    assert j.record is rec and j.server == "gpu7" and rec.end != rec.end     # end: NaN
    k = job(4, stage="vae_decode")
    start_record(k, "gpu1", 3.0)
    assert k.req.stages[-1].stage == "vae_decode"


def test_free_engines_finds_the_first_free_gpu_of_gpus_that_do_not_report_unit_ends():
    """GPUs without reports_unit_end: every lookup scans, so a GPU that was busy at one lookup
    and is free at the next is found again (first in engine order)."""
    from sim.core.gpu import GPU, Engine, Unit
    from sim.core.kernel import Kernel
    from sim.engines.queues import FreeEngines
    env, busy = Kernel(), Unit([1.0], lambda k, now: None, "s")
    gpus = [GPU(env, i, 0) for i in range(2)]   # a plain GPU does not report unit ends
    engines = [Engine() for _ in gpus]
    for g, e in zip(gpus, engines):
        g.add(e)
    free = FreeEngines(engines)
    gpus[0].cur = busy
    assert free.first() is engines[1]
    gpus[0].cur = None
    assert free.first() is engines[0]
    gpus[0].cur = gpus[1].cur = busy
    assert free.first() is None
    gpus[1].cur = None
    assert free.first() is engines[1]


def test_remove_finds_a_job_above_the_last_class_and_takes_one_entry():
    """remove() looks first in the level put() chose (a priority past the last class sits in the
    last level) and takes exactly one entry, as deque.remove does: the count and the work sum
    drop by that one job."""
    q = StageQueue("q", priority=True)
    a, b, c = job(0, priority=7), job(1, work=2.0, priority=0), job(2, priority=2)
    for j in (a, b, c):
        q.put(j, 0.0)
    q.remove(a)                                         # level min(7, 2) = 2, not 7 or 4
    assert ids(q) == [1, 2] and len(q) == 2 and q.work == pytest.approx(3.0)
    q.put(b, 1.0)                                       # the same job twice in one level
    q.remove(b)
    assert ids(q) == [1, 2] and len(q) == 2 and q.work == pytest.approx(3.0)
