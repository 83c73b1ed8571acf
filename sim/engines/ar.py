"""AR engine modelled on vLLM V1's scheduler (vllm/v1/core/sched/scheduler.py):
continuous batching; each step first serves running requests (decode tokens, then the rest of
chunked prefills) under the token budget `max_num_batched_tokens`, then admits waiting ones
(up to `max_num_seqs`), allocating KV blocks of `block_size` tokens; when a running request
cannot get a block, the most recently admitted running request is preempted (recompute: its
blocks are freed and it goes back to the front of the waiting queue). Vision encoding of a
request's images runs inside the step that starts its prefill (baseline) unless an encoder
pool already did it. Step time comes from the latency model. A stable all-decode batch is
advanced to its next completion or block shortage in one unit (jump-ahead)."""
from __future__ import annotations

from typing import Any, ClassVar

import math
from dataclasses import dataclass
from heapq import heappop, heappush

from sim.core.gpu import Engine, Unit, steps_before, steps_through
from sim.core.kernel import Timer
from sim.core.records import Job, StageRecord
from sim.engines.latency import DecodeSteps, LatencyModel
from sim.engines.queues import StageQueue, start_record
from sim.names import DECODE, PREFILL, VISION_ENCODE


@dataclass(frozen=True)
class FrontEnd:
    """Serve-level time before the engine core sees a request (seconds): the client/HTTP part
    every request pays (`base` + `per_prompt_token` x prompt), plus `idle` when the engine is
    idle at the arrival (the engine core sleeps on its input queue; the first step after idle
    overlaps no host work) or, when it is busy, the API server's ingest: `busy` +
    `busy_per_running_seq` x running sequences (its one event loop also streams every step's
    tokens). Measured on probes and ladders (sim/tools/calibrate.py)."""
    base: float = 0.0
    per_prompt_token: float = 0.0
    idle: float = 0.0
    busy: float = 0.0
    busy_per_running_seq: float = 0.0

    def delay(self, prompt_tokens: int, engine_idle: bool, running: int) -> float:
        d = self.base + self.per_prompt_token * prompt_tokens
        return d + (self.idle if engine_idle else self.busy + self.busy_per_running_seq * running)


