"""vLLM-Omni serving ground truth as `python -m profiler.omni_bench` writes it (schema
mmsim.omni_bench.v1; the fields are described in traces/validation/README.md, "vLLM-Omni image
serving"), read and checked once for every consumer: the per-stage table builder
(profiler.omni_table) and the simulator's replay (sim.tools.omni_validate).

- `OmniBenchRun`: one run file (`<model>__<run>[__tag].json.gz`): its requests (one row each,
  in send order), the pipeline batches the server ran during it (stage log lines), the
  `vllm bench serve`-style summary and the provenance.
- `OmniServerCall`: one server start (`call_id`): every batch of its stage log
  (`stagelog_<model>__<call>.jsonl.gz`), including the server's own start-up warm-up, so a run
  can be placed in the server's history (which output sizes it had already decoded).

A request counts as the real run counted it: completed = HTTP 200 with no error; every other
request that was sent (an HTTP error, no answer, cancelled at the deadline) is failed; requests
never sent are neither. Failed requests still ran on the GPU when their batch is in the stage
log (vLLM-Omni's 500s of this data came 30 s after their forward ended).

Bad input stops with one `OmniRunError` line naming the file, the row and the field.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from profiler.jsonfiles import json_files, read_json, read_text, run_name

SCHEMA = "mmsim.omni_bench.v1"
TASKS = ("generate", "edit")
# request columns every run has (profiler.omni_client.columns), and what each must hold
REQUEST_COLUMNS: dict[str, str] = {
    "arrival_time": "a number of seconds >= 0",
    "task": f"one of {list(TASKS)}",
    "prompt_tokens": "an integer >= 1",
    "output_height": "an integer >= 16",
    "output_width": "an integer >= 16",
    "steps": "an integer >= 1",
    "cfg": "true or false",
    "seed": "an integer",
    "sent_s": "a number >= 0, or null (never sent)",
    "latency_s": "a number >= 0, or null",
    "status": "an HTTP status, -1 (no answer), -2 (cancelled) or null (never sent)",
    "error": "a string ('' when the request succeeded)",
}
SUMMARY_KEYS = ("request_throughput", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")
STAGE_SUFFIX = {  # column of batch_frame() -> suffix of vLLM-Omni's profiler stage name
    "text_encode_s": ".text_encoder.forward",
    "diffuse_s": ".diffuse",
    "vae_decode_s": ".vae.decode",
    "vae_encode_s": ".vae.encode",
}
STAGELOG_RE = re.compile(r"^stagelog_(?P<model>.+?)__(?P<call>[0-9]{8}T[0-9]{6}Z)\.jsonl(\.gz)?$")


class OmniRunError(ValueError):
    """An omni_bench result (or stage log) that breaks the format; the message names the file,
    the row and the field, and what is allowed."""


def is_omni_bench(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("schema") == SCHEMA


def stage_seconds(rec: dict[str, Any], suffix: str) -> Optional[float]:
    """The duration (s) of the stage named `<Pipeline>{suffix}` in one stage-log record."""
    for k, v in (rec.get("stage_durations") or {}).items():
        if str(k).endswith(suffix):
            return float(v)
    return None


def _bad(path: Any, what: str, allowed: str) -> OmniRunError:
    return OmniRunError(f"{path}: {what} is invalid; allowed: {allowed}")


def _cell_ok(col: str, v: Any) -> bool:
    def num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if col == "task":
        return v in TASKS
    if col == "cfg":
        return isinstance(v, bool)
    if col == "error":
        return isinstance(v, str)
    if col == "arrival_time":
        return num(v) and v >= 0
    if col in ("sent_s", "latency_s"):
        return v is None or (num(v) and v >= 0)
    if col == "status":
        return v is None or (isinstance(v, int) and not isinstance(v, bool))
    if col == "seed":
        return isinstance(v, int) and not isinstance(v, bool)
    least = {"prompt_tokens": 1, "output_height": 16, "output_width": 16, "steps": 1}[col]
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


@dataclass
class OmniBenchRun:
    """One run of profiler.omni_bench (module docstring). `requests` has one row per drawn
    request (send order) with the file's columns plus `sent` / `completed` / `failed` flags."""
    path: Path
    obj: dict[str, Any] = field(repr=False)
    requests: pd.DataFrame = field(repr=False)

    @classmethod
    def load(cls, path: str | Path) -> "OmniBenchRun":
        path = Path(path)
        try:
            obj = read_json(path)
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise OmniRunError(f"{path}: cannot be read as JSON ({type(e).__name__}: {msg}); allowed: "
                               f"a result of python -m profiler.omni_bench (.json or .json.gz)") from None
        return cls.from_obj(path, obj)

    @classmethod
    def from_obj(cls, path: str | Path, obj: Any) -> "OmniBenchRun":
        path = Path(path)
        if not isinstance(obj, dict):
            raise _bad(path, f"a JSON {type(obj).__name__}", f"an object with schema {SCHEMA!r}")
        if obj.get("schema") != SCHEMA:
            raise _bad(path, f"field 'schema' = {obj.get('schema')!r}",
                       f"{SCHEMA!r} (a result of python -m profiler.omni_bench)")
        for key in ("model", "run", "requests", "provenance"):
            if key not in obj:
                raise _bad(path, f"missing field {key!r}", "a result of python -m profiler.omni_bench, "
                           "which writes model, run, requests, batches, provenance")
        req = obj["requests"]
        if not isinstance(req, dict):
            raise _bad(path, f"field 'requests' (a JSON {type(req).__name__})",
                       "an object of columns, one list per field")
        n = None
        for col in REQUEST_COLUMNS:
            if col not in req:
                raise _bad(path, f"missing requests column {col!r}",
                           f"every column of {list(REQUEST_COLUMNS)}")
            vals = req[col]
            if not isinstance(vals, list):
                raise _bad(path, f"requests column {col!r} (not a list)", "one list entry per request")
            if n is None:
                n = len(vals)
            elif len(vals) != n:
                raise _bad(path, f"requests column {col!r} with {len(vals)} entries",
                           f"one entry per request ({n}, as 'arrival_time')")
            for i, v in enumerate(vals):
                if not _cell_ok(col, v):
                    raise _bad(path, f"request row {i} field {col!r} = {v!r}", REQUEST_COLUMNS[col])
        df = pd.DataFrame({k: v for k, v in req.items() if isinstance(v, list) and len(v) == n})
        for i in range(n or 0):
            if req["task"][i] == "edit":
                for col in ("image_height", "image_width"):
                    v = (req.get(col) or [None] * n)[i]
                    if not (isinstance(v, int) and v >= 16):
                        raise _bad(path, f"request row {i} field {col!r} = {v!r}",
                                   "an integer >= 16 for an edit (its input image)")
            if req["sent_s"][i] is not None and req["status"][i] is None:
                raise _bad(path, f"request row {i} field 'status' = None with sent_s set",
                           "an HTTP status, -1 or -2 for a request that was sent")
        df["sent"] = df["status"].notna()
        df["completed"] = df["sent"] & (df["status"] == 200) & (df["error"] == "")
        df["failed"] = df["sent"] & ~df["completed"]
        bad_lat = df["completed"] & df["latency_s"].isna()
        if bad_lat.any():
            i = int(np.flatnonzero(bad_lat.to_numpy())[0])
            raise _bad(path, f"request row {i} field 'latency_s' = None on a completed request",
                       "the send-to-last-byte seconds of every HTTP-200 request")
        return cls(path, obj, df)

    # --- what the run is ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return run_name(self.path)

    @property
    def run(self) -> str:
        return str(self.obj["run"])

    @property
    def served(self) -> str:
        """The served model: qwen_image, qwen_image_edit, flux1_dev (omni_bench --model)."""
        return str(self.obj["model"])

    @property
    def provenance(self) -> dict[str, Any]:
        return self.obj.get("provenance") or {}

    @property
    def model(self) -> str:
        """The simulator's model entry (conf/model/<name>.yaml) the served pipeline belongs to."""
        return str(self.provenance.get("model_yaml") or self.served)

    @property
    def task(self) -> str:
        return str(self.obj.get("task") or self.requests["task"].iloc[0])

    @property
    def validation(self) -> bool:
        """False for the warm-up runs omni_bench marks as not ground truth."""
        return bool(self.obj.get("validation", True)) and self.run != "warmup"

    @property
    def sequential(self) -> bool:
        """One request at a time (the warm-up and the zero-load probe)."""
        return self.obj.get("max_concurrency") == 1 or self.obj.get("request_rate") == "sequential"

    @property
    def call_id(self) -> Optional[str]:
        return self.provenance.get("call_id")

    @property
    def capacity_rps(self) -> Optional[float]:
        c = self.provenance.get("calibrated_capacity_rps")
        return float(c) if c else None

    @property
    def batches(self) -> list[dict[str, Any]]:
        return list(self.obj.get("batches") or [])

    def start_wall(self) -> Optional[float]:
        """Wall clock of the run's first send (the client's t0 when the run has no send)."""
        w = self.requests["wall_sent"].dropna() if "wall_sent" in self.requests else pd.Series([], dtype=float)
        if len(w):
            return float(w.min())
        t0 = self.provenance.get("client_t0_wall")
        return float(t0) if t0 is not None else None

    # --- measured figures ------------------------------------------------------------------------
    def measured(self) -> dict[str, float]:
        """`vllm bench serve`-style summary over the completed requests: the file's own keys,
        recomputed from the rows where it lacks one (same definitions: profiler.omni_client)."""
        df = self.requests
        ok = df[df["completed"]]
        lat = ok["latency_s"].to_numpy(float) * 1e3
        sent = df[df["sent"]]
        if len(ok):
            dur = float((ok["sent_s"] + ok["latency_s"]).max() - sent["sent_s"].min())
        else:
            dur = float(self.obj.get("duration") or math.nan)
        calc = {"request_throughput": len(ok) / dur if dur > 0 else math.nan,
                "mean_e2el_ms": float(lat.mean()) if len(lat) else math.nan,
                "median_e2el_ms": float(np.percentile(lat, 50)) if len(lat) else math.nan,
                "p99_e2el_ms": float(np.percentile(lat, 99)) if len(lat) else math.nan}
        out = {k: float(self.obj[k]) if isinstance(self.obj.get(k), (int, float)) else v
               for k, v in calc.items()}
        out.update(completed=int(len(ok)), failed=int(df["failed"].sum()), duration=dur)
        return out

    def batch_frame(self) -> pd.DataFrame:
        """The run's pipeline batches (stage log lines), one row each, with vLLM-Omni's stage
        durations as columns (STAGE_SUFFIX) and, per batch, its first request's row (by seed)."""
        return batch_frame(self.batches, self.requests, str(self.path))


