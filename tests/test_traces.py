"""Trace replay: table formats round-trip, aliases, vLLM bench JSON, errors that name the field."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sim.config import ArrivalConfig, ConfigError, TraceConfig, WorkloadConfig
from sim.workloads.trace import load_trace, load_vllm_bench
from sim.workloads import request_source

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "traces" / "workloads"


def trace_cfg(path, **kw) -> WorkloadConfig:
    return WorkloadConfig(arrival=ArrivalConfig(process="trace"), trace=TraceConfig(path=str(path), **kw))


def key(r):
    return (r.task, r.model, r.prompt_tokens, r.output_tokens, r.input_images, r.output_image,
            r.steps, r.cfg, r.slo_class, r.image_tokens_in, r.image_tokens_out)


def table_of(reqs) -> pd.DataFrame:
    rows = []
    for r in reqs:
        rows.append({
            "arrival_time": r.arrival, "task": r.task, "model": r.model,
            "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
            "image_height": r.input_images[0][0] if r.input_images else None,
            "image_width": r.input_images[0][1] if r.input_images else None,
            "output_height": r.output_image[0] if r.output_image else None,
            "output_width": r.output_image[1] if r.output_image else None,
            "steps": r.steps, "cfg": r.cfg, "slo_class": r.slo_class})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def synthetic():
    return list(request_source(WorkloadConfig(num_requests=300), 21))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_roundtrip(tmp_path, synthetic, fmt):
    df = table_of(synthetic)
    p = tmp_path / f"t.{fmt}"
    {"csv": lambda: df.to_csv(p, index=False),
     "jsonl": lambda: df.to_json(p, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(p)}[fmt]()
    w = request_source(trace_cfg(p), 0)
    got = list(w)
    assert len(w) == len(synthetic) == len(got)
    assert [key(r) for r in got] == [key(r) for r in synthetic]
    assert np.allclose([r.arrival for r in got], [r.arrival for r in synthetic], atol=1e-9)
    assert [r.id for r in got] == list(range(len(got)))


def test_chunked_trace_equals_single(tmp_path, synthetic):
    p = tmp_path / "t.csv"
    table_of(synthetic).to_csv(p, index=False)
    a = [key(r) for r in request_source(trace_cfg(p), 0, chunk_size=7)]
    b = [key(r) for r in request_source(trace_cfg(p), 0)]
    assert a == b
    w = request_source(trace_cfg(p), 0)        # re-iterable, fresh requests each time (the
    first = next(iter(w))                       # run's pilot is a second iteration)
    assert [key(r) for r in w] == b and next(iter(w)) is not first


def test_a_run_reads_its_trace_once(tmp_path, synthetic, synthetic_profiles, monkeypatch):
    """The run's pilot requests (pool sizing) are a second iteration of its source, not a
    second source: the trace file is read once, and the pilot holds the trace's first requests."""
    import sim.workloads.trace as trace
    from conftest import make_cfg
    from sim.run.runner import Run
    p = tmp_path / "t.csv"
    table_of(synthetic).to_csv(p, index=False)
    reads = []
    monkeypatch.setattr(trace, "load_trace", lambda *a, **k: reads.append(a) or load_trace(*a, **k))
    cfg = make_cfg(synthetic_profiles)
    cfg.workload = trace_cfg(p)
    r = Run(cfg)
    assert len(reads) == 1
    assert [key(x) for x in r.ctx.pilot] == [key(x) for x in synthetic[:len(r.ctx.pilot)]]


def test_aliases_epoch_shift_sort_and_scale(tmp_path):
    df = pd.DataFrame({"timestamp": [1.7e9 + 5, 1.7e9 + 1, 1.7e9 + 2],
                       "input_len": [10, 20, 30], "output_len": [3, 4, 5]})
    p = tmp_path / "a.csv"
    df.to_csv(p, index=False)
    reqs = list(request_source(trace_cfg(p, time_scale=0.5), 0))
    assert [r.arrival for r in reqs] == [0.0, 0.5, 2.0]
    assert [r.prompt_tokens for r in reqs] == [20, 30, 10]
    assert [r.output_tokens for r in reqs] == [4, 5, 3]
    assert {r.task for r in reqs} == {"text"} and {r.model for r in reqs} == {"qwen2_5_vl_7b"}


def test_iso_timestamps_and_defaults(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"start_time": "2026-01-01T00:00:01Z", "task": "generate", "prompt_tokens": 40}\n'
                 '{"start_time": "2026-01-01T00:00:00Z", "task": "edit", "prompt_tokens": 50,'
                 ' "image_height": 512, "image_width": 768}\n'
                 '{"start_time": "2026-01-01T00:00:03Z", "task": "outpaint", "prompt_tokens": 50,'
                 ' "image_height": 512, "image_width": 768, "steps": 9, "cfg": false}\n')
    e, g, o = list(request_source(trace_cfg(p), 0))
    assert (e.arrival, g.arrival, o.arrival) == (0.0, 1.0, 3.0)
    assert g.output_image == (1328, 1328) and g.steps == 50 and g.cfg is True  # model defaults
    assert e.output_image == (512, 768) and e.image_tokens_out == 32 * 48
    assert o.output_image == (768, 768) and o.steps == 9 and o.cfg is False


def test_model_override_and_column(tmp_path):
    p = tmp_path / "c.csv"
    pd.DataFrame({"arrival_time": [0, 1], "prompt_tokens": [5, 6], "output_tokens": [1, 2],
                  "task": ["text", "text"], "model": ["qwen2_5_7b", None]}).to_csv(p, index=False)
    reqs = list(request_source(trace_cfg(p), 0, model_override="llama2_7b"))
    assert [r.model for r in reqs] == ["qwen2_5_7b", "llama2_7b"]


