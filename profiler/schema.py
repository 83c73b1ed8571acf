"""The profile-table contract shared by `profiler` (writes) and `sim` (reads).

One parquet per (gpu, model), long format, one row per grid point. Kept dependency-light
(numpy + pyarrow; pandas only inside the functions that take or return a DataFrame) so the
simulator imports it without torch or pandas and reads tables with `read_columns`.

Axes by stage (unused axes are null):
- prefill:  num_tokens = tokens in the engine step (chunk), context_len = tokens already cached for
            that sequence, batch_size = sequences in the step, num_decode_seqs = decode sequences
            riding in the same step (0 = pure prefill; >0 = a mixed step).
- decode:   batch_size = decoding sequences, context_len = per-sequence context, num_tokens = batch.
- vision_encode: batch_size = images, height/width = resized image, num_tokens = tokens per image.
- text_encode: component = encoder name, batch_size, num_tokens = sequence length.
- dit_step: batch_size = transformer batch (CFG already doubled by the caller), height/width =
            output image, seq_len = image tokens in the sequence (target + condition latents),
            num_tokens = text tokens.
- vae_encode / vae_decode: batch_size, height, width.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import pandas as pd

STAGES = (
    "preprocess", "vision_encode", "text_encode", "prefill", "decode", "dit_step",
    "vae_encode", "vae_decode", "postprocess", "transfer",
)
ENGINES = ("vllm", "vllm-omni", "diffusers", "analytic", "synthetic")
STATUSES = ("ok", "oom", "error")

# column -> pyarrow type. The first block is every table's contract; the second, stage-specific.
COLUMNS: dict[str, pa.DataType] = {
    "model": pa.string(),
    "stage": pa.string(),
    "engine": pa.string(),
    "engine_version": pa.string(),
    "torch_version": pa.string(),
    "gpu": pa.string(),
    "dtype": pa.string(),
    "tp": pa.int64(),
    "batch_size": pa.int64(),
    "num_tokens": pa.int64(),
    "context_len": pa.int64(),
    "height": pa.int64(),
    "width": pa.int64(),
    "latency_ms_median": pa.float64(),
    "latency_ms_p10": pa.float64(),
    "latency_ms_p90": pa.float64(),
    "n_samples": pa.int64(),
    "peak_mem_bytes": pa.int64(),
    "measured_at": pa.string(),
    "git_sha": pa.string(),
    # stage-specific and bookkeeping
    "component": pa.string(),
    "num_decode_seqs": pa.int64(),
    "seq_len": pa.int64(),
    "status": pa.string(),
    "error": pa.string(),
    "mem_requested_bytes": pa.int64(),
    "engine_settings": pa.string(),
    "command": pa.string(),
    # added by the profiler (issue 3): roofline terms and per-point details (JSON)
    "flops": pa.float64(),
    "hbm_bytes": pa.float64(),
    "extra": pa.string(),
}
REQUIRED = tuple(list(COLUMNS)[:20])
SCHEMA = pa.schema([pa.field(k, v) for k, v in COLUMNS.items()])
# Axes that identify a grid point (used for resume and de-duplication).
KEY_COLUMNS = ("model", "stage", "component", "tp", "batch_size", "num_tokens", "context_len",
               "num_decode_seqs", "height", "width", "seq_len")


class SchemaError(ValueError):
    """A profile table that breaks the contract."""


def empty_frame() -> pd.DataFrame:
    return SCHEMA.empty_table().to_pandas()


def _check_required(names: Iterable[str]) -> None:
    have = set(names)
    missing = [c for c in REQUIRED if c not in have]
    if missing:
        raise SchemaError(f"profile table lacks required columns {missing}; "
                          f"required: {list(REQUIRED)}")


def _string_scalar(s: str) -> pa.Scalar:
    """`s` as an arrow string scalar, built from its bytes (pa.scalar would import pandas)."""
    data = s.encode()
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int32).tobytes())
    return pa.StringArray.from_buffers(1, offsets, pa.py_buffer(data))[0]


def conform(table: pa.Table) -> pa.Table:
    """The contract's columns in its order and types: the required ones must be there (else
    SchemaError), a missing optional one is all nulls, a null status reads as ok, columns
    outside the contract are dropped. Casts are safe (a value that would change raises)."""
    _check_required(table.column_names)
    cols = []
    for name, typ in COLUMNS.items():
        if name not in table.column_names:
            col = pa.chunked_array([pa.nulls(table.num_rows, typ)])
        else:
            col = table.column(name)
            if col.type != typ:
                col = col.cast(typ)
        if name == "status" and col.null_count:
            import pyarrow.compute as pc        # (0.04 s to import: only for a table that needs it)
            col = pc.coalesce(col, _string_scalar("ok"))
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Adds missing optional columns as nulls and casts to the contract's types (`conform`)."""
    _check_required(df.columns)
    present = [c for c in COLUMNS if c in df.columns]
    table = pa.Table.from_pandas(df[present], schema=pa.schema([SCHEMA.field(c) for c in present]),
                                 preserve_index=False)
    return conform(table).to_pandas()


