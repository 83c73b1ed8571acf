"""Run outputs: the per-request row (one definition for parquet and DataFrames), atomic writers,
and a short console summary.

Why atomic: sweeps run many simulations in parallel and get killed; a reader (a notebook, the next
sweep stage) must never see a half-written ``summary.json`` or ``requests.parquet``. Every writer
goes to a temp file in the same directory and ``os.replace``-s it into place at the end. The
files get the usual permissions (0666 less the umask), not the temp file's owner-only ones.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sim.config import SLOConfig
from sim.core.records import Request
from sim.names import (DECODE, DIT_STEP, PREFILL, TEXT_ENCODE, TEXT_OUT_TASKS, TRANSFER, VAE_DECODE,
                       VAE_ENCODE, VISION_ENCODE)

# Stage names that get wide columns in requests.parquet. Fixed, so every run has the same schema;
# other stages (preprocess/postprocess on CPU) appear only in summary.json's per_stage.
WIDE_STAGES: tuple[str, ...] = (VISION_ENCODE, TEXT_ENCODE, PREFILL, DECODE, DIT_STEP, VAE_ENCODE,
                                VAE_DECODE, TRANSFER)

_BASE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.int64()), ("arrival", pa.float64()), ("task", pa.string()), ("model", pa.string()),
    ("slo_class", pa.string()), ("prompt_tokens", pa.int64()), ("output_tokens", pa.int64()),
    ("input_h", pa.int32()), ("input_w", pa.int32()), ("num_input_images", pa.int32()),
    ("output_h", pa.int32()), ("output_w", pa.int32()), ("steps", pa.int32()), ("cfg", pa.bool_()),
    ("image_tokens_in", pa.int64()), ("image_tokens_out", pa.int64()),
    ("first_token", pa.float64()), ("finish", pa.float64()), ("ttft_ms", pa.float64()),
    ("tpot_ms", pa.float64()), ("e2el_ms", pa.float64()), ("queue_ms", pa.float64()),
    ("preemptions", pa.int32()), ("slo_met", pa.bool_()),
]
REQUEST_SCHEMA: pa.Schema = pa.schema(
    _BASE_FIELDS + [(f"{s}_{k}", pa.float64()) for s in WIDE_STAGES
                    for k in ("enqueue", "start", "end")])
REQUEST_COLUMNS: tuple[str, ...] = tuple(REQUEST_SCHEMA.names)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


_FILE_MODE = 0o666 & ~_umask()


def temp_beside(path: Path) -> Path:
    """A new empty temp file next to `path` (hidden, `.tmp`), with the mode a plain file gets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    return Path(tmp)


def _num(x: float) -> float | None:
    """NaN/inf -> None: undefined values are null in parquet and JSON, never NaN."""
    return x if math.isfinite(x) else None


def _nan_min(a: float, b: float) -> float:
    return b if a != a else a if b != b else min(a, b)


def _nan_max(a: float, b: float) -> float:
    return b if a != a else a if b != b else max(a, b)