def batch_frame(lines: Iterable[dict[str, Any]], requests: Optional[pd.DataFrame] = None,
                where: str = "<stage log>") -> pd.DataFrame:
    """Stage-log lines as a table: t_start / t_end (wall), forward_s, batch_size, height, width,
    steps, cfg (a negative prompt was sent), the stage durations (s), `seed` (the batch's first)
    and, when `requests` is given, that request's prompt_tokens, input size, task, wall_sent,
    latency_s and completed flag (NaN for a batch of no request there: the server's warm-up)."""
    rows = []
    for i, rec in enumerate(lines):
        try:
            seeds = list(rec.get("seeds") or [])
            row = {"t_start": float(rec["t_start"]), "t_end": float(rec["t_end"]),
                   "forward_s": float(rec["forward_s"]), "batch_size": int(rec["batch_size"]),
                   "height": int(rec["height"]), "width": int(rec["width"]),
                   "steps": int(rec["num_inference_steps"]),
                   "cfg": bool(any(rec.get("negative_prompt") or [])),
                   "seed": int(seeds[0]) if seeds else None, "pipeline": rec.get("pipeline")}
        except (KeyError, TypeError, ValueError) as e:
            raise OmniRunError(f"{where}: batch line {i} field {e.args[0] if isinstance(e, KeyError) else '?'!s} "
                               f"is missing or not a number ({type(e).__name__}); allowed: a stage-log line "
                               f"with t_start, t_end, forward_s, batch_size, height, width, "
                               f"num_inference_steps, seeds, stage_durations") from None
        for col, suf in STAGE_SUFFIX.items():
            row[col] = stage_seconds(rec, suf)
        rows.append(row)
    cols = ["t_start", "t_end", "forward_s", "batch_size", "height", "width", "steps", "cfg", "seed",
            "pipeline", *STAGE_SUFFIX]
    out = pd.DataFrame(rows, columns=cols)
    if requests is not None and len(out):
        keep = [c for c in ("seed", "task", "prompt_tokens", "image_height", "image_width", "wall_sent",
                            "sent_s", "latency_s", "completed") if c in requests]
        out = out.merge(requests[keep].drop_duplicates("seed"), on="seed", how="left")
    return out


