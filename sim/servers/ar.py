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

import math
from bisect import bisect_left, bisect_right

import numpy as np

from sim.gpu import Unit
from sim.latency import LatencyModel
from sim.request import StageRecord
from sim.servers.jobs import Job, StageQueue, start_record


class Seq:
    __slots__ = ("job", "prompt", "out", "generated", "computed", "blocks", "encoded", "dec_rec",
                 "enqueued", "ready_at")

    def __init__(self, job: Job):
        self.job = job
        self.prompt = job.tokens
        self.out = job.out_tokens
        self.generated = 0
        self.computed = 0
        self.blocks = 0
        self.encoded = job.vision_tokens == 0
        self.dec_rec: StageRecord | None = None
        self.ready_at = 0       # first engine step index that may schedule it (async scheduling)

    @property
    def priority(self) -> int:
        return self.job.priority

    @property
    def work(self) -> float:
        return float(self.prompt + self.out)

    @property
    def need(self) -> int:
        return self.prompt + self.generated - self.computed


class AREngine:
    def __init__(self, model: str, lat: LatencyModel, kv_capacity_tokens: int, *,
                 max_num_batched_tokens: int = 8192, max_num_seqs: int = 256, block_size: int = 16,
                 step_overhead_s: float = 0.0, priority: bool = False, itl_sink=None,
                 host_s: float = 0.0, host_per_seq_s: float = 0.0, frontend=(0.0, 0.0),
                 async_admit: bool = False,
                 max_model_len: int | None = None):
        self.model = model
        self.lat = lat
        self.budget = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.bs = block_size
        self.total_blocks = max(1, kv_capacity_tokens // block_size)
        self.free_blocks = self.total_blocks
        self.overhead = step_overhead_s
        self.host = host_s      # async scheduling: a step costs max(sync - host(B), host(B))
        self.host_seq = host_per_seq_s
        self.frontend = frontend  # (seconds, seconds per prompt token) before the engine sees it
        self.async_admit = async_admit
        self.waiting = StageQueue(f"{model}/waiting", priority)
        self.running: list[Seq] = []
        self.itl_sink = itl_sink
        # a sink that takes a whole series of step durations at once (MetricsCollector)
        self.itl_many = getattr(getattr(itl_sink, "__self__", None), "add_itl_many", None)
        self.max_model_len = max_model_len
        self.gpu = None
        self.sched: list[tuple[Seq, int]] = []
        self.vision_in_step = 0
        self.peak_blocks_used = 0
        self.steps = 0
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
        delay = self.frontend[0] + self.frontend[1] * job.tokens if self.gpu is not None else 0.0
        if delay > 0:
            env = self.gpu.env
            env.timeout(delay).callbacks.append(lambda _e: self._enter(job, env.now))
        else:
            self._enter(job, now)

    def _enter(self, job: Job, now: float) -> None:
        job.enqueued = now
        self._po += job.tokens + job.out_tokens
        seq = Seq(job)
        seq.ready_at = self._async_ready_at(now)
        self.waiting.put(seq, now)   # queue items are Seqs (duck-typed: priority, work, enqueued)
        if self.gpu is not None:
            self.gpu.kick()

    def _async_ready_at(self, now: float) -> int:
        """With async scheduling the step after the one in flight is already scheduled when a
        request arrives, so it can join only the step after that (vLLM's AsyncScheduler keeps
        two batches in flight); an idle engine schedules it at once."""
        g = self.gpu
        if not self.async_admit or g is None or g.cur is None or g.cur.engine is not self:
            return 0
        k = bisect_left(g.cur.ends, now - g.start - 1e-12) + 1   # steps of the unit up to now
        return self.steps + min(k, len(g.cur.ends)) + 1

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def can_join(self, job: Job) -> bool:
        return len(self.running) < self.max_seqs

    def load(self) -> float:
        """Outstanding tokens (prompt + output) of queued and running requests."""
        # = sum(prompt + out) of queued + sum(need + out - generated) of running, kept
        # incrementally (need + out - generated = prompt + out - computed; queued: computed = 0)
        w, r = 0, self._po - self._comp
        g = self.gpu   # a jumped decode unit commits at its end: count the steps already run
        if g is not None and g.cur is not None and g.cur.engine is self and g.cur.commit == self._commit_jump:
            r -= len(self.sched) * bisect_right(g.cur.ends, g.env.now - g.start + 1e-12)
        return float(w + r)

    def num_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    # --- KV blocks ---------------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def _alloc(self, s: Seq, tokens: int) -> bool:
        need = self._blocks_for(tokens) - s.blocks
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        s.blocks += need
        used = self.total_blocks - self.free_blocks
        if used > self.peak_blocks_used:
            self.peak_blocks_used = used
        return True

    def _free(self, s: Seq) -> None:
        self.free_blocks += s.blocks
        s.blocks = 0

    def _preempt(self, s: Seq, now: float) -> None:
        self._free(s)
        self._comp -= s.computed
        s.computed = 0
        s.encoded = s.job.vision_tokens == 0
        s.job.req.preemptions += 1
        lvl = min(s.job.priority, len(self.waiting.levels) - 1) if self.waiting.priority else 0
        self.waiting.levels[lvl].appendleft(s)
        self.waiting.n += 1

    # --- scheduling ---------------------------------------------------------------------------
    def plan(self, now: float) -> Unit | None:
        if not self.running and not len(self.waiting):
            return None
        budget = self.budget
        sched: list[tuple[Seq, int]] = []
        preempted = False
        i = 0
        running, bs = self.running, self.bs
        while i < len(running) and budget > 0:
            s = running[i]
            need = s.prompt + s.generated - s.computed
            n = need if need < budget else budget
            if -(-(s.computed + n) // bs) <= s.blocks:     # _alloc needs no new block: True
                sched.append((s, n))
                budget -= n
                i += 1
                continue
            while not self._alloc(s, s.computed + n):
                victim = self.running.pop()
                for k, (q, m) in enumerate(sched):
                    if q is victim:
                        del sched[k]
                        budget += m
                        break
                self._preempt(victim, now)
                preempted = True
                if victim is s:
                    break
            else:
                sched.append((s, n))
                budget -= n
                i += 1
                continue
            break
        if not preempted:
            while len(self.waiting) and len(self.running) < self.max_seqs and budget > 0:
                s = self.waiting.head()
                if s.ready_at > self.steps and sched:
                    break                       # async: the step it arrived in was already planned
                n = min(s.need, budget)
                if not self._alloc(s, s.computed + n):
                    break
                self.waiting.popleft()
                if s.job.record is None:
                    start_record(s.job, self.gpu.name, now)
                self.running.append(s)
                sched.append((s, n))
                budget -= n
        if not sched:
            return None
        self.sched = sched
        # step composition
        p_tok = d_seqs = 0
        d_ctx = p_ctx = 0.0
        vision = 0
        for s, n in sched:
            if n == 1 and s.generated > 0 and s.prompt + s.generated - s.computed == 1:
                d_seqs += 1
                d_ctx += s.computed
            else:
                p_tok += n
                p_ctx += s.computed * n
                if not s.encoded:
                    vision += s.job.vision_tokens
        self.vision_in_step = vision
        if d_seqs:
            d_ctx /= d_seqs
        if p_tok:
            p_ctx /= p_tok
        t = self.lat.ar_step(self.model, p_tok, d_seqs, d_ctx, p_ctx) + self.overhead
        if vision:
            t += self.lat.vision_encode(self.model, vision)
        if self.host or self.host_seq:
            h = self.host + self.host_seq * len(sched)
            t = max(t - h, h)
        if p_tok == 0 and not preempted and not self._admissible():
            k = self._jump_len()
            if k > 1:
                series = self.lat.decode_series(self.model, d_seqs, d_ctx, k) + self.overhead
                if self.host or self.host_seq:
                    h = self.host + self.host_seq * d_seqs
                    series = np.maximum(series - h, h)
                self.jump_ends = ends = np.cumsum(series)
                return Unit(ends, self._commit_jump, "decode", self)
        return Unit((t,), self._commit_step, "prefill" if p_tok else "decode", self)

    def _admissible(self) -> bool:
        """Could a waiting request join at the next step (so the batch would change)?"""
        if not len(self.waiting) or len(self.running) >= self.max_seqs:
            return False
        s = self.waiting.head()
        if s.ready_at > self.steps + 1:
            return False
        return self._blocks_for(s.computed + min(s.need, self.budget)) - s.blocks <= self.free_blocks

    def _jump_len(self) -> int:
        """Steps until the first completion, bounded by the KV blocks left (exact)."""
        k = min(s.out - s.generated for s in self.running)
        if k <= 1:
            return 1
        comp = np.fromiter((s.computed for s in self.running), dtype=np.int64, count=len(self.running))
        held = np.fromiter((s.blocks for s in self.running), dtype=np.int64, count=len(self.running))

        def extra(j: int) -> int:  # blocks beyond those held, to compute j steps
            return int(np.maximum(-(-(comp + j) // self.bs) - held, 0).sum())

        if extra(k) <= self.free_blocks:       # common case: enough free blocks for all k
            return k
        lo, hi = 1, k - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if extra(mid) <= self.free_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # --- commits ------------------------------------------------------------------------------
    def _commit_step(self, k: int, now: float) -> None:
        self.steps += 1
        dur = now - self.gpu.start
        decoded = 0
        finished = []
        for s, n in self.sched:
            gen = s.generated
            was_decode = n == 1 and gen > 0 and s.prompt + gen - s.computed == 1
            if not s.encoded:
                s.encoded = True
                req = s.job.req
                req.stages.append(StageRecord("vision_encode", self.gpu.name, self.gpu.start,
                                              self.gpu.start, now))
            s.computed += n
            self._comp += n
            if s.prompt + gen - s.computed > 0:
                continue                        # chunked prefill not finished
            if s.out == 0:
                finished.append(s)              # prefill-only (condition encoder)
                continue
            s.generated += 1
            if was_decode:
                decoded += 1
            if s.generated == 1:
                self._first_token(s, now)
            if s.generated >= s.out:
                finished.append(s)
        if decoded and self.itl_sink:
            self.itl_sink(dur, decoded)
        self._finish(finished, now)

    def _commit_jump(self, k: int, now: float) -> None:
        self.steps += k
        ends = self.jump_ends
        finished = []
        bs = self.bs
        for s, _ in self.sched:
            if k > 1 and -(-(s.computed + k) // bs) > s.blocks:
                self._alloc(s, s.computed + k)   # blocks of steps 2..k (step 1 allocated in plan)
            s.computed += k
            self._comp += k
            s.generated += k
            if s.generated >= s.out:
                finished.append(s)
        if self.itl_many is not None:
            # per-step durations e[i] - e[i-1] (e[-1] = 0), the same floats as the loop below
            d = ends[:k].copy()
            d[1:] -= ends[:k - 1]
            self.itl_many(d, len(self.sched))
        elif self.itl_sink:
            prev = 0.0
            d = len(self.sched)
            for e in ends[:k]:
                self.itl_sink(float(e) - prev, d)
                prev = float(e)
        self._finish(finished, now)

    def _first_token(self, s: Seq, now: float) -> None:
        req = s.job.req
        if math.isnan(req.first_token):
            req.first_token = now
        if s.job.record is not None and math.isnan(s.job.record.end):
            s.job.record.end = now
        if s.out > 1 and s.dec_rec is None:
            s.dec_rec = StageRecord("decode", self.gpu.name, now, now)
            req.stages.append(s.dec_rec)

    def _finish(self, finished: list[Seq], now: float) -> None:
        for s in finished:
            self.running.remove(s)
            self._free(s)
            self._po -= s.prompt + s.out
            self._comp -= s.computed
            if s.job.record is not None and math.isnan(s.job.record.end):
                s.job.record.end = now
            if s.dec_rec is not None:
                s.dec_rec.end = now
            s.job.on_done(s.job, now)