class Seq:
    """One request in an AR engine. While it decodes in its engine's decode aggregate (`g0` is
    not None) `computed` and `generated` hold their values as of the engine's aggregate step
    `g0` (both grow by one per aggregate step since); `blocks` is always the true figure."""
    __slots__ = ("job", "eng", "prompt", "out", "generated", "computed", "held", "encoded",
                 "dec_rec", "enqueued", "ready_at", "order", "g0")
    enqueued: float             # set by StageQueue.put

    def __init__(self, job: Job, eng: "AREngine"):
        self.job = job
        self.eng = eng
        self.prompt = job.tokens
        self.out = job.out_tokens
        self.generated = job.pre_generated      # (0 but for a prefill/decode split's decode hop)
        self.computed = job.pre_computed        # KV held on arrival (prefix hit, transferred KV)
        self.held = 0           # KV blocks held (while not in the decode aggregate)
        self.encoded = job.vision_tokens == 0
        self.dec_rec: StageRecord | None = None
        self.ready_at = 0       # first engine step index that may schedule it (async scheduling)
        self.order = 0          # admission rank: the engine's running order
        self.g0: int | None = None

    @property
    def priority(self) -> int:
        return self.job.priority

    @property
    def work(self) -> float:
        return float(self.prompt + self.out)

    @property
    def need(self) -> int:
        return self.prompt + self.generated - self.computed

    @property
    def blocks(self) -> int:
        """KV blocks held (derived from the aggregate step counter while in the aggregate)."""
        if self.g0 is None:
            return self.held
        e = self.eng
        return -(-(self.computed + e.G - self.g0 + e.ahead) // e.bs)


class AREngine(Engine):
    """Running sequences are kept in two parts. Decoding ones (one token per step, every step)
    form the decode aggregate: a step counter `G`, the count `nd`, the sum of their contexts,
    a histogram of their context phases modulo the block size (new KV blocks per step) and a
    heap of their finishing steps, so a step costs O(1) in them instead of O(n). The others
    (prefilling, or decoders while the aggregate is dissolved) are in `pre`, in running order,
    and are scheduled one by one exactly as vLLM does. The aggregate is used only when it
    gives the same schedule as the plain loop: its members come first in running order, all
    fit in the token budget and get their KV blocks without preemption; else it is dissolved
    for that step (every member materialised into `pre`). `aggregate = False` dissolves it at
    every step: the plain per-sequence loop, kept as the reference for tests."""

    aggregate: ClassVar[bool] = True   # (a ClassVar: tests set it on the class, compiled too)

    def __init__(self, model: str, lat: LatencyModel | None, kv_capacity_tokens: int, *,
                 max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, block_size: int = 16,
                 step_overhead_s: float = 0.0, priority: bool = False, itl_sink=None,
                 host_s: float = 0.0, host_per_seq_s: float = 0.0, frontend: FrontEnd = FrontEnd(),
                 stream_s_per_token: float = 0.0, async_admit: bool = False,
                 max_model_len: int | None = None, reserve_full_isl: bool = False):
        super().__init__()              # queue None: no shared queue, its own waiting queue
        self.model = model
        self.lat = lat          # None only in tests that never plan a step
        self.budget = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.bs = block_size
        self.total_blocks = max(1, kv_capacity_tokens // block_size)
        self.free_blocks = self.total_blocks
        self.overhead = step_overhead_s
        self.host = host_s      # async scheduling: a step costs max(sync - host(B), host(B))
        self.host_seq = host_per_seq_s
        self.frontend = frontend
        # a step's tokens reach their clients one after another (API-server output processing and
        # the client's stream parsing): a first or last token is seen this many seconds per token
        # of its step after the step ends; engine timestamps are unchanged
        self.stream = stream_s_per_token
        self.async_admit = async_admit
        self.waiting = StageQueue(f"{model}/waiting", priority)
        self.running: dict[Seq, None] = {}     # every running seq, in running (admission) order
        self.pre: list[Seq] = []               # running seqs outside the aggregate, in order
        self.itl_sink = itl_sink
        # a sink that takes a whole series of steps at once (MetricsCollector)
        self.itl_steps = getattr(getattr(itl_sink, "__self__", None), "add_itl_steps", None)
        self.max_model_len = max_model_len
        # admission needs free blocks for the whole known sequence (vLLM 0.26's
        # scheduler_reserve_full_isl), not only for the chunk scheduled now
        self.reserve_full = reserve_full_isl
        self.sched: list[tuple[Seq, int]] = []  # seqs of `pre` (and admitted) in the planned step
        self.jump_unit: Unit | None = None      # the planned multi-step decode unit, if any
        self.jump_ends: DecodeSteps | None = None
        self.peak_blocks_used = 0
        self.steps = 0
        self.n_admitted = 0
        # decode aggregate
        self.G = 0              # aggregate steps committed
        self.ahead = 0          # 1 while a planned step's blocks are allocated but not committed
        self.nd = 0             # members
        self.dsum0 = 0          # sum of (computed - g0): their contexts sum to dsum0 + nd * G
        self.phase = [0] * block_size   # members by (computed - g0) mod block_size
        self.fin: list[tuple[int, int, Seq]] = []   # heap of (G at which it ends, order, seq)
        self.dmax = -1          # >= the largest running order of a member
        # load() bookkeeping (exact integers): sum of prompt + out over queued and running
        # sequences, and sum of computed tokens over running ones (queued ones hold 0)
        self._po = 0
        self._comp = 0

    # --- interface used by routers and the GPU ----------------------------------------------
    def submit(self, job: Job, now: float) -> None:
        need = -(-(job.tokens + max(job.out_tokens, 1)) // self.bs)
        if need > self.total_blocks:
            raise ValueError(
                f"request {job.req.id}: prompt {job.tokens} + output {job.out_tokens} tokens needs "
                f"{need} KV blocks but model {self.model} has {self.total_blocks} on this GPU "
                f"(engine.kv_capacity_tokens / max_model_len too small for this workload)")
        g = self.gpu
        if g is not None:
            idle = g.cur is None and not self.has_work()
            delay = self.frontend.delay(job.tokens, idle, len(self.running))
            if delay > 0:
                g.agenda.timer(delay, self._entered, job)
                return
        self._enter(job, now)

    def _entered(self, ev: Timer) -> None:
        """The front end has handed a submitted job (the event's value) to the engine."""
        g = self.gpu
        assert g is not None
        self._enter(ev.value, g.agenda.now)

    def _enter(self, job: Job, now: float) -> None:
        job.enqueued = now
        self._po += job.tokens + job.out_tokens
        seq = Seq(job, self)
        seq.ready_at = self._async_ready_at(now)
        self.waiting.put(seq, now)   # queue items are Seqs (duck-typed: priority, work, enqueued)
        g = self.gpu
        if g is not None:
            # async: it joins the step after next, so our running decode unit may go on one
            # more step (the plain schedule would run that step alone, with the same batch)
            g.kick(1 if seq.ready_at else 0)

    def _async_ready_at(self, now: float) -> int:
        """With async scheduling the step after the one in flight is already scheduled when a
        request arrives, so it can join only the step after that (vLLM's AsyncScheduler keeps
        two batches in flight); an idle engine schedules it at once."""
        g = self.gpu
        if not self.async_admit or g is None:
            return 0
        u = g.cur
        if u is None or u.engine is not self:
            return 0
        k = steps_before(u.ends, now - g.start - 1e-12) + 1  # steps of the unit up to now
        return self.steps + min(k, len(u.ends)) + 1

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def can_join(self, job: Job) -> bool:
        return len(self.running) < self.max_seqs

    def load(self) -> int:
        """Outstanding tokens (prompt + output) of queued and running requests (an exact int:
        token-aware routing compares it over every engine per request)."""
        # = sum(prompt + out) of queued + sum(need + out - generated) of running, kept
        # incrementally (need + out - generated = prompt + out - computed; queued: computed = 0)
        if self.jump_unit is None:
            return self._po - self._comp
        g = self.gpu
        assert g is not None
        return self.load_at(g.agenda.now)

    def load_at(self, now: float) -> int:
        """load() at the current time `now` (a jumped decode unit commits at its end: count
        the steps it has run)."""
        r = self._po - self._comp
        u = self.jump_unit
        if u is not None:
            g = self.placed()
            if g.cur is u:
                r -= self.nd * self._steps_run(u, now - g.start + 1e-12)
        return r

    def _steps_run(self, u: Unit, el: float) -> int:
        """Steps of the planned unit u ended within `el` seconds of its start (bisect_right of
        its ends; a native call when they are still the jump's own DecodeSteps)."""
        ends = u.ends
        j = self.jump_ends
        if j is not None and ends is j:
            return j.bisect_right(el)
        return steps_through(ends, el)

    @staticmethod
    def least_loaded(engines: list["AREngine"], now: float) -> "AREngine":
        """min(engines, key=AREngine.load) in one loop (token-aware routing runs it over every
        LLM engine per request): no call for engines without a decode unit in flight."""
        best, low = None, 0
        for e in engines:
            r = e._po - e._comp
            u = e.jump_unit
            if u is not None:
                # = load_at(now); its bisect is skipped when even the whole unit's steps could
                # not bring the load under the lowest so far (no step count exceeds len(ends))
                g = e.placed()
                if g.cur is u and e.nd:
                    j = e.jump_ends
                    ends = u.ends
                    n_ends = j.k if j is not None and ends is j else len(ends)
                    if best is not None and r - e.nd * n_ends >= low:
                        continue
                    start: float = g.start
                    el = now - start + 1e-12
                    if best is not None and j is not None and ends is j:
                        # nor when the steps that can have ended by now could not (none is
                        # shorter than dmin; a margin for the ends' rounding)
                        dmin: float = j.dmin
                        if el < n_ends * dmin and r - e.nd * int(el / dmin + 1e-6) >= low:
                            continue
                    r -= e.nd * e._steps_run(u, el)
            if best is None or r < low:
                best, low = e, r
        if best is None:
            raise ValueError("least_loaded() of no engines")
        return best

    def num_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    # --- KV blocks ---------------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def _alloc(self, s: Seq, tokens: int) -> bool:
        need = self._blocks_for(tokens) - s.held
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self._take_blocks(need)
        s.held += need
        return True

    def _take_blocks(self, n: int) -> None:
        self.free_blocks -= n
        used = self.total_blocks - self.free_blocks
        if used > self.peak_blocks_used:
            self.peak_blocks_used = used

    def _free(self, s: Seq) -> None:
        self.free_blocks += s.held
        s.held = 0

    def _preempt(self, s: Seq, now: float) -> None:
        self._free(s)
        self._comp -= s.computed
        s.computed = 0
        s.encoded = s.job.vision_tokens == 0
        s.job.req.preemptions += 1
        lvl = min(s.job.priority, len(self.waiting.levels) - 1) if self.waiting.priority else 0
        self.waiting.levels[lvl].appendleft(s)
        self.waiting.n += 1

    # --- decode aggregate ----------------------------------------------------------------------
    def _join(self, s: Seq) -> None:
        """s decodes from now on (one token per step): move it into the aggregate."""
        g = self.G
        c = s.computed - g
        s.g0 = g
        self.nd += 1
        self.dsum0 += c
        self.phase[c % self.bs] += 1
        heappush(self.fin, (g + s.out - s.generated, s.order, s))
        if s.order > self.dmax:
            self.dmax = s.order

    def _leave(self, s: Seq) -> None:
        """Materialise s's counters and blocks and take it out of the aggregate."""
        d = self.G - s.g0               # type: ignore[operator]
        c = s.computed - s.g0           # type: ignore[operator]
        self.nd -= 1
        self.dsum0 -= c
        self.phase[c % self.bs] -= 1
        s.computed += d
        s.generated += d
        s.held = self._blocks_for(s.computed + self.ahead)
        s.g0 = None

    def _dissolve(self) -> None:
        """Every member back into `pre`: the next step is scheduled one seq at a time."""
        for _, _, s in self.fin:
            self._leave(s)
        self.fin = []
        self.dmax = -1
        self.pre = list(self.running)

    def _aggregate_fits(self) -> bool:
        """Would the plain loop schedule every member for one token without preempting?
        (members first in running order, within the token budget -- leaving some for `pre`,
        as the loop would -- and enough free blocks for those that start a new block)"""
        nd, pre = self.nd, self.pre
        return (self.aggregate and (nd < self.budget or (nd == self.budget and not pre))
                and self.phase[-self.G % self.bs] <= self.free_blocks
                and (not pre or self.dmax < pre[0].order))

    def _advance(self, k: int) -> None:
        """Commit k aggregate steps: every member computed and generated k more tokens."""
        self.G += k
        self._comp += self.nd * k
        self.ahead = 0

    def _extra_blocks(self, j: int) -> int:
        """Blocks the members need beyond those held after planning one step, to run j steps:
        a member with context c holds ceil((c + 1) / bs) and needs ceil((c + j) / bs), i.e.
        (c % bs + j - 1) // bs more = q, plus one if c % bs >= bs - m (j - 1 = q * bs + m);
        c % bs = (phase + G) % bs, so those are m consecutive (cyclic) phases."""
        bs = self.bs
        q, m = divmod(j - 1, bs)
        tot = self.nd * q
        if m:
            ph = self.phase
            a = (bs - m - self.G) % bs
            for i in range(a, a + m):           # (a native loop: no slices, no sum() call)
                tot += ph[i] if i < bs else ph[i - bs]
        return tot

    def _pop_finished(self) -> list[Seq]:
        """Members whose last token was committed, in running order."""
        fin, g, out = self.fin, self.G, []
        while fin and fin[0][0] <= g:
            out.append(heappop(fin)[2])
        if len(out) > 1:
            out.sort(key=lambda s: s.order)
        return out

    # --- scheduling ---------------------------------------------------------------------------
    def plan(self, now: float) -> Unit | None:
        if not self.running and not len(self.waiting):
            return None
        if self.nd and not self._aggregate_fits():
            self._dissolve()
        budget = self.budget
        if self.nd:                       # every member: one decode token, maybe a new block
            self._take_blocks(self.phase[-self.G % self.bs])
            self.ahead = 1
            budget -= self.nd
        sched, budget, preempted = self._schedule_pre(budget, now)
        if not preempted:
            self._admit(sched, budget, now)
        if not sched and not self.nd:
            return None
        self.sched = sched
        # step composition
        p_tok = p_ctx = p_sq = 0
        d_seqs, d_ctx = self.nd, self.dsum0 + self.nd * self.G
        vision = 0
        for s, n in sched:
            if n == 1 and s.generated > 0 and s.prompt + s.generated - s.computed == 1:
                d_seqs += 1
                d_ctx += s.computed
            else:
                p_tok += n
                p_ctx += s.computed * n
                p_sq += n * n
                if not s.encoded:
                    vision += s.job.vision_tokens
        d_mean = d_ctx / d_seqs if d_seqs else 0.0          # exact integer sums, one rounding
        p_mean = p_ctx / p_tok if p_tok else 0.0
        if not sched and not preempted and not self._admissible():
            k = self._jump_len()
            if k > 1:
                return self._plan_jump(d_seqs, d_mean, k)
        lat = self.lat
        assert lat is not None
        t = lat.ar_step(self.model, p_tok, d_seqs, d_mean, p_mean, p_sq) + self.overhead
        if vision:
            t += lat.vision_encode(self.model, vision)
        if self.host or self.host_seq:
            h = self.host + self.host_seq * (self.nd + len(sched))
            t = max(t - h, h)
        return Unit((t,), self._commit_step, PREFILL if p_tok else DECODE, self)

    def _plan_jump(self, d_seqs: int, d_ctx: float, k: int) -> Unit:
        """The aggregate alone, k steps. Its first step's single-step time is not needed, but
        that lookup's side effects are kept (range policy, out-of-grid and hole counts): the
        series looks up its start point once more."""
        self.jump_ends = ends = self._decode_run(d_seqs, d_ctx, k, start_lookups=2)
        self.jump_unit = Unit(ends, self._commit_jump, DECODE, self)
        return self.jump_unit

    def _decode_run(self, d_seqs: int, d_ctx: float, k: int, start_lookups: int) -> DecodeSteps:
        """k decode steps of the aggregate (as k single steps), with the step overhead and async
        scheduling's host time applied to each step."""
        h = self.host + self.host_seq * d_seqs if self.host or self.host_seq else None
        lat = self.lat
        assert lat is not None
        return lat.decode_run(self.model, d_seqs, d_ctx, k, start_lookups, self.overhead, h)

    def _schedule_pre(self, budget: int, now: float) -> tuple[list[tuple[Seq, int]], int, bool]:
        """vLLM's loop over running requests (those of `pre`): each gets min(need, budget)
        tokens; one that cannot get its KV blocks preempts the latest admitted ones (which
        are at the end of `pre`: the aggregate's members come first) until it can, or is
        preempted itself."""
        sched: list[tuple[Seq, int]] = []
        pre, bs = self.pre, self.bs
        preempted = False
        i = 0
        while i < len(pre) and budget > 0:
            s = pre[i]
            need = s.prompt + s.generated - s.computed
            n = need if need < budget else budget
            if -(-(s.computed + n) // bs) > s.held:          # needs a new block
                while not self._alloc(s, s.computed + n):
                    victim = pre.pop()
                    del self.running[victim]
                    self._preempt(victim, now)
                    if victim is s:
                        return sched, budget, True
                    preempted = True
            sched.append((s, n))
            budget -= n
            i += 1
        return sched, budget, preempted

    def _admit(self, sched: list[tuple[Seq, int]], budget: int, now: float) -> None:
        """Admit waiting requests in queue order while seats, budget and blocks allow."""
        while len(self.waiting) and len(self.running) < self.max_seqs and budget > 0:
            s: Seq = self.waiting.head()
            if s.ready_at > self.steps and (sched or self.nd):
                break                       # async: the step it arrived in was already planned
            n = s.prompt + s.generated - s.computed
            if n > budget:
                n = budget
                if self.reserve_full and self._blocks_for(s.prompt + s.generated) - s.held > self.free_blocks:
                    break
            if not self._alloc(s, s.computed + n):
                break
            self.waiting.popleft()
            if s.computed:                  # KV it arrived with (never after a preemption,
                self._comp += s.computed    # which resets computed to 0): counted from now on
            if s.job.record is None:
                start_record(s.job, self.placed().name, now)
            self.n_admitted += 1
            s.order = self.n_admitted
            self.running[s] = None
            self.pre.append(s)
            sched.append((s, n))
            budget -= n

    def _admissible(self) -> bool:
        """Could a waiting request join at the next step (so the batch would change)?"""
        if not len(self.waiting) or len(self.running) >= self.max_seqs:
            return False
        s: Seq = self.waiting.head()
        if s.ready_at > self.steps + 1:
            return False
        full = s.prompt + s.generated if self.reserve_full else s.computed + min(s.need, self.budget)
        return self._blocks_for(full) - s.held <= self.free_blocks

    def _jump_len(self) -> int:
        """Aggregate steps until the first completion, bounded by the KV blocks left (exact)."""
        k = self.fin[0][0] - self.G
        if k <= 1:
            return 1
        if self._extra_blocks(k) <= self.free_blocks:   # common case: enough for all k
            return k
        lo, hi = 1, k - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._extra_blocks(mid) <= self.free_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # --- commits ------------------------------------------------------------------------------
    def _commit_step(self, k: int, now: float) -> None:
        self.steps += 1
        dur = now - self.placed().start
        decoded = produced = self.nd
        finished, firsts = [], []
        if self.nd:
            self._advance(1)
            finished = self._pop_finished()
        for s, n in self.sched:
            gen = s.generated
            was_decode = n == 1 and gen > 0 and s.prompt + gen - s.computed == 1
            if not s.encoded:
                s.encoded = True
                req = s.job.req
                req.stages.append(StageRecord(VISION_ENCODE, self.placed().name, self.placed().start,
                                              self.placed().start, now))
            s.computed += n
            self._comp += n
            if s.prompt + gen - s.computed > 0:
                continue                        # chunked prefill not finished
            if s.out == 0:
                finished.append(s)              # prefill-only (condition encoder)
                continue
            s.generated += 1
            produced += 1
            if was_decode:
                decoded += 1
            if s.generated == 1:
                firsts.append(s)
            if s.generated >= s.out:
                finished.append(s)
            else:
                self._join(s)
        seen = now + self.stream * produced
        for s in firsts:
            self._first_token(s, now, seen)
        if decoded and self.itl_sink:
            self.itl_sink(dur, decoded)
        self._finish(finished, now, self.stream * produced)
        self.pre = [s for s in self.pre if s.g0 is None and s in self.running]

    def _commit_jump(self, k: int, now: float) -> None:
        self.jump_unit = None
        self.steps += k
        if k > 1:
            self._take_blocks(self._extra_blocks(k))    # steps 2..k (step 1 allocated in plan)
        self._advance(k)
        run: Any = self.jump_ends
        if self.itl_steps is not None:
            self.itl_steps(run, k, self.nd)     # its first k steps' times, as the loop below
        elif self.itl_sink:
            for t in run.durations(k):
                self.itl_sink(t, self.nd)
        produced = self.nd
        self._finish(self._pop_finished(), now, self.stream * produced)

    def _first_token(self, s: Seq, now: float, seen: float) -> None:
        req = s.job.req
        if math.isnan(req.first_token):
            req.first_token = seen
        if s.job.record is not None and math.isnan(s.job.record.end):
            s.job.record.end = now
        if s.out > 1 and s.dec_rec is None:
            s.dec_rec = StageRecord(DECODE, self.placed().name, now, now)
            req.stages.append(s.dec_rec)

    def _finish(self, finished: list[Seq], now: float, out_delay: float) -> None:
        for s in finished:
            if s.g0 is not None:
                self._leave(s)
            del self.running[s]
            self._free(s)
            self._po -= s.prompt + s.out
            self._comp -= s.computed
            if s.job.record is not None and math.isnan(s.job.record.end):
                s.job.record.end = now
            if s.dec_rec is not None:
                s.dec_rec.end = now
            s.job.out_delay = out_delay
            s.job.on_done(s.job, now)   # type: ignore[misc]