@dataclass
class OmniServerCall:
    """One server start of profiler.omni_bench: its stage log (every batch, the start-up warm-up
    included) and the runs it served (files in the same folder with its call_id)."""
    model: str
    call_id: str
    stagelog: Optional[Path]
    runs: list[OmniBenchRun]

    def batches(self) -> pd.DataFrame:
        lines: list[dict[str, Any]] = []
        if self.stagelog is not None:
            for n, line in enumerate(read_text(self.stagelog).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    raise OmniRunError(f"{self.stagelog}: line {n} is not valid JSON; allowed: one "
                                       f"stage-log record per line") from None
        reqs = pd.concat([r.requests for r in self.runs], ignore_index=True) if self.runs else None
        df = batch_frame(lines, reqs, str(self.stagelog))
        run_of = {int(s): r.run for r in self.runs for s in r.requests["seed"]}
        df["run"] = [run_of.get(int(s), "server_warmup") if s is not None and s == s else "server_warmup"
                     for s in df["seed"]]
        return df.sort_values("t_start", kind="stable").reset_index(drop=True)

    def decoded_before(self, t_wall: float) -> list[tuple[int, int]]:
        """Output sizes (height, width) the server decoded in batches that ended before t_wall,
        in first-use order (the server's start-up warm-up included)."""
        df = self.batches()
        seen: dict[tuple[int, int], None] = {}
        for h, w in df.loc[df["t_end"] < t_wall, ["height", "width"]].itertuples(index=False):
            seen.setdefault((int(h), int(w)), None)
        return list(seen)


def find_runs(folder: str | Path) -> list[OmniBenchRun]:
    """Every omni_bench run file under `folder` (recursively; other JSON is skipped), sorted by
    path. A file with the schema but broken content raises OmniRunError."""
    out = []
    for p in json_files(folder, recursive=True):
        try:
            obj = read_json(p)
        except (OSError, ValueError, EOFError, UnicodeDecodeError):
            continue
        if is_omni_bench(obj):
            out.append(OmniBenchRun.from_obj(p, obj))
    return out


def server_calls(folder: str | Path, runs: Optional[list[OmniBenchRun]] = None) -> dict[tuple[str, str], OmniServerCall]:
    """(served model, call_id) -> OmniServerCall, from the stage logs in `folder` and the runs."""
    folder = Path(folder)
    runs = find_runs(folder) if runs is None else runs
    logs: dict[tuple[str, str], Path] = {}
    for p in sorted(folder.rglob("stagelog_*.jsonl*")):
        m = STAGELOG_RE.match(p.name)
        if m:
            logs.setdefault((m.group("model"), m.group("call")), p)
    keys = set(logs) | {(r.served, r.call_id) for r in runs if r.call_id}
    return {k: OmniServerCall(k[0], k[1], logs.get(k), [r for r in runs if (r.served, r.call_id) == k])
            for k in sorted(keys)}
