"""Trace replay: recorded arrivals and lengths into the same `Request` stream as synthetic loads.

Formats: CSV / JSONL / parquet tables (one row per request, common column aliases accepted) and
the result JSON of `vllm bench serve --save-detailed` (vLLM 0.26.0). The replay of a real vLLM
run is how the simulator is validated against the engine (traces/validation/README.md), so the
vLLM loader keeps exactly what vLLM recorded: per-request send times and lengths.

What vLLM 0.26.0 writes (`vllm/benchmarks/serve.py`, `benchmark()` result dict, kept in the
saved JSON only with `--save-detailed`): `input_lens`, `output_lens` (actual lengths; 0 for a
failed request), `ttfts`, `itls` (lists of inter-token gaps), `start_times`, `generated_texts`,
`errors` ("" when the request succeeded). `start_times` are `time.perf_counter()` values taken
when each request was sent (`lib/endpoint_request_func.py`), i.e. an arbitrary clock origin, so
they are shifted to start at 0. Lists are in request (send) order. Top-level keys also include
`request_rate` (a number or "inf"), `burstiness`, `num_prompts`, `duration`, `completed`,
`failed`, `max_concurrency`. Failed requests are dropped: vLLM leaves them out of its metrics too.
Older result files without `start_times` get arrivals regenerated with vLLM's own law
(`gamma_arrivals(..., vllm_scaling=True)` from `request_rate`/`burstiness`; same law, not the
same draws) and a warning.

Every format is read into a `TraceTable` (columns as numpy arrays); pandas is imported only for
what needs it: a CSV file (its parser) and arrival times written as dates (its date parser).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from profiler.jsonfiles import read_text
from profiler.models import TASKS, ModelSpec
from sim.config import ConfigError, WorkloadConfig
from sim.core.records import Request
from sim.names import GENERATE, IMAGE_IN_TASKS, OUTPAINT, TEXT_OUT_TASKS
from sim.rng import stream
from sim.workloads.laws import DEFAULT_CHUNK, gamma_arrivals, outpaint_size
from sim.workloads.requests import TokenCache, build_requests, check_task_model, resolve_model

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

# canonical column -> accepted names (first match wins)
ALIASES: dict[str, tuple[str, ...]] = {
    "arrival": ("arrival_time", "timestamp", "start_time", "arrival"),
    "task": ("task",),
    "model": ("model",),
    "prompt_tokens": ("prompt_tokens", "input_len", "input_tokens", "prompt_len"),
    "output_tokens": ("output_tokens", "output_len", "max_tokens"),
    "image_height": ("image_height",),
    "images": ("images",),          # all input images of a row: [[h, w], ...] (overrides height/width)
    "image_width": ("image_width",),
    # several input images: their count (all of image_height x image_width), or their sizes
    # "HxW;HxW;..." (overrides both); and their identities "id;id;..." (equal ids = the same
    # picture: feature and prefix caches can hit)
    "num_images": ("num_images", "numimages"),
    "image_sizes": ("image_sizes",),
    "image_ids": ("image_ids", "image_id"),
    "output_height": ("output_height",),
    "output_width": ("output_width",),
    "steps": ("steps",),
    "cfg": ("cfg",),
    "slo_class": ("slo_class",),
}
EPOCH_THRESHOLD_S = 1e8     # times above ~3 years are absolute clocks: shift so the first is 0
FORMAT_BY_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                    ".pq": "parquet", ".json": "vllm_json"}


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = Path(path).name.lower()
    suf = ".json" if name.endswith(".json.gz") else Path(name).suffix
    if suf not in FORMAT_BY_SUFFIX:
        raise ConfigError(f"workload.trace.format=auto cannot tell the format of {str(path)!r}; "
                          f"allowed: a file ending in {sorted(FORMAT_BY_SUFFIX)} (.json also as .json.gz) or an explicit "
                          f"format (csv, jsonl, parquet, vllm_json)")
    return FORMAT_BY_SUFFIX[suf]


def _missing(path: Any, name: str) -> ConfigError:
    return ConfigError(f"trace {str(path)!r}: required field {name!r} is missing; accepted "
                       f"column names: {list(ALIASES[name])}")


# canonical numeric column -> (least value, whole number, what is allowed); checked on every row
NUMERIC: dict[str, tuple[float, bool, str]] = {
    "prompt_tokens": (0, True, "a whole number of tokens >= 0"),
    "output_tokens": (0, True, "a whole number of tokens >= 0"),
    "image_height": (1, True, "a whole number of pixels >= 1"),
    "image_width": (1, True, "a whole number of pixels >= 1"),
    "output_height": (1, True, "a whole number of pixels >= 1"),
    "output_width": (1, True, "a whole number of pixels >= 1"),
    "steps": (0, True, "a whole number of denoising steps (>= 1 for image outputs; 0 or empty "
                       "for text outputs)"),
    "num_images": (0, True, "a whole number of input images (>= 1 for an image-input task)"),
}
TRUE_WORDS = ("1", "true", "yes", "y", "t")
FALSE_WORDS = ("0", "false", "no", "n", "f")
ROW_COL = "_row"        # the request's row in the file, 1-based (kept through the sort)


class TraceTable:
    """Columns of a trace, all of one length (`len(table)`), each a numpy array: numbers as a
    numeric array, anything else (text, lists, mixed cells) as an object array in which None is
    a missing cell. A reader's table keeps the file's column names; `normalise_table`'s has the
    canonical ones (the ALIASES keys the file has, `_row`, `measured_*`), checked, in arrival
    order. `rows` says how the file numbers its requests in messages ("csv": data row and line,
    "jsonl": line, "row": row from 1); `max_concurrency` is a bench result's client limit (None:
    open loop). Sequences that are not arrays become columns as `column` makes them."""

    def __init__(self, columns: Mapping[str, Any], rows: str = "row",
                 max_concurrency: Optional[int] = None) -> None:
        self.data: dict[str, np.ndarray] = {
            str(k): v if isinstance(v, np.ndarray) else column(list(v)) for k, v in columns.items()}
        self.rows = rows
        self.max_concurrency = max_concurrency

    def __len__(self) -> int:
        return len(next(iter(self.data.values()), ()))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    def __contains__(self, name: object) -> bool:
        return name in self.data

    @property
    def columns(self) -> list[str]:
        return list(self.data)

    def take(self, rows: np.ndarray) -> TraceTable:
        """The rows selected by an index array or a boolean mask, in its order."""
        return TraceTable({k: v[rows] for k, v in self.data.items()}, self.rows, self.max_concurrency)

    def to_pandas(self) -> pd.DataFrame:
        """The table as a DataFrame (max_concurrency in its attrs), for analysis."""
        import pandas as pd
        df = pd.DataFrame(self.data, index=range(len(self)))
        if self.max_concurrency is not None:
            df.attrs["max_concurrency"] = self.max_concurrency
        return df


def column(values: Sequence[Any]) -> np.ndarray:
    """A column of Python values (JSON's, a parquet column's): numbers only (no bools) as int64
    when all are ints and none is missing (None), else as float64 with NaN for a missing cell;
    any other cells as an object array, element by element (a list stays one cell)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if len(present) == len(values) and all(isinstance(v, int) for v in present):
            try:
                return np.array(values, dtype=np.int64)
            except OverflowError:       # beyond int64: kept as Python ints
                pass
        else:
            return np.array([math.nan if v is None else v for v in values], dtype=float)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def where(path: Any, table: TraceTable, i: int) -> str:
    """'trace <path>: row R (line L)' of row i of a normalised table, as the file numbers it."""
    r = int(table[ROW_COL][i]) if ROW_COL in table else i + 1
    if table.rows == "csv":
        return f"trace {str(path)!r}: row {r} (line {r + 1})"
    return f"trace {str(path)!r}: {'line' if table.rows == 'jsonl' else 'row'} {r}"


