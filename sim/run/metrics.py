"""Metrics the simulator feeds while it runs, and the summary.json it produces at the end.

Why this shape: per-request metrics (TTFT, TPOT, E2EL, queueing) get *exact* percentiles, so the
collector keeps one compact numeric column per metric (``array.array``: 8 bytes a value, about
100 MB for a million requests) instead of Request objects. Inter-token latencies are one value per
sequence per engine step -- far too many to keep -- so they go into a QuantileSketch.
Key names and meanings follow ``vllm bench serve`` (vllm/benchmarks/serve.py) where they overlap:
``std_*`` is numpy's population std, percentiles use numpy's linear interpolation, TPOT excludes
the first token and is undefined for 1-token outputs, ITL is per generated token after the first.
Where vLLM reports 0 for an empty metric (e.g. TTFT of image-output requests), we report None.
``total_output_tokens`` (vLLM's text meaning) counts ``output_tokens`` of text-out tasks only;
image tokens are reported separately (``image_*_tokens``) and together in the unified rate.
``per_stage`` statistics are per stage *visit* (a request may visit dit_step many times); their
p99s come from QuantileSketches (relative error 0.5%), their means are exact.

Which quantiles are exact: every per-request statistic (TTFT, TPOT, E2EL, queue; overall and
per task; mean/median/std/p90/p99) is computed by numpy from the full per-request columns, so it
is exact. ITL (``*_itl_ms``) and ``per_stage`` ``p99_*`` come from ``sim.run.sketch.QuantileSketch``:
the returned quantile is within relative error ``alpha`` (0.5%: ``|x~ - x| <= 0.005 x``) of the
exact weighted lower quantile; their mean/std/count stay exact (up to float summation order).
Memory: about 100 bytes per completed request (the columns) plus a few thousand sketch buckets,
whatever the run length; ITL and stage values are buffered and folded into the sketches in
vectorised batches of ``_FLUSH`` values, a decode jump's ITLs per linear piece of its step times
(QuantileSketch.add_series); the buckets are those of adding every value one by one.
"""
from __future__ import annotations

import math
from array import array
from typing import Any, Final

import numpy as np

from sim.config import SLOConfig
from sim.run.output import REQUEST_COLUMNS, meets_slo, request_row, rows_to_table
from sim.core.records import Request, StageRecord
from sim.names import TEXT_OUT_TASKS
from sim.run.sketch import QuantileSketch

_FLUSH: Final = 1 << 16   # buffered sketch values folded in per vectorised add_many
_ROWS_FLUSH: Final = 1 << 12   # buffered requests folded into the column arrays at once

_FLOAT_COLS = ("arrival", "finish", "ttft_ms", "tpot_ms", "e2el_ms", "queue_ms")
_INT_COLS = ("prompt_tokens", "output_tokens", "image_tokens_in", "image_tokens_out",
             "preemptions")


