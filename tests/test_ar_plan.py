"""AR engine (sim/engines/ar.py) edge cases, each against an oracle computed by hand from the
synthetic closed forms of conftest.py (prefill(t) = 5 + 0.05 t ms, decode(b, c) = 8 + 0.02 b +
1e-5 b c ms, vision(t) = 1 + 0.01 t ms; no attention or mixed-step term): the engine's
defaults, the front end's idle test, exact step boundaries (async arrivals, load), the plan
(decode jumps run to the first completion or exactly to the KV bound; when a waiting request
cuts them), admissions (token budget, full-sequence gate, none in a step that preempted),
preemption of an image request, a one-token prompt, prefix-cache hits, stage records and
per-token streaming."""
from __future__ import annotations

import pytest

from conftest import decode_ms, prefill_ms, vision_ms
from sim.core.gpu import GPU
from sim.core.records import Job, Request
from sim.engines.ar import AREngine, FrontEnd
from sim.engines.latency import OutOfRange
from sim.names import DECODE, PREFILL, VISION_ENCODE
from test_ar import M, Rig, close, decode_steps, ms, preemption_scene


class RecGPU(GPU):
    """A GPU that records the steps each of its units committed (the engine's plan as run)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.units: list[int] = []

    def _done(self, tok: int) -> None:
        if tok == self.token:
            self.units.append(self.planned)
        super()._done(tok)


class Rig2(Rig):
    """Rig on a RecGPU; jobs may carry image tokens and KV held on arrival; finishing order."""

    def __init__(self, profiles, kv_tokens: int = 1 << 20, **kw):
        super().__init__(profiles, kv_tokens, **kw)
        self.gpu = RecGPU(self.env, 0, 0)
        self.gpu.add(self.eng)
        self.jobs: dict[int, Job] = {}
        self.done_order: list[int] = []

    @property
    def units(self) -> list[int]:
        return self.gpu.units

    def submit(self, i: int, prompt: int, out: int, at: float = 0.0, priority: int = 1,
               **extra) -> Request:
        req = Request(i, at, "text", M, prompt, out)
        job = Job(req, "ar", M, on_done=self._done, tokens=prompt, out_tokens=out,
                  priority=priority, **extra)
        self.reqs[i] = req
        self.jobs[i] = job
        if at > self.env.now:
            self.env.run(until=at)
        self.eng.submit(job, self.env.now)
        return req

    def _done(self, job: Job, now: float) -> None:
        self.done_order.append(job.req.id)
        super()._done(job, now)


def mixed_ms(tokens: int, d: int, ctx: float) -> float:
    """A step of `tokens` prefill tokens beside d decoding sequences of mean context ctx (the
    latency model's composition on the synthetic table: no mixed or attention term)."""
    return prefill_ms(tokens + d) + (decode_ms(d, ctx) - decode_ms(d, 1) if d else 0.0)


def _job(i: int, prompt: int, out: int) -> Job:
    return Job(Request(i, 0.0, "text", M, prompt, out), "ar", M, tokens=prompt, out_tokens=out)


# --- construction, submission, what routers read ------------------------------------------------

def test_defaults_are_vllm_v1s_and_a_fresh_engine_is_empty():
    e = AREngine(M, None, 1 << 20)
    assert (e.budget, e.max_seqs, e.bs, e.reserve_full, e.async_admit) == (8192, 256, 16, False, False)
    assert e.total_blocks == e.free_blocks == (1 << 20) // 16
    assert e.peak_blocks_used == 0 and e.load() == 0 and not e.has_work()
    # a cache smaller than a block still holds one
    assert [AREngine(M, None, kv).total_blocks for kv in (0, 15, 16, 31, 32)] == [1, 1, 1, 1, 2]
    # an engine not yet on a GPU takes a job in at once (no front end without a GPU)
    job = _job(0, 100, 10)
    e.submit(job, 2.5)
    assert len(e.waiting) == 1 and job.enqueued == 2.5 and e.load() == 110


def test_submit_reserves_a_block_for_one_output_token_at_least():
    e = AREngine(M, None, 16)                   # one block of 16 tokens
    e.submit(_job(0, 15, 1), 0.0)               # 15 + 1 tokens: the one block
    e.submit(_job(1, 15, 0), 0.0)               # prefill only: its prompt + 1 as well
    for prompt, out in ((16, 0), (16, 1), (15, 2)):
        with pytest.raises(ValueError, match="needs 2 KV blocks"):
            e.submit(_job(2, prompt, out), 0.0)
    assert len(e.waiting) == 2


def test_can_join_while_a_seat_is_free(synthetic_profiles):
    r = Rig2(synthetic_profiles, max_num_seqs=2)
    assert r.eng.can_join(_job(9, 10, 2))
    r.submit(0, 100, 5)                         # admitted at once (the GPU was idle)
    assert len(r.eng.running) == 1 and r.eng.can_join(_job(9, 10, 2))
    r.submit(1, 100, 5, at=0.001)
    r.env.run(until=0.02)                       # both running
    assert len(r.eng.running) == 2 and not r.eng.can_join(_job(9, 10, 2))
    r.run()


def test_front_end_is_busy_when_the_idle_gpu_has_queued_work(synthetic_profiles):
    """The idle delay is for an engine with nothing to do; a GPU held idle (not available)
    with a request already queued is busy for the next arrival."""
    fe = FrontEnd(base=0.001, idle=0.004, busy=0.002)
    r = Rig2(synthetic_profiles, frontend=fe)
    r.hold()
    r.submit(0, 100, 5)
    r.env.run(until=0.01)
    r.submit(1, 100, 5, at=0.01)
    r.env.run(until=0.02)
    assert close(r.jobs[0].enqueued, 0.001 + 0.004)
    assert close(r.jobs[1].enqueued, 0.01 + 0.001 + 0.002)
    r.go()
    r.run()


def test_an_arrival_exactly_at_a_step_end(synthetic_profiles):
    """Async scheduling, b arriving at the very end of a's 2nd decode step (engine step 3):
    that step counts as run for load (40 - 2 tokens outstanding) and as the one in flight for
    the arrival (step 4 is already scheduled), so b joins step 5, as the GPU's cut assumes."""
    r = Rig2(synthetic_profiles, async_admit=True)
    a = r.submit(0, 100, 40)
    t1 = ms(prefill_ms(100))
    r.env.run(until=t1 + 0.5 * ms(decode_ms(1, 100)))
    u = r.gpu.cur
    assert u is r.eng.jump_unit and len(u.ends) == 39          # a's whole decode, one unit
    t = r.gpu.start + u.ends[1]
    r.env.run(until=t)
    eng = r.eng
    assert eng.load_at(t) == 38 and eng.load() == 38
    other = AREngine(M, None, 1 << 20)
    other.submit(_job(9, 30, 9), t)                            # 39 outstanding tokens
    assert AREngine.least_loaded([other, eng], t) is eng
    b = r.submit(1, 50, 2, at=t)
    r.run()
    assert close(b.first_token, t1 + sum(decode_steps(1, 100, 3)) + ms(mixed_ms(50, 1, 103)))
    assert close(a.first_token, t1)


# --- the plan: decode jumps -----------------------------------------------------------------------

def test_a_request_filling_the_cache_decodes_in_one_jump(synthetic_profiles):
    """100 + 12 tokens in 7 blocks: the prompt fills them (no block free), and every decode
    step's token fits the 7th: the 11 decode steps are one unit."""
    r = Rig2(synthetic_profiles, kv_tokens=7 * 16)
    req = r.submit(0, 100, 12)
    r.run()
    assert r.units == [1, 11] and r.eng.peak_blocks_used == 7
    assert close(req.finish, ms(prefill_ms(100)) + sum(decode_steps(1, 100, 11)))


def test_decoders_using_the_whole_token_budget_jump(synthetic_profiles):
    """Budget 2, two 1-token prompts: then 2 decoders take every token of each step, nothing
    else runs, and their 9 decode steps to the end are one unit."""
    r = Rig2(synthetic_profiles, max_num_batched_tokens=2)
    r.hold()
    a = r.submit(0, 1, 10)
    b = r.submit(1, 1, 10)
    r.go()
    r.run()
    assert r.units == [1, 9]
    t1 = ms(prefill_ms(2))
    assert close(a.first_token, t1) and close(b.first_token, t1)
    assert close(a.finish, t1 + sum(decode_steps(2, 1, 9))) and close(b.finish, a.finish)


@pytest.mark.parametrize("k", [13, 15])     # steps to a's completion (two bisection paths)
def test_a_decode_jump_runs_exactly_to_the_kv_bound(synthetic_profiles, k):
    """14 blocks: after the prefill a (100 tokens) holds 7, b (90) holds 6, 1 is free. b takes
    it for its 97th token (7th decode step); a needs an 8th block for its 113th (13th step):
    the jump runs exactly 12 steps. Then a preempts b and ends alone (a jump of its own)."""
    r = Rig2(synthetic_profiles, kv_tokens=14 * 16)
    r.hold()
    a = r.submit(0, 100, k + 1)
    b = r.submit(1, 90, 60)
    r.go()
    r.run()
    assert r.units[:2] == [1, 12]
    assert a.preemptions == 0 and b.preemptions == 1
    t1 = ms(prefill_ms(190))
    assert close(a.finish, t1 + sum(decode_steps(2, 95, 12)) + sum(decode_steps(1, 112, k - 12)))


@pytest.mark.parametrize("reserve", [False, True])
def test_a_request_waiting_for_kv_blocks_does_not_cut_the_decode_jump(synthetic_profiles, reserve):
    """b is a decode hop (its 96-token prompt's KV and first token made elsewhere): it needs 7
    blocks for 97 tokens, but a (100 + 20) leaves 6 of 13 free, so the batch cannot change
    until a ends: a decodes its 19 steps in one unit, then b decodes its last 3 (from context
    96) -- with the full-sequence gate or without."""
    r = Rig2(synthetic_profiles, kv_tokens=13 * 16, reserve_full_isl=reserve)
    r.hold()
    a = r.submit(0, 100, 20)
    b = r.submit(1, 96, 4, pre_computed=96, pre_generated=1)
    r.go()
    r.run()
    assert r.units == [1, 19, 1, 2]
    ta = ms(prefill_ms(100)) + sum(decode_steps(1, 100, 19))
    assert close(a.finish, ta) and close(b.finish, ta + sum(decode_steps(1, 96, 3)))
    assert [x.stage for x in b.stages] == [DECODE]


def test_async_arrival_with_a_prefix_hit_joins_the_step_after_next(synthetic_profiles):
    """Async scheduling: b (128 tokens, 64 of them cached) arrives during a's prefill; it
    needs 8 blocks (128 tokens), 10 are free, so a decodes one step alone (the step already
    scheduled) and b's 64 uncached tokens join the next."""
    r = Rig2(synthetic_profiles, kv_tokens=16 * 16, async_admit=True)
    a = r.submit(0, 90, 6)
    t1 = ms(prefill_ms(90))
    b = r.submit(1, 128, 3, at=0.5 * t1, pre_computed=64)
    r.run()
    assert close(a.first_token, t1)
    tb = t1 + ms(decode_ms(1, 90)) + ms(mixed_ms(64, 1, 91))
    assert close(b.first_token, tb)
    assert close(b.finish, tb + sum(decode_steps(2, 110, 2)))   # contexts a 92-93, b 128-129
    assert close(a.finish, b.finish + ms(decode_ms(1, 94)))


@pytest.mark.parametrize("out, lookups", [(2, 1), (3, 3)])
def test_decode_lookups_outside_the_grid(synthetic_profiles, out, lookups):
    """A 70,000-token prompt decodes past the table's last context (65,536): a single decode
    step looks its point up once; a jump (k = 2) its start point twice (the skipped single-step
    lookup, counted as if made) and its end point once."""
    r = Rig2(synthetic_profiles)
    r.lat.mode = OutOfRange.clamp
    r.submit(0, 70_000, out)
    r.run()
    assert r.units == [1] * 9 + [out - 1]      # 9 prefill chunks of at most 8,192 tokens
    assert dict(r.lat.outside) == {f"{M}/decode": lookups}


# --- admissions -------------------------------------------------------------------------------

def test_admissions_share_the_token_budget(synthetic_profiles):
    """Budget 64, two 50-token prompts: a's 50 and b's first 14 tokens, then b's last 36 beside
    a's last decode step."""
    r = Rig2(synthetic_profiles, max_num_batched_tokens=64)
    r.hold()
    a = r.submit(0, 50, 2)
    b = r.submit(1, 50, 2)
    r.go()
    r.run()
    t1, t2 = ms(prefill_ms(64)), ms(mixed_ms(36, 1, 50))
    assert close(a.first_token, t1) and close(a.finish, t1 + t2)
    assert close(b.first_token, t1 + t2) and close(b.finish, t1 + t2 + ms(decode_ms(1, 50)))


def test_a_waiting_request_starts_when_a_token_of_the_budget_is_free(synthetic_profiles):
    """Budget 2: a and b (1-token prompts) decode, taking both tokens of every step; c waits
    and is admitted -- its prefill record starts -- at the first step with a token to spare,
    right after a's last one."""
    r = Rig2(synthetic_profiles, max_num_batched_tokens=2)
    r.hold()
    a = r.submit(0, 1, 3)
    r.submit(1, 1, 6)
    c = r.submit(2, 10, 2)
    r.go()
    r.run()
    assert [x.stage for x in c.stages] == [PREFILL, DECODE]
    assert c.stages[0].start == a.finish and c.stages[0].enqueue == 0.0


def test_a_prefill_chunk_runs_in_the_one_token_left(synthetic_profiles):
    """Budget 2: a (1-token prompt) decodes; b's 5-token prompt takes the token left beside it
    at every step (4 steps after its first token in step 1)."""
    r = Rig2(synthetic_profiles, max_num_batched_tokens=2)
    r.hold()
    a = r.submit(0, 1, 10)
    b = r.submit(1, 5, 2)
    r.go()
    r.run()
    t1 = ms(prefill_ms(2))
    # step 1 + j (j = 1..4): a at context j, b's (j + 1)-th token after j cached
    steps = [ms(mixed_ms(1, 1, j)) for j in range(1, 5)]
    assert close(b.first_token, t1 + sum(steps))
    assert close(a.first_token, t1)


def test_full_sequence_gate_admits_a_prompt_that_fills_the_cache_exactly(synthetic_profiles):
    """scheduler_reserve_full_isl: 150 + 2 tokens in 10 blocks, all of them: admitted (its
    whole sequence fits), then prefilled in chunks of 64, 64 and 22 tokens."""
    r = Rig2(synthetic_profiles, kv_tokens=10 * 16, max_num_batched_tokens=64,
             reserve_full_isl=True)
    req = r.submit(0, 150, 2)
    r.run()
    first = ms(prefill_ms(64) * 2 + prefill_ms(22))
    assert close(req.first_token, first)
    assert close(req.finish, first + ms(decode_ms(1, 150)))
    assert r.eng.peak_blocks_used == 10


def test_kv_held_on_arrival_is_computed_once_admitted(synthetic_profiles):
    """A prefix-cache hit (64 of 100 prompt tokens): queued, all 110 tokens are outstanding;
    admitted, 46 (its 36 uncached prompt tokens and 10 outputs); at the end, none. Its prefill
    runs the 36 tokens."""
    r = Rig2(synthetic_profiles)
    r.hold()
    req = r.submit(0, 100, 10, pre_computed=64)
    assert r.eng.load() == 110
    r.go()
    assert len(r.eng.running) == 1 and r.eng.load() == 46
    r.run()
    assert r.eng.load() == 0
    first = ms(prefill_ms(36))
    assert close(req.first_token, first)
    assert close(req.finish, first + sum(decode_steps(1, 100, 9)))


def test_requests_ending_in_the_same_step_finish_in_admission_order(synthetic_profiles):
    r = Rig2(synthetic_profiles)
    r.hold()
    for i, p in enumerate((60, 50, 40)):
        r.submit(i, p, 8)
    r.go()
    r.run()
    assert r.done_order == [0, 1, 2]
    assert len({q.finish for q in r.reqs.values()}) == 1


# --- preemption ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vision", [0, 64])
def test_a_preempted_request_encodes_its_images_again(synthetic_profiles, vision):
    """As test_ar.py's one-block-short case (13 blocks; b, the latest, is preempted when both
    need a 7th), with b's prompt holding `vision` image tokens: its recompute step encodes
    them again (a second vision-encode record); a text request has none to encode."""
    r = Rig2(synthetic_profiles, kv_tokens=13 * 16)
    r.hold()
    a = r.submit(0, 90, 12)
    b = r.submit(1, 90, 12, vision_tokens=vision)
    r.go()
    r.run()
    assert a.preemptions == 0 and b.preemptions == 1
    enc = ms(vision_ms(vision)) if vision else 0.0
    first = ms(prefill_ms(180)) + enc
    assert close(a.first_token, first) and close(b.first_token, first)
    assert close(a.finish, first + sum(decode_steps(2, 90, 6)) + sum(decode_steps(1, 96, 5)))
    assert close(b.finish, a.finish + ms(prefill_ms(97)) + enc + sum(decode_steps(1, 97, 4)))
    assert [x.stage for x in b.stages].count(VISION_ENCODE) == (2 if vision else 0)
    assert VISION_ENCODE not in [x.stage for x in a.stages]


@pytest.mark.parametrize("blocks, a_prompt, out, before_c", [
    # 13 blocks: a and b both need a 7th block at their 7th decode step; one is free: a takes it,
    # b preempts itself
    (13, 90, 12, lambda: ms(prefill_ms(180)) + sum(decode_steps(2, 90, 6)) + ms(decode_ms(1, 96))),
    # 12 blocks: a (95 tokens) and b fill them; at its 2nd decode step a needs a 7th and preempts b
    (12, 95, 20, lambda: ms(prefill_ms(185)) + ms(decode_ms(2, 92.5)) + ms(decode_ms(1, 96))),
], ids=["b_preempts_itself", "a_preempts_b"])
def test_no_admission_in_a_step_that_preempted(synthetic_profiles, blocks, a_prompt, out, before_c):
    """c (class 1, waiting for blocks) is ahead of the preempted b in the queue, but, as in
    vLLM, nothing is admitted in a step that preempted: c's prefill runs in the next step,
    beside a's decode."""
    r = Rig2(synthetic_profiles, kv_tokens=blocks * 16, priority=True)
    a, b, c = preemption_scene(r, a_prompt, out)
    assert close(c.first_token, before_c() + ms(mixed_ms(40, 1, 97)))


# --- a one-token prompt, stage records, streaming -------------------------------------------------

def test_a_one_token_prompt_is_a_prefill_step(synthetic_profiles):
    """Its step is a 1-token prefill (not a decode at context 0) and yields no ITL value: the
    ITL values are those of the 2 decode steps after it."""
    r = Rig2(synthetic_profiles)
    req = r.submit(0, 1, 3)
    r.run()
    first = ms(prefill_ms(1))
    want = decode_steps(1, 1, 2)
    assert close(req.first_token, first) and close(req.finish, first + sum(want))
    assert [w for _, w in r.itl] == [1, 1]
    assert all(close(d, t) for (d, _), t in zip(r.itl, want))


@pytest.mark.parametrize("out", [1, 2, 3])
def test_a_decode_stage_record_only_with_tokens_after_the_first(synthetic_profiles, out):
    r = Rig2(synthetic_profiles)
    req = r.submit(0, 100, out)
    r.run()
    first = ms(prefill_ms(100))
    got = [(x.stage, x.start, x.end) for x in req.stages]
    assert got[0][:2] == (PREFILL, 0.0) and close(got[0][2], first)
    if out == 1:
        assert len(got) == 1
    else:
        assert len(got) == 2 and got[1][0] == DECODE
        assert close(got[1][1], first) and close(got[1][2], req.finish)
        assert close(req.finish, first + sum(decode_steps(1, 100, out - 1)))


def test_streamed_tokens_reach_the_client_one_after_another(synthetic_profiles):
    """stream_s_per_token: a token is seen that many seconds per token of its step after the
    step ends. Step 1 makes 3 first tokens; step 2 a's last with b's and c's (3 tokens); b and
    c then decode to their end in one jump of 3 steps, 2 tokens each."""
    st = 0.001
    r = Rig2(synthetic_profiles, stream_s_per_token=st)
    r.hold()
    a = r.submit(0, 40, 2)
    b = r.submit(1, 40, 5)
    c = r.submit(2, 40, 5)
    r.go()
    r.run()
    assert r.units == [1, 1, 3]
    t1, t2 = ms(prefill_ms(120)), ms(decode_ms(3, 40))
    for q in (a, b, c):
        assert close(q.first_token, t1 + 3 * st)
    assert close(a.finish, t1 + t2 + 3 * st)
    end = t1 + t2 + sum(decode_steps(2, 41, 3))
    assert close(b.finish, end + 2 * st) and close(c.finish, b.finish)
