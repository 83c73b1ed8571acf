"""Shared fixtures: small SYNTHETIC profile tables with closed-form latencies, and a config
builder for small serving runs.

The synthetic laws are (bi)linear in each grid axis, so the latency model's (bi)linear
interpolation reproduces them exactly between grid points (tests/test_latency.py relies on it):

    prefill(t)            = 5 ms + 0.05 ms * t                      (t = tokens in the step)
    decode(b, c)          = 8 ms + 0.02 ms * b + 1e-5 ms * b * c    (b = batch, c = context)
    vision_encode(t)      = 1 ms + 0.01 ms * t                      (t = image tokens)
    text_encode(b, t)     = 2 ms + 1e-3 ms * b * t  (t5_xxl);  0.5 ms + 1e-4 ms * b * t (clip_l)
    dit_step(b, s)        = 20 ms * b * s / 4096                    (s = image sequence tokens)
    vae_{en,de}code(b, p) = 1e-5 ms * p * b                         (p = height * width pixels)
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# the commands the tests start keep their reusable compositions (sim.run.compose_cache) in a
# folder of the test session's own, not the user's cache
os.environ.setdefault("MMSERVE_SIM_CACHE_DIR", tempfile.mkdtemp(prefix="mmserve_sim_cache_"))

from profiler.schema import write_table  # noqa: E402
from sim.config import SimConfig  # noqa: E402

GPU = "h100"

# --- closed forms (milliseconds) -------------------------------------------------------------


def prefill_ms(tokens: float) -> float:
    return 5.0 + 0.05 * tokens


def decode_ms(batch: float, ctx: float) -> float:
    return 8.0 + 0.02 * batch + 1e-5 * batch * ctx


def vision_ms(tokens: float) -> float:
    return 1.0 + 0.01 * tokens


TEXT_ENCODERS = {"t5_xxl": (2.0, 1e-3), "clip_l": (0.5, 1e-4)}


def text_encode_ms(component: str, batch: float, tokens: float) -> float:
    a, b = TEXT_ENCODERS[component]
    return a + b * batch * tokens


def dit_ms(batch: float, seq: float) -> float:
    return 20.0 * batch * seq / 4096.0


def vae_ms(batch: float, pixels: float) -> float:
    return 1e-5 * pixels * batch


# --- grids --------------------------------------------------------------------------------------

def _pow2(lo: int, hi: int) -> list[int]:
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= 2
    return out


PREFILL_TOKENS = [1] + _pow2(16, 32768)            # covers 1..16384 (and prompt+image up to 32k)
DECODE_BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
DECODE_CTX = [1] + _pow2(64, 65536)                # covers 1..32768 (+ the estimates' headroom)
VISION_TOKENS = [1] + _pow2(64, 65536)
DIT_BATCH = [1, 2, 4, 8, 16]
DIT_SEQ = _pow2(16, 65536)
VAE_BATCH = [1, 2, 4, 8, 16]
VAE_SIDES = _pow2(16, 4096)
TE_BATCH = [1, 2, 4, 8, 16, 32]
TE_TOKENS = [1, 16, 64, 77, 128, 256, 512]

PROVENANCE = dict(engine="synthetic", engine_version="0", torch_version="none", gpu=GPU,
                  dtype="bfloat16", tp=1, n_samples=1, peak_mem_bytes=0,
                  measured_at="2026-01-01T00:00:00Z", git_sha="synthetic", status="ok")


def _row(model: str, stage: str, lat_ms: float, **axes: Any) -> dict:
    r = dict(PROVENANCE, model=model, stage=stage, latency_ms_median=lat_ms,
             latency_ms_p10=lat_ms, latency_ms_p90=lat_ms)
    for k in ("batch_size", "num_tokens", "context_len", "height", "width"):
        r.setdefault(k, None)
    r.update(axes)
    return r


def qwen_vl_rows(model: str = "qwen2_5_vl_7b") -> list[dict]:
    rows = [_row(model, "prefill", prefill_ms(t), batch_size=1, num_tokens=t, context_len=0,
                 num_decode_seqs=0) for t in PREFILL_TOKENS]
    rows += [_row(model, "decode", decode_ms(b, c), batch_size=b, num_tokens=b, context_len=c)
             for b, c in itertools.product(DECODE_BATCH, DECODE_CTX)]
    rows += [_row(model, "vision_encode", vision_ms(t), batch_size=1, num_tokens=t)
             for t in VISION_TOKENS]
    return rows


def dit_rows(model: str, text_encoders: tuple[str, ...] = ()) -> list[dict]:
    rows = [_row(model, "dit_step", dit_ms(b, s), batch_size=b, seq_len=s, num_tokens=64)
            for b, s in itertools.product(DIT_BATCH, DIT_SEQ)]
    for stage in ("vae_encode", "vae_decode"):
        rows += [_row(model, stage, vae_ms(b, s * s), batch_size=b, height=s, width=s)
                 for b, s in itertools.product(VAE_BATCH, VAE_SIDES)]
    for comp in text_encoders:
        rows += [_row(model, "text_encode", text_encode_ms(comp, b, t), batch_size=b, num_tokens=t,
                      component=comp) for b, t in itertools.product(TE_BATCH, TE_TOKENS)]
    return rows


def write_synthetic_profiles(root: Path) -> Path:
    """Writes <root>/h100/{qwen2_5_vl_7b,qwen_image,flux1_dev}.parquet; returns root."""
    write_table(pd.DataFrame(qwen_vl_rows()), root / GPU / "qwen2_5_vl_7b.parquet")
    write_table(pd.DataFrame(dit_rows("qwen_image")), root / GPU / "qwen_image.parquet")
    write_table(pd.DataFrame(dit_rows("flux1_dev", ("t5_xxl", "clip_l"))),
                root / GPU / "flux1_dev.parquet")
    return root


@pytest.fixture(scope="session")
def synthetic_profiles(tmp_path_factory) -> Path:
    """profiles_dir holding synthetic tables (engine="synthetic") for the default workload's
    models and flux1_dev; use with cfg.profiles_dir=<dir>, cfg.cluster.gpu="h100"."""
    return write_synthetic_profiles(tmp_path_factory.mktemp("synthetic_profiles"))


# --- configs ------------------------------------------------------------------------------------

def _set(obj: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        obj = obj[p] if isinstance(obj, dict) else getattr(obj, p)
    if isinstance(obj, dict):
        obj[parts[-1]] = value
    else:
        if not hasattr(obj, parts[-1]):
            raise AttributeError(f"config has no field {dotted!r}")
        setattr(obj, parts[-1], value)


def make_cfg(profiles_dir: str | Path | None = None, overrides: dict[str, Any] | None = None,
             **kw: Any) -> SimConfig:
    """A SimConfig for a small run (100 requests, default mix, h100x8, out_of_range=error).

    Overrides use dotted keys in `overrides` ({"workload.arrival.rate": 2.0}) or keyword
    arguments with "__" for dots (workload__arrival__rate=2.0)."""
    cfg = SimConfig()
    cfg.cluster.gpu = GPU
    cfg.workload.num_requests = 100
    cfg.output.progress = "off"
    if profiles_dir is not None:
        cfg.profiles_dir = str(profiles_dir)
    items = dict(overrides or {})
    items.update({k.replace("__", "."): v for k, v in kw.items()})
    for k, v in items.items():
        _set(cfg, k, v)
    return cfg


@pytest.fixture
def cfg_factory(synthetic_profiles):
    """make_cfg bound to the synthetic profiles_dir."""
    def factory(overrides: dict[str, Any] | None = None, **kw: Any) -> SimConfig:
        return make_cfg(synthetic_profiles, overrides, **kw)
    return factory


def rel_close(a: float, b: float, rel: float = 1e-9) -> bool:
    if (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return (isinstance(a, float) and math.isnan(a)) and (isinstance(b, float) and math.isnan(b))
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)