class Columns:
    """A profile table as numpy columns, without pandas: an integer column without nulls is an
    int64 array, any other numeric column float64 with NaN for nulls (pandas' dtypes for the
    same table), a string column an object array with None for nulls. Read-only by contract:
    `select` and `with_column` return new tables, never views to write through."""
    __slots__ = ("data", "nrows")

    def __init__(self, data: dict[str, np.ndarray], nrows: int):
        self.data = data
        self.nrows = nrows

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    def __len__(self) -> int:
        return self.nrows

    def select(self, rows: np.ndarray) -> "Columns":
        """The rows a boolean mask (or an index array) selects, in table order."""
        data = {k: v[rows] for k, v in self.data.items()}
        return Columns(data, len(next(iter(data.values()))) if data else 0)

    def with_column(self, name: str, values: np.ndarray) -> "Columns":
        return Columns({**self.data, name: values}, self.nrows)

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd
        return pd.DataFrame(self.data)


def _numpy_column(col: pa.ChunkedArray) -> np.ndarray:
    # via Python lists: pyarrow's own to_numpy imports pandas
    values = col.to_pylist()
    if pa.types.is_string(col.type):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    if pa.types.is_integer(col.type) and not col.null_count:
        return np.array(values, dtype=np.int64)
    return np.array(values, dtype=np.float64)          # None -> NaN


def read_columns(path: str | os.PathLike) -> Columns:
    """The table at `path` conformed to the contract (`conform`), as numpy columns (`Columns`);
    the same rows and values `read_table` gives as a DataFrame."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"profile table not found: {path}")
    with pq.ParquetFile(path) as f:         # one file: no need of the dataset API (read_table's)
        table = conform(f.read())
    return Columns({name: _numpy_column(table.column(name)) for name in table.column_names},
                   table.num_rows)


def validate_rows(df: pd.DataFrame) -> list[str]:
    """Returns a list of human-readable problems (empty = valid)."""
    problems: list[str] = []
    bad_stage = sorted(set(df["stage"].dropna()) - set(STAGES))
    if bad_stage:
        problems.append(f"stage has unknown values {bad_stage}; allowed: {list(STAGES)}")
    bad_engine = sorted(set(df["engine"].dropna()) - set(ENGINES))
    if bad_engine:
        problems.append(f"engine has unknown values {bad_engine}; allowed: {list(ENGINES)}")
    bad_status = sorted(set(df["status"].dropna()) - set(STATUSES))
    if bad_status:
        problems.append(f"status has unknown values {bad_status}; allowed: {list(STATUSES)}")
    ok = df[df["status"] == "ok"]
    lat = ok["latency_ms_median"]
    if lat.isna().any() or (lat <= 0).any() or not lat.map(lambda x: x == x and abs(x) != float("inf")).all():
        problems.append("latency_ms_median must be positive and finite on every status=ok row")
    for col in ("batch_size", "tp"):
        if (ok[col].dropna() < 1).any():
            problems.append(f"{col} must be >= 1")
    return problems


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes atomically (temp file + rename) so a crash never leaves a half-written table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(normalize(df), schema=SCHEMA, preserve_index=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"profile table not found: {path}")
    with pq.ParquetFile(path) as f:         # one file: no need of the dataset API (read_table's)
        return conform(f.read()).to_pandas()


def append_rows(path: str | os.PathLike, rows: list[dict]) -> pd.DataFrame:
    """Appends rows to a table (read + atomic rewrite): each point survives a later crash."""
    import pandas as pd
    path = Path(path)
    old = read_table(path) if path.exists() else empty_frame()
    new = normalize(pd.DataFrame(rows))
    df = pd.concat([old, new], ignore_index=True) if len(old) else new
    write_table(df, path)
    return df


def point_key(row: dict | pd.Series) -> tuple:
    """Hashable identity of a grid point (nulls normalised) for resume."""
    pd = sys.modules.get("pandas")          # (a pandas NA exists only once pandas is loaded)
    na = pd.NA if pd is not None else None
    out = []
    for c in KEY_COLUMNS:
        v = row.get(c) if isinstance(row, dict) else row[c]
        if v is None or (isinstance(v, float) and v != v) or v is na:
            v = None
        elif c not in ("model", "stage", "component"):
            v = int(v)
        out.append(v)
    return tuple(out)


def table_path(root: str | os.PathLike, gpu: str, model: str) -> Path:
    return Path(root) / gpu / f"{model}.parquet"


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)