@pytest.mark.parametrize("drop, name", [("arrival_time", "arrival"), ("prompt_tokens", "prompt_tokens"),
                                         ("output_tokens", "output_tokens")])
def test_missing_column_names_it(tmp_path, drop, name):
    df = pd.DataFrame({"arrival_time": [0.0, 1.0], "prompt_tokens": [5, 6], "output_tokens": [1, 2]})
    p = tmp_path / "m.csv"
    df.drop(columns=[drop]).to_csv(p, index=False)
    with pytest.raises(ConfigError) as e:
        request_source(trace_cfg(p), 0)
    msg = str(e.value)
    assert "m.csv" in msg and repr(name) in msg and "accepted column names" in msg


def test_bad_rows_raise_up_front(tmp_path):
    p = tmp_path / "bad.csv"
    pd.DataFrame({"arrival_time": [0], "prompt_tokens": [5], "task": ["edit"]}).to_csv(p, index=False)
    with pytest.raises(ConfigError, match="image_height"):
        request_source(trace_cfg(p), 0)
    pd.DataFrame({"arrival_time": [0], "prompt_tokens": [5], "task": ["video"]}).to_csv(p, index=False)
    with pytest.raises(ConfigError, match="'task'.*video"):
        request_source(trace_cfg(p), 0)
    pd.DataFrame({"arrival_time": [0], "prompt_tokens": [5], "output_tokens": [1],
                  "model": ["gpt5"]}).to_csv(p, index=False)
    with pytest.raises(ConfigError, match="gpt5.*allowed"):
        request_source(trace_cfg(p), 0)
    with pytest.raises(ConfigError, match="workload.trace.path"):
        request_source(trace_cfg(tmp_path / "nope.csv"), 0)
    with pytest.raises(ConfigError, match="workload.trace.format"):
        request_source(trace_cfg(p, format="xml"), 0)


def test_example_csv_replays():
    w = request_source(trace_cfg(EXAMPLES / "example_mixed.csv"), 0)
    reqs = list(w)
    assert len(reqs) == 200 and len({r.task for r in reqs}) >= 5
    assert all(b.arrival >= a.arrival for a, b in zip(reqs, reqs[1:]))
    # it was written from the synthetic workload with seed 7: the replay is the same stream
    syn = list(request_source(WorkloadConfig(num_requests=200), 7))
    assert [key(r) for r in reqs] == [key(r) for r in syn]


def test_vllm_bench_example():
    obj = json.loads((EXAMPLES / "example_vllm_bench.json").read_text())
    assert "synthetic" in obj["note"].lower()
    ok = [i for i, e in enumerate(obj["errors"]) if not e]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        reqs = list(request_source(trace_cfg(EXAMPLES / "example_vllm_bench.json"), 0))
    assert any("failed" in str(x.message) for x in rec)
    assert len(reqs) == len(ok) == obj["completed"]
    st = np.array(obj["start_times"])
    assert np.allclose([r.arrival for r in reqs], st[ok] - st.min())
    assert [r.prompt_tokens for r in reqs] == [obj["input_lens"][i] for i in ok]
    assert [r.output_tokens for r in reqs] == [obj["output_lens"][i] for i in ok]
    assert {r.task for r in reqs} == {"text"}
    df = load_vllm_bench(EXAMPLES / "example_vllm_bench.json")
    assert np.allclose(df["measured_ttft_s"], np.array(obj["ttfts"])[ok])
    scaled = list(request_source(trace_cfg(EXAMPLES / "example_vllm_bench.json", time_scale=2.0), 0))
    assert np.allclose([r.arrival for r in scaled], [2 * r.arrival for r in reqs])


def test_vllm_json_without_start_times(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"request_rate": 4.0, "burstiness": 0.5, "input_lens": [10] * 40,
                             "output_lens": [5] * 40, "errors": [""] * 40}))
    with pytest.warns(UserWarning, match="start_times"):
        df = load_trace(p)
    assert df["arrival"][-1] == pytest.approx(40 / 4.0)
    p.write_text(json.dumps({"input_lens": [10], "output_lens": [5]}))
    with pytest.raises(ConfigError, match="start_times"):
        load_trace(p)
    p.write_text(json.dumps({"start_times": [1.0], "output_lens": [5]}))
    with pytest.raises(ConfigError, match="input_lens"):
        load_trace(p)


