"""Backend protocol shared by the profiler backends, plus timing and OOM helpers.

A backend turns (model spec, grid config) into a list of grid points (`plan`) and then measures
them (`iter_rows`, a generator of table rows). The sweep runner (profiler/sweep.py) owns resume,
the time budget, provenance and writing; a backend owns only how a point is measured.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


class SimulatedOOM(RuntimeError):
    """Stand-in for torch.cuda.OutOfMemoryError (tests inject it; the runner treats it as OOM)."""


_OOM_RE = re.compile(r"Tried to allocate ([0-9.]+) (GiB|MiB|KiB|B)")
_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, SimulatedOOM):
        return True
    try:
        import torch
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # torch missing: only the stand-in counts
        pass
    msg = str(exc)
    return "out of memory" in msg.lower() and ("CUDA" in msg or "cuda" in msg)


def oom_requested_bytes(exc: BaseException) -> int | None:
    m = _OOM_RE.search(str(exc))
    if not m:
        return getattr(exc, "requested_bytes", None)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def summarize(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    def q(p: float) -> float:
        if len(s) == 1:
            return s[0]
        x = p * (len(s) - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)
    return {"latency_ms_median": statistics.median(s), "latency_ms_p10": q(0.10),
            "latency_ms_p90": q(0.90), "n_samples": len(s)}


def time_callable(fn: Callable[[], Any], device: str, warmup: int, repeats: int,
                  max_seconds: float | None = None, chain: int = 1) -> list[float]:
    """Times fn() with CUDA events on a GPU (host clock on the CPU); returns per-call ms.

    `max_seconds` trims repeats for expensive points: after the first timed call, the number of
    repeats is cut so the point takes at most about that long (at least one sample).
    `chain` > 1 times that many back-to-back calls per sample and divides: the steady state of a
    loop (a denoising loop launches step i+1 while the GPU runs step i), where a lone call from
    an idle GPU would expose its whole kernel-launch time.
    """
    import torch
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out: list[float] = []
    budget_end = None
    for i in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(chain):
                fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / chain)
        else:
            t0 = time.perf_counter()
            for _ in range(chain):
                fn()
            out.append((time.perf_counter() - t0) * 1e3 / chain)
        if max_seconds is not None:
            if budget_end is None:
                budget_end = time.monotonic() + max_seconds - out[0] / 1e3
            elif time.monotonic() + out[-1] / 1e3 > budget_end:
                break
    return out


@dataclass
class RunContext:
    """What the runner hands a backend: config, stop flag, and per-point bookkeeping."""
    cfg: Any
    device: str = "cuda"
    should_stop: Callable[[], bool] = lambda: False
    done_keys: set = field(default_factory=set)
    log: Callable[[str], None] = print
    fault_injector: Callable[[dict], None] | None = None  # tests: raise at chosen points


class Backend:
    name = "base"

    def engine_version(self) -> str:
        return "unknown"

    def gpu_name(self, device: str) -> str:
        try:
            import torch
            if str(device).startswith("cuda") and torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:
            pass
        return "cpu"

    def plan(self, spec, grid) -> list[dict]:
        raise NotImplementedError

    def iter_rows(self, spec, points: list[dict], ctx: RunContext) -> Iterator[dict]:
        """Default: measure points one at a time; an OOM becomes a status=oom row."""
        for p in points:
            if ctx.should_stop():
                return
            yield self.guarded(spec, p, ctx)

    def guarded(self, spec, p: dict, ctx: RunContext) -> dict:
        try:
            if ctx.fault_injector is not None:
                ctx.fault_injector(p)
            row = self.measure_point(spec, p, ctx)
        except Exception as e:  # noqa: BLE001 - recorded in the table, sweep goes on
            row = dict(p)
            if is_oom(e):
                row.update(status="oom", mem_requested_bytes=oom_requested_bytes(e),
                           error=str(e).splitlines()[0][:300] if str(e) else "OOM")
            else:
                row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
            self.cleanup_after_error(ctx)
        return row

    def cleanup_after_error(self, ctx: RunContext) -> None:
        try:
            import gc

            import torch
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass

    def measure_point(self, spec, p: dict, ctx: RunContext) -> dict:
        raise NotImplementedError
