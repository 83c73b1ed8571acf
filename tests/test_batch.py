"""One-shot batching engine (sim/engines/batch.py: vision/text encoders, VAE) on one simulated
GPU with closed-form laws: which queued jobs share a pass (same shape, at most max_batch, at
most max_batch_tokens image tokens), each pass's duration by stage, and the work figures."""
from __future__ import annotations

import math

from sim.core.gpu import GPU
from sim.core.kernel import Kernel
from sim.core.records import Job, Request
from sim.engines.batch import BatchEngine
from sim.engines.queues import StageQueue


class Law:
    """vision_encode(t) = 1 ms + 0.01 ms t; text_encode(c, b, t) = a_c + 0.001 ms b t;
    vae(stage, b, h, w) = 1e-5 ms b h w (x2 for decode)."""

    def vision_encode(self, model, tokens):
        return (1.0 + 0.01 * tokens) / 1e3

    def text_encode(self, model, comp, batch, tokens):
        return ({"t5": 2.0, "clip": 0.5}[comp] + 1e-3 * batch * tokens) / 1e3

    def vae(self, model, stage, batch, h, w):
        return 1e-5 * batch * h * w * (2 if stage == "vae_decode" else 1) / 1e3


class Rig:
    def __init__(self, stage: str, **kw):
        self.env = Kernel()
        self.q = StageQueue(stage)
        self.stage = stage
        self.eng = BatchEngine(stage, "m", self.q, Law(), **kw)
        self.gpu = GPU(self.env, 0, 0)
        self.done: dict[int, float] = {}

    def put(self, i: int, **kw) -> Job:
        j = Job(Request(i, 0.0, "understand", "m", 10), self.stage, "m", on_done=self._done, **kw)
        self.q.put(j, self.env.now)
        return j

    def _done(self, job: Job, now: float) -> None:
        assert job.record is not None and job.record.end == now and job.record.start <= now
        self.done[job.req.id] = now

    def start(self) -> list[int]:
        self.gpu.add(self.eng)
        self.gpu.kick()
        return [j.req.id for j in self.eng.running]

    def run(self) -> dict[int, float]:
        self.env.run()
        assert not self.eng.running and len(self.q) == 0
        return self.done


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def test_vision_encoder_batches_up_to_max_batch_and_sums_tokens():
    r = Rig("vision_encode", max_batch=3)
    for i, t in enumerate([100, 200, 300, 400, 500]):
        r.put(i, vision_tokens=t)
    assert r.start() == [0, 1, 2]
    done = r.run()
    law = Law()
    first = law.vision_encode("m", 600)
    assert all(close(done[i], first) for i in range(3))
    assert close(done[3], first + law.vision_encode("m", 900)) and close(done[4], done[3])


def test_vision_encoder_image_token_cap():
    """A pass holds at most max_batch_tokens image tokens (exactly the cap fits); the head
    always runs, even above the cap."""
    r = Rig("vision_encode", max_batch=8, max_batch_tokens=1000)
    for i, t in enumerate([400, 600, 100, 50]):
        r.put(i, vision_tokens=t)
    assert r.start() == [0, 1]                     # 400 + 600 = the cap; 100 more would not fit
    r.run()
    r = Rig("vision_encode", max_batch=8, max_batch_tokens=1000)
    r.put(0, vision_tokens=1500)
    r.put(1, vision_tokens=10)
    assert r.start() == [0]
    done = r.run()
    law = Law()
    assert close(done[1], law.vision_encode("m", 1500) + law.vision_encode("m", 10))


def test_vae_batches_only_one_shape():
    r = Rig("vae_decode", max_batch=8)
    for i, (h, w) in enumerate([(512, 512), (1024, 512), (512, 512), (512, 1024)]):
        r.put(i, height=h, width=w)
    assert r.start() == [0, 2]
    done = r.run()
    law = Law()
    t0 = law.vae("m", "vae_decode", 2, 512, 512)
    t1 = t0 + law.vae("m", "vae_decode", 1, 1024, 512)
    assert close(done[0], t0) and close(done[2], t0)
    assert close(done[1], t1) and close(done[3], t1 + law.vae("m", "vae_decode", 1, 512, 1024))


def test_text_encoder_sums_its_components_at_the_longest_prompt():
    r = Rig("text_encode", max_batch=8)
    r.put(0, tokens=77, components=("t5", "clip"))
    r.put(1, tokens=300, components=("t5", "clip"))
    assert r.start() == [0, 1]
    done = r.run()
    law = Law()
    want = law.text_encode("m", "t5", 2, 300) + law.text_encode("m", "clip", 2, 300)
    assert close(done[0], want) and close(done[1], want)


def test_synthetic_service_and_work_figures():
    env_calls = []

    def service(jobs):
        env_calls.append(len(jobs))
        return 0.5 * len(jobs)
    r = Rig("vae_encode", max_batch=2)
    r.eng.service = service
    assert not r.eng.has_work() and r.eng.load() == 0
    for i in range(3):
        r.put(i, height=64, width=64, work=1.5)
    assert r.eng.has_work() and r.eng.load() == 4.5 and not r.eng.can_join(r.q.head())
    r.start()
    assert r.eng.busy_work() == 3.0 and r.eng.load() == 4.5 and r.q.work == 1.5
    done = r.run()
    assert env_calls == [2, 1] and done == {0: 1.0, 1: 1.0, 2: 1.5}
    assert r.eng.busy_work() == 0 and not r.eng.has_work()


def test_default_vision_token_cap_is_16384_and_a_job_over_it_closes_the_pass():
    r = Rig("vision_encode", max_batch=8)                 # default max_batch_tokens
    for i, t in enumerate([8192, 8192, 1]):
        r.put(i, vision_tokens=t)
    assert r.start() == [0, 1]                             # exactly the cap
    r.run()
    r = Rig("vision_encode", max_batch=8)
    for i, t in enumerate([8192, 8193, 1]):
        r.put(i, vision_tokens=t)
    assert r.start() == [0]                                # over it: no skipping ahead
    r.run()
    r = Rig("vision_encode", max_batch=8, max_batch_tokens=1000)
    for i, t in enumerate([400, 700, 100]):
        r.put(i, vision_tokens=t)
    assert r.start() == [0]
    r.run()


def test_one_queued_job_is_work():
    r = Rig("vae_encode", max_batch=2)
    r.put(0, height=64, width=64, work=1.0)
    assert r.eng.has_work() and len(r.q) == 1