def test_auto_format_unknown_extension(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("x")
    with pytest.raises(ConfigError, match="workload.trace.format"):
        load_trace(p)


# --- vLLM bench results: what the table keeps, warnings, closed-loop ready times --------------------

def bench(path, n: int, **kw):
    obj = {"input_lens": [10 + i for i in range(n)], "output_lens": [1 + i for i in range(n)],
           "start_times": [100.0 + 0.5 * i for i in range(n)], "ttfts": [0.1] * n,
           "itls": [[0.01] * i for i in range(n)], "errors": [""] * n, "request_rate": 2.0}
    obj.update(kw)
    path.write_text(json.dumps(obj))
    return path


def test_vllm_bench_table_columns_and_measured_e2el(tmp_path):
    """measured_e2el = ttft + the sum of the inter-token gaps (none for a 1-token output)."""
    df = load_vllm_bench(bench(tmp_path / "b.json", 3))
    assert list(df.columns) == ["arrival", "prompt_tokens", "output_tokens", "measured_ttft_s",
                                "measured_e2el_s"]
    assert df["measured_e2el_s"].tolist() == pytest.approx([0.1, 0.11, 0.12], abs=1e-12)
    assert df["arrival"].tolist() == [0.0, 0.5, 1.0]


def test_vllm_bench_warnings_name_the_caller(tmp_path):
    """Dropped failed requests and kept send times are warned about at the caller's line."""
    p = bench(tmp_path / "e.json", 3, errors=["", "timeout", ""])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        df = load_vllm_bench(p)
    assert len(df) == 2
    assert [r.filename for r in rec if "dropped 1 failed" in str(r.message)] == [__file__]
    p = bench(tmp_path / "f.json", 4, max_concurrency=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        load_vllm_bench(p)
    assert [r.filename for r in rec if "ready times" in str(r.message)] == [__file__]


@pytest.mark.parametrize("rate", [None, "inf"])
def test_closed_loop_ready_times_at_an_unbounded_rate(tmp_path, rate):
    """No request_rate recorded, or "inf": every request past the first wave was ready when the
    last of the first wave was sent."""
    p = bench(tmp_path / "r.json", 4, max_concurrency=2, request_rate=rate,
              start_times=[10.0, 10.2, 11.0, 12.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "ready times" warning
        df = load_vllm_bench(p)
    assert df["arrival"].tolist() == pytest.approx([0.0, 0.2, 0.2, 0.2])


def test_several_input_images_as_a_count_of_one_size(tmp_path):
    p = tmp_path / "n.csv"
    pd.DataFrame({"arrival_time": [0.0, 1.0], "prompt_tokens": [5, 6], "task": ["edit", "edit"],
                  "image_height": [512, 256], "image_width": [768, 256],
                  "num_images": [2, None]}).to_csv(p, index=False)
    a, b = list(request_source(trace_cfg(p), 0))
    assert a.input_images == ((512, 768), (512, 768)) and b.input_images == ((256, 256),)
    assert a.output_image == (512, 768)


def test_output_size_needs_both_sides_and_model_defaults_fill_in(tmp_path):
    p = tmp_path / "o.csv"
    pd.DataFrame({"arrival_time": [0.0, 1.0, 2.0], "prompt_tokens": [5, 6, 7],
                  "task": ["generate", "generate", "edit"], "output_height": [512, 640, 256],
                  "output_width": [768, None, None], "image_height": [None, None, 96],
                  "image_width": [None, None, 128]}).to_csv(p, index=False)
    a, b, c = list(request_source(trace_cfg(p), 0))
    assert a.output_image == (512, 768)
    assert b.output_image == (1328, 1328)           # one side only: the model's default
    assert c.output_image == (96, 128)              # an edit keeps its input's size


def test_generate_without_a_size_anywhere_is_1024_square(tmp_path):
    from profiler.models import load_model
    p = tmp_path / "g.csv"
    pd.DataFrame({"arrival_time": [0.0], "prompt_tokens": [5], "task": ["generate"]}).to_csv(p, index=False)
    w = request_source(trace_cfg(p), 0)
    spec, steps, cf, slo = w._plans[("generate", "qwen_image")]
    bare = dataclasses.replace(load_model("qwen_image"), request_defaults={"steps": 3})
    w._plans[("generate", "qwen_image")] = (bare, steps, cf, slo)
    (r,) = list(w)
    assert r.output_image == (1024, 1024)


def test_steps_column_one_step_is_valid_and_zero_is_not(tmp_path):
    p = tmp_path / "s.csv"
    pd.DataFrame({"arrival_time": [0.0, 1.0], "prompt_tokens": [5, 6], "task": ["generate"] * 2,
                  "steps": [1, None]}).to_csv(p, index=False)
    a, b = list(request_source(trace_cfg(p), 0))
    assert a.steps == 1 and b.steps == 50            # an empty cell: the model's default
    pd.DataFrame({"arrival_time": [0.0], "prompt_tokens": [5], "task": ["generate"],
                  "steps": [0]}).to_csv(p, index=False)
    with pytest.raises(ConfigError, match=r"row 1 \(line 2\), field .steps.: 0 is invalid"):
        list(request_source(trace_cfg(p), 0))


def test_missing_steps_are_refused_up_front_without_a_steps_column(tmp_path):
    """workload.steps=0 (as if the model had no default) and no 'steps' column: refused when
    the trace is opened, before any request is read."""
    from sim.workloads.trace import TraceWorkload
    p = tmp_path / "z.csv"
    pd.DataFrame({"arrival_time": [0.0], "prompt_tokens": [5], "task": ["generate"]}).to_csv(p, index=False)
    cfg = trace_cfg(p)
    cfg.steps = 0
    with pytest.raises(ConfigError, match="no request_defaults.steps.*'steps' column"):
        TraceWorkload(cfg, 0)


def test_slo_class_column_overrides_the_task_default(tmp_path):
    p = tmp_path / "c.csv"
    pd.DataFrame({"arrival_time": [0.0, 1.0], "prompt_tokens": [5, 6], "output_tokens": [2, 2],
                  "slo_class": ["batch", None]}).to_csv(p, index=False)
    a, b = list(request_source(trace_cfg(p), 0))
    assert a.slo_class == "batch" and b.slo_class == "interactive"   # text's default class


def test_vllm_json_without_start_times_warns_at_the_caller(tmp_path):
    p = tmp_path / "old.json"
    p.write_text(json.dumps({"request_rate": 4.0, "input_lens": [10] * 3, "output_lens": [5] * 3}))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        load_vllm_bench(p)
    assert [r.filename for r in rec if "no start_times" in str(r.message)] == [__file__]


def test_image_result_text_prompt_is_at_least_one_token_and_1_pixel_sides_are_valid(tmp_path):
    """A chat_bench result: text prompt = input_lens - image_tokens, at least 1 (the server's
    prompt is never all image); a 1-pixel side is a valid image, a 0-pixel one is refused."""
    p = bench(tmp_path / "i.json", 4, input_lens=[101, 100, 90, 7], images=[[[1, 1]], [[64, 1]], [[1, 64]], []],
              image_tokens=[100, 100, 100, 0])
    df = load_vllm_bench(p)
    assert df["prompt_tokens"].tolist() == [1, 1, 1, 7]
    assert df["task"].tolist() == ["understand", "understand", "understand", "text"]
    assert [tuple(x) for x in df["images"]] == [((1, 1),), ((64, 1),), ((1, 64),), ()]
    for bad in ([[64, 0]], [[0, 64]]):
        bench(p, 4, images=[bad, [], [], []], image_tokens=[1, 0, 0, 0])
        with pytest.raises(ConfigError, match=r"row 0 field 'images' .*positive heights and widths"):
            load_vllm_bench(p)


def test_explicit_format_overrides_the_suffix_and_a_json_list_is_a_table(tmp_path):
    rows = [{"arrival_time": 0.0, "prompt_tokens": 5, "output_tokens": 3},
            {"arrival_time": 0.5, "prompt_tokens": 6, "output_tokens": 4}]
    t = tmp_path / "t.txt"
    pd.DataFrame(rows).to_csv(t, index=False)
    a, b = list(request_source(trace_cfg(t, format="csv"), 0))
    assert (a.arrival, a.prompt_tokens, b.arrival, b.output_tokens) == (0.0, 5, 0.5, 4)
    j = tmp_path / "records.json"
    j.write_text(json.dumps(rows))
    df = load_trace(j)
    assert df["arrival"].tolist() == [0.0, 0.5] and df["prompt_tokens"].tolist() == [5, 6]


# --- every cell rule of the trace tables (sim/workloads/trace.py NUMERIC, cfg, times, rows) ------

def csv_of(tmp_path, cols: dict, name: str = "c.csv"):
    p = tmp_path / name
    pd.DataFrame(cols).to_csv(p, index=False)
    return p


@pytest.mark.parametrize("col, least", [("prompt_tokens", 0), ("output_tokens", 0), ("image_height", 1),
                                        ("image_width", 1), ("output_height", 1), ("output_width", 1),
                                        ("steps", 0), ("num_images", 0)])
def test_numeric_columns_take_whole_numbers_from_their_least_value(tmp_path, col, least):
    """Each numeric column (the others absent: every present column is checked) accepts its least
    value, refuses one less and a fraction, naming the row."""
    base = {"arrival_time": [0.0, 1.0], "prompt_tokens": [5, 6]}
    ok = load_trace(csv_of(tmp_path, {**base, col: [least, least + 3]}))
    assert ok[col].tolist() == [least, least + 3]
    for bad in (least - 1, least + 0.5):
        with pytest.raises(ConfigError, match=rf"row 2 \(line 3\), field '{col}'"):
            load_trace(csv_of(tmp_path, {**base, col: [least, bad]}, "bad.csv"))


def test_cfg_cells_numbers_and_words(tmp_path):
    """cfg takes true/false words (any case, also yes/no, y/n, t/f, 1/0 as text) and the numbers
    1 and 0 (a JSON or parquet column); 2 is refused."""
    p = tmp_path / "c.jsonl"
    rows = [{"arrival_time": float(i), "prompt_tokens": 5, "task": "generate", "cfg": v}
            for i, v in enumerate([1, 0, "yes", "No", "TRUE", "f", True])]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [r.cfg for r in request_source(trace_cfg(p), 0)] == [True, False, True, False, True, False, True]
    p.write_text(json.dumps({"arrival_time": 0.0, "prompt_tokens": 5, "cfg": 2}) + "\n")
    with pytest.raises(ConfigError, match="line 1, field 'cfg': 2 is invalid"):
        load_trace(p)


def test_epoch_threshold_is_1e8_seconds(tmp_path):
    """Arrival times above 1e8 s are absolute clocks (shifted to start at 0); 1e8 itself is not."""
    kept = load_trace(csv_of(tmp_path, {"arrival_time": [1e8, 1e8 + 2], "prompt_tokens": [5, 6]}))
    assert kept["arrival"].tolist() == [1e8, 1e8 + 2]
    moved = load_trace(csv_of(tmp_path, {"arrival_time": [1e8 + 0.5, 1e8 + 2.5], "prompt_tokens": [5, 6]}, "m.csv"))
    assert moved["arrival"].tolist() == [0.0, 2.0]


def test_time_cells_dates_offsets_and_bad_rows(tmp_path):
    """Dates with different UTC offsets, or none (read as UTC), are one clock; a date before 1973
    is below the epoch threshold and stays as epoch seconds, exactly; a cell that is neither a
    number nor a date, or a non-finite number, is refused with its row."""
    t = load_trace(csv_of(tmp_path, {"timestamp": ["2024-01-01T01:00:00+01:00", "2024-01-01T00:00:01Z",
                                            "2024-01-01 00:00:03"], "prompt_tokens": [5, 6, 7]}))
    assert t["arrival"].tolist() == [0.0, 1.0, 3.0]
    old = load_trace(csv_of(tmp_path, {"timestamp": ["1970-01-01T00:00:10Z", "1970-01-01T00:00:12Z"],
                                       "prompt_tokens": [5, 6]}, "old.csv"))
    assert old["arrival"].tolist() == [10.0, 12.0]
    with pytest.raises(ConfigError, match=r"row 3 \(line 4\), field 'arrival' \(column 'timestamp'\): 'soon'"):
        load_trace(csv_of(tmp_path, {"timestamp": ["2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z", "soon"],
                                     "prompt_tokens": [5, 6, 7]}, "bad.csv"))
    with pytest.raises(ConfigError, match=r"row 2 \(line 3\), field 'arrival'.*on every row"):
        load_trace(csv_of(tmp_path, {"arrival_time": [0.0, float("inf"), 2.0], "prompt_tokens": [5, 6, 7]}, "inf.csv"))
    with pytest.raises(ConfigError, match=r"row 3 \(line 4\), field 'arrival'"):
        load_trace(csv_of(tmp_path, {"arrival_time": [0.0, 1.0, -2.0], "prompt_tokens": [5, 6, 7]}, "neg.csv"))


def test_csv_rows_count_blank_lines_and_tables_keep_their_columns(tmp_path):
    """A blank line is no request but keeps the file's numbering; a column named `index` is
    carried without harm; the table holds the canonical columns and _row only."""
    p = tmp_path / "b.csv"
    p.write_text("arrival_time,prompt_tokens,index\n0.0,5,9\n\n1.0,x,9\n")
    with pytest.raises(ConfigError, match=r"row 3 \(line 4\), field 'prompt_tokens'"):
        load_trace(p)
    p.write_text("arrival_time,prompt_tokens,index\n0.0,5,9\n\n1.0,6,9\n")
    t = load_trace(p)
    assert t["prompt_tokens"].tolist() == [5, 6] and t["_row"].tolist() == [1, 3]
    assert set(t.columns) == {"arrival", "prompt_tokens", "_row"}


def test_appended_results_replay_the_last_one(tmp_path):
    """`vllm bench serve --append-result` writes one JSON object per line: the last is replayed
    (warned about at the caller's line); two lines as well as three."""
    objs = [{"input_lens": [k] * 2, "output_lens": [1, 1], "start_times": [0.0, 1.0]} for k in (10, 20, 30)]
    for n in (2, 3):
        p = tmp_path / f"a{n}.json"
        p.write_text("\n".join(json.dumps(o) for o in objs[:n]) + "\n")
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            df = load_vllm_bench(p)
        assert df["prompt_tokens"].tolist() == [10 * n] * 2
        assert [r.filename for r in rec if "several results" in str(r.message)] == [__file__]


def test_regenerated_arrivals_follow_vllms_gamma_law_and_the_seed(tmp_path):
    """No start_times: arrivals are vLLM's Gamma law at request_rate, burstiness 1 when absent,
    drawn from the 'arrivals' stream of the seed (0 by default); request_rate Infinity (a float)
    sends everything at 0; max_concurrency = the number of requests is no closed loop."""
    from sim.rng import stream
    from sim.workloads.laws import gamma_arrivals
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"request_rate": 4.0, "input_lens": [10] * 30, "output_lens": [5] * 30}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, a0, a1 = load_vllm_bench(p), load_vllm_bench(p, 0), load_vllm_bench(p, 1)
        t = load_trace(p)
    want = gamma_arrivals(30, 4.0, 1.0, stream(0, "arrivals"), vllm_scaling=True)
    assert a["arrival"].tolist() == pytest.approx(list(want), rel=1e-12)
    assert a0["arrival"].tolist() == a["arrival"].tolist() != a1["arrival"].tolist()
    assert t["arrival"].tolist() == pytest.approx(sorted(want), rel=1e-12)
    p.write_text(json.dumps({"request_rate": float("inf"), "input_lens": [10] * 3, "output_lens": [5] * 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_vllm_bench(p)["arrival"].tolist() == [0.0, 0.0, 0.0]
    q = bench(tmp_path / "c.json", 4, max_concurrency=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "ready times" warning
        assert load_vllm_bench(q)["arrival"].tolist() == [0.0, 0.5, 1.0, 1.5]


def test_image_columns_of_a_trace(tmp_path):
    """num_images 1 is one image; an image-input row needs both sides (or images / image_sizes);
    image_sizes lists several; image_ids need one id per image (one for a plain size)."""
    base = {"arrival_time": [0.0], "prompt_tokens": [5], "task": ["edit"]}
    (r,) = list(request_source(trace_cfg(csv_of(tmp_path, {**base, "image_height": [256], "image_width": [512],
                                                         "num_images": [1]})), 0))
    assert r.input_images == ((256, 512),)
    for cols in ({"image_height": [256], "image_width": [None]},
                 {"image_height": [256], "image_width": [None], "num_images": [2]}):
        with pytest.raises(ConfigError, match=r"row 1 \(line 2\), fields 'image_height', 'image_width'"):
            request_source(trace_cfg(csv_of(tmp_path, {**base, **cols}, "h.csv")), 0)
    (s,) = list(request_source(trace_cfg(csv_of(tmp_path, {**base, "image_sizes": ["512x512;1024X768"],
                                                         "image_ids": ["3;4"]}, "s.csv")), 0))
    assert s.input_images == ((512, 512), (1024, 768)) and s.image_ids == (3, 4)
    (u,) = list(request_source(trace_cfg(csv_of(tmp_path, {**base, "image_height": [64], "image_width": [64],
                                                         "image_ids": ["7"]}, "u.csv")), 0))
    assert u.image_ids == (7,)
    with pytest.raises(ConfigError, match="'image_ids' has 2 ids for 1 images"):
        request_source(trace_cfg(csv_of(tmp_path, {**base, "image_height": [64], "image_width": [64],
                                                   "image_ids": ["7;8"]}, "v.csv")), 0)


def test_row_defaults_steps_one_and_rows_of_a_given_table(tmp_path):
    """workload.steps=1 without a steps column is valid (one step); a prompt of 0 tokens is
    served as 1; an empty output_tokens cell of a text row is 0. A table given directly (no _row
    column) numbers its rows from 1."""
    from sim.workloads.trace import TraceTable, TraceWorkload
    p = csv_of(tmp_path, {"arrival_time": [0.0, 1.0], "prompt_tokens": [0, 6], "task": ["generate", "text"],
                          "output_tokens": [None, None]})
    cfg = trace_cfg(p)
    cfg.steps = 1
    g, t = list(request_source(cfg, 0))
    assert (g.steps, g.prompt_tokens) == (1, 1)
    assert (t.output_tokens, t.prompt_tokens) == (0, 6)
    table = TraceTable({"arrival": [0.0, 1.0], "prompt_tokens": [5, 6], "task": ["text", "video"],
                        "output_tokens": [1, 1]})
    with pytest.raises(ConfigError, match=r"row 2, field 'task': 'video'"):
        TraceWorkload(trace_cfg(p), 0, table=table)


# --- the column store: which reader needs pandas, cells of every kind and format ---------------

READ_AND_LIST_PANDAS_IMPORTERS = r"""
import builtins, json, sys, warnings
real_import = builtins.__import__
importers = set()


def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if name.split(".")[0] == "pandas":
        importers.add((globals or {}).get("__name__", ""))
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = spy
from sim.config import ArrivalConfig, TraceConfig, WorkloadConfig
from sim.workloads.trace import TraceWorkload
for path in sys.argv[1:]:
    cfg = WorkloadConfig(arrival=ArrivalConfig(process="trace"), trace=TraceConfig(path=path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(TraceWorkload(cfg, 0))
print(json.dumps({"loaded": "pandas" in sys.modules,
                  "importers": sorted(m for m in importers if m.startswith(("sim", "profiler")))}))
"""


def pandas_use(*paths) -> dict:
    """Replay the traces in a fresh process: whether pandas got loaded, and which of the
    project's modules ran an `import pandas`."""
    p = subprocess.run([sys.executable, "-c", READ_AND_LIST_PANDAS_IMPORTERS, *map(str, paths)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pandas_free_traces(tmp_path_factory):
    """A vLLM bench result (with images), a JSONL and a parquet trace: numeric arrivals, image
    tasks, empty cells."""
    d = tmp_path_factory.mktemp("nopandas")
    b = bench(d / "img.json", 3, images=[[[64, 64]], [], [[32, 48], [48, 32]]], image_tokens=[4, 0, 8])
    j = d / "t.jsonl"
    j.write_text('{"arrival_time": 0.5, "task": "edit", "prompt_tokens": 5, "image_height": 64,'
                 ' "image_width": 32, "cfg": null}\n'
                 '{"arrival_time": 0.25, "prompt_tokens": "7", "output_tokens": 3, "slo_class": null}\n')
    q = d / "t.parquet"
    pq.write_table(pa.table({"timestamp": [1.7e9 + 1, 1.7e9], "input_len": [5, None],
                             "output_tokens": pa.array([2, 3], pa.int16()), "task": ["text", None]}), q)
    return [EXAMPLES / "example_vllm_bench.json", b, j, q]


def test_the_json_jsonl_and_parquet_readers_import_no_pandas(pandas_free_traces, tmp_path):
    """Reading a bench result, a JSONL or a parquet trace runs no `import pandas` in
    sim.workloads; a CSV trace does (pandas' CSV parser, imported when a CSV is read)."""
    use = pandas_use(*pandas_free_traces)
    assert not [m for m in use["importers"] if m.startswith("sim.workloads")], use
    c = tmp_path / "t.csv"
    c.write_text("arrival_time,prompt_tokens,output_tokens\n0,5,1\n")
    assert "sim.workloads.trace" in pandas_use(c)["importers"]


def test_a_replay_of_json_jsonl_and_parquet_traces_loads_no_pandas(pandas_free_traces):
    assert pandas_use(*pandas_free_traces)["loaded"] is False


@pytest.mark.parametrize("cell, value", [(" 7 ", 7), ("1e2", 100), ("+3", 3), ("8.", 8), (".5e1", 5),
                                         ("\t12\n", 12), (9.0, 9), (True, 1), ("0", 0)])
def test_a_number_cell_can_be_text_or_a_bool(tmp_path, cell, value):
    """A numeric cell is a number, a bool (True is 1) or number text as pandas reads it: decimal
    notation with surrounding white space."""
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps({"arrival_time": 0, "prompt_tokens": 5, "output_tokens": cell}) + "\n")
    assert load_trace(p)["output_tokens"].tolist() == [value]
    (r,) = request_source(trace_cfg(p), 0)
    assert r.output_tokens == value and type(r.output_tokens) is int


@pytest.mark.parametrize("cell", ["1_000", "\u0663", "0x10", "nan", " inf", "inf", "1e", "1 000", [5], {"n": 5}])
def test_other_cells_are_no_numbers(tmp_path, cell):
    """Python-only number forms (underscores, other scripts' digits, hex), nan and inf, lists and
    objects are refused with the line and the cell as written."""
    p = tmp_path / "n.jsonl"
    p.write_text('{"arrival_time": 0, "prompt_tokens": 5, "output_tokens": 1}\n\n'
                 + json.dumps({"arrival_time": 1, "prompt_tokens": 5, "output_tokens": cell}) + "\n")
    with pytest.raises(ConfigError) as e:
        load_trace(p)
    assert str(e.value) == (f"trace {str(p)!r}: line 3, field 'output_tokens': {cell!r} is invalid; "
                            f"allowed: a whole number of tokens >= 0")


def test_number_text_reads_as_pandas_reads_it():
    """The text a numeric cell may hold is what pandas.to_numeric reads (a CSV column of text
    went through it), number for number."""
    from sim.workloads.trace import _numbers
    cells = [" 1.5 ", "1.5\n", "\t2", "1e-5", "1E+05", "+.5e1", "-0", "00012", "1.", ".", "+", "e5",
             "1e5.5", "12abc", "", "  ", "0.1e-400", "1e400", "-1e400", "+inf", "-Infinity", "INF",
             " inf", "inf ", "nan", "NaN", "1_000", "\u0663", "\u00a01", "1,5", "None", None, math.nan,
             True, False, 7, -3.25, [1], "0.30000000000000004", "123456789012345678901234567890"]
    col = np.empty(len(cells), dtype=object)
    for i, c in enumerate(cells):
        col[i] = c
    want = pd.to_numeric(pd.Series(col, dtype=object), errors="coerce").to_numpy(dtype=float)
    np.testing.assert_array_equal(_numbers(col), want)


def test_empty_cells_are_the_same_in_every_format(tmp_path):
    """A missing key, null, "" and white space are empty cells (the default applies) in JSONL;
    the same rows as CSV (blank cells) and parquet (nulls) replay to the same requests; an
    empty arrival is refused the same way in each format."""
    rows = [{"arrival_time": 0.0, "task": "generate", "prompt_tokens": 5, "steps": None, "cfg": "",
             "slo_class": "  ", "model": None},
            {"arrival_time": 1.0, "task": " ", "prompt_tokens": 6, "output_tokens": ""},
            {"arrival_time": 2.0, "task": None, "prompt_tokens": 7, "output_tokens": 4, "model": "qwen2_5_7b"}]
    j = tmp_path / "e.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    g, t, m = request_source(trace_cfg(j), 0)
    assert (g.steps, g.cfg, g.slo_class, g.model) == (50, True, "standard", "qwen_image")
    assert (t.task, t.output_tokens, t.model) == ("text", 0, "qwen2_5_vl_7b")
    assert (m.task, m.output_tokens, m.model) == ("text", 4, "qwen2_5_7b")
    full = pd.DataFrame(rows).replace({"": None, " ": None, "  ": None})
    c, q = tmp_path / "e.csv", tmp_path / "e.parquet"
    full.to_csv(c, index=False)
    pq.write_table(pa.Table.from_pandas(full, preserve_index=False), q)
    for p in (c, q):
        assert [key(r) for r in request_source(trace_cfg(p), 0)] == [key(r) for r in (g, t, m)]
    bad = {"arrival_time": [0.0, None], "prompt_tokens": [5, 6], "output_tokens": [1, 1]}
    j.write_text('{"arrival_time": 0.0, "prompt_tokens": 5, "output_tokens": 1}\n'
                 '{"prompt_tokens": 6, "output_tokens": 1}\n')
    pd.DataFrame(bad).to_csv(c, index=False)
    pq.write_table(pa.table(bad), q)
    for p, at in ((j, "line 2"), (c, r"row 2 \(line 3\)"), (q, "row 2")):
        with pytest.raises(ConfigError) as e:
            load_trace(p)
        assert re.fullmatch(rf"trace '.*': {at}, field 'arrival' \(column 'arrival_time'\): nan is invalid; "
                            r"allowed: seconds from the trace's start \(>= 0\) on every row", str(e.value))


def test_a_column_of_mixed_cells(tmp_path):
    """Cells of one column may differ in type: numbers, number text and bools in a numeric
    column; bools, 0/1 and words in cfg; a text column's non-text cell is refused as written."""
    p = tmp_path / "m.jsonl"
    cells = [(3, True), ("4", 0), (5.0, "no"), (True, "Yes"), (" 6", 1.0)]
    p.write_text("".join(json.dumps({"arrival_time": i, "task": "generate", "prompt_tokens": 5,
                                     "steps": s, "cfg": c}) + "\n" for i, (s, c) in enumerate(cells)))
    assert [(r.steps, r.cfg) for r in request_source(trace_cfg(p), 0)] == [
        (3, True), (4, False), (5, False), (1, True), (6, True)]
    p.write_text('{"arrival_time": 0, "prompt_tokens": 5, "output_tokens": 1, "task": "text"}\n'
                 '{"arrival_time": 1, "prompt_tokens": 5, "output_tokens": 1, "task": 3}\n')
    with pytest.raises(ConfigError, match=r"line 2, field 'task': 3 is invalid; allowed: one of \['text'"):
        request_source(trace_cfg(p), 0)
    p.write_text('{"arrival_time": 0, "prompt_tokens": 5}\n{"arrival_time": "", "prompt_tokens": 5}\n')
    with pytest.raises(ConfigError, match=r"line 2, field 'arrival' \(column 'arrival_time'\): '' is invalid; "
                                          r"allowed: seconds from the trace's start \(>= 0\), or a date and time"):
        load_trace(p)


def test_dates_in_jsonl_and_parquet_timestamps_are_epoch_seconds(tmp_path):
    """ISO dates in a JSONL trace (any UTC offset, or none: UTC) and a parquet timestamp column
    (any unit, with or without a time zone) are the same arrivals; a missing timestamp is
    refused with its row."""
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps({"timestamp": s, "prompt_tokens": 5, "output_tokens": 1}) + "\n" for s in
                         ["2024-01-01T01:00:01.5+01:00", "2024-01-01T00:00:00Z", "2024-01-01 00:00:03"]))
    assert load_trace(j)["arrival"].tolist() == [0.0, 1.5, 3.0]
    when = np.array(["2024-01-01T00:00:01.5", "2024-01-01T00:00:00", "2024-01-01T00:00:03"], "M8[ms]")
    for kind in (pa.timestamp("ns"), pa.timestamp("us", tz="UTC"), pa.timestamp("s", tz="Europe/Paris")):
        q = tmp_path / "d.parquet"
        stamps = pa.array(when.astype("M8[ns]"), pa.timestamp("ns")).cast(kind, safe=False)
        pq.write_table(pa.table({"timestamp": stamps, "prompt_tokens": [5, 6, 7], "output_tokens": [1, 1, 1]}), q)
        want = [0.0, 1.5, 3.0] if kind.unit != "s" else [0.0, 1.0, 3.0]
        assert load_trace(q)["arrival"].tolist() == want, kind
    pq.write_table(pa.table({"timestamp": pa.array([when[0], None], pa.timestamp("ms")),
                             "prompt_tokens": [5, 6], "output_tokens": [1, 1]}), q)
    with pytest.raises(ConfigError, match=r"row 2, field 'arrival' \(column 'timestamp'\): nan is invalid"):
        load_trace(q)


def test_rows_of_one_arrival_keep_the_file_order(tmp_path):
    """The sort by arrival is stable: rows that arrive together keep their order in the file."""
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps({"arrival_time": (7 * i) % 3, "prompt_tokens": i, "output_tokens": 1}) + "\n"
                         for i in range(60)))
    t = load_trace(p)
    assert t["prompt_tokens"].tolist() == sorted(range(60), key=lambda i: ((7 * i) % 3, i))
    assert t["_row"].tolist() == [i + 1 for i in t["prompt_tokens"].astype(int)]


def test_aliases_ignore_case_and_the_first_accepted_name_wins(tmp_path):
    """Column names match in any case; where a file has two accepted names of one field, the
    first in ALIASES is read, and a message names the column as the file writes it."""
    p = tmp_path / "a.jsonl"
    p.write_text('{"Timestamp": 9, "ARRIVAL_TIME": 1, "Prompt_Len": 3, "INPUT_LEN": 5, "Max_Tokens": 2}\n')
    t = load_trace(p)
    assert (t["arrival"].tolist(), t["prompt_tokens"].tolist(), t["output_tokens"].tolist()) == ([1.0], [5.0], [2.0])
    assert set(t.columns) == {"arrival", "prompt_tokens", "output_tokens", "_row"}
    p.write_text('{"Timestamp": 9, "ARRIVAL_TIME": 1, "Prompt_Len": 3, "INPUT_LEN": -5, "Max_Tokens": 2}\n')
    with pytest.raises(ConfigError, match=r"line 1, field 'prompt_tokens' \(column 'INPUT_LEN'\): -5 is invalid"):
        load_trace(p)


def test_parquet_column_types(tmp_path):
    """Narrow, unsigned, nullable and decimal numbers, dictionary-encoded text, nullable bools
    and an `images` list column replay as the same requests as their JSONL rows."""
    import decimal
    rows = [{"arrival_time": 0.5, "task": "understand", "prompt_tokens": 5, "output_tokens": 3,
             "images": [[64, 32], [16, 16]], "slo_class": "batch", "image_ids": "1;2"},
            {"arrival_time": 0.25, "task": "generate", "prompt_tokens": 6, "output_tokens": None,
             "steps": 4, "cfg": False, "output_height": 512, "output_width": 256},
            {"arrival_time": 1.0, "task": "edit", "prompt_tokens": 7, "image_height": 96, "image_width": 128,
             "cfg": None, "steps": 3, "slo_class": "batch"}]
    j = tmp_path / "t.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    col = lambda k: [r.get(k) for r in rows]     # noqa: E731
    q = tmp_path / "t.parquet"
    pq.write_table(pa.table({
        "arrival_time": pa.array([decimal.Decimal(str(x)) for x in col("arrival_time")], pa.decimal128(6, 3)),
        "task": pa.array(col("task")).dictionary_encode(),
        "prompt_tokens": pa.array(col("prompt_tokens"), pa.uint16()),
        "output_tokens": pa.array(col("output_tokens"), pa.int8()), "steps": pa.array(col("steps"), pa.float32()),
        "cfg": pa.array(col("cfg"), pa.bool_()), "images": pa.array(col("images"), pa.list_(pa.list_(pa.int32()))),
        "slo_class": col("slo_class"), "image_ids": col("image_ids"),
        "output_height": pa.array(col("output_height"), pa.int64()), "output_width": col("output_width"),
        "image_height": col("image_height"), "image_width": col("image_width")}), q)
    want = [key(r) for r in request_source(trace_cfg(j), 0)]
    assert want[1][:2] == ("understand", "qwen2_5_vl_7b") and want[1][4] == ((64, 32), (16, 16))
    assert [key(r) for r in request_source(trace_cfg(q), 0)] == want
    tj, tq = load_trace(j), load_trace(q)
    for c in ("arrival", "prompt_tokens", "output_tokens", "steps", "output_height", "image_width", "_row"):
        np.testing.assert_array_equal(tq[c], tj[c], err_msg=c)      # NaN where empty
    sliced = tmp_path / "s.parquet"          # row groups of 2: the table arrives in chunks
    pq.write_table(pq.read_table(q), sliced, row_group_size=2)
    assert [key(r) for r in request_source(trace_cfg(sliced), 0)] == want


def test_trace_tables_of_python_values():
    """A column of ints is int64; one with a missing cell is float64 (NaN); bools, text and
    lists stay Python values (a list is one cell); rows are taken by mask or order."""
    from sim.workloads.trace import TraceTable, column
    assert column([1, 2]).dtype == np.int64
    assert np.array_equal(column([1, None, 2.5]), [1.0, np.nan, 2.5], equal_nan=True)
    assert column([True, None]).tolist() == [True, None] and column([True, None]).dtype == object
    lists = column([[1, 2], [3, 4]])
    assert lists.shape == (2,) and lists[1] == [3, 4]
    t = TraceTable({"a": [3, 1, 2], "b": ["x", None, "z"]}, max_concurrency=4)
    assert len(t) == 3 and t.columns == ["a", "b"] and "b" in t and "c" not in t
    assert t.take(np.array([1, 2, 0]))["b"].tolist() == [None, "z", "x"]
    assert t.take(np.array([True, False, True]))["a"].tolist() == [3, 2]
    df = t.to_pandas()
    assert df["a"].tolist() == [3, 1, 2] and df.attrs["max_concurrency"] == 4