def _clean(obj: Any) -> Any:
    """Recursively make ``obj`` strict-JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _stats(values: np.ndarray, name: str, which: tuple[str, ...] = (
        "mean", "median", "std", "p90", "p99")) -> dict[str, float | None]:
    """``{mean_<name>_ms, ...}`` over the defined (non-NaN) values; None when there are none."""
    v = values[~np.isnan(values)]
    out: dict[str, float | None] = {}
    for w in which:
        key = f"{w}_{name}_ms"
        if v.size == 0:
            out[key] = None
        elif w == "mean":
            out[key] = float(np.mean(v))
        elif w == "median":
            out[key] = float(np.median(v))
        elif w == "std":
            out[key] = float(np.std(v))
        else:
            out[key] = float(np.percentile(v, float(w[1:])))
    return out


class _StageStats:
    """Queue (enqueue->start) and service (start->end) times of one stage, per visit (ms).
    Values are buffered in ``qbuf``/``sbuf`` and folded into the sketches in batches."""
    __slots__ = ("queue", "service", "qbuf", "sbuf")

    def __init__(self) -> None:
        self.queue = QuantileSketch()
        self.service = QuantileSketch()
        self.qbuf: list[float] = []
        self.sbuf: list[float] = []

    def flush(self) -> None:
        if self.qbuf:
            self.queue.add_many(self.qbuf)
            self.qbuf = []
        if self.sbuf:
            self.service.add_many(self.sbuf)
            self.sbuf = []

    def summary(self) -> dict[str, Any]:
        self.flush()
        return {"visits": int(self.service.count or self.queue.count),
                "mean_queue_ms": self.queue.mean, "p99_queue_ms": self.queue.quantile(0.99),
                "mean_service_ms": self.service.mean,
                "p99_service_ms": self.service.quantile(0.99)}


class MetricsCollector:
    """Collects completed requests and engine-step ITLs; ``summary()`` makes summary.json.

    ``slo`` (optional here) fills each row's ``slo_met``; ``summary()`` re-evaluates the SLO it is
    given. The first ``keep_rows`` rows are kept for ``requests_frame()`` (small runs, tests);
    large runs stream rows to parquet instead (``record`` returns each row for that).
    """

    def __init__(self, slo: SLOConfig | None = None, keep_rows: int = 20_000,
                 itl_alpha: float = 0.005) -> None:
        self.slo = slo
        self.keep_rows = int(keep_rows)
        self._task_codes: dict[str, int] = {}
        self._task = array("h")
        self._f = {c: array("d") for c in _FLOAT_COLS}
        self._i = {c: array("q") for c in _INT_COLS}
        # record() appends to plain lists (a compiled list append is cheap, array.append is a
        # method call that parses its argument), folded into the arrays every _ROWS_FLUSH rows
        self._bt: list[int] = []
        self._bf: list[list[float]] = [[] for _ in _FLOAT_COLS]
        self._bi: list[list[int]] = [[] for _ in _INT_COLS]
        self._rows: list[tuple[Any, ...]] = []
        self._stages: dict[str, _StageStats] = {}
        self._itl = QuantileSketch(alpha=itl_alpha)   # milliseconds
        self._itl_v: list[float] = []                 # buffered single steps (seconds)
        self._itl_w: list[float] = []

    def __len__(self) -> int:
        return len(self._task) + len(self._bt)

    def _flush_rows(self) -> None:
        """Fold the buffered per-request values into the column arrays."""
        if self._bt:
            self._task.fromlist(self._bt)
            self._bt = []
            for c, buf in zip(_FLOAT_COLS, self._bf):
                self._f[c].fromlist(buf)
            for c, ibuf in zip(_INT_COLS, self._bi):
                self._i[c].fromlist(ibuf)
            self._bf = [[] for _ in _FLOAT_COLS]
            self._bi = [[] for _ in _INT_COLS]

    @property
    def itl(self) -> QuantileSketch:
        """The ITL sketch (ms), with every buffered value folded in."""
        self._flush_itl()
        return self._itl

    def record(self, req: Request, row: bool = True) -> dict[str, Any] | None:
        """Add a completed request; returns its requests.parquet row (see output.request_row).

        ``row=False``: the caller does not need the row; it is then built only while the first
        ``keep_rows`` rows are being kept (same numbers either way), and None is returned."""
        code = self._task_codes.get(req.task)
        if code is None:
            code = self._task_codes[req.task] = len(self._task_codes)
        bt = self._bt
        bt.append(code)
        arrival, finish = req.arrival, req.finish
        lat = req.latencies_ms(self._add_stages(req.stages))
        ttft, tpot, e2el, queue = lat
        inf = math.inf
        bf = self._bf                   # in _FLOAT_COLS order
        bf[0].append(arrival)
        bf[1].append(finish if -inf < finish < inf else math.nan)
        bf[2].append(ttft if -inf < ttft < inf else math.nan)
        bf[3].append(tpot if -inf < tpot < inf else math.nan)
        bf[4].append(e2el if -inf < e2el < inf else math.nan)
        bf[5].append(queue if -inf < queue < inf else math.nan)
        bi = self._bi                   # in _INT_COLS order
        bi[0].append(req.prompt_tokens)
        bi[1].append(req.output_tokens)
        bi[2].append(req.image_tokens_in)
        bi[3].append(req.image_tokens_out)
        bi[4].append(req.preemptions)
        if len(bt) >= _ROWS_FLUSH:
            self._flush_rows()
        keep = len(self._rows) < self.keep_rows
        if not (row or keep):
            return None
        r = request_row(req, self.slo, lat)
        if keep:
            self._rows.append(tuple(r[c] for c in REQUEST_COLUMNS))
        return r if row else None

    def _add_stages(self, stages: list[StageRecord]) -> float:
        """Feed the per-stage statistics; returns the earliest start (NaN if none started)."""
        st_map = self._stages
        first = math.inf
        for s in stages:
            st = st_map.get(s.stage)
            if st is None:
                st = st_map[s.stage] = _StageStats()
            start = s.start
            if start == start:
                if start < first:
                    first = start
                st.qbuf.append((start - s.enqueue) * 1000.0)
                end = s.end
                if end == end:
                    st.sbuf.append((end - start) * 1000.0)
                if len(st.qbuf) >= _FLUSH:
                    st.flush()
        return first if first < math.inf else math.nan

    def add_itl(self, duration_s: float, weight: int) -> None:
        """One AR engine step of ``duration_s`` gave a decode token to ``weight`` sequences."""
        self._itl_v.append(duration_s)
        self._itl_w.append(weight)
        if len(self._itl_v) >= _FLUSH:
            self._flush_itl()

    def add_itl_steps(self, run: Any, k: int, weight: int) -> None:
        """The first k steps of a decode jump (sim.engines.latency.DecodeSteps), each giving a
        decode token to ``weight`` sequences: add_itl per step with that step's time, folded in
        per linear piece of the jump (QuantileSketch.add_series: the same buckets)."""
        itl = self._itl
        for alpha, beta, steps in run.pieces(k):
            itl.add_series(alpha, beta, steps, weight, 1000.0)

    def _flush_itl(self) -> None:
        if self._itl_v:
            self._itl.add_many(np.asarray(self._itl_v) * 1000.0, self._itl_w)
            self._itl_v, self._itl_w = [], []

    def column(self, name: str) -> np.ndarray:
        """One per-request column of every recorded request (a copy): the float columns
        (arrival, finish, ttft_ms, tpot_ms, e2el_ms, queue_ms; NaN where undefined) and the
        integer ones (prompt_tokens, output_tokens, image_tokens_in, image_tokens_out,
        preemptions), in completion order."""
        self._flush_rows()
        if name in self._f:
            return np.array(self._f[name], dtype=np.float64)
        if name in self._i:
            return np.array(self._i[name], dtype=np.int64)
        raise KeyError(f"column {name!r} is not recorded; allowed: {list(_FLOAT_COLS + _INT_COLS)}")

    def requests_frame(self) -> Any:
        """The recorded rows as a pandas DataFrame (same columns and types as requests.parquet;
        pyarrow's to_pandas imports pandas)."""
        if len(self) > len(self._rows):
            raise RuntimeError(f"only the first {self.keep_rows} of {len(self)} rows were "
                               "kept; read requests.parquet or raise keep_rows")
        rows = [dict(zip(REQUEST_COLUMNS, r)) for r in self._rows]
        return rows_to_table(rows).to_pandas()

    def _slo_mask(self, task: np.ndarray, ttft: np.ndarray, tpot: np.ndarray, e2el: np.ndarray,
                  slo: SLOConfig) -> np.ndarray:
        ok = np.ones(task.size, dtype=bool)
        for name, code in self._task_codes.items():
            m = task == code
            ok[m] = meets_slo(name, ttft[m], tpot[m], e2el[m], slo)
        return ok

    def summary(self, duration_s: float, num_gpus: int, gpu_kind: str, usd_per_gpu_hour: float,
                slo: SLOConfig, utilization: dict[str, Any],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """summary.json content (strict JSON: None where a statistic is undefined)."""
        if not duration_s > 0:
            raise ValueError(f"duration_s={duration_s!r} is invalid; allowed: > 0")
        if not isinstance(utilization, dict):
            raise TypeError(f"utilization must be a dict, got {type(utilization).__name__}")
        self._flush_rows()
        n = len(self._task)
        task = np.frombuffer(self._task, dtype=np.int16) if n else np.zeros(0, np.int16)
        col = {c: np.frombuffer(a, dtype=np.float64) if n else np.zeros(0)
               for c, a in self._f.items()}
        ints = {c: np.frombuffer(a, dtype=np.int64) if n else np.zeros(0, np.int64)
                for c, a in self._i.items()}
        ttft, tpot, e2el = col["ttft_ms"], col["tpot_ms"], col["e2el_ms"]
        met = self._slo_mask(task, ttft, tpot, e2el, slo)
        text_codes = [c for t, c in self._task_codes.items() if t in TEXT_OUT_TASKS]
        text_out = np.isin(task, text_codes)

        t_in = int(ints["prompt_tokens"].sum())
        t_out = int(ints["output_tokens"][text_out].sum())
        i_in = int(ints["image_tokens_in"].sum())
        i_out = int(ints["image_tokens_out"].sum())
        d = duration_s
        s: dict[str, Any] = {
            "duration": d, "completed": n, "failed": 0,
            "total_input_tokens": t_in, "total_output_tokens": t_out,
            "request_throughput": n / d, "request_goodput": int(met.sum()) / d,
            "output_throughput": t_out / d, "total_token_throughput": (t_in + t_out) / d,
        }
        s.update(_stats(ttft, "ttft"))
        s.update(_stats(tpot, "tpot"))
        itl = self.itl
        s.update({"mean_itl_ms": itl.mean, "median_itl_ms": itl.quantile(0.5),
                  "std_itl_ms": itl.std, "p90_itl_ms": itl.quantile(0.9),
                  "p99_itl_ms": itl.quantile(0.99)})
        s.update(_stats(e2el, "e2el"))
        s.update(_stats(col["queue_ms"], "queue", ("mean", "median", "p99")))
        s["goodput"] = int(met.sum()) / d
        s["slo_attainment"] = float(met.mean()) if n else None
        per_task: dict[str, Any] = {}
        for name, code in sorted(self._task_codes.items()):
            m = task == code
            k = int(m.sum())
            pt: dict[str, Any] = {"completed": k, "request_throughput": k / d}
            pt.update(_stats(e2el[m], "e2el", ("mean", "median", "p90", "p99")))
            if name in TEXT_OUT_TASKS:
                pt.update(_stats(ttft[m], "ttft", ("mean", "median", "p90", "p99")))
                pt.update(_stats(tpot[m], "tpot", ("mean", "median", "p90", "p99")))
            pt["goodput"] = int(met[m].sum()) / d
            pt["slo_attainment"] = float(met[m].mean()) if k else None
            per_task[name] = pt
        s["per_task"] = per_task
        s["per_stage"] = {name: st.summary() for name, st in sorted(self._stages.items())}
        s["utilization"] = utilization
        gpu_hours = num_gpus * d / 3600.0
        cost = gpu_hours * usd_per_gpu_hour
        s.update({"num_gpus": num_gpus, "gpu_kind": gpu_kind,
                  "usd_per_gpu_hour": usd_per_gpu_hour, "gpu_hours": gpu_hours,
                  "cost_usd": cost, "usd_per_1k_requests": 1000.0 * cost / n if n else None})
        s.update({"text_input_tokens": t_in, "text_output_tokens": t_out,
                  "image_input_tokens": i_in, "image_output_tokens": i_out,
                  "text_input_throughput": t_in / d, "text_output_throughput": t_out / d,
                  "image_input_throughput": i_in / d, "image_output_throughput": i_out / d,
                  "unified_token_throughput": (t_in + t_out + i_in + i_out) / d})
        s["preemptions"] = int(ints["preemptions"].sum())
        if extra:
            s.update(extra)
        return _clean(s)
