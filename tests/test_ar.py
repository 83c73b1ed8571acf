"""AR engine (sim/engines/ar.py) on one simulated GPU with the synthetic tables of conftest.py,
against step times computed by hand from their closed forms: prefill and decode steps, the
step-overhead and host-overhead terms (their signs), the front-end delay, chunked prefill under
the token budget, the exact-fit KV edge (a request that needs every block; two that share them
exactly), the decode-count == token-budget edge of the decode aggregate, and the load figures
routers read."""
from __future__ import annotations

import math

import pytest

import pandas as pd

from conftest import GPU as GPU_KIND, PREFILL_TOKENS, _row, decode_ms, prefill_ms, qwen_vl_rows
from profiler.schema import write_table
from sim.core.gpu import GPU
from sim.core.kernel import Kernel
from sim.core.records import Job, Request
from sim.engines.ar import AREngine, FrontEnd
from sim.engines.latency import LatencyModel

M = "qwen2_5_vl_7b"
LONG_JUMP = 24          # a decode jump this long or longer: many steps in one unit


class Rig:
    def __init__(self, profiles, kv_tokens: int = 1 << 20, **kw):
        self.env = Kernel()
        self.lat = LatencyModel(profiles, GPU_KIND)
        self.itl: list[tuple[float, int]] = []
        self.eng = AREngine(M, self.lat, kv_tokens, itl_sink=self._itl, **kw)
        self.gpu = GPU(self.env, 0, 0)
        self.gpu.add(self.eng)
        self.reqs: dict[int, Request] = {}

    def hold(self) -> None:
        """Requests submitted until go() are scheduled together (the GPU does not start)."""
        self.gpu.available = False

    def go(self) -> None:
        self.gpu.available = True
        self.gpu.kick()

    def _itl(self, d: float, w: int) -> None:
        self.itl.append((d, w))

    def submit(self, i: int, prompt: int, out: int, at: float = 0.0, priority: int = 1) -> Request:
        req = Request(i, at, "text", M, prompt, out)
        job = Job(req, "ar", M, on_done=self._done, tokens=prompt, out_tokens=out, priority=priority)
        self.reqs[i] = req
        if at > self.env.now:
            self.env.run(until=at)
        self.eng.submit(job, self.env.now)
        return req

    def _done(self, job: Job, now: float) -> None:
        job.req.finish = now + job.out_delay

    def run(self) -> dict[int, Request]:
        self.env.run()
        assert not self.eng.running and not len(self.eng.waiting)
        assert self.eng.free_blocks == self.eng.total_blocks
        return self.reqs


def ms(x: float) -> float:
    return x / 1e3


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def decode_steps(batch: int, ctx0: int, k: int) -> list[float]:
    """Seconds of k decode steps of `batch` sequences whose mean context starts at ctx0."""
    return [ms(decode_ms(batch, ctx0 + i)) for i in range(k)]


# --- one request: prefill, then decode steps ------------------------------------------------------

