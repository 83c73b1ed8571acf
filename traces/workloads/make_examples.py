"""Regenerate the example traces in this folder (deterministic): `python -m traces.workloads.make_examples`
(or with the repo root on PYTHONPATH).

example_mixed.csv: 200 requests of the default mixed workload (seed 7), one row each.
example_vllm_bench.json: a SYNTHETIC file shaped like a `vllm bench serve --save-detailed` result of
vLLM 0.26.0 (same keys), with one failed request; its numbers were not measured on any GPU.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from sim.config import WorkloadConfig
from sim.workloads import request_source
from sim.workloads.laws import gamma_arrivals

HERE = Path(__file__).resolve().parent


def mixed_csv(path: Path = HERE / "example_mixed.csv") -> None:
    cols = ["arrival_time", "task", "model", "prompt_tokens", "output_tokens", "image_height",
            "image_width", "output_height", "output_width", "steps", "cfg", "slo_class"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in request_source(WorkloadConfig(num_requests=200), seed=7):
            ih, iw = r.input_images[0] if r.input_images else ("", "")
            oh, ow = r.output_image if r.output_image else ("", "")
            w.writerow([f"{r.arrival:.6f}", r.task, r.model, r.prompt_tokens,
                        r.output_tokens if r.text_out else "", ih, iw, oh, ow,
                        r.steps or "", str(r.cfg).lower() if not r.text_out else "", r.slo_class])


def vllm_json(path: Path = HERE / "example_vllm_bench.json", n: int = 20) -> None:
    rng = np.random.default_rng(11)
    t = gamma_arrivals(n, 2.0, 0.5, rng, vllm_scaling=True)
    ins = rng.integers(64, 1024, n).tolist()
    outs = rng.integers(16, 256, n).tolist()
    errors = [""] * n
    errors[5], outs[5] = "synthetic failure (connection reset)", 0
    ttfts = np.round(0.02 + 0.0002 * np.array(ins), 6).tolist()
    itls = [[0.012] * max(o - 1, 0) for o in outs]
    obj = {
        "note": "SYNTHETIC example shaped like `vllm bench serve --save-detailed` output of vLLM "
                "0.26.0; numbers are made up, not measured. Regenerate with make_examples.py.",
        "date": "20260101-000000", "endpoint_type": "openai", "backend": "openai", "label": None,
        "model_id": "Qwen/Qwen2.5-VL-7B-Instruct", "tokenizer_id": "Qwen/Qwen2.5-VL-7B-Instruct",
        "num_prompts": n, "request_rate": 2.0, "burstiness": 0.5, "max_concurrency": None,
        "duration": float(t[-1] + 3.0), "completed": n - 1, "failed": 1,
        "input_lens": ins, "output_lens": outs, "ttfts": ttfts, "itls": itls,
        "start_times": np.round(81234.5 + t, 6).tolist(),   # perf_counter clock: arbitrary origin
        "generated_texts": ["" if e else "lorem" for e in errors], "errors": errors,
    }
    path.write_text(json.dumps(obj, indent=1) + "\n")


if __name__ == "__main__":
    mixed_csv()
    vllm_json()