def _bad_cell(path: Any, table: TraceTable, i: int, canon: str, src: str, value: Any,
              allowed: str) -> ConfigError:
    col = f"field {canon!r}" + (f" (column {src!r})" if src != canon else "")
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:                   # a missing cell reads nan, in every format
        value = math.nan
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return ConfigError(f"{where(path, table, i)}, {col}: {value!r} is invalid; allowed: {allowed}")


# text that is a number, as pandas.to_numeric reads text: decimal notation with surrounding white
# space, or inf / infinity (any case, a sign, no white space); other text ("nan" too) is none
_NUMBER_TEXT = re.compile(r"[ \t\n\r\f\v]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t\n\r\f\v]*"
                          r"|[+-]?inf(?:inity)?", re.IGNORECASE)


def _number(x: Any) -> float:
    """A cell as a number: numbers and bools (True is 1) as they are, number text (_NUMBER_TEXT)
    parsed; NaN for anything else (missing, blank, other text, lists)."""
    if isinstance(x, (int, float, np.integer, np.floating, np.bool_)):
        return float(x)
    if isinstance(x, str) and _NUMBER_TEXT.fullmatch(x):
        return float(x)
    return math.nan


def _numbers(col: np.ndarray) -> np.ndarray:
    """Every cell of a column as a number (float64, NaN where a cell is none; see _number)."""
    if col.dtype.kind in "biuf":
        return col.astype(float)
    return np.array([_number(x) for x in col.tolist()], dtype=float)


