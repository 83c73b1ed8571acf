"""GPU work per image request of a workload, alone, under the two work rules the simulator has:
`python -m sim.studies.omni_work [--requests N] [--seed S] [--tables h100]`.

- step-level: what every policy's hops cost (sim.engines.pipeline.plan_hops + cost.hop_work): the
  condition encode once, CFG as one transformer pass at batch 2, an edit's condition latents at
  the input size (the model entry's rule); the disaggregated and modality_aware policies run this;
- vLLM-Omni: what the baseline's omni engines cost (sim.engines.omni.OmniCosts): the encode per
  prompt (x2 with CFG), CFG as two passes at batch 1, an edit's ~1 MP condition and its
  Qwen2.5-VL tokens in the transformer's text stream.

Per task: mean seconds of the transformer alone and of the whole request under each rule, plus
the transformer at the step-level sequences run as two passes at batch 1 (what CFG alone
changes). The default workload's image requests, on the measured tables (docs/omni_baseline.md);
the omni columns read vLLM-Omni's own table set where it exists, as the baseline does.
"""
from __future__ import annotations

import argparse
import itertools
from collections import Counter, defaultdict

from sim.config import SimConfig
from sim.engines.cost import hop_work
from sim.engines.latency import LatencyModel
from sim.engines.omni import OmniCosts
from sim.engines.pipeline import plan_hops
from sim.names import DIT_STEP, IMAGE_OUT_TASKS
from sim.run.runner import resolve
from sim.workloads import request_source

COLUMNS = ("step_level_dit", "cfg_two_passes_dit", "omni_dit", "step_level_total", "omni_total")


def work_table(cfg: SimConfig, requests: int, seed: int, tables: str,
               omni_tables: str = "") -> tuple[dict, Counter]:
    """omni_tables: vLLM-Omni's own table set for the omni column, as the baseline reads it
    (diffusion.omni_tables; "" = the diffusers / vLLM tables only)."""
    root = resolve(cfg.profiles_dir)
    lat = LatencyModel(root, tables)
    omni = LatencyModel(root, omni_tables) if omni_tables and (root / omni_tables).is_dir() else None
    costs: dict[str, OmniCosts] = {}
    sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0.0))
    n: Counter = Counter()
    budget = cfg.engine.max_num_batched_tokens
    for r in itertools.islice(iter(request_source(cfg.workload, seed)), requests):
        if r.task not in IMAGE_OUT_TASKS:
            continue
        c = costs.get(r.model) or costs.setdefault(r.model, OmniCosts(r.model, lat, omni))
        hops = plan_hops(r, True)
        dit = next(h for h in hops if h.stage == DIT_STEP)
        j = c.job(r)
        row = sums[r.task]
        row["step_level_dit"] += dit.steps * lat.dit_step(r.model, dit.weight, dit.seq_len)
        row["cfg_two_passes_dit"] += dit.steps * dit.weight * lat.dit_step(r.model, 1, dit.seq_len)
        row["omni_dit"] += j.steps * c.step((j,))
        row["step_level_total"] += sum(hop_work(lat, h, budget) for h in hops)
        row["omni_total"] += j.work
        n[r.task] += 1
    return sums, n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000, help="first N requests of the workload")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tables", default="h100", help="table set under profiles_dir")
    ap.add_argument("--omni-tables", default=None,
                    help="vLLM-Omni's table set for the omni columns (default: diffusion.omni_tables, "
                         "'{gpu}-vllm-omni', when it exists; '' = the diffusers / vLLM tables)")
    a = ap.parse_args(argv)
    cfg = SimConfig().check()
    omni = (cfg.diffusion.omni_tables if a.omni_tables is None else a.omni_tables).replace("{gpu}", a.tables)
    sums, n = work_table(cfg, a.requests, a.seed, a.tables, omni)
    print(f"mean seconds alone per image request, default workload (first {a.requests:,} requests, "
          f"seed {a.seed}), tables {a.tables}, omni columns {omni or a.tables}")
    print(f"{'task':10s} {'n':>6s} " + " ".join(f"{c:>18s}" for c in COLUMNS))
    total = dict.fromkeys(COLUMNS, 0.0)
    for t in sorted(sums):
        print(f"{t:10s} {n[t]:6d} " + " ".join(f"{sums[t][c] / n[t]:18.2f}" for c in COLUMNS))
        for c in COLUMNS:
            total[c] += sums[t][c]
    k = sum(n.values())
    print(f"{'all':10s} {k:6d} " + " ".join(f"{total[c] / max(k, 1):18.2f}" for c in COLUMNS))


if __name__ == "__main__":
    main()