def meets_slo(task: str, ttft_ms: Any, tpot_ms: Any, e2el_ms: Any, slo: SLOConfig) -> Any:
    """THE SLO rule (scalars or numpy arrays of one task): every target of the task must hold.

    ttft/tpot targets apply to text-out tasks only, e2el to all; a task without targets is met.
    An undefined value (NaN: e.g. TPOT of a 1-token answer) counts as met, as vLLM's goodput
    counts such a TPOT as 0.
    """
    targets = slo.targets.get(task) or {}
    ok: Any = np.True_
    text = task in TEXT_OUT_TASKS
    for key, val in (("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms), ("e2el_ms", e2el_ms)):
        target = targets.get(key)
        if target is None or (key != "e2el_ms" and not text):
            continue
        v = np.asarray(val, dtype=np.float64)
        ok = ok & ~(v > target)          # NaN > target is False -> met
    return ok


def first_start(req: Request) -> float:
    """When the request's first stage started (NaN if none did)."""
    return min((s.start for s in req.stages if s.start == s.start), default=math.nan)


def latencies_ms(req: Request, first: float) -> tuple[float, float, float, float]:
    """(ttft, tpot, e2el, queue) of a completed request in ms (Request.latencies_ms)."""
    return req.latencies_ms(first)


def request_row(req: Request, slo: SLOConfig | None,
                lat: tuple[float, float, float, float] | None = None) -> dict[str, Any]:
    """One requests.parquet row for a completed request (None where undefined); `lat`: its
    latencies_ms when the caller has them.

    Used by both RequestsParquetWriter and MetricsCollector, so the file and the summary agree.
    """
    ttft, tpot, e2el, queue = lat if lat is not None else latencies_ms(req, first_start(req))
    img_in = req.input_images[0] if req.input_images else (None, None)
    img_out = req.output_image or (None, None)
    row: dict[str, Any] = {
        "id": req.id, "arrival": req.arrival, "task": req.task, "model": req.model,
        "slo_class": req.slo_class, "prompt_tokens": req.prompt_tokens,
        "output_tokens": req.output_tokens, "input_h": img_in[0], "input_w": img_in[1],
        "num_input_images": len(req.input_images), "output_h": img_out[0],
        "output_w": img_out[1], "steps": req.steps, "cfg": bool(req.cfg),
        "image_tokens_in": req.image_tokens_in, "image_tokens_out": req.image_tokens_out,
        "first_token": _num(req.first_token), "finish": _num(req.finish),
        "ttft_ms": _num(ttft), "tpot_ms": _num(tpot), "e2el_ms": _num(e2el),
        "queue_ms": _num(queue), "preemptions": req.preemptions,
        "slo_met": None if slo is None else bool(meets_slo(req.task, ttft, tpot, e2el, slo)),
    }
    wide: dict[str, list[float]] = {}
    for s in req.stages:
        if s.stage not in WIDE_STAGES:
            continue
        w = wide.get(s.stage)
        if w is None:
            wide[s.stage] = [s.enqueue, s.start, s.end]
        else:  # first enqueue/start, last end
            w[0] = _nan_min(w[0], s.enqueue)
            w[1] = _nan_min(w[1], s.start)
            w[2] = _nan_max(w[2], s.end)
    for stage in WIDE_STAGES:
        w = wide.get(stage)
        row[f"{stage}_enqueue"] = None if w is None else _num(w[0])
        row[f"{stage}_start"] = None if w is None else _num(w[1])
        row[f"{stage}_end"] = None if w is None else _num(w[2])
    return row


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (from request_row) -> an arrow table with the fixed REQUEST_SCHEMA."""
    rows = list(rows)
    return arrow_table({f.name: [r[f.name] for r in rows] for f in REQUEST_SCHEMA}, REQUEST_SCHEMA)


def arrow_table(columns: dict[str, list[Any]], schema: pa.Schema) -> pa.Table:
    """`pa.table(columns, schema=schema)` for a schema of arrow_array's types, without pandas."""
    return pa.Table.from_arrays([arrow_array(columns[f.name], f.type) for f in schema], schema=schema)


_NUMPY_TYPES = {pa.int32(): np.int32, pa.int64(): np.int64, pa.float64(): np.float64}


def arrow_array(values: list[Any], typ: pa.DataType) -> pa.Array:
    """`pa.array(values, typ)` for the types of REQUEST_SCHEMA (int32, int64, float64, bool,
    string; None is null, a float NaN stays a value), built from numpy buffers: pa.array
    imports pandas on its first call (pyarrow's pandas shim), 0.3 s a single run does without.
    A value the type cannot hold raises (OverflowError, ValueError or TypeError)."""
    n = len(values)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    nulls = n - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    if typ == pa.string():
        data = [v.encode() if v is not None else b"" for v in values]
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum([len(b) for b in data], out=offsets[1:])
        return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))],
                                     null_count=nulls)
    if typ == pa.bool_():
        bits = np.fromiter((bool(v) if v is not None else False for v in values), dtype=bool, count=n)
        return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(np.packbits(bits, bitorder="little"))],
                                     null_count=nulls)
    dtype = _NUMPY_TYPES[typ]
    data = np.array([v if v is not None else 0 for v in values], dtype=dtype)
    return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(data)], null_count=nulls)