def _absent(col: np.ndarray) -> np.ndarray:
    """Which cells hold nothing: None or NaN (blank text is a value)."""
    if col.dtype.kind == "f":
        return np.isnan(col)
    if col.dtype.kind in "biu":
        return np.zeros(len(col), dtype=bool)
    return np.array([x is None or (isinstance(x, float) and math.isnan(x)) for x in col.tolist()], dtype=bool)


def _blank(col: np.ndarray) -> np.ndarray:
    """Which cells are empty (_val): nothing, or text of white space only."""
    if col.dtype.kind in "biuf":
        return _absent(col)
    return np.array([_val(x) is None for x in col.tolist()], dtype=bool)


def _to_seconds(col: np.ndarray, path: Any, table: TraceTable, src: str) -> np.ndarray:
    """Numbers stay numbers; datetimes / ISO strings become epoch seconds. A cell that is
    neither, empty or not finite stops the run with its row."""
    if col.dtype.kind == "M":       # a date-and-time column (parquet): UTC
        t = (col - np.datetime64(0, "s")) / np.timedelta64(1, "s")
    else:
        t = _numbers(col)
        if np.count_nonzero(~np.isnan(t)) < np.count_nonzero(~_absent(col)):    # times as text?
            import pandas as pd     # pandas reads dates and times in their many written forms
            ts = pd.to_datetime(pd.Series(col), utc=True, errors="coerce", format="mixed")
            if ts.notna().all():
                return (ts - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=float)
            bad = int(np.flatnonzero(ts.isna().to_numpy() & np.isnan(t))[0])
            raise _bad_cell(path, table, bad, "arrival", src, col[bad],
                            "seconds from the trace's start (>= 0), or a date and time")
    ok = np.isfinite(t)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise _bad_cell(path, table, bad, "arrival", src, col[bad],
                        "seconds from the trace's start (>= 0) on every row")
    return t


def _cfg_ok(x: Any) -> bool:
    """Whether a cfg cell is a yes/no: empty, a bool, the number 1 or 0, or a TRUE / FALSE word."""
    return (_val(x) is None or isinstance(x, (bool, np.bool_))
            or (isinstance(x, (int, float, np.integer, np.floating)) and x in (0, 1))
            or (isinstance(x, str) and x.strip().lower() in TRUE_WORDS + FALSE_WORDS))


def _check_cells(out: TraceTable, src: dict[str, str], path: Any) -> None:
    """Every numeric cell a number in range, every cfg cell a yes/no: else one ConfigError
    naming the file, the row and the field. Numeric columns become float64, NaN where empty."""
    for canon, (least, whole, allowed) in NUMERIC.items():
        if canon not in out:
            continue
        col = out[canon]
        blank = _blank(col)
        num = np.where(blank, np.nan, _numbers(col))
        bad = ~blank & ~(np.isfinite(num) & (num >= least) & ((num == np.floor(num)) if whole else True))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _bad_cell(path, out, i, canon, src[canon], col[i], allowed)
        out.data[canon] = num
    if "cfg" in out:
        col = out["cfg"]
        ok = np.array([_cfg_ok(x) for x in col.tolist()], dtype=bool)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise _bad_cell(path, out, i, "cfg", src["cfg"], col[i],
                            "true or false (also 1/0, yes/no), or empty for the model's default")


