"""Stage latencies from profile tables: interpolation over the measured grid, with an explicit
policy outside it (error by default; clamp or extrapolate only when configured, and counted).

Lookups bisect Python lists and memoise in-grid points per grid. A decode jump is priced in
closed form (`decode_run`, `DecodeSteps`): its step times are linear in the step index between
grid points, so its steps are a few linear pieces and their end offsets arithmetic series -- the
cost of a jump does not grow with its length. tests/reference.py holds the plain numpy
formulation of both (per-step values, a running sum), the oracle tests/test_latency.py compares
them with.

Tables are read as numpy columns (profiler.schema.read_columns) and grouped with numpy
(`group_medians`, pandas' groupby median to the bit): a run loads no pandas for its tables.
`LatencyModel.frame_df` gives a model's rows as a DataFrame to studies and tools.
"""
from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from profiler.schema import Columns, read_columns
from sim.config import OutOfRange
from sim.core.gpu import Steps
from sim.core.mypyc_compat import mypyc_attr
from sim.names import DECODE, DIT_STEP, PREFILL, TEXT_ENCODE, VISION_ENCODE


_MEMO_MAX: Final = 1 << 16      # memoised points per grid (cleared when full: bounded memory)

# where a model's latencies come from (LatencyModel.table_sets): one name per table-set kind
MEASURED, ESTIMATED, ANALYTIC, MISSING = "measured", "estimated", "analytic", "missing"
ESTIMATED_SUFFIX, ANALYTIC_SUFFIX = "-est", "-analytic"
ESTIMATES = "{gpu}" + ESTIMATED_SUFFIX    # the default estimated set of a GPU's tables


class OutOfGridError(ValueError):
    """A lookup outside the measured grid while latency.out_of_range=error."""


@mypyc_attr(native_class=False)             # (compiled: a plain class, as OSError subclasses must)
class MissingProfileError(FileNotFoundError):
    pass


def _right_of(a: list[float], x: float) -> int:
    """bisect.bisect_right(a, x) on a list of floats (compiled: a native loop, no boxing)."""
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _left_of(a: list[float], x: float) -> int:
    """bisect.bisect_left(a, x) on a list of floats (as _right_of)."""
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _axis_pos(axis: list[float], x: float) -> tuple[int, float]:
    """Index i and weight w so that x = (1-w)*axis[i] + w*axis[i+1]; w may be <0 or >1 (outside)."""
    n = len(axis)
    if n == 1:
        return 0, 0.0
    i = _right_of(axis, x) - 1
    if i < 0:                   # (conditionals: min/max calls cost more on this hot path)
        i = 0
    elif i > n - 2:
        i = n - 2
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


def _at2(g: "Grid", i: int, wi: float, j: int, wj: float) -> tuple[float, bool]:
    """(value, whether a hole carried weight) of a 2-axis grid at the axis positions (i, wi),
    (j, wj) of _axis_pos (weights maybe clamped or outside [0, 1]): bilinear, >= 1e-6 s."""
    v: list[list[float]] = g.vl          # (typed: compiled, native float arithmetic)
    f: list[list[bool]] = g.fl
    n0, n1 = len(v), len(v[0])
    i1 = i + 1 if i + 1 < n0 else n0 - 1
    j1 = j + 1 if j + 1 < n1 else n1 - 1
    vi, vi1 = v[i], v[i1]
    out = ((1 - wi) * ((1 - wj) * vi[j] + wj * vi[j1])
           + wi * ((1 - wj) * vi1[j] + wj * vi1[j1]))
    fi, fi1 = f[i], f[i1]
    hole = ((fi[j] and (1 - wi) * (1 - wj) != 0) or (fi[j1] and (1 - wi) * wj != 0)  # a hole
            or (fi1[j] and wi * (1 - wj) != 0) or (fi1[j1] and wi * wj != 0))  # counts where it has weight
    return (out if out > 1e-6 else 1e-6), hole


def _at1(g: "Grid", i: int, w: float) -> tuple[float, bool]:
    """_at2 on a 1-axis grid (a one-point grid is its point, not floored)."""
    v: list[float] = g.vl
    f: list[bool] = g.fl
    n = len(v)
    if n == 1:
        return float(v[0]), False
    out = (1 - w) * v[i] + w * v[i + 1]
    hole = bool(f[i] or f[i + 1 if i + 1 < n else n - 1])
    return (out if out > 1e-6 else 1e-6), hole


def _mixed_decode_context(extra: Any) -> float | None:
    """Decode context of a measured mixed step from its row's `extra` (the profiler stores it
    there; context_len is the prefill chunk's own context)."""
    if isinstance(extra, str) and extra:
        e = json.loads(extra)
        v = e.get("measured_mean_context", e.get("decode_context"))
        if v:
            return float(v)
    return None


class _DecodeCol(NamedTuple):
    """A decode grid column at one batch size: values along the context axis (array and list),
    whether the batch lies inside the batch axis, and the two batch rows it mixes."""
    arr: np.ndarray
    vals: list[float]
    inside: bool
    i: int
    i1: int


@dataclass
class Grid:
    """Latency (seconds) on a product grid of 1-2 axes; NaN cells (OOM holes) are filled along
    the first axis by proportional scaling from the nearest measured cell, and such hits are
    reported as extrapolated."""
    name: str
    axes: list[list[float]]
    values: np.ndarray          # shape = tuple(len(a) for a in axes)
    filled: np.ndarray          # bool mask of cells that were holes

    @classmethod
    def from_table(cls, name: str, rows: Columns, cols: list[str], fill=None) -> "Grid":
        """The grid of the rows' median latency over the columns `cols` (`median_grid`);
        `fill(vals, axes)` fills the NaN cells (default `_fill_holes`)."""
        if not len(rows):
            raise MissingProfileError(f"profile has no measured rows for {name}")
        axes, vals = median_grid(rows, cols)
        holes = np.isnan(vals)
        if holes.any():
            vals = (fill or _fill_holes)(vals, axes)
        return cls(name, axes, vals, holes)

    def __post_init__(self) -> None:
        # plain-Python copies for the scalar hot path (same float64 values as `values`)
        self.vl = self.values.tolist()
        self.fl = self.filled.tolist()
        self.carr = [np.asarray(a, dtype=float) for a in self.axes]
        # in-grid lookups already made: point -> (value, whether a hole carried weight);
        # engines ask for the same points over and over (batch sizes, prompt lengths)
        # (keyed by the point's coordinates, without a tuple: 1 axis {x: v}, 2 axes {x0: {x1: v}};
        # v is the value, negated when a hole carried weight -- values are >= 1e-6 > 0)
        self.memo1: dict[float, float] = {}
        self.memo2: dict[float, dict[float, float]] = {}
        self.nmemo = 0
        self.memoise = True     # False: every lookup interpolates (points that rarely repeat)
        self.cols: dict[int, _DecodeCol] = {}       # decode_series columns by batch, under
        self.cols_mode: Any = None                  # this range policy

    def lo_hi(self) -> list[tuple[float, float]]:
        return [(a[0], a[-1]) for a in self.axes]


