"""vLLM 0.26's full-sequence admission gate (SchedulerConfig.scheduler_reserve_full_isl, default
True): a waiting request whose prompt is longer than the token budget is admitted only when the
free KV blocks hold its whole prompt, not just the first chunk (sim/engines/ar.py `_admit`)."""
from __future__ import annotations

import pytest

from conftest import make_cfg
from sim.run.runner import Run

VL = "qwen2_5_vl_7b"


def _run(profiles, tmp_path, reserve: bool) -> list:
    # A (256 + 1,200 tokens, ~8 ms a token) holds ~78 of the 100 blocks of 16 when B arrives at
    # 8 s and needs 92 at its end; B's 600-token prompt needs 38 blocks in all but only 4 for its
    # first 64-token chunk
    p = tmp_path / "t.csv"
    p.write_text("arrival,task,prompt_tokens,output_tokens\n0.0,text,256,1200\n8.0,text,600,8\n")
    cfg = make_cfg(profiles, {"workload.path": str(p), "latency.fallback": None,
                              "cluster.num_gpus": 1, "engine.kv_capacity_tokens": 1600,
                              "engine.block_size": 16, "engine.max_num_batched_tokens": 64,
                              "engine.scheduler_reserve_full_isl": reserve})
    r = Run(cfg)
    r.run()
    return sorted(r.requests, key=lambda q: q.id)


def test_long_prompt_waits_until_all_of_it_fits(synthetic_profiles, tmp_path):
    a, b = _run(synthetic_profiles, tmp_path, True)
    # B cannot start while A holds the blocks B's whole prompt needs: no chunk of B runs, nobody
    # is preempted, and B's prefill starts only after A has finished and freed its blocks
    assert a.preemptions == 0 and b.preemptions == 0
    assert b.first_token > a.finish
    loose_a, loose_b = _run(synthetic_profiles, tmp_path, False)
    # without the gate B's first chunks are admitted beside A; each time A needs a block B, the
    # latest admitted, is preempted (recompute) and re-admitted: B thrashes (49 preemptions
    # here) and A, sharing its steps with B's wasted chunks, finishes later
    assert loose_b.preemptions > 10 and loose_a.preemptions == 0
    assert loose_a.finish > a.finish