def normalise_table(raw: TraceTable, path: Any = "<table>", time_scale: float = 1.0) -> TraceTable:
    """Rename aliases to canonical columns, check every cell, make arrivals relative if they
    are epoch times, scale them, and sort by arrival (stable). Requires arrival and
    prompt_tokens. Keeps each request's row in the file (column `_row`) for messages."""
    names = {c.lower(): c for c in raw.columns}
    cols: dict[str, np.ndarray] = {}
    src: dict[str, str] = {}
    for canon, accepted in ALIASES.items():
        found = next((names[n] for n in accepted if n in names), None)
        if found is not None:
            cols[canon] = raw[found]
            src[canon] = found
    for req in ("arrival", "prompt_tokens"):
        if req not in cols:
            raise _missing(path, req)
    if not len(raw):
        raise ConfigError(f"trace {str(path)!r} has no request rows; allowed: one row per "
                          f"request under the header")
    cols[ROW_COL] = raw[ROW_COL] if ROW_COL in raw else np.arange(1, len(raw) + 1)
    out = TraceTable(cols, raw.rows, raw.max_concurrency)
    t = _to_seconds(out["arrival"], path, out, src["arrival"])
    if np.nanmin(t) > EPOCH_THRESHOLD_S:
        t = t - np.nanmin(t)
    if (t < 0).any():
        i = int(np.flatnonzero(t < 0)[0])
        raise _bad_cell(path, out, i, "arrival", src["arrival"], out["arrival"][i],
                        "seconds >= 0 from the trace's start (or epoch times, shifted to start at 0)")
    out.data["arrival"] = t * time_scale
    _check_cells(out, src, path)
    for c in raw.columns:   # vLLM's measurements ride along for validation
        if c.startswith("measured_"):
            out.data[c] = raw[c]
    return out.take(np.argsort(out["arrival"], kind="stable"))


def _read_json_obj(path: Path) -> dict[str, Any]:
    try:
        text = read_text(path)
    except (OSError, EOFError, UnicodeDecodeError) as e:      # e.g. a damaged .json.gz
        raise ConfigError(f"trace {str(path)!r} cannot be read ({_first_line(e)}); allowed: a "
                          f"`vllm bench serve` result .json (or .json.gz)") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:   # --append-result: one JSON object per line; take the last
        lines = [ln for ln in text.splitlines() if ln.strip()]
        try:
            obj = json.loads(lines[-1]) if len(lines) > 1 else None
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise ConfigError(f"trace {str(path)!r}: line {e.lineno} is not valid JSON ({e.msg}, column "
                              f"{e.colno}); allowed: a `vllm bench serve` result JSON") from None
        warnings.warn(f"{path}: several results appended; replaying the last one", stacklevel=3)
    if isinstance(obj, list):
        return {"__records__": obj}
    if not isinstance(obj, dict):
        raise ConfigError(f"trace {str(path)!r} holds a JSON {type(obj).__name__}; allowed: a "
                          f"`vllm bench serve` result (an object with input_lens, output_lens, ...)")
    return obj


def load_vllm_bench(path: str | Path, seed: int = 0) -> TraceTable:
    """A `vllm bench serve --save-detailed` result as a table: arrival (s from the first send),
    prompt_tokens, output_tokens, and what vLLM measured (measured_ttft_s, measured_e2el_s =
    ttft + sum(itl), as vLLM's own timeline plot computes it). Failed requests are dropped."""
    path = Path(path)
    obj = _read_json_obj(path)
    if "__records__" in obj:
        return _records_table(obj["__records__"])
    for key in ("input_lens", "output_lens"):
        if key not in obj:
            raise ConfigError(f"trace {str(path)!r}: required field {key!r} is missing; a "
                              f"`vllm bench serve --save-detailed` result has input_lens, "
                              f"output_lens, start_times, ttfts, itls, errors")
    n = len(obj["input_lens"])
    for key in ("output_lens", "start_times", "ttfts", "itls", "errors"):
        if obj.get(key) is not None and len(obj[key]) != n:
            raise ConfigError(f"trace {str(path)!r}: field {key!r} has {len(obj[key])} entries; "
                              f"allowed: one per request, as input_lens ({n})")
    starts = obj.get("start_times")
    conc = obj.get("max_concurrency")
    if starts:
        t = np.asarray(starts, dtype=float)
        t = t - t.min()
        if conc and int(conc) < n:
            t = _ready_times(obj, t, int(conc))
    else:
        rate = obj.get("request_rate")
        if rate is None:
            raise ConfigError(f"trace {str(path)!r}: required field 'start_times' is missing and "
                              f"there is no request_rate to regenerate them; save the result "
                              f"with --save-detailed from vLLM >= 0.26.0")
        warnings.warn(f"{path}: no start_times; regenerating arrivals with vLLM's Gamma law "
                      f"(request_rate={rate}, burstiness={obj.get('burstiness', 1.0)})", stacklevel=2)
        if rate == "inf" or float(rate) == math.inf:
            t = np.zeros(n)
        else:
            t = gamma_arrivals(n, float(rate), float(obj.get("burstiness", 1.0)),
                               stream(seed, "arrivals"), vllm_scaling=True)
    errors = obj.get("errors") or [""] * n
    ok = np.array([not e for e in errors], dtype=bool)
    ttft = np.asarray(obj.get("ttfts") or [np.nan] * n, dtype=float)
    itls = obj.get("itls") or [[] for _ in range(n)]
    e2el = ttft + np.array([sum(x) if x else 0.0 for x in itls])
    cols = {"arrival": t, "prompt_tokens": column(obj["input_lens"]),
            "output_tokens": column(obj["output_lens"]), "measured_ttft_s": ttft, "measured_e2el_s": e2el}
    if "images" in obj:
        _add_image_columns(cols, n, obj, path)
    dropped = int((~ok).sum())
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} failed requests (non-empty errors)", stacklevel=2)
    return TraceTable(cols, max_concurrency=int(conc) if conc else None).take(ok)