def group_medians(keys: list[np.ndarray], values: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """pandas' `groupby(keys)[values].median()` on numpy columns: rows with a NaN key are left
    out, NaN values are skipped (a group of NaN values only has median NaN), and the groups come
    in ascending key order, the first key first. Returns each key column's value per group and
    the groups' medians (numpy's: an even count takes (a + b) / 2 of the two middle values).
    One sort for all groups: values ascend within a group, NaN last (np.median per group costs
    50 us a call and imports numpy.ma)."""
    keep = np.ones(len(values), dtype=bool)
    for k in keys:
        keep &= ~np.isnan(k)
    # lexsort's last key sorts first: the keys in order, then the value within a group
    order = np.lexsort([values[keep]] + [k[keep] for k in keys[::-1]])
    ks = [k[keep][order] for k in keys]
    v = values[keep][order]
    first = np.zeros(len(v), dtype=bool)                     # a group's first row
    first[:1] = True
    for k in ks:
        first[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(first)
    if not len(starts):
        return [k[starts] for k in ks], np.zeros(0)
    n = np.add.reduceat((~np.isnan(v)).astype(np.int64), starts)    # values per group
    lo = v[starts + (n - 1) // 2]             # (n = 0: an index in range, masked below)
    hi = v[starts + n // 2]
    with np.errstate(over="ignore"):         # (lo + hi) of an odd count is not used
        meds = np.where(n == 0, np.nan, np.where(n % 2 == 1, lo, (lo + hi) / 2))
    return [k[starts] for k in ks], meds


def median_grid(rows: Columns, cols: list[str]) -> tuple[list[list[float]], np.ndarray]:
    """(axes, values): each axis the distinct non-null values of one of `cols`, ascending; a
    cell the median latency_ms_median / 1e3 (seconds) of the rows at that point
    (`group_medians`), NaN where no row is."""
    keys, meds = group_medians([rows[c] for c in cols], rows["latency_ms_median"])
    axes = []
    for c in cols:
        x = rows[c]
        axes.append(np.unique(x[~np.isnan(x)]).astype(float).tolist())
    vals = np.full([len(a) for a in axes], np.nan)
    vals[tuple(np.searchsorted(a, k) for a, k in zip(axes, keys))] = meds / 1e3
    return axes, vals


def _no_decodes(rows: Columns) -> np.ndarray:
    """Rows with no decode sequence in the step (an empty num_decode_seqs cell reads as 0)."""
    n = rows["num_decode_seqs"]
    return np.isnan(n) | (n == 0)


def _fill_holes(vals: np.ndarray, axes: list[list[float]]) -> np.ndarray:
    """Fill NaN cells: scale the nearest measured cell along axis 0 by the axis-0 ratio
    (latency proportional to batch/tokens), else along axis 1, else the global max."""
    vals = vals.copy()
    a0 = np.asarray(axes[0])
    for idx in zip(*np.nonzero(np.isnan(vals))):
        rest = idx[1:]
        col = vals[(slice(None),) + rest]
        ok = np.nonzero(~np.isnan(col))[0]
        if len(ok):
            j = ok[np.argmin(np.abs(ok - idx[0]))]
            vals[idx] = col[j] * a0[idx[0]] / a0[j]
            continue
        if vals.ndim > 1:
            row = vals[idx[0]]
            ok = np.nonzero(~np.isnan(row))[0]
            if len(ok):
                j = ok[np.argmin(np.abs(ok - idx[1]))]
                a1 = np.asarray(axes[1])
                vals[idx] = row[j] * a1[idx[1]] / a1[j]
                continue
        vals[idx] = np.nanmax(vals)
    return vals


def kv_token_slope(vals: np.ndarray, axes: list[list[float]]) -> float:
    """Seconds per (sequence x context token) of a decode grid (axes: batch, context): the
    least-squares slope through the origin of t(B, c) - t(B, c0) against B (c - c0) over the
    measured cells, c0 the smallest context. A decode step reads every sequence's KV cache once,
    so its context term grows with the total KV tokens B x c (llama2_7b H100: 0.16 us per token,
    residual <= 4 ms over 60 cells; qwen2_5_7b, GQA: 0.018 us)."""
    b = np.asarray(axes[0], float)[:, None]
    c = np.asarray(axes[1], float)[None, :]
    x = (b * (c - c[0, 0])).ravel()
    y = (vals - vals[:, :1]).ravel()
    ok = np.isfinite(y) & (x > 0)
    sxx = float((x[ok] * x[ok]).sum())
    return float((x[ok] * y[ok]).sum() / sxx) if sxx else 0.0


def _fill_decode_holes(vals: np.ndarray, axes: list[list[float]]) -> np.ndarray:
    """NaN cells of a decode grid (batch x context; the profiler's OOM points, where B x c
    exceeded the KV cache): from the largest measured context c' of the same batch row, plus
    the KV-read term kv_token_slope x B x (c - c'). Scaling a neighbour in proportion to the
    batch (`_fill_holes`) would also scale the step's fixed part (weights, launch) and, on
    llama2_7b, put the step at B=128, c=1024 at 44.5 ms instead of 35.7 ms. Rows with no
    measured cell fall back to `_fill_holes`."""
    k = kv_token_slope(vals, axes)
    out = vals.copy()
    a1 = np.asarray(axes[1], float)
    for i, bsz in enumerate(axes[0]):
        row = vals[i]
        ok = np.nonzero(np.isfinite(row))[0]
        if not len(ok):
            continue
        for j in np.nonzero(np.isnan(row))[0]:
            below = ok[ok < j]
            r = below[-1] if len(below) else ok[0]
            out[i, j] = row[r] + k * bsz * (a1[j] - a1[r])
    if np.isnan(out).any():
        out = _fill_holes(out, axes)
    return out


# axis columns a lookup interpolates over: (least value, what is allowed), checked on ok rows
_AXES = {"batch_size": 1, "tp": 1, "num_tokens": 0, "context_len": 0, "height": 1, "width": 1,
         "seq_len": 0, "num_decode_seqs": 0}


def read_profile(path: Path) -> Columns:
    """A profile table, read and checked: a file that cannot be read, or a status=ok row with
    a latency that is not a positive finite number or an axis out of range, stops the run with
    one ConfigError naming the file, the row and the field."""
    from sim.config import ConfigError
    hint = f"(`python -m profiler check {path}` lists what is wrong)"
    try:
        t = read_columns(path)
    except Exception as e:              # pyarrow errors have no common base
        msg = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"profile table {path} cannot be read ({type(e).__name__}: {msg}); "
                          f"allowed: a parquet table written by `python -m profiler` (measure it again, or "
                          f"restore it: `git checkout -- {path}` for a shipped one)") from None
    ok = t["status"] == "ok"
    lat = t["latency_ms_median"]
    bad = ok & ~(np.isfinite(lat) & (lat > 0))
    checks = [("latency_ms_median", bad, "a positive, finite number of ms on status=ok rows")]
    for col, least in _AXES.items():
        v = t[col]
        checks.append((col, ok & ~np.isnan(v) & ~(v >= least), f"a number >= {least} (or null)"))
    for col, mask, allowed in checks:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise ConfigError(f"profile table {path}: row {i} (model={t['model'][i]}, stage="
                              f"{t['stage'][i]}), field {col!r}: {t[col][i]!r} is invalid; "
                              f"allowed: {allowed} {hint}")
    return t


# the ok rows of each table read in this process, by (path, mtime_ns, size): many runs in one
# process (capacity probes, sweeps' workers, tests) read the same tables once. Readers treat the
# tables as read-only (Columns.select and with_column make new ones).
_OK_ROWS: dict[tuple[str, int, int], Columns] = {}


def ok_rows(path: Path) -> Columns:
    """The status=ok rows of the table at `path` (read_profile), read once per file version."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    t = _OK_ROWS.get(key)
    if t is None:
        full = read_profile(path)
        t = full.select(full["status"] == "ok")
        # a prefill row's empty context_len is no cached context (the profiler writes 0); read
        # as 0, so the chunk-after-context grid's context axis starts at 0, not at NaN
        ctx = t["context_len"]
        empty_ctx = (t["stage"] == PREFILL) & np.isnan(ctx)
        if empty_ctx.any():
            t = t.with_column("context_len", np.where(empty_ctx, 0.0, ctx))
        _OK_ROWS[key] = t
    return t


def table_source_line(t: dict[str, Any]) -> str:
    """One model's entry of LatencyModel.tables() as the summary's `profile_tables` line:
    '<source> (<what it is>): <path>'."""
    what = {MEASURED: f"measured ({', '.join(t['engines'])})",
            ESTIMATED: "estimated (measured tables scaled by roofline ratios, not measured)",
            ANALYTIC: "analytic (roofline, not measured)"}[t["source"]]
    return f"{what}: {t['path']}"


def _interp_sq(xs: list[float], ss: list[float], n: float) -> float:
    """ss interpolated at n along xs (piecewise linear; the end segments extended)."""
    if len(xs) == 1:
        return ss[0] * (n / xs[0]) ** 2
    j = _right_of(xs, n) - 1
    if j < 0:
        j = 0
    elif j > len(xs) - 2:
        j = len(xs) - 2
    w = (n - xs[j]) / (xs[j + 1] - xs[j])
    return ss[j] + w * (ss[j + 1] - ss[j])


class LatencyModel:
    """Lookups in seconds for every stage kind; counts points served outside the grid."""

    def __init__(self, profiles_dir: str | Path, gpu: str, out_of_range: OutOfRange | str = "error",
                 fallback: str | None = ESTIMATES):
        self.root = Path(profiles_dir)
        self.gpu = gpu
        # the estimated set read for models the measured set lacks (ESTIMATES: <gpu>-est;
        # None: none); see table_sets() for the whole rule
        self.fallback = None if fallback is None else str(fallback).replace("{gpu}", gpu)
        self.mode = OutOfRange(out_of_range)
        self.outside: Counter[str] = Counter()   # name -> lookups outside the grid
        self.hole_hits: Counter[str] = Counter()
        self._frames: dict[str, Columns] = {}
        self._paths: dict[str, tuple[Path, str]] = {}   # model -> (table read, its source)
        self._grids: dict[tuple, Grid] = {}
        self._mixed_per_seq: dict[str, float] = {}
        self._attn: dict[str, tuple[float, list[float], list[float]]] = {}  # prefill attention
        self._ar_grids: dict[tuple[str, str], Grid | None] = {}
        self._pre: dict[str, Grid] = {}             # model -> its "prefill" / "decode" grid
        self._dec: dict[str, Grid] = {}             # (the hot lookups: no tuple key)
        self._dit: dict[str, Grid] = {}
        self._dit_joint: dict[str, tuple[Grid, float]] = {}   # model -> (grid, its text length)
        self._dit_text: dict[str, Grid] = {}        # model -> batch-1 (seq_len, num_tokens) grid
        self._te: dict[str, dict[str, Grid]] = {}   # model -> component -> text_encode grid
        self._vis: dict[str, Grid] = {}
        self._vae: dict[str, dict[str, Grid]] = {}  # model -> stage -> grid

    # --- tables ---------------------------------------------------------------------------
    def table_sets(self) -> list[tuple[str, str]]:
        """The table sets (folders under the profiles root) a model's table is looked up in,
        first found wins, each with the source it stands for:
          <gpu>/           measured   (the profiler's vLLM / diffusers sweeps)
          <gpu>-est/       estimated  (measured tables scaled by roofline ratios to a precision
                                       variant or another GPU: `profiler sweep backend=analytic
                                       analytic.method=scaled`; latency.fallback names it)
          <gpu>-analytic/  analytic   (the roofline from the shapes alone: `profiler
                                       import-model`, `profiler sweep backend=analytic`)
        A set named explicitly with its suffix (latency.tables=h100-est / h100-analytic) starts
        the chain at that source."""
        g = self.gpu
        if g.endswith(ANALYTIC_SUFFIX):
            return [(g, ANALYTIC)]
        if g.endswith(ESTIMATED_SUFFIX):
            return [(g, ESTIMATED), (g[:-len(ESTIMATED_SUFFIX)] + ANALYTIC_SUFFIX, ANALYTIC)]
        sets = [(g, MEASURED)]
        if self.fallback:
            sets.append((self.fallback, ESTIMATED))
        sets.append((g + ANALYTIC_SUFFIX, ANALYTIC))
        return sets

    def resolve(self, model: str) -> tuple[Path, str]:
        """(the table <root>/<set>/<model>.parquet, its source) by table_sets(); the measured
        path with source MISSING when no set has one."""
        for folder, source in self.table_sets():
            path = self.root / folder / f"{model}.parquet"
            if path.exists():
                return path, source
        return self.root / self.gpu / f"{model}.parquet", MISSING

    def frame(self, model: str) -> Columns:
        """`model`'s status=ok rows (ok_rows) from its table (resolve)."""
        if model not in self._frames:
            path, source = self.resolve(model)
            if source == MISSING:
                have = sorted(p.stem for p in (self.root / self.gpu).glob("*.parquet"))
                sets = sorted(p.name for p in self.root.glob("*") if p.is_dir())
                looked = ", ".join(f"{f}/ ({s})" for f, s in self.table_sets())
                raise MissingProfileError(
                    f"no profile table for model={model!r} on gpu={self.gpu!r}: no {model}.parquet "
                    f"in {looked}; tables in {self.gpu}/: {have}; table sets under {self.root}: "
                    f"{sets} (measure one with `python -m profiler sweep model={model}`, or make "
                    f"roofline ones with `python -m profiler sweep backend=analytic model={model}`)")
            self._frames[model] = ok_rows(path)
            if source == MEASURED and ANALYTIC in self.engines(model):
                source = ANALYTIC        # rows computed, not measured, whatever folder they are in
            self._paths[model] = (path, source)
        return self._frames[model]

    def frame_df(self, model: str) -> Any:
        """frame(model) as a pandas DataFrame (imports pandas: for studies and tools, not runs)."""
        return self.frame(model).to_pandas()

    def source(self, model: str) -> str:
        """measured | estimated | analytic: where `model`'s latencies come from."""
        self.frame(model)
        return self._paths[model][1]

    def tables(self) -> dict[str, dict[str, Any]]:
        """Per model read so far: its table, the set it is in, that set's source (measured /
        estimated / analytic), its engines, and whether it was measured."""
        out: dict[str, dict[str, Any]] = {}
        for m in sorted(self._frames):
            path, source = self._paths[m]
            out[m] = {"path": str(path), "table_set": path.parent.name, "source": source,
                      "engines": self.engines(m), "measured": source == MEASURED}
        return out

    def not_measured(self) -> list[str]:
        return [m for m, t in self.tables().items() if not t["measured"]]

    def models_from(self, source: str) -> list[str]:
        return [m for m, t in self.tables().items() if t["source"] == source]

    def analytic_models(self) -> list[str]:
        return self.models_from(ANALYTIC)

    def engine_settings(self, model: str) -> dict:
        s = [x for x in self.frame(model)["engine_settings"].tolist() if x is not None]
        return json.loads(s[0]) if s else {}

    def engines(self, model: str) -> list[str]:
        return sorted({e for e in self.frame(model)["engine"].tolist() if e is not None})

    def _grid(self, model: str, stage: str, cols: list[str], where=None, tag: str = "",
              fill=None) -> Grid:
        # the fill rule is part of the grid: a grid built with one is never served for another
        key = (model, stage, tuple(cols), tag, getattr(fill, "__name__", None))
        g = self._grids.get(key)
        if g is None:
            t = self.frame(model)
            rows = t.select(t["stage"] == stage)
            if where is not None:
                rows = rows.select(where(rows))
            if not len(rows):
                raise MissingProfileError(
                    f"profile table of model={model!r} (gpu={self.gpu!r}) has no status=ok rows "
                    f"for stage={stage!r}{' ' + tag if tag else ''}; stages present: "
                    f"{sorted({x for x in t['stage'].tolist() if x is not None})}")
            g = Grid.from_table(f"{model}/{stage}{'/' + tag if tag else ''}", rows, cols, fill)
            self._grids[key] = g
        return g

    def _memo_full(self, g: Grid) -> None:
        g.nmemo += 1
        if g.nmemo > _MEMO_MAX:
            g.memo1.clear()
            g.memo2.clear()
            g.nmemo = 1

    def _lookup1(self, g: Grid, x: float) -> float:
        """Interpolated value at x on a 1-axis grid (in-grid points are memoised, their hole
        hits counted again on every use)."""
        v = g.memo1.get(x)
        if v is None:
            hit = self._interp(g, (x,))
            if hit is None:
                return self._outside(g, (x,))
            self._memo_full(g)
            v = -hit[0] if hit[1] else hit[0]
            g.memo1[x] = v
        if v < 0:
            self.hole_hits[g.name] += 1
            return -v
        return v

    def _lookup2(self, g: Grid, x0: float, x1: float) -> float:
        """_lookup1 on a 2-axis grid."""
        if not g.memoise:
            hit = self._interp(g, (x0, x1))
            if hit is None:
                return self._outside(g, (x0, x1))
            if hit[1]:
                self.hole_hits[g.name] += 1
            return hit[0]
        row = g.memo2.get(x0)
        v = None if row is None else row.get(x1)
        if v is None:
            hit = self._interp(g, (x0, x1))
            if hit is None:
                return self._outside(g, (x0, x1))
            self._memo_full(g)
            if row is None or not g.memo2:     # (a clear empties memo2, not the row we hold)
                row = g.memo2[x0] = {}
            v = -hit[0] if hit[1] else hit[0]
            row[x1] = v
        if v < 0:
            self.hole_hits[g.name] += 1
            return -v
        return v

    @staticmethod
    def _interp(g: Grid, xs: tuple[float, ...]) -> tuple[float, bool] | None:
        """(value, hole carried weight) at an in-grid point; None outside the grid."""
        axes = g.axes
        if len(axes) == 2:
            i, wi = _axis_pos(axes[0], xs[0])
            j, wj = _axis_pos(axes[1], xs[1])
            if wi < -1e-9 or wi > 1 + 1e-9 or wj < -1e-9 or wj > 1 + 1e-9:
                return None
            return _at2(g, i, wi, j, wj)
        i, w = _axis_pos(axes[0], xs[0])
        if w < -1e-9 or w > 1 + 1e-9:
            return None
        return _at1(g, i, w)

    def _outside(self, g: Grid, xs: tuple[float, ...]) -> float:
        """A point outside the grid: counted, then refused (out_of_range=error) or served with
        the weights clamped to the grid (clamp) or as they are (extrapolate)."""
        pos = [_axis_pos(a, x) for a, x in zip(g.axes, xs)]
        self.outside[g.name] += 1
        if self.mode is OutOfRange.error:
            raise OutOfGridError(
                f"{g.name}: point {dict(zip(['axis0', 'axis1'], xs))} is outside the measured "
                f"grid {g.lo_hi()}; set latency.out_of_range=clamp or =extrapolate to allow it "
                f"(counted in the summary), or measure a wider grid")
        if self.mode is OutOfRange.clamp:
            pos = [(i, min(max(w, 0.0), 1.0)) for i, w in pos]
        if len(pos) == 2:
            value, hole = _at2(g, pos[0][0], pos[0][1], pos[1][0], pos[1][1])
        else:
            value, hole = _at1(g, pos[0][0], pos[0][1])
        if hole:
            self.hole_hits[g.name] += 1
        return value

    # --- AR stages --------------------------------------------------------------------------
    def _ar_grid(self, model: str, which: str) -> Any:     # Grid, or None for "prefill_ctx"
        """The AR grids by a short key (engines ask for them at every step): DECODE,
        PREFILL (pure chunks) or "prefill_ctx" (chunks after cached context; None when
        the table has no such rows)."""
        g = self._ar_grids.get((model, which), False)
        if g is False:
            if which == DECODE:
                g = self._grid(model, DECODE, ["batch_size", "context_len"], fill=_fill_decode_holes)
                g.memoise = False
            elif which == PREFILL:
                g = self._grid(model, PREFILL, ["num_tokens"],
                               lambda d: _no_decodes(d) & (d["context_len"] == 0), "pure")  # no NaN: ok_rows
            else:
                t = self.frame(model)
                has = ((t["stage"] == PREFILL) & (t["context_len"] > 0) & _no_decodes(t)).any()
                g = self._grid(model, PREFILL, ["num_tokens", "context_len"], _no_decodes, "ctx") if has else None
            self._ar_grids[(model, which)] = g
        return g

    def _prefill_grid(self, model: str) -> Grid:
        g = self._pre.get(model)
        if g is None:
            g = self._pre[model] = self._ar_grid(model, PREFILL)
        return g

    def _decode_grid(self, model: str) -> Grid:
        g = self._dec.get(model)
        if g is None:
            g = self._dec[model] = self._ar_grid(model, DECODE)
        return g

    def prefill(self, model: str, tokens: float) -> float:
        return self._lookup1(self._prefill_grid(model), tokens)

    def decode(self, model: str, batch: float, context: float) -> float:
        return self._lookup2(self._decode_grid(model), batch, context)

    def _decode_col(self, g: Grid, batch: int) -> _DecodeCol:
        """The decode grid interpolated along the batch axis at `batch` (cached per batch)."""
        if g.cols_mode is not self.mode:     # (columns depend on the range policy)
            g.cols = {}
            g.cols_mode = self.mode
        col = g.cols.get(batch)
        if col is None:
            b_axis, v = g.axes[0], g.values
            i, w = _axis_pos(b_axis, batch)
            inside = -1e-9 <= w <= 1 + 1e-9
            if len(b_axis) > 1:
                if self.mode is OutOfRange.clamp:
                    w = min(max(w, 0.0), 1.0)
                arr = (1 - w) * v[i] + w * v[i + 1]
            else:
                arr = v[0]
            n0 = len(b_axis)
            col = _DecodeCol(arr, arr.tolist(), inside, i, i + 1 if i + 1 < n0 else n0 - 1)
            g.cols[batch] = col
        return col

    def _end_lookups(self, g: Grid, col: _DecodeCol, batch: int, ctx0: float, k: int,
                     start_lookups: int) -> None:
        """The range policy and counting of a series: lookups of its two end points, skipped
        when they could neither raise nor count (all k contexts in one grid cell, batch inside
        the grid, no hole among the cell's corners). start_lookups: lookups of the start point
        then (a caller that skipped its own lookup there passes 2, keeping its counts)."""
        c = g.axes[1]
        if len(c) > 1:
            j = self._one_cell(c, ctx0, ctx0 + (k - 1))
            if j is not None and col.inside and not self._cell_has_hole(g, col, j):
                return
        for _ in range(start_lookups):
            self._lookup2(g, batch, ctx0)
        self._lookup2(g, batch, ctx0 + k - 1)

    def decode_run(self, model: str, batch: int, ctx0: float, k: int, start_lookups: int = 1,
                   overhead: float = 0.0, host: float | None = None) -> "DecodeSteps":
        """k decode steps of `batch` sequences whose contexts start at ctx0 (and grow by one a
        step): step i takes decode(batch, ctx0 + i) (the bilinear rule, >= 1e-6 s), plus
        `overhead`, then max(t - host, host) when `host` is not None. The steps' end offsets, in
        closed form (DecodeSteps). start_lookups: see _end_lookups."""
        g = self._decode_grid(model)
        col = self._decode_col(g, batch)
        self._end_lookups(g, col, batch, ctx0, k, start_lookups)
        starts, alpha, beta = self._pieces(g, col, ctx0, k)
        _floor(starts, alpha, beta, k, 1e-6)
        if overhead:
            for p in range(len(alpha)):
                alpha[p] += overhead
        if host is not None:
            for p in range(len(alpha)):
                alpha[p] -= host
            _floor(starts, alpha, beta, k, host)
        return DecodeSteps(k, starts, alpha, beta)

    def decode_steps(self, model: str, batch: int, ctx0: float, k: int,
                     start_lookups: int = 1) -> list[float]:
        """decode(batch, ctx0 + i) for i < k: the step times of k decode steps (decode_run's)."""
        return self.decode_run(model, batch, ctx0, k, start_lookups).durations(k)

    def _pieces(self, g: Grid, col: _DecodeCol, ctx0: float, k: int
                ) -> tuple[list[int], list[float], list[float]]:
        """The k step values decode(batch, ctx0 + i), i < k, as linear pieces: piece p covers the
        steps from starts[p] to the next start, step starts[p] + m taking alpha[p] + beta[p] * m.
        A piece is one context cell (the one bisection picks, within the axis), or the constant
        edge value where out_of_range=clamp holds the context at the axis's end."""
        c, vals = g.axes[1], col.vals
        last = len(c) - 2
        if last < 0:                        # one context point: a constant column
            return [0], [vals[0]], [0.0]
        clamp = self.mode is OutOfRange.clamp
        starts: list[int] = []
        alpha: list[float] = []
        beta: list[float] = []
        i = 0
        while i < k:
            x = ctx0 + i
            if clamp and x < c[0]:          # held at the axis's first point
                e = min(k, max(i + 1, math.ceil(c[0] - ctx0)))
                a, b = vals[0], 0.0
            elif clamp and x > c[-1]:       # held at its last point
                e = k
                a, b = vals[-1], 0.0
            else:
                j = _right_of(c, x) - 1
                j = 0 if j < 0 else last if j > last else j
                if j < last:                # steps up to the next grid point
                    e = min(k, max(i + 1, math.ceil(c[j + 1] - ctx0)))
                elif clamp:                 # the last cell: up to the axis's end
                    e = min(k, max(i + 1, math.floor(c[-1] - ctx0) + 1))
                else:
                    e = k
                b = (vals[j + 1] - vals[j]) / (c[j + 1] - c[j])
                a = vals[j] + b * (x - c[j])
            starts.append(i)
            alpha.append(a)
            beta.append(b)
            i = e
        return starts, alpha, beta

    @staticmethod
    def _cell_has_hole(g: Grid, col: _DecodeCol, j: int) -> bool:
        f0, f1 = g.fl[col.i], g.fl[col.i1]
        return f0[j] or f0[j + 1] or f1[j] or f1[j + 1]

    @staticmethod
    def _one_cell(axis: list[float], lo: float, hi: float) -> int | None:
        """Index of the grid cell holding all of [lo, hi] inside the axis, else None."""
        if lo < axis[0] or hi > axis[-1]:
            return None
        j = _right_of(axis, lo) - 1
        if j > len(axis) - 2:
            j = len(axis) - 2
        return j if hi <= axis[j + 1] and (hi < axis[j + 1] or j == len(axis) - 2) else None

    def ar_step(self, model: str, prefill_tokens: int, decode_seqs: int, decode_ctx: float,
                prefill_ctx: float = 0.0, prefill_sq: float = -1.0) -> float:
        """One engine step: linear (token) cost of every scheduled token, plus the attention
        cost of decode contexts and of prefill chunks that attend to earlier chunks; a decode
        sequence that rides along with a prefill chunk costs `mixed_per_seq` more.

        prefill_sq = the sum of the squared chunk lengths of the step's prefill chunks (one per
        request): a chunk's tokens attend to each other, not to other requests' chunks, so the
        step's self-attention is that of its chunks, not of one sequence of all its tokens as
        the table's single-prompt rows measured (`prefill_attention`). -1: one chunk."""
        if prefill_tokens == 0:
            return self.decode(model, decode_seqs, decode_ctx)
        n = prefill_tokens + decode_seqs
        t = self.prefill(model, n)
        if prefill_sq >= 0.0:
            c, xs, ss = self._attn.get(model) or self.prefill_attention(model)
            if c > 0.0:
                t -= c * (_interp_sq(xs, ss, n) - prefill_sq - decode_seqs)
        if decode_seqs:
            t += max(0.0, self.decode(model, decode_seqs, decode_ctx) - self.decode(model, decode_seqs, self._min_ctx(model)))
            t += self.mixed_per_seq(model) * decode_seqs
        if prefill_ctx > 0:
            t += self.prefill_context_cost(model, prefill_tokens, prefill_ctx)
        return t

    def _min_ctx(self, model: str) -> float:
        return self._decode_grid(model).axes[1][0]

    def prefill_context_cost(self, model: str, tokens: int, ctx: float) -> float:
        """Extra time of a chunk whose sequence already holds ctx cached tokens (from rows with
        context_len > 0; zero if the table has none)."""
        g = self._ar_grid(model, "prefill_ctx")
        if g is None:
            return 0.0
        saved, self.mode = self.mode, OutOfRange.clamp if self.mode is OutOfRange.error else self.mode
        try:
            with_ctx = self._lookup2(g, tokens, ctx)
        finally:
            self.mode = saved
        return max(0.0, with_ctx - self.prefill(model, tokens))

    def _mixed_composed(self, model: str, n: int, d: int, extra: Any) -> float:
        """The composition rule without the mixed term, for a measured mixed-step row (one
        prompt chunk of n tokens beside d decodes; `extra`: the row's extra)."""
        ctx = _mixed_decode_context(extra) or self._min_ctx(model)
        t = self.prefill(model, n + d)
        c, xs, ss = self._attn.get(model) or self.prefill_attention(model)
        if c > 0.0:
            t -= c * (_interp_sq(xs, ss, n + d) - n * n - d)
        return t + max(0.0, self.decode(model, d, ctx) - self.decode(model, d, self._min_ctx(model)))

    def prefill_attention(self, model: str) -> tuple[float, list[float], list[float]]:
        """(c, xs, ss): seconds per token pair of a prefill's self-attention, and the sum of
        squared sequence lengths the pure-prefill grid's points (xs tokens) were measured with
        (ss; a row of B prompts of N/B tokens holds N^2/B).

        c is the least-squares fit of the table's own prefill rows: pure rows as
        t = a + b N + c S (S = N^2 / B: causal self-attention grows with the square of each
        sequence, the rest with the tokens), rows of a chunk after `context_len` cached tokens as
        t = a + b N + c (N^2 + 2 N ctx) (each token also attends to the whole context), with c
        clamped at >= 0. qwen2_5_7b H100: c = 3.2e-10 s, i.e. 21 ms of a single 8,192-token
        prompt's 198 ms; its context rows alone give 2c within 2-4% at 8,192 tokens. Used to move
        a step from the grid's single-prompt attention to that of its actual chunks."""
        if model in self._attn:
            return self._attn[model]
        t = self.frame(model)
        pf = t.select(t["stage"] == PREFILL)
        dec = _no_decodes(pf)
        ctxc = pf["context_len"]             # a prefill row's empty cell reads as 0 (ok_rows)
        pure = pf.select(dec & (ctxc == 0))
        with_ctx = pf.select(dec & (ctxc > 0))
        n_pure = pure["num_tokens"]
        sq_pure = n_pure.astype(float) ** 2 / np.clip(pure["batch_size"], 1, None)
        keys, meds = group_medians([n_pure], sq_pure)
        xs = [float(x) for x in keys[0].tolist()]
        ss = [float(v) for v in meds.tolist()]
        rows = [(1.0, float(n), float(s), ms / 1e3) for n, s, ms in
                zip(n_pure.tolist(), sq_pure.tolist(), pure["latency_ms_median"].tolist()) if n >= 256]
        rows += [(1.0, float(n), float(n) ** 2 + 2.0 * n * c, ms / 1e3) for n, c, ms in
                 zip(with_ctx["num_tokens"].tolist(), with_ctx["context_len"].tolist(),
                     with_ctx["latency_ms_median"].tolist())]
        c = 0.0
        if len(rows) >= 4:
            a = np.array(rows)
            coef = np.linalg.lstsq(a[:, :3], a[:, 3], rcond=None)[0]
            c = max(float(coef[2]), 0.0)
        self._attn[model] = (c, xs, ss)
        return self._attn[model]

    def mixed_per_seq(self, model: str) -> float:
        """Extra seconds per decode sequence in a mixed prefill+decode step: the least-squares
        slope through the origin of (measured - composed) against the decode count over the
        table's measured mixed steps (0 when the table has none).

        Why additive per sequence, not a factor on the whole step: the residual does not scale
        with the chunk (qwen2_5_7b, 16 decodes: +0.9 / +2.1 / -0.7 ms at 256 / 1,024 / 4,096
        tokens; 64 decodes: +3.2 / +2.6 / +3.1 ms), and a factor (median ratio 1.08) made an
        8,192-token chunk ~15 ms too long against the steps `vllm serve` logged."""
        if model not in self._mixed_per_seq:
            t = self.frame(model)
            mixed = t.select((t["stage"] == PREFILL) & (t["num_decode_seqs"] > 0))   # (NaN: not > 0)
            sxy = sxx = 0.0
            for ms, n, dn, extra in zip(mixed["latency_ms_median"].tolist(), mixed["num_tokens"].tolist(),
                                        mixed["num_decode_seqs"].tolist(), mixed["extra"].tolist()):
                try:
                    resid = ms / 1e3 - self._mixed_composed(model, int(n), int(dn), extra)
                except (OutOfGridError, MissingProfileError):
                    continue
                d = float(dn)
                sxy += resid * d
                sxx += d * d
            self._mixed_per_seq[model] = sxy / sxx if sxx else 0.0
        return self._mixed_per_seq[model]

    # --- encoders, DiT, VAE -----------------------------------------------------------------
    def vision_encode(self, model: str, image_tokens: float) -> float:
        """Vision encoder time for a set of images holding image_tokens LLM tokens in all."""
        g = self._vis.get(model)
        if g is None:
            g = self._vis[model] = self._vision_grid(model)
        return self._lookup1(g, image_tokens)

    def _vision_grid(self, model: str) -> Grid:
        t = self.frame(model)
        key = (model, VISION_ENCODE, ("total",), "")
        g = self._grids.get(key)
        if g is None:
            d = t.select(t["stage"] == VISION_ENCODE)
            d = d.with_column("total", d["num_tokens"] * d["batch_size"])
            g = Grid.from_table(f"{model}/{VISION_ENCODE}", d, ["total"])
            self._grids[key] = g
        return g

    def text_encode(self, model: str, component: str, batch: float, tokens: float) -> float:
        by = self._te.get(model)
        if by is None:
            by = self._te[model] = {}
        g = by.get(component)
        if g is None:
            g = by[component] = self._grid(model, TEXT_ENCODE, ["batch_size", "num_tokens"],
                                           lambda d: d["component"] == component, component)
        return self._lookup2(g, batch, tokens)

    def dit_step(self, model: str, batch: float, seq_len: float) -> float:
        g = self._dit.get(model)
        if g is None:
            g = self._dit[model] = self._grid(model, DIT_STEP, ["batch_size", "seq_len"])
        return self._lookup2(g, batch, seq_len)

    def dit_step_joint(self, model: str, batch: float, seq_len: float, text_tokens: float) -> float:
        """One transformer forward at `batch` over seq_len image and text_tokens text tokens.
        An MMDiT's blocks run both streams through projections of one width and one joint
        attention, so its cost follows the joint length: every dit_step row is placed at
        seq_len + num_tokens - T0 (T0: the table's most common text length, so rows at T0 keep
        their seq_len) on a (batch, joint length) grid, read at seq_len + text_tokens - T0.
        A batch size not measured at some joint length is interpolated along that batch's own
        measured lengths (not a hole); beyond them it is extrapolated and counted as a hole hit.
        (Qwen-Image, diffusers H100 table: from the 64-token rows alone this rule puts the step
        at 4,096 image + 1,024 text tokens at 252 ms; measured 243 ms, +3.7%; tests/
        test_omni_engine.py holds it to that.)"""
        e = self._dit_joint.get(model)
        if e is None:
            e = self._dit_joint[model] = self._joint_grid(model)
        return self._lookup2(e[0], batch, seq_len + text_tokens - e[1])

    def _joint_grid(self, model: str) -> tuple[Grid, float]:
        t = self.frame(model)
        d = t.select((t["stage"] == DIT_STEP) & ~np.isnan(t["num_tokens"]))
        if not len(d):
            raise MissingProfileError(f"profile table of model={model!r} has no dit_step rows "
                                      "with num_tokens (the text length)")
        texts, counts = np.unique(d["num_tokens"], return_counts=True)
        t0 = float(texts[np.argmax(counts)])        # the most common length (the least of ties)
        d = d.with_column("joint", d["seq_len"] + d["num_tokens"] - t0)
        (b_axis, j_axis), vals = median_grid(d, ["batch_size", "joint"])
        filled = np.zeros(vals.shape, dtype=bool)
        ja = np.asarray(j_axis)
        for i in range(len(b_axis)):
            ok = np.nonzero(~np.isnan(vals[i]))[0]
            if len(ok) < 2:
                continue
            lo, hi = ja[ok[0]], ja[ok[-1]]
            for k in np.nonzero(np.isnan(vals[i]))[0]:
                x = ja[k]
                if lo <= x <= hi:
                    vals[i, k] = np.interp(x, ja[ok], vals[i, ok])
                else:                       # beyond this batch's lengths: the end segment's slope
                    a, c = (ok[0], ok[1]) if x < lo else (ok[-2], ok[-1])
                    vals[i, k] = vals[i, a] + (vals[i, c] - vals[i, a]) * (x - ja[a]) / (ja[c] - ja[a])
                    filled[i, k] = True
        holes = np.isnan(vals)
        if holes.any():                     # rows with fewer than two lengths: along the batch
            vals = _fill_holes(vals, [b_axis, j_axis])
            filled |= holes
        return Grid(f"{model}/{DIT_STEP}/joint", [b_axis, j_axis], vals, filled), t0

    def dit_step_text(self, model: str, seq_len: float, text_tokens: float) -> float:
        """One transformer forward at batch 1 over seq_len image and text_tokens text tokens,
        read on the (seq_len, num_tokens) grid of the table's batch-1 dit_step rows: for a table
        whose rows span both axes (profiler.omni_table's vLLM-Omni fits, where a text token costs
        less than an image token), unlike dit_step_joint's single joint-length axis."""
        g = self._dit_text.get(model)
        if g is None:
            g = self._dit_text[model] = self._grid(model, DIT_STEP, ["seq_len", "num_tokens"],
                                                   lambda d: d["batch_size"] == 1, "text")
        return self._lookup2(g, seq_len, text_tokens)

    def vae(self, model: str, stage: str, batch: float, height: float, width: float) -> float:
        by = self._vae.get(model)
        if by is None:
            by = self._vae[model] = {}
        g = by.get(stage)
        if g is None:
            g = by[stage] = self._vae_grid(model, stage)
        return self._lookup2(g, batch, height * width)

    def _vae_grid(self, model: str, stage: str) -> Grid:
        key = (model, stage, ("batch_size", "pixels"), "")
        g = self._grids.get(key)
        if g is None:
            t = self.frame(model)
            d = t.select(t["stage"] == stage)
            if not len(d):
                raise MissingProfileError(f"profile table of model={model!r} has no rows for stage={stage!r}")
            d = d.with_column("pixels", d["height"] * d["width"])
            g = Grid.from_table(f"{model}/{stage}", d, ["batch_size", "pixels"])
            self._grids[key] = g
        return g

    def host_per_seq(self, model: str) -> float:
        """Host seconds per scheduled sequence in a synchronously timed step: the least-squares
        slope of decode(B, shortest context) over B <= 64, where the GPU time is flat (weight
        bound), so the growth is host work (sampling, output processing, input prep).
        0 for tables not timed synchronously or not measured with vLLM."""
        st = self.engine_settings(model)
        if st.get("async_scheduling", True) or self.engines(model) != ["vllm"]:
            return 0.0
        g = self._decode_grid(model)         # the filled cells are excluded below
        b = np.asarray(g.axes[0])
        sel = (b <= 64) & ~g.filled[:, 0]
        if sel.sum() < 2:
            return 0.0
        slope = np.polyfit(b[sel], g.values[sel, 0], 1)[0]
        return max(0.0, float(slope))

    def report(self) -> dict:
        return {"out_of_grid_lookups": dict(self.outside), "oom_hole_lookups": dict(self.hole_hits),
                "out_of_range_policy": self.mode.value,
                "engines": {m: self.engines(m) for m in self._frames},
                "tables": self.tables(), "not_measured": self.not_measured()}


def _floor(starts: list[int], alpha: list[float], beta: list[float], k: int, low: float) -> None:
    """max(value, low) on linear pieces (see LatencyModel._pieces), in place: a piece that
    crosses `low` is split where it does, its part below held at `low`."""
    p = 0
    while p < len(starts):
        a, b = alpha[p], beta[p]
        n = (starts[p + 1] if p + 1 < len(starts) else k) - starts[p]
        z = a + b * (n - 1)                  # its last step's value
        if a >= low and z >= low:
            p += 1
            continue
        if (a < low and z < low) or b == 0.0:
            alpha[p], beta[p] = low, 0.0
            p += 1
            continue
        if b > 0.0:                          # below `low` up to step m, above from m on
            m = min(n - 1, max(1, math.ceil((low - a) / b)))
            starts.insert(p + 1, starts[p] + m)
            alpha.insert(p + 1, a + b * m)
            beta.insert(p + 1, b)
            alpha[p], beta[p] = low, 0.0
        else:                                # above up to step m, below from m on
            m = min(n - 1, max(1, math.floor((low - a) / b) + 1))
            starts.insert(p + 1, starts[p] + m)
            alpha.insert(p + 1, low)
            beta.insert(p + 1, 0.0)
        p += 2


class DecodeSteps(Steps):
    """The end offsets of a decode jump's k steps (LatencyModel.decode_run) in closed form: step
    starts[p] + m takes alpha[p] + beta[p] * m seconds (p: its linear piece), so the end of step
    i is base[p] + n * alpha[p] + beta[p] * n (n - 1) / 2 with n = i - starts[p] + 1. Reads as
    the list of ends (items, slices, len); bisection solves the series' quadratic. It equals the
    running sum of the per-step values to rounding (~1e-15 relative; tests/test_latency.py)."""
    __slots__ = ("k", "starts", "alpha", "beta", "base", "dmin")

    def __init__(self, k: int, starts: list[int], alpha: list[float], beta: list[float]):
        self.k = k
        self.starts = starts
        self.alpha = alpha
        self.beta = beta
        base = [0.0]                         # the end offset before each piece
        dmin = math.inf                      # the shortest step (a piece's first or last)
        for p in range(len(starts)):
            n = (starts[p + 1] if p + 1 < len(starts) else k) - starts[p]
            if p + 1 < len(starts):
                base.append(base[p] + n * alpha[p] + beta[p] * (n * (n - 1) // 2))
            dmin = min(dmin, alpha[p], alpha[p] + beta[p] * (n - 1))
        self.base = base
        self.dmin = dmin

    def __len__(self) -> int:
        return self.k

    def _piece(self, i: int) -> int:
        return 0 if len(self.starts) == 1 else bisect_right(self.starts, i) - 1

    def end(self, i: int) -> float:
        """The end offset of step i (0 <= i < k)."""
        p = self._piece(i)
        n = i - self.starts[p] + 1
        return self.base[p] + n * self.alpha[p] + self.beta[p] * (n * (n - 1) // 2)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.end(j) for j in range(*i.indices(self.k))]
        if i < 0:
            i += self.k
        if not 0 <= i < self.k:
            raise IndexError(i)
        return self.end(i)

    def durations(self, k: int) -> list[float]:
        """The times of the first k steps."""
        out: list[float] = []
        starts, alpha, beta = self.starts, self.alpha, self.beta
        for p in range(len(starts)):
            e = starts[p + 1] if p + 1 < len(starts) else self.k
            a, b = alpha[p], beta[p]
            for m in range(min(e, k) - starts[p]):
                out.append(a + b * m)
        return out

    def pieces(self, k: int) -> list[tuple[float, float, int]]:
        """(alpha, beta, steps) of the pieces of the first k steps."""
        starts, out = self.starts, []
        for p in range(len(starts)):
            if starts[p] >= k:
                break
            e = starts[p + 1] if p + 1 < len(starts) else self.k
            out.append((self.alpha[p], self.beta[p], min(e, k) - starts[p]))
        return out

    def bisect_left(self, x: float) -> int:
        return self._search(x, False)

    def bisect_right(self, x: float) -> int:
        return self._search(x, True)

    def _search(self, x: float, right: bool) -> int:
        """The first step whose end is >= x (> x when right); k when none is."""
        base, starts, k = self.base, self.starts, self.k
        if len(base) == 1:                   # one piece (base[0] = 0.0): no bisection
            p = 0 if (x >= base[0] if right else x > base[0]) else -1
        else:
            p = (_right_of(base, x) if right else _left_of(base, x)) - 1   # the piece holding it
        if p < 0:
            return 0
        s = starts[p]
        e = starts[p + 1] if p + 1 < len(starts) else k
        bp, a, b = base[p], self.alpha[p], self.beta[p]
        c = bp - x
        # smallest n >= 1 with c + n a + b n (n - 1) / 2 >= 0 (a root of the quadratic, refined
        # below on the exact ends: end(i) of this piece, m = i - s + 1, as end() computes it)
        q = a - 0.5 * b
        d = q * q - 2.0 * b * c
        den = q + math.sqrt(d if d > 0.0 else 0.0)
        n = math.ceil(-2.0 * c / den) if den > 0.0 else e - s
        i = s + min(max(n, 1), e - s) - 1
        while i > s:
            m = i - s                        # end(i - 1)
            v = bp + m * a + b * (m * (m - 1) // 2)
            if not (v > x if right else v >= x):
                break
            i -= 1
        while i < e:
            m = i - s + 1                    # end(i)
            v = bp + m * a + b * (m * (m - 1) // 2)
            if not (v <= x if right else v < x):
                break
            i += 1
        return i