class RequestsParquetWriter:
    """Streams request rows to parquet, one row group per ``chunk_rows`` rows.

    Writes to a temp file next to ``path`` and renames on close(); leaving a ``with`` block by an
    exception (or calling abort()) deletes the temp file, so ``path`` is either complete or absent.
    """

    def __init__(self, path: str | os.PathLike[str], chunk_rows: int = 100_000,
                 slo: SLOConfig | None = None) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows!r} is invalid; allowed: >= 1")
        self.path = Path(path)
        self.chunk_rows = int(chunk_rows)
        self.slo = slo
        self.rows_written = 0
        self._tmp = temp_beside(self.path)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._tmp, REQUEST_SCHEMA)
        self._buf: list[dict[str, Any]] = []

    def add(self, req: Request) -> None:
        """Add a completed request (row built with the writer's ``slo``)."""
        self.add_row(request_row(req, self.slo))

    def add_row(self, row: dict[str, Any]) -> None:
        """Add a row already built by request_row (e.g. returned by MetricsCollector.record)."""
        if self._writer is None:
            raise RuntimeError("writer is closed")
        self._buf.append(row)
        if len(self._buf) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if self._buf and self._writer is not None:
            self._writer.write_table(rows_to_table(self._buf), row_group_size=self.chunk_rows)
            self.rows_written += len(self._buf)
            self._buf = []

    def close(self) -> None:
        """Flush, finish the file and move it to ``path`` atomically."""
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop everything written so far; ``path`` is left untouched."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                self._buf = []
                self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RequestsParquetWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON (strict: NaN/inf are refused) via a temp file + os.replace."""
    text = json.dumps(obj, indent=2, allow_nan=False, sort_keys=False)
    write_text_atomic(path, text + "\n")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file via a temp file + os.replace (complete or absent, never partial)."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_parquet_atomic(path: str | os.PathLike[str], table: pa.Table) -> None:
    """Write an arrow table as parquet via a temp file + os.replace."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fmt(x: Any, unit: str = "", digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}{unit}"
    return f"{x}{unit}"


def latency_model_notes(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """What a reader of the run's numbers must know about its latency tables, as (short, long)
    notes: lookups outside the measured grid (extrapolated or clamped) and tables that were not
    measured (analytic)."""
    lm = summary.get("latency_model") or {}
    notes = []
    out = lm.get("out_of_grid_lookups") or {}
    if out:
        n = sum(out.values())
        top = ", ".join(f"{k} {v:,}" for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:3])
        verb = {"extrapolate": "EXTRAPOLATED", "clamp": "CLAMPED"}.get(
            str(lm.get("out_of_range_policy")), "OUT OF GRID")
        notes.append((f"{verb}: {n:,} lookups outside the measured tables",
                      f"{verb}: {n:,} latency lookups outside the measured tables ({top}); "
                      f"latency.out_of_range={lm.get('out_of_range_policy')}"))
    analytic = summary.get("analytic_tables") or sorted(
        m for m, engines in (lm.get("engines") or {}).items() if "analytic" in engines)
    if analytic:
        notes.append(("ANALYTIC: roofline, not measured",
                      f"ANALYTIC: {', '.join(analytic)} simulated on roofline tables (engine=analytic, "
                      f"not measured; an optimistic floor). Measure with `python -m profiler sweep "
                      f"model={analytic[0]}` on a GPU."))
    return notes