def _add_image_columns(cols: dict[str, np.ndarray], n: int, obj: dict[str, Any], path: Path) -> None:
    """An image + text result (profiler.chat_bench): per request `images` ([[h, w], ...], empty
    for text-only) and `image_tokens` (their tokens in the served model). A request with images
    becomes an `understand` request with those images and, as text prompt, the server's prompt
    tokens (`input_lens`, usage.prompt_tokens) minus its image tokens, so the replayed prefill
    (text + image tokens) is the served one; the others stay `text`."""
    images, itok = obj["images"], obj.get("image_tokens")
    if len(images) != n or itok is None or len(itok) != n:
        raise ConfigError(f"trace {str(path)!r}: field 'images' has {len(images)} rows and 'image_tokens' "
                          f"{None if itok is None else len(itok)}; allowed: one entry per request "
                          f"({n}) in both, as profiler.chat_bench writes them")
    pairs: list[tuple[tuple[int, int], ...]] = []
    for i, imgs in enumerate(images):
        try:
            pairs.append(tuple((int(h), int(w)) for h, w in imgs))
        except (TypeError, ValueError):
            raise ConfigError(f"trace {str(path)!r}: row {i} field 'images' is {imgs!r}; allowed: a list "
                              f"of [height, width] pairs of positive integers") from None
        if any(h < 1 or w < 1 for h, w in pairs[-1]):
            raise ConfigError(f"trace {str(path)!r}: row {i} field 'images' is {imgs!r}; allowed: "
                              f"positive heights and widths")
    text = np.asarray(cols["prompt_tokens"], dtype=np.int64) - np.asarray(itok, dtype=np.int64)
    has = np.array([bool(p) for p in pairs])
    cols["prompt_tokens"] = np.where(has, np.maximum(text, 1), cols["prompt_tokens"])
    cols["task"] = np.where(has, "understand", "text").astype(object)
    cols["images"] = column(pairs)
    cols["measured_image_tokens"] = np.asarray(itok, dtype=np.int64)


def _ready_times(obj: dict[str, Any], sent: np.ndarray, conc: int) -> np.ndarray:
    """When each request of a `--max-concurrency` run was ready to go, for a closed-loop replay.

    The recorded start times are send times, and past the first `conc` they wait for a slot,
    i.e. for the measured server. At `--request-rate inf` every request is ready as soon as the
    client has dispatched the first wave (vLLM's client creates all tasks at once; a FIFO
    semaphore holds them), so those get the last first-wave send time. At a finite rate the
    ready times were not saved; the send times are used, which can only delay a request."""
    order = np.argsort(sent, kind="stable")
    rate = obj.get("request_rate")
    if rate in (None, "inf") or float(rate) == math.inf:
        ready = sent.copy()
        ready[order[conc:]] = sent[order[conc - 1]]
        return ready
    warnings.warn("a finite-rate --max-concurrency result keeps no ready times; replaying its "
                  "send times, which include the measured server's waits for a slot", stacklevel=3)
    return sent