@pytest.mark.parametrize("out", [1, 2, 3, 12, LONG_JUMP + 16])   # short and long jumps
def test_single_request_step_times(synthetic_profiles, out):
    r = Rig(synthetic_profiles)
    req = r.submit(0, 100, out)
    r.run()
    first = ms(prefill_ms(100))
    assert close(req.first_token, first)
    assert close(req.finish, first + sum(decode_steps(1, 100, out - 1)))
    # one ITL value per decode step, weight 1 (the prefill step produced the first token)
    assert len(r.itl) == out - 1 or (out > 2 and 1 <= len(r.itl) < out)
    assert sum(d * w for d, w in r.itl) == pytest.approx(req.finish - req.first_token, rel=1e-9)
    assert r.eng.peak_blocks_used == -(-(100 + out - 1) // 16)


def test_step_overhead_is_added_to_every_step(synthetic_profiles):
    r = Rig(synthetic_profiles, step_overhead_s=0.002)
    req = r.submit(0, 100, 30)
    r.run()
    first = ms(prefill_ms(100)) + 0.002
    assert close(req.first_token, first)
    assert close(req.finish, first + sum(t + 0.002 for t in decode_steps(1, 100, 29)))


@pytest.mark.parametrize("out", [5, LONG_JUMP + 10])
def test_host_overhead_hides_under_the_gpu_step(synthetic_profiles, out):
    """Async scheduling: a step costs max(sync - host(B), host(B)), host(B) = base + per_seq B."""
    host, per_seq = 0.003, 0.001
    r = Rig(synthetic_profiles, host_s=host, host_per_seq_s=per_seq)
    req = r.submit(0, 100, out)
    r.run()
    h = host + per_seq * 1
    first = max(ms(prefill_ms(100)) - h, h)
    assert close(req.first_token, first)
    assert close(req.finish, first + sum(max(t - h, h) for t in decode_steps(1, 100, out - 1)))


def test_host_overhead_floor_when_the_gpu_step_is_short(synthetic_profiles):
    """A host part longer than the rest of the step: the step takes the host part."""
    r = Rig(synthetic_profiles, host_s=0.02, host_per_seq_s=0.0)
    req = r.submit(0, 100, 4)
    r.run()
    assert close(req.first_token, 0.02) and close(req.finish, 0.02 * 4)


def test_two_sequences_decoding_a_long_jump_with_host_overhead(synthetic_profiles):
    """Two sequences decoding together for more than LONG_JUMP steps (the numpy path of a
    jump): host(B) = base + per_seq x 2 at every step."""
    host, per_seq = 0.001, 0.004
    r = Rig(synthetic_profiles, host_s=host, host_per_seq_s=per_seq)
    r.hold()
    a = r.submit(0, 64, LONG_JUMP + 12)
    b = r.submit(1, 64, LONG_JUMP + 12)
    r.go()
    r.run()
    h = host + 2 * per_seq
    first = max(ms(prefill_ms(128)) - h, h)
    assert close(a.first_token, first)
    steps = [max(t - h, h) for t in decode_steps(2, 64, LONG_JUMP + 11)]
    assert close(a.finish, first + sum(steps)) and close(b.finish, a.finish)


def test_plain_loop_reports_one_itl_value_per_decode_step(synthetic_profiles, monkeypatch):
    monkeypatch.setattr(AREngine, "aggregate", False)
    r = Rig(synthetic_profiles)
    req = r.submit(0, 100, 5)
    r.run()
    want = decode_steps(1, 100, 4)
    assert [w for _, w in r.itl] == [1, 1, 1, 1]
    assert all(close(d, t) for (d, _), t in zip(r.itl, want))
    assert close(req.finish, ms(prefill_ms(100)) + sum(want))


def test_host_overhead_counts_every_scheduled_sequence(synthetic_profiles):
    """Two sequences prefilled in one step, then decoding together: host(B) with B = 2."""
    host, per_seq = 0.001, 0.004
    r = Rig(synthetic_profiles, host_s=host, host_per_seq_s=per_seq)
    a = r.submit(0, 64, 5)
    # b arrives while a's prefill runs: it joins at the next step (a decodes, b prefills)
    b = r.submit(1, 64, 3, at=0.001)
    r.run()
    h1, h2 = host + per_seq, host + 2 * per_seq
    t1 = max(ms(prefill_ms(64)) - h1, h1)
    assert close(a.first_token, t1)
    # step 2: b's 64-token prefill with a's decode riding along
    t2 = r.lat.ar_step(M, 64, 1, 64.0)
    t2 = max(t2 - h2, h2)
    assert close(b.first_token, t1 + t2)
    # steps 3-4: both decode (contexts a: 65, 66; b: 64, 65), then a decodes alone (ctx 67)
    d = [max(ms(decode_ms(2, c)) - h2, h2) for c in (64.5, 65.5)]
    assert close(b.finish, t1 + t2 + d[0] + d[1])
    assert close(a.finish, b.finish + max(ms(decode_ms(1, 67)) - h1, h1))


def test_front_end_delay_idle_and_busy(synthetic_profiles):
    fe = FrontEnd(base=0.001, per_prompt_token=1e-5, idle=0.004, busy=0.002,
                  busy_per_running_seq=0.0005)
    r = Rig(synthetic_profiles, frontend=fe)
    a = r.submit(0, 100, 50)
    enter_a = 0.001 + 1e-5 * 100 + 0.004                 # engine idle at arrival
    assert close(fe.delay(100, True, 0), enter_a)
    assert close(fe.delay(100, False, 3), 0.001 + 1e-5 * 100 + 0.002 + 0.0005 * 3)
    r.run()
    assert close(a.first_token, enter_a + ms(prefill_ms(100)))


# --- token budget and chunked prefill -----------------------------------------------------------

def test_chunked_prefill_under_the_token_budget(synthetic_profiles):
    r = Rig(synthetic_profiles, max_num_batched_tokens=64)
    req = r.submit(0, 150, 2)
    r.run()
    chunks = [r.lat.ar_step(M, 64, 0, 0.0, 0.0), r.lat.ar_step(M, 64, 0, 0.0, 64.0),
              r.lat.ar_step(M, 22, 0, 0.0, 128.0)]
    assert close(req.first_token, sum(chunks))
    assert close(req.finish, sum(chunks) + ms(decode_ms(1, 150)))


def _finish_times(profiles, aggregate: bool, monkeypatch, **kw):
    monkeypatch.setattr(AREngine, "aggregate", aggregate)
    r = Rig(profiles, **kw)
    for i in range(6):
        r.submit(i, 4, 9 + i)
    reqs = r.run()
    return {i: (q.first_token, q.finish) for i, q in reqs.items()}, r


@pytest.mark.parametrize("budget", [4, 5, 6])
def test_decode_count_equal_to_the_token_budget(synthetic_profiles, monkeypatch, budget):
    """Six 4-token prompts under a budget of 4-6 tokens: at times exactly `budget` sequences
    decode (every token of the step), with or without a prefill waiting: the aggregate must
    give the plain loop's schedule, and no step may exceed the budget."""
    agg, r = _finish_times(synthetic_profiles, True, monkeypatch, max_num_batched_tokens=budget)
    ref, _ = _finish_times(synthetic_profiles, False, monkeypatch, max_num_batched_tokens=budget)
    for i in agg:
        assert close(agg[i][0], ref[i][0]) and close(agg[i][1], ref[i][1]), i
    assert max(w for _, w in r.itl) <= budget


# --- KV blocks -------------------------------------------------------------------------------------

def test_exact_fit_kv_request_is_accepted_and_never_preempted(synthetic_profiles):
    r = Rig(synthetic_profiles, kv_tokens=7 * 16)            # 100 + 12 tokens = 7 blocks
    req = r.submit(0, 100, 12)
    r.run()
    assert req.preemptions == 0 and r.eng.peak_blocks_used == 7
    assert close(req.finish, ms(prefill_ms(100)) + sum(decode_steps(1, 100, 11)))
    small = Rig(synthetic_profiles, kv_tokens=6 * 16 + 15)   # 6 blocks: one short
    with pytest.raises(ValueError, match="needs 7 KV blocks"):
        small.submit(0, 100, 12)


def _two_growing(profiles, blocks: int):
    """Two 90-token prompts admitted together (6 blocks each), each growing to 102 tokens
    (7 blocks) while it decodes."""
    r = Rig(profiles, kv_tokens=blocks * 16)
    r.hold()
    a = r.submit(0, 90, 12)
    b = r.submit(1, 90, 12)
    r.go()
    r.run()
    return r, a, b


def test_two_requests_sharing_the_kv_cache_exactly(synthetic_profiles):
    """2 x 7 blocks in a 14-block cache: both run to the end together, no preemption."""
    r, a, b = _two_growing(synthetic_profiles, 14)
    assert a.preemptions == b.preemptions == 0
    assert r.eng.peak_blocks_used == 14
    first = ms(prefill_ms(180))
    assert close(a.first_token, first) and close(b.first_token, first)
    assert close(a.finish, first + sum(decode_steps(2, 90, 11))) and close(b.finish, a.finish)


def test_one_block_short_preempts_the_latest_and_recomputes(synthetic_profiles):
    """13 blocks: at the step where both need their 7th block, the later one is preempted
    (recompute: it prefills its 90 + 6 tokens again once the first one is done)."""
    r, a, b = _two_growing(synthetic_profiles, 13)
    assert a.preemptions == 0 and b.preemptions == 1
    assert r.eng.peak_blocks_used == 13
    first = ms(prefill_ms(180))
    assert close(a.first_token, first) and close(b.first_token, first)
    # both decode with contexts 90.. until the step that would take context 96 -> 97
    together = decode_steps(2, 90, 6)
    assert close(a.finish, first + sum(together) + sum(decode_steps(1, 96, 5)))
    # b recomputes all of its 90 + 7 tokens once a has freed the cache, then decodes 4 more
    assert close(b.finish, a.finish + ms(prefill_ms(97)) + sum(decode_steps(1, 97, 4)))


# --- what routers read -------------------------------------------------------------------------------

def test_load_counts_outstanding_tokens(synthetic_profiles):
    r = Rig(synthetic_profiles)
    eng = r.eng
    assert eng.load() == 0 and eng.num_requests() == 0 and not eng.has_work()
    r.hold()
    r.submit(0, 100, 40)
    assert eng.has_work() and eng.num_requests() == 1      # one waiting, none running
    r.submit(1, 50, 10)
    assert eng.num_requests() == 2 and eng.has_work()
    assert eng.load() == 100 + 40 + 50 + 10
    r.go()
    first = ms(prefill_ms(150))
    d1, d2 = ms(decode_ms(2, 75)), ms(decode_ms(2, 76))
    r.env.run(until=first + 0.5 * d1)       # both prefilled (prompt computed), decoding
    assert eng.load() == 40 + 10
    r.env.run(until=first + d1 + 0.5 * d2)  # inside a multi-step decode unit: one step done
    assert eng.load() == 40 + 10 - 2 and eng.load_at(r.env.now) == eng.load()
    assert AREngine.least_loaded([eng], r.env.now) is eng
    r.run()
    assert eng.load() == 0 and eng.num_requests() == 0


def test_least_loaded_picks_the_engine_with_fewest_outstanding_tokens(synthetic_profiles):
    rigs = [Rig(synthetic_profiles) for _ in range(3)]
    for i, (p, o) in enumerate([(500, 50), (100, 10), (300, 30)]):
        rigs[i].submit(i, p, o)
    engines = [x.eng for x in rigs]
    assert AREngine.least_loaded(engines, 0.0) is engines[1]
    with pytest.raises(ValueError):
        AREngine.least_loaded([], 0.0)


@pytest.mark.parametrize("seed", range(12))
def test_least_loaded_is_the_min_of_load_at_mid_jump(synthetic_profiles, seed):
    """Engines caught inside decode jumps at random instants: least_loaded (which skips the
    bisect of an engine whose steps run by now could not beat the lowest load so far) picks
    what min(load_at(now)) picks, ties to the first."""
    import random
    rnd = random.Random(seed)
    rigs = [Rig(synthetic_profiles) for _ in range(6)]
    for k, r in enumerate(rigs):
        if seed % 2:            # the same request, started a little later on each engine: loads
            r.submit(0, 100, 300, at=rnd.uniform(0.0, 0.3))     # a few tokens apart
            continue
        for i, at in enumerate(sorted(rnd.uniform(0.0, 0.3) for _ in range(rnd.randint(0, 3)))):
            r.submit(i, rnd.randint(20, 400), rnd.randint(20, 400), at=at)
    engines = [r.eng for r in rigs]
    for t in sorted(rnd.uniform(0.3, 3.0) for _ in range(15)):
        for r in rigs:
            r.env.run(until=t)
        loads = [e.load_at(t) for e in engines]
        assert AREngine.least_loaded(engines, t) is engines[loads.index(min(loads))], (t, loads)


def test_least_loaded_one_token_apart_inside_jumps(synthetic_profiles):
    """The same request on two engines, b's started half a decode step before a's: b is one
    token lighter half of the time. Read after a (the lowest so far), b must not be skipped
    on a bound of its steps run that is one short (steps are ~ dmin long: the bound is tight)."""
    half = 0.5 * ms(decode_ms(1, 100))
    a, b = Rig(synthetic_profiles), Rig(synthetic_profiles)
    b.submit(0, 100, 300)
    a.submit(0, 100, 300, at=half)
    start = ms(prefill_ms(100)) + 2 * half
    lighter = 0
    for i in range(400):
        t = start + i * 0.6 * half                    # through the first ~100 steps
        for r in (a, b):
            r.env.run(until=t)
        la, lb = a.eng.load_at(t), b.eng.load_at(t)
        assert AREngine.least_loaded([a.eng, b.eng], t) is (b.eng if lb < la else a.eng), (t, la, lb)
        lighter += lb < la
    assert 100 < lighter < 300


def test_async_scheduling_starts_a_request_on_an_idle_engine_at_once(synthetic_profiles):
    """Nothing in flight: under async scheduling the first request is scheduled in the very next
    step, as without it (the same first token and finish)."""
    out = []
    for async_admit in (False, True):
        r = Rig(synthetic_profiles, async_admit=async_admit)
        req = r.submit(0, 90, 5)
        r.run()
        out.append((req.first_token, req.finish))
    assert out[1] == out[0]
    assert close(out[0][0], ms(prefill_ms(90)))


def test_async_arrival_at_an_engine_sharing_a_busy_gpu_takes_the_next_boundary(synthetic_profiles):
    """Two engines on one GPU: a request reaching the idle one while the other decodes has no
    step of its own engine in flight, so async scheduling does not hold it back: the other's
    unit is cut at its next step boundary, as without async scheduling."""
    firsts = []
    for async_admit in (False, True):
        env = Kernel()
        lat = LatencyModel(synthetic_profiles, GPU_KIND)
        engines = [AREngine(M, lat, 1 << 20, async_admit=async_admit) for _ in range(2)]
        gpu = GPU(env, 0, 0)
        for e in engines:
            gpu.add(e)
        reqs = [Request(i, 0.0, "text", M, 90, 200) for i in range(2)]

        def submit(i: int) -> None:
            job = Job(reqs[i], "ar", M, on_done=lambda j, now: None, tokens=90, out_tokens=200)
            engines[i].submit(job, env.now)

        submit(0)
        env.run(until=ms(prefill_ms(90)) + 2.5 * ms(decode_ms(1, 91)))   # mid-way through a decode step
        submit(1)
        env.run()
        firsts.append(reqs[1].first_token)
    assert firsts[1] == firsts[0]


@pytest.mark.parametrize("prompt_b", [127, 128, 129])       # b needs 8 blocks: exactly the free ones
def test_async_arrival_that_exactly_fits_the_free_blocks(synthetic_profiles, monkeypatch, prompt_b):
    """Under async scheduling a request arriving during a's prefill step joins the step after
    next; if its blocks fit (exactly all free ones included), a's decoding must not jump past
    that step: the jump-ahead run equals the plain step-by-step loop."""
    out = {}
    for aggregate in (True, False):
        monkeypatch.setattr(AREngine, "aggregate", aggregate)
        r = Rig(synthetic_profiles, kv_tokens=14 * 16, async_admit=True)
        a = r.submit(0, 90, 40)                      # holds 6 blocks (7 from its 97th token)
        b = r.submit(1, prompt_b, 3, at=0.5 * ms(prefill_ms(90)))    # during a's prefill
        r.run()
        out[aggregate] = (a.first_token, a.finish, b.first_token, b.finish, b.preemptions)
    assert all(close(x, y) for x, y in zip(out[True][:4], out[False][:4])), out
    assert out[True][4] == out[False][4]


# --- a chunk after cached context, priority after preemption, the admission gate, jumps -----------

CTX = [0, 64, 128, 256, 512, 1024]


def prefill_ctx_ms(tokens: float, ctx: float) -> float:
    """A chunk of `tokens` after `ctx` cached tokens (bilinear: exact between grid points)."""
    return prefill_ms(tokens) + 2e-4 * tokens * ctx


@pytest.fixture(scope="module")
def ctx_profiles(tmp_path_factory):
    """The synthetic qwen2_5_vl_7b table plus prefill rows after cached context."""
    root = tmp_path_factory.mktemp("ctx_profiles")
    rows = qwen_vl_rows() + [_row(M, "prefill", prefill_ctx_ms(t, c), batch_size=1, num_tokens=t,
                                  context_len=c, num_decode_seqs=0)
                             for t in PREFILL_TOKENS for c in CTX if c > 0]
    write_table(pd.DataFrame(rows), root / GPU_KIND / f"{M}.parquet")
    return root


def test_chunks_after_cached_context_cost_their_context(ctx_profiles):
    """A 160-token prompt under a 64-token budget: chunks of 64 (no context), 64 after 64 and
    32 after 128 cached tokens, each costing the table's chunk-after-context time."""
    r = Rig(ctx_profiles, max_num_batched_tokens=64)
    req = r.submit(0, 160, 2)
    r.run()
    first = ms(prefill_ctx_ms(64, 0) + prefill_ctx_ms(64, 64) + prefill_ctx_ms(32, 128))
    assert close(req.first_token, first)
    assert close(req.finish, first + ms(decode_ms(1, 160)))


def preemption_scene(r: "Rig", a_prompt: int, out: int) -> tuple:
    """On a priority-class rig with little KV: a (class 1, a_prompt tokens) and b (class 2, 90
    tokens), both generating `out` tokens, start together; c (class 1, 40 tokens, 2 out) arrives
    at 1 ms and waits for blocks. b is preempted once, a and c never (asserted)."""
    r.hold()
    a = r.submit(0, a_prompt, out, priority=1)
    b = r.submit(1, 90, out, priority=2)
    r.go()
    c = r.submit(2, 40, 2, at=0.001, priority=1)
    r.run()
    assert (a.preemptions, b.preemptions, c.preemptions) == (0, 1, 0)
    return a, b, c


def test_a_preempted_request_goes_back_to_its_own_priority_class(synthetic_profiles):
    """Priority classes: a (standard) and b (batch, class 2) share 13 blocks until both need a
    7th; b, the latest admitted, is preempted and re-queued at the head of class 2, behind c
    (standard, waiting since just after the start), so c is admitted at once (3 of the 6 freed
    blocks) and b, needing 6, waits for a to finish."""
    a, b, c = preemption_scene(Rig(synthetic_profiles, kv_tokens=13 * 16, priority=True), 90, 12)
    assert c.first_token < a.finish < b.finish
    # b's recompute starts only when a's blocks are free: after a's last step
    assert b.finish > a.finish + ms(prefill_ms(96))


def test_full_sequence_gate_on_readmission_counts_the_generated_tokens(synthetic_profiles):
    """scheduler_reserve_full_isl: a preempted request whose prompt + generated tokens exceed the
    token budget is re-admitted only when its whole sequence fits the free blocks. a (64 + 100)
    and b (80 + 100) share 16 blocks until a needs one more; b, preempted with ~48 generated
    tokens, would get its first chunk's blocks but not its whole sequence's: it waits for a
    (one preemption). Without the gate it thrashes."""
    def run(reserve: bool):
        r = Rig(synthetic_profiles, kv_tokens=16 * 16, max_num_batched_tokens=64,
                reserve_full_isl=reserve)
        r.hold()
        a = r.submit(0, 64, 100)
        b = r.submit(1, 80, 100)
        r.go()
        r.run()
        return a, b
    a, b = run(True)
    assert a.preemptions == 0 and b.preemptions == 1
    assert b.finish > a.finish + ms(prefill_ms(64))
    a2, b2 = run(False)
    assert a2.preemptions == 0 and b2.preemptions > 1


def test_a_request_waiting_for_a_seat_does_not_cut_the_decode_jump(synthetic_profiles):
    """max_num_seqs=1: while a decodes, b waits for its seat and the batch cannot change, so a's
    decode runs in as few units (GPU events) as when a is alone; b then runs as if alone."""
    alone = Rig(synthetic_profiles, max_num_seqs=1)
    alone.submit(0, 100, 60)
    alone.run()
    r = Rig(synthetic_profiles, max_num_seqs=1)
    a = r.submit(0, 100, 60)
    b = r.submit(1, 50, 30)
    r.run()
    assert close(a.finish, alone.reqs[0].finish)
    assert close(b.first_token, a.finish + ms(prefill_ms(50)))
    other = Rig(synthetic_profiles, max_num_seqs=1)
    other.submit(1, 50, 30)
    other.run()
    assert alone.gpu.events <= 4
    assert r.gpu.events == alone.gpu.events + other.gpu.events


def test_default_engine_is_first_come_first_served_across_priorities(synthetic_profiles):
    """Without priority classes (the default, as vLLM), a later interactive request does not
    pass an earlier batch-class one waiting for the only seat."""
    r = Rig(synthetic_profiles, max_num_seqs=1)
    a = r.submit(0, 100, 20, priority=1)
    b = r.submit(1, 100, 5, at=0.001, priority=2)
    c = r.submit(2, 100, 5, at=0.002, priority=0)
    r.run()
    assert a.finish < b.first_token < b.finish < c.first_token


def test_load_after_a_preemption_counts_the_recompute(synthetic_profiles):
    """load() = outstanding prompt + output tokens minus the computed ones: a preempted request's
    computed tokens are dropped (it recomputes them), so its whole prompt + output is outstanding
    again."""
    r = Rig(synthetic_profiles, kv_tokens=13 * 16)
    r.hold()
    r.submit(0, 90, 12)
    b = r.submit(1, 90, 12)
    r.go()
    seen = []

    def probe():
        if b.preemptions and not seen:
            seen.append((r.env.now, r.eng.load(), {s.job.req.id: (s.computed, s.generated) for s in r.eng.running}))
    t = 0.0
    while not seen and t < 1.0:
        t += 0.001
        r.env.run_until(t)
        probe()
    assert seen, "b was never preempted"
    _, load, running = seen[0]
    a_computed, a_generated = running[0]
    # a: 90 + 12 outstanding less what it computed; b: all 90 + 12 again
    assert load == (90 + 12 - a_computed) + (90 + 12)
    r.run()


def test_prefill_chunks_of_several_requests_pay_their_own_attention():
    """On the measured qwen2_5_vl_7b table (its prefill rows fit a self-attention coefficient
    c > 0): two 1,000-token prompts prefilled in one step cost the step with the sum of their
    squared lengths, not that of one 2,000-token sequence."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "traces/profiles"
    if not (root / GPU_KIND / f"{M}.parquet").exists():
        pytest.skip("no measured qwen2_5_vl_7b table")
    r = Rig(root)
    assert r.lat.prefill_attention(M)[0] > 0
    r.hold()
    a = r.submit(0, 1000, 1)
    b = r.submit(1, 1000, 1)
    r.go()
    r.run()
    two = r.lat.ar_step(M, 2000, 0, 0.0, 0.0, 2 * 1000 ** 2)
    assert close(a.first_token, two) and close(b.first_token, two)
    assert two < r.lat.ar_step(M, 2000, 0, 0.0, 0.0, 2000 ** 2)