def print_summary(summary: dict[str, Any], title: str = "simulation summary") -> None:
    """A short rich table of the headline numbers of a summary.json dict; what the numbers rest
    on is in the table itself: lookups outside the measured tables (a row and the caption), the
    table of each model (ANALYTIC for a roofline one, also said above the table)."""
    from rich.console import Console
    from rich.table import Table

    s = summary
    notes = [n for n in latency_model_notes(s) if not n[0].startswith("ANALYTIC")]   # rows below
    t = Table(title=title, show_header=True,
              caption="\n".join(f"[bold red]{long}[/]" for _, long in notes) or None)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for short, _ in notes:
        t.add_row("[bold red]latency tables[/]", f"[bold red]{short}[/]")
    conc = s.get("max_concurrency")
    t.add_row("client", "open loop (arrivals as scheduled)" if conc is None
              else f"closed loop: at most {conc} requests in flight")
    t.add_row("completed / duration", f"{s.get('completed')} / {_fmt(s.get('duration'), ' s')}")
    t.add_row("request throughput", _fmt(s.get("request_throughput"), " req/s", 3))
    t.add_row("goodput", _fmt(s.get("goodput"), " req/s", 3))
    att = s.get("slo_attainment")
    t.add_row("SLO attainment", "-" if att is None else f"{100 * att:.1f} %")
    for m in ("ttft", "tpot", "e2el"):
        t.add_row(f"{m.upper()} median / p99",
                  f"{_fmt(s.get(f'median_{m}_ms'), ' ms')} / {_fmt(s.get(f'p99_{m}_ms'), ' ms')}")
    for task, d in (s.get("per_task") or {}).items():
        t.add_row(f"  {task} p99 E2EL", _fmt(d.get("p99_e2el_ms"), " ms"))
    util = (s.get("utilization") or {}).get("mean_gpu")
    t.add_row("mean GPU utilization", "-" if util is None else f"{100 * util:.1f} %")
    t.add_row("$ / 1k requests", _fmt(s.get("usd_per_1k_requests"), "", 4))
    # one row per model: where its latencies come from (sim.engines.latency.table_sets), and a
    # banner per kind of table that is not a measurement: never silent
    analytic = s.get("analytic_tables") or []
    estimated = s.get("estimated_tables") or []
    sets = {m: d.get("table_set", "?") for m, d in
            ((s.get("latency_model") or {}).get("tables") or {}).items() if isinstance(d, dict)}
    for m, how in (s.get("profile_tables") or {}).items():
        t.add_row(f"latency table {m}",
                  "ANALYTIC: roofline, not measured" if m in analytic
                  else "NOT MEASURED: estimated" if m in estimated else how.split(":")[0])
    de = (s.get("layout") or {}).get("diffusion_engine") or {}
    for m, src in (de.get("stage_costs") or {}).items():     # the baseline's vLLM-Omni engine
        by: dict[str, list[str]] = {}
        for st, where in src.items():
            by.setdefault(where.split(":")[0], []).append(st.split(" ")[0])
        t.add_row(f"{m} stage costs ({de.get('engine')})",
                  "; ".join(f"{eng}: {', '.join(dict.fromkeys(sts))}" for eng, sts in by.items()))
    con = Console()
    if estimated:
        where = ", ".join(sorted({sets.get(m, "?") for m in estimated}))
        con.print(f"[bold yellow]NOT MEASURED: {', '.join(estimated)} simulated on estimated "
                  f"tables ({where}: measured tables scaled by roofline ratios, engine=analytic). "
                  f"Measure with `python -m profiler sweep model={estimated[0]}` on a GPU.[/]")
    if analytic:
        con.print(f"[bold yellow]ANALYTIC: {', '.join(analytic)} simulated on roofline tables "
                  "(engine=analytic, not measured; an optimistic floor). Measure with `python -m "
                  f"profiler sweep model={analytic[0]}` on a GPU.[/]")
    con.print(t)
    for m, src in (de.get("stage_costs") or {}).items():
        other = sorted(st.split(" ")[0] for st, w in src.items() if not w.startswith("vllm-omni"))
        if other:
            why = (" (it runs the condition encoder under Hugging Face transformers and the transformer "
                   "with regional torch.compile)" if set(other) - {"vae_encode", "vae_decode"} else "")
            con.print(f"[yellow]{m}: {', '.join(dict.fromkeys(other))} costed from tables not measured "
                      f"inside vLLM-Omni{why}; summary.json layout.diffusion_engine.stage_costs names "
                      "each table.[/]")