def load_trace(path: str | Path, fmt: str = "auto", time_scale: float = 1.0, seed: int = 0
               ) -> TraceTable:
    """Any supported trace as a table with canonical columns (see ALIASES), sorted by arrival,
    arrivals in seconds from the start (epoch clocks shifted) times `time_scale`."""
    if path is None:
        raise ConfigError("workload.trace.path=None is invalid; allowed: a path to a .csv, .jsonl, "
                          ".parquet or vllm bench .json trace")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"workload.trace.path={str(path)!r} is invalid; allowed: an existing file")
    f = detect_format(p, fmt)
    if f == "csv":
        raw = _read_csv(p)
    elif f == "jsonl":
        raw = _read_jsonl(p)
    elif f == "parquet":
        raw = _read_parquet(p)
    elif f == "vllm_json":
        raw = load_vllm_bench(p, seed)
    else:
        raise ConfigError(f"workload.trace.format={fmt!r} is invalid; allowed: auto, csv, jsonl, "
                          f"parquet, vllm_json")
    return normalise_table(raw, p, time_scale)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _read_csv(p: Path) -> TraceTable:
    import pandas as pd     # pandas' CSV parser: quoting, column types, empty cells
    try:
        df = pd.read_csv(p, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"trace {str(p)!r} is empty; allowed: a header line naming the columns "
                          f"and one row per request") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"trace {str(p)!r} is not a readable CSV ({_first_line(e)}); allowed: "
                          f"comma-separated values under one header line") from None
    df = df.dropna(how="all")                       # blank lines: no request
    cols = {str(c): df[c].to_numpy() for c in df.columns}
    cols[ROW_COL] = df.index.to_numpy() + 1         # data row r is the file's line r + 1
    return TraceTable(cols, rows="csv")


def _read_parquet(p: Path) -> TraceTable:
    import pyarrow.parquet as pq
    try:
        with pq.ParquetFile(p) as f:
            t = f.read()
    except Exception as e:          # pyarrow's errors have no common base
        raise ConfigError(f"trace {str(p)!r} cannot be read as parquet ({_first_line(e)}); "
                          f"allowed: a parquet table, one row per request") from None
    return TraceTable({name: _arrow_column(t.column(i)) for i, name in enumerate(t.column_names)})


def _arrow_column(col: pa.ChunkedArray) -> np.ndarray:
    """A parquet column as the other readers give columns: numbers as a numeric array of their
    width (integers as float64 where one is missing, NaN for it), timestamps as datetime64 (NaT
    where missing), anything else as `column` makes its Python values (None where missing).
    Numbers are read from the Arrow buffers: pyarrow's to_numpy imports pandas."""
    import pyarrow as pa
    kind = col.type
    if pa.types.is_decimal(kind):
        col, kind = col.cast(pa.float64()), pa.float64()
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        code = "f" if pa.types.is_floating(kind) else "u" if pa.types.is_unsigned_integer(kind) else "i"
        dtype, empty = np.dtype(f"{code}{kind.bit_width // 8}"), np.nan
    elif pa.types.is_timestamp(kind):
        dtype, empty = np.dtype(f"M8[{kind.unit}]"), np.datetime64("NaT")
    else:
        return column(col.to_pylist())
    a = col.combine_chunks()
    n, at = len(a), a.offset
    values = np.frombuffer(a.buffers()[1], dtype)[at:at + n] if n else np.empty(0, dtype)
    if not a.null_count:
        return values.copy()
    values = values.astype(float) if dtype.kind in "iu" else values.copy()
    valid = np.unpackbits(np.frombuffer(a.buffers()[0], np.uint8), bitorder="little")[at:at + n]
    values[valid == 0] = empty
    return values


def _read_jsonl(p: Path) -> TraceTable:
    """One JSON object per line (blank lines skipped); a line that is not one stops the run."""
    records, lines = [], []
    with open(p, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"trace {str(p)!r}: line {n} is not valid JSON ({e.msg}, column "
                                  f"{e.colno}); allowed: one JSON object per line") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"trace {str(p)!r}: line {n} is a JSON {type(obj).__name__}; "
                                  f"allowed: one JSON object per line") from None
            records.append(obj)
            lines.append(n)
    if not records:
        raise ConfigError(f"trace {str(p)!r} has no request lines; allowed: one JSON object "
                          f"per request per line")
    cols = _records_table(records).data
    cols[ROW_COL] = np.array(lines)
    return TraceTable(cols, rows="jsonl")


def _records_table(records: list[Any]) -> TraceTable:
    """JSON objects as rows: a column per key (in order of first appearance), None where an
    object lacks it; an item that is no object has no fields."""
    rows = [r if isinstance(r, dict) else {} for r in records]
    names = dict.fromkeys(k for r in rows for k in r)
    return TraceTable({k: column([r.get(k) for r in rows]) for k in names})


