"""GPU-only profiler checks (skipped cleanly without a CUDA GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
sys.path.insert(0, str(Path(__file__).parent))


def test_diffusers_tiny_on_gpu(tmp_path):
    from profiler_tiny import tiny_spec

    from profiler import schema
    from profiler.__main__ import compose
    from profiler.sweep import run_sweep
    cfg = compose(["backend=diffusers", "grid=tiny", "device=cuda", "warmup=1", "repeats=2",
                   f"out_dir={tmp_path}", "models=[flux1_dev]", "progress=false"])
    out = run_sweep(cfg, log=lambda s: None, spec_loader=tiny_spec)["flux1_dev"]
    df = schema.read_table(out["path"])
    assert (df["status"] == "ok").all() and (df["peak_mem_bytes"] > 0).all()