def _val(x: Any) -> Any:
    """None for missing cells (NaN / None / empty string)."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str) and not x.strip()):
        return None
    return x


def _bool(x: Any) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("1", "true", "yes", "y", "t")
    return bool(x)


class TraceWorkload:
    """Requests of a trace file, in arrival order; every row is validated up front. `len()` is
    the number of usable trace rows (workload.num_requests is ignored). A `RequestSource`
    (sim.workloads)."""

    def __init__(self, cfg: WorkloadConfig, seed: int, model_override: Optional[str] = None,
                 chunk_size: int = DEFAULT_CHUNK, table: Optional[TraceTable] = None) -> None:
        tc = cfg.trace
        self.cfg, self.chunk_size = cfg, chunk_size
        self.path = tc.path
        tab = table if table is not None else load_trace(tc.path, tc.format, tc.time_scale, seed)
        self.table = tab
        n = len(tab)
        col = lambda c: tab[c].tolist() if c in tab else [None] * n   # noqa: E731
        tasks = [(_val(t) or tc.default_task) for t in col("task")]
        models = col("model")
        for i, t in enumerate(tasks):
            if t not in TASKS:
                raise ConfigError(f"{where(self.path, tab, i)}, field 'task': {t!r} is invalid; "
                                  f"allowed: one of {list(TASKS)}")
        if "output_tokens" not in tab and any(t in TEXT_OUT_TASKS for t in tasks):
            raise _missing(self.path, "output_tokens")
        self._plans: dict[tuple[str, str], tuple[ModelSpec, int, bool, str]] = {}
        self.tasks, self.models = tasks, []
        for i, t in enumerate(tasks):
            m = _val(models[i]) or model_override or cfg.task_models.get(t)
            if m is None:
                raise ConfigError(f"workload.task_models.{t}=None is invalid for trace "
                                  f"{str(self.path)!r}; allowed: a model name (or a 'model' column)")
            self.models.append(str(m))
            if (t, str(m)) not in self._plans:
                self._plans[(t, str(m))] = self._plan(t, str(m), cfg, where(self.path, tab, i))
        self._cols = {c: col(c) for c in ("prompt_tokens", "output_tokens", "image_height",
                                          "image_width", "output_height", "output_width",
                                          "steps", "cfg", "slo_class", "num_images",
                                          "images", "image_sizes", "image_ids")}
        self._arrival = np.asarray(tab["arrival"], dtype=float).tolist()
        self.max_concurrency: Optional[int] = cfg.max_concurrency or tab.max_concurrency
        if "steps" not in tab:
            for (t, m), (_spec, steps, _cf, _slo) in self._plans.items():
                if t not in TEXT_OUT_TASKS and steps < 1:
                    raise ConfigError(f"workload.steps=None is invalid for model {m!r} (no "
                                      f"request_defaults.steps) in trace {str(self.path)!r}; allowed: an "
                                      f"integer >= 1 or a 'steps' column")
        ih, iw = self._cols["image_height"], self._cols["image_width"]
        # per row: (input image sizes, image ids); sizes () = the one image_height x image_width
        self._images = [self._images_of(i) if t in IMAGE_IN_TASKS else ((), ())
                        for i, t in enumerate(tasks)]
        for i, t in enumerate(tasks):
            if t in IMAGE_IN_TASKS and not self._images[i][0] and (_val(ih[i]) is None or _val(iw[i]) is None):
                raise ConfigError(f"{where(self.path, tab, i)}, fields 'image_height', 'image_width': "
                                  f"empty, and task {t!r} needs an input image; allowed: its size "
                                  f"in pixels (columns image_height and image_width, or images, "
                                  f"image_sizes, num_images)")

    def _images_of(self, i: int) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """(input image sizes, image ids) of row i. Sizes, first given wins: the `images` column
        ([[h, w], ...] pairs: an image + text run's images, load_vllm_bench), `image_sizes`
        ("HxW;HxW;..."), `num_images` copies of image_height x image_width; () when the row
        gives only image_height and image_width (one image). Ids from `image_ids`."""
        c, at = self._cols, where(self.path, self.table, i)
        sizes: tuple[tuple[int, int], ...] = ()
        v = c["images"][i]
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and not isinstance(v, str):
            sizes = tuple((int(h), int(w)) for h, w in v)
        raw = _val(c["image_sizes"][i])
        if raw is not None and not sizes:
            try:
                sizes = tuple((int(h), int(w)) for h, w in
                              (x.lower().split("x") for x in str(raw).split(";") if x.strip()))
            except ValueError:
                raise ConfigError(f"{at}, field 'image_sizes'={raw!r} is invalid; allowed: "
                                  f"'HxW;HxW;...' (e.g. 512x512;1024x768)") from None
        n = _val(c["num_images"][i])
        if not sizes and n is not None:
            if int(n) < 1:
                raise ConfigError(f"{at}, field 'num_images'={n!r} is invalid; allowed: >= 1 "
                                  f"for an image-input task")
            h, w = _val(c["image_height"][i]), _val(c["image_width"][i])
            if h is not None and w is not None:
                sizes = ((int(h), int(w)),) * int(n)
        ids: tuple[int, ...] = ()
        raw = _val(c["image_ids"][i])
        if raw is not None:
            try:
                ids = tuple(int(x) for x in str(raw).split(";") if x.strip())
            except ValueError:
                raise ConfigError(f"{at}, field 'image_ids'={raw!r} is invalid; allowed: "
                                  f"integers separated by ';'") from None
            k = len(sizes) or 1
            if len(ids) != k:
                raise ConfigError(f"{at}, field 'image_ids' has {len(ids)} ids for {k} images; "
                                  f"allowed: one id per input image")
        return sizes, ids

    def _plan(self, task: str, model: str, cfg: WorkloadConfig, at: str
              ) -> tuple[ModelSpec, int, bool, str]:
        field = f"{at}, field 'model'"
        spec = resolve_model(model, field)
        check_task_model(task, spec, field)
        slo = str(cfg.slo_classes.get(task, "standard"))
        if task in TEXT_OUT_TASKS:
            return spec, 0, False, slo
        steps = cfg.steps if cfg.steps is not None else spec.request_defaults.get("steps", 0)
        cf = bool(cfg.cfg if cfg.cfg is not None else spec.request_defaults.get("cfg", False))
        return spec, int(steps), cf, slo

    def __len__(self) -> int:
        return len(self._arrival)

    def __iter__(self) -> Iterator[Request]:
        for c in self.chunks():
            yield from c

    def _row(self, i: int) -> tuple[Any, ...]:
        c, t = self._cols, self.tasks[i]
        spec, steps, cf, slo = self._plans[(t, self.models[i])]
        prompt = int(_val(c["prompt_tokens"][i]) or 1)
        out_tok = int(_val(c["output_tokens"][i]) or 0) if t in TEXT_OUT_TASKS else 0
        ins: tuple[tuple[int, int], ...] = ()
        if t in IMAGE_IN_TASKS:
            ins = self._images[i][0] or ((int(c["image_height"][i]), int(c["image_width"][i])),)
        out: tuple[int, int] | None = None
        oh, ow = _val(c["output_height"][i]), _val(c["output_width"][i])
        if t not in TEXT_OUT_TASKS:
            if oh is not None and ow is not None:
                out = (int(oh), int(ow))
            elif t == GENERATE:
                d = spec.request_defaults
                out = (int(d.get("height", 1024)), int(d.get("width", 1024)))
            elif t == OUTPAINT:
                h, w = outpaint_size(np.array([ins[0][0]]), np.array([ins[0][1]]), self.cfg.image)
                out = (int(h[0]), int(w[0]))
            else:
                out = ins[0]
            if _val(c["steps"][i]) is not None:
                steps = int(c["steps"][i])
            if _val(c["cfg"][i]) is not None:
                cf = _bool(c["cfg"][i])
            if steps < 1:
                raise ConfigError(f"{where(self.path, self.table, i)}, field 'steps': {steps} is "
                                  f"invalid; allowed: >= 1 (a 'steps' column or workload.steps)")
        if _val(c["slo_class"][i]) is not None:
            slo = str(c["slo_class"][i])
        return prompt, out_tok, ins, out, steps, cf, slo

    def chunks(self) -> Iterator[list[Request]]:
        cache = TokenCache()
        specs = {m: s for (_, m), (s, *_r) in self._plans.items()}
        n = len(self)
        for lo in range(0, n, self.chunk_size):
            hi = min(n, lo + self.chunk_size)
            rows = [self._row(i) for i in range(lo, hi)]
            cols = list(zip(*rows)) if rows else [[]] * 7
            yield build_requests(lo, self._arrival[lo:hi], self.tasks[lo:hi], self.models[lo:hi],
                                 list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]),
                                 list(cols[4]), list(cols[5]), list(cols[6]), specs, cache,
                                 [ids for _, ids in self._images[lo:hi]])
