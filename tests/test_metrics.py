"""MetricsCollector summary against hand-computed figures, NaN-free JSON, parquet writer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.config import SLOConfig
from sim.run.metrics import MetricsCollector
from sim.run.output import (REQUEST_COLUMNS, REQUEST_SCHEMA, WIDE_STAGES, RequestsParquetWriter,
                            arrow_array, arrow_table, meets_slo, print_summary, request_row,
                            write_json_atomic)
from sim.core.records import Request, StageRecord

UTIL = {"per_stage": {"prefill": 0.5}, "per_gpu": {"0": 0.5}, "mean_gpu": 0.5}
SLO = SLOConfig(targets={"text": {"ttft_ms": 250.0, "tpot_ms": 150.0},
                         "generate": {"e2el_ms": 5000.0}})


def text_req(i: int, arrival: float, start: float, first: float, finish: float, out: int,
             preempt: int = 0) -> Request:
    r = Request(id=i, arrival=arrival, task="text", model="m", prompt_tokens=100,
                output_tokens=out, preemptions=preempt)
    r.stages = [StageRecord("prefill", "g0", arrival, start, first),
                StageRecord("decode", "g0", first, first, finish)]
    r.first_token, r.finish = first, finish
    return r


def gen_req(i: int, arrival: float, finish: float, size: tuple[int, int] = (1024, 768),
            edit: bool = False) -> Request:
    r = Request(id=i, arrival=arrival, task="edit" if edit else "generate", model="qi",
                prompt_tokens=50, output_image=size, steps=20, cfg=True,
                input_images=((512, 512), (256, 256)) if edit else (),
                image_tokens_in=330 if edit else 0, image_tokens_out=3072)
    mid = arrival + 0.5 * (finish - arrival)
    r.stages = [StageRecord("text_encode", "e0", arrival, arrival + 0.1, arrival + 0.2),
                StageRecord("dit_step", "d0", arrival + 0.2, arrival + 0.3, mid),
                StageRecord("dit_step", "d1", mid, mid + 0.1, finish - 0.2),
                StageRecord("vae_decode", "v0", finish - 0.2, finish - 0.2, finish)]
    r.finish = finish
    return r


def four_requests() -> list[Request]:
    # ttft 100/300/200/500 ms; tpot 100/200/undefined/250 ms; e2el 1000/2300/200/1500 ms
    return [text_req(0, 0.0, 0.05, 0.1, 1.0, 10),
            text_req(1, 1.0, 1.1, 1.3, 3.3, 11, preempt=2),
            text_req(2, 2.0, 2.0, 2.2, 2.2, 1),
            text_req(3, 3.0, 3.25, 3.5, 4.5, 5)]


def test_hand_computed_summary() -> None:
    c = MetricsCollector(SLO)
    for r in four_requests():
        c.record(r)
    for _ in range(3):
        c.add_itl(0.010, 2)
    c.add_itl(0.030, 2)
    s = c.summary(10.0, num_gpus=4, gpu_kind="h100", usd_per_gpu_hour=3.6, slo=SLO,
                  utilization=UTIL, extra={"extrapolated_points": 0})
    assert s["completed"] == 4 and s["duration"] == 10.0
    assert s["total_input_tokens"] == 400 and s["total_output_tokens"] == 27
    assert s["request_throughput"] == pytest.approx(0.4)
    assert s["output_throughput"] == pytest.approx(2.7)
    assert s["total_token_throughput"] == pytest.approx(42.7)
    # e2el sorted 200, 1000, 1500, 2300
    assert s["mean_e2el_ms"] == pytest.approx(1250.0)
    assert s["median_e2el_ms"] == pytest.approx(1250.0)
    assert s["p99_e2el_ms"] == pytest.approx(1500 + 0.97 * 800)
    assert s["std_e2el_ms"] == pytest.approx(np.std([1000, 2300, 200, 1500]))
    # ttft sorted 100, 200, 300, 500
    assert s["mean_ttft_ms"] == pytest.approx(275.0)
    assert s["median_ttft_ms"] == pytest.approx(250.0)
    assert s["p99_ttft_ms"] == pytest.approx(300 + 0.97 * 200)
    # tpot excludes the 1-token request (vLLM)
    assert s["mean_tpot_ms"] == pytest.approx((100 + 200 + 250) / 3)
    assert s["median_tpot_ms"] == pytest.approx(200.0)
    # itl: weights 2,2,2 at 10 ms and 2 at 30 ms -> mean 15 ms
    assert s["mean_itl_ms"] == pytest.approx(15.0)
    assert s["median_itl_ms"] == pytest.approx(10.0, rel=0.005)
    assert s["p99_itl_ms"] == pytest.approx(30.0, rel=0.005)
    # queue = arrival -> first stage start: 50, 100, 0, 250
    assert s["mean_queue_ms"] == pytest.approx(100.0)
    assert s["median_queue_ms"] == pytest.approx(75.0)
    # SLO: r0 (100, 100) ok; r1 ttft 300 fails; r2 (200, undefined tpot) ok; r3 fails
    assert s["goodput"] == pytest.approx(0.2) and s["request_goodput"] == pytest.approx(0.2)
    assert s["slo_attainment"] == pytest.approx(0.5)
    assert s["per_task"]["text"]["slo_attainment"] == pytest.approx(0.5)
    assert s["per_task"]["text"]["completed"] == 4
    assert s["per_task"]["text"]["p99_e2el_ms"] == pytest.approx(s["p99_e2el_ms"])
    assert s["per_task"]["text"]["median_ttft_ms"] == pytest.approx(250.0)
    # cost: 4 GPUs x 10 s = 1/90 GPU-h at $3.6 -> $0.04 for 4 requests -> $10 per 1k
    assert s["gpu_hours"] == pytest.approx(4 * 10 / 3600)
    assert s["cost_usd"] == pytest.approx(0.04)
    assert s["usd_per_1k_requests"] == pytest.approx(10.0)
    assert s["preemptions"] == 2
    assert s["utilization"] == UTIL and s["extrapolated_points"] == 0
    ps = s["per_stage"]
    assert set(ps) == {"prefill", "decode"} and ps["prefill"]["visits"] == 4
    assert ps["prefill"]["mean_queue_ms"] == pytest.approx(100.0)
    assert ps["prefill"]["mean_service_ms"] == pytest.approx((50 + 200 + 200 + 250) / 4)
    assert s["unified_token_throughput"] == pytest.approx(42.7)
    json.dumps(s, allow_nan=False)
    print_summary(s, "hand-built")


def test_image_output_requests_are_nan_free() -> None:
    c = MetricsCollector(SLO)
    c.record(gen_req(0, 0.0, 3.0))
    c.record(gen_req(1, 1.0, 7.5, edit=True))
    s = c.summary(20.0, 8, "h100", 2.99, SLO, UTIL)
    text = json.dumps(s, allow_nan=False)
    assert "NaN" not in text
    for m in ("ttft", "tpot", "itl"):
        for w in ("mean", "median", "std", "p90", "p99"):
            assert s[f"{w}_{m}_ms"] is None
    assert s["mean_e2el_ms"] == pytest.approx(4750.0)
    assert s["total_output_tokens"] == 0
    assert s["image_output_tokens"] == 6144 and s["image_input_tokens"] == 330
    assert s["image_output_throughput"] == pytest.approx(6144 / 20)
    assert s["unified_token_throughput"] == pytest.approx((100 + 330 + 6144) / 20)
    # generate (e2el 3000 <= 5000) met; edit has no target -> met
    assert s["slo_attainment"] == 1.0
    assert "mean_ttft_ms" not in s["per_task"]["generate"]
    assert s["per_stage"]["dit_step"]["visits"] == 4


def test_empty_collector_summary() -> None:
    s = MetricsCollector().summary(5.0, 1, "h100", 2.99, SLO, UTIL)
    json.dumps(s, allow_nan=False)
    assert s["completed"] == 0 and s["slo_attainment"] is None
    assert s["usd_per_1k_requests"] is None and s["mean_e2el_ms"] is None
    with pytest.raises(ValueError):
        MetricsCollector().summary(0.0, 1, "h100", 2.99, SLO, UTIL)
    with pytest.raises(TypeError):
        MetricsCollector().summary(1.0, 1, "h100", 2.99, SLO, [])  # type: ignore[arg-type]


def test_request_row_wide_stages() -> None:
    r = gen_req(7, 1.0, 5.0, edit=True)
    row = request_row(r, SLO)
    assert list(row) == list(REQUEST_COLUMNS)
    assert (row["input_h"], row["input_w"], row["num_input_images"]) == (512, 512, 2)
    assert (row["output_h"], row["output_w"]) == (1024, 768)
    assert row["dit_step_enqueue"] == pytest.approx(1.2)   # first enqueue
    assert row["dit_step_start"] == pytest.approx(1.3)     # first start
    assert row["dit_step_end"] == pytest.approx(4.8)       # last end
    assert row["prefill_start"] is None and row["ttft_ms"] is None
    assert row["queue_ms"] == pytest.approx(100.0) and row["slo_met"] is True
    assert request_row(r, None)["slo_met"] is None
    for s in WIDE_STAGES:
        assert f"{s}_end" in row


def test_meets_slo_scalar_and_vector_agree() -> None:
    ttft = np.array([100.0, 300.0, 200.0, np.nan])
    tpot = np.array([100.0, 100.0, np.nan, 100.0])
    e2el = np.array([1.0, 1.0, 1.0, 1.0])
    vec = meets_slo("text", ttft, tpot, e2el, SLO)
    assert list(vec) == [bool(meets_slo("text", a, b, c, SLO)) for a, b, c in zip(ttft, tpot, e2el)]
    assert list(vec) == [True, False, True, True]
    assert bool(meets_slo("inpaint", np.nan, np.nan, 1e9, SLO))   # no targets -> met
    assert not bool(meets_slo("generate", 1e9, 1e9, 6000.0, SLO))


def test_parquet_round_trip_chunks(tmp_path: Path) -> None:
    reqs = [text_req(i, float(i), i + 0.1, i + 0.2, i + 1.0, 5) if i % 3 else
            gen_req(i, float(i), i + 2.0) for i in range(25)]
    c = MetricsCollector(SLO)
    path = tmp_path / "out" / "requests.parquet"
    with RequestsParquetWriter(path, chunk_rows=10, slo=SLO) as w:
        for r in reqs:
            w.add_row(c.record(r))
    assert w.rows_written == 25
    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups == 3 and f.metadata.num_rows == 25
    df = pd.read_parquet(path)
    assert list(df.columns) == list(REQUEST_COLUMNS)
    pd.testing.assert_frame_equal(df, c.requests_frame())
    assert df["ttft_ms"].isna().sum() == 9            # image-out rows are null
    assert df.loc[1, "ttft_ms"] == pytest.approx(200.0)
    assert [p.name for p in path.parent.iterdir()] == ["requests.parquet"]
    # add() builds the same rows
    p2 = tmp_path / "r2.parquet"
    with RequestsParquetWriter(p2, chunk_rows=7, slo=SLO) as w2:
        for r in reqs:
            w2.add(r)
    pd.testing.assert_frame_equal(pd.read_parquet(p2), df)


# a value of each REQUEST_SCHEMA type as request_row writes it, or None
CELLS = {
    "int32": st.integers(-2**31, 2**31 - 1), "int64": st.integers(-2**63, 2**63 - 1),
    "double": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**53, 2**53)),
    "bool": st.one_of(st.booleans(), st.sampled_from([np.bool_(True), np.bool_(False)])),
    "string": st.text(),
}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_arrow_array_is_pa_array(data) -> None:
    """arrow_array(values, type) == pa.array(values, type) for every type of REQUEST_SCHEMA:
    nulls (None) anywhere, NaN kept as a value, extreme ints, unicode text, numpy bools."""
    import pyarrow as pa
    typ = data.draw(st.sampled_from(sorted({f.type for f in REQUEST_SCHEMA}, key=str)))
    values = data.draw(st.lists(st.one_of(st.none(), CELLS[str(typ)]), max_size=40))
    got, want = arrow_array(values, typ), pa.array(values, typ)
    assert got.type == want.type and got.null_count == want.null_count
    assert got.to_pylist() == want.to_pylist() or all(   # NaN != NaN in to_pylist's lists
        (a is None and b is None) or a == b or (a != a and b != b)
        for a, b in zip(got.to_pylist(), want.to_pylist()))
    got.validate(full=True)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_arrow_table_is_pa_table(data) -> None:
    """arrow_table(columns, schema) writes the parquet bytes pa.table(columns, schema=schema)
    writes, for timeline.parquet's schema and REQUEST_SCHEMA, nulls anywhere."""
    import pyarrow as pa
    from sim.run.timeline import TIMELINE_SCHEMA
    schema = data.draw(st.sampled_from([TIMELINE_SCHEMA, REQUEST_SCHEMA]))
    n = data.draw(st.integers(0, 20))
    columns = {f.name: data.draw(st.lists(st.one_of(st.none(), CELLS[str(f.type)]), min_size=n,
                                          max_size=n)) for f in schema}

    def parquet(table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()

    assert parquet(arrow_table(columns, schema)) == parquet(pa.table(columns, schema=schema))


@pytest.mark.parametrize("typ, value, error", [("int32", 2**31, OverflowError),
                                               ("int64", 2**63, OverflowError)])
def test_arrow_array_refuses_what_the_type_cannot_hold(typ, value, error) -> None:
    import pyarrow as pa
    with pytest.raises(error):
        arrow_array([1, value], getattr(pa, typ)())


def test_parquet_no_file_after_exception(tmp_path: Path) -> None:
    path = tmp_path / "requests.parquet"
    with pytest.raises(RuntimeError, match="boom"):
        with RequestsParquetWriter(path, chunk_rows=2, slo=SLO) as w:
            for r in four_requests():
                w.add(r)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_requests_frame_refuses_truncation() -> None:
    c = MetricsCollector(SLO, keep_rows=2)
    for r in four_requests():
        c.record(r)
    with pytest.raises(RuntimeError):
        c.requests_frame()
    assert c.summary(10.0, 1, "h100", 1.0, SLO, UTIL)["completed"] == 4


def test_write_json_atomic(tmp_path: Path) -> None:
    p = tmp_path / "summary.json"
    write_json_atomic(p, {"a": 1, "b": None})
    assert json.loads(p.read_text()) == {"a": 1, "b": None}
    with pytest.raises(ValueError):
        write_json_atomic(p, {"a": math.nan})
    assert json.loads(p.read_text()) == {"a": 1, "b": None}   # old file untouched
    assert [x.name for x in tmp_path.iterdir()] == ["summary.json"]


req_strategy = st.tuples(
    st.sampled_from(["text", "understand", "generate", "edit"]),
    st.floats(0.0, 100.0), st.floats(0.0, 5.0), st.floats(0.001, 5.0), st.floats(0.0, 30.0),
    st.integers(1, 500))


@settings(max_examples=40, deadline=None)
@given(st.lists(req_strategy, min_size=1, max_size=40),
       st.lists(st.tuples(st.floats(1e-4, 1.0), st.integers(1, 64)), max_size=20))
def test_summary_properties(specs: list[tuple[str, float, float, float, float, int]],
                            itls: list[tuple[float, int]]) -> None:
    slo = SLOConfig()
    c = MetricsCollector(slo)
    for i, (task, arr, q, ttft, rest, out) in enumerate(specs):
        r = Request(id=i, arrival=arr, task=task, model="m", prompt_tokens=10,
                    output_tokens=out if task in ("text", "understand") else 0,
                    output_image=None if task in ("text", "understand") else (512, 512))
        r.stages = [StageRecord("prefill", "g", arr, arr + q, arr + q + ttft)]
        if task in ("text", "understand"):
            r.first_token = arr + q + ttft
        r.finish = arr + q + ttft + rest
        c.record(r)
    for d, w in itls:
        c.add_itl(d, w)
    s = c.summary(200.0, 2, "h100", 2.99, slo, UTIL)
    json.dumps(s, allow_nan=False)
    for m in ("ttft", "tpot", "itl", "e2el"):
        if s[f"median_{m}_ms"] is not None:
            assert s[f"median_{m}_ms"] <= s[f"p90_{m}_ms"] * (1 + 1e-12) + 1e-9
            assert s[f"p90_{m}_ms"] <= s[f"p99_{m}_ms"] * (1 + 1e-12) + 1e-9
    assert 0.0 <= s["slo_attainment"] <= 1.0
    assert s["goodput"] <= s["request_throughput"] + 1e-12
    for pt in s["per_task"].values():
        assert 0.0 <= pt["slo_attainment"] <= 1.0
        assert pt["median_e2el_ms"] <= pt["p90_e2el_ms"] + 1e-9 <= pt["p99_e2el_ms"] + 2e-9
    assert sum(pt["completed"] for pt in s["per_task"].values()) == s["completed"]


# --- the large-run path: record(row=False) past keep_rows ----------------------------------------

def mixed_requests() -> list[Request]:
    """Text, 1-token text, understanding, generation and editing requests, some preempted, one
    with a stage that never started and one whose first start precedes the others' order."""
    reqs = four_requests()
    u = Request(id=4, arrival=4.0, task="understand", model="m", prompt_tokens=40,
                output_tokens=3, input_images=((448, 448),), image_tokens_in=256, preemptions=1)
    u.stages = [StageRecord("vision_encode", "e0", 4.0, 4.5, 4.6),
                StageRecord("prefill", "g0", 4.6, 4.4, 4.8),      # starts before the encoder
                StageRecord("decode", "g0", 4.8, 4.8, 5.6),
                StageRecord("transfer", "net", 4.8)]              # never started: no statistic
    u.first_token, u.finish = 4.8, 5.6
    return reqs + [u, gen_req(5, 5.0, 9.0), gen_req(6, 6.0, 7.5, edit=True)]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("keep_rows", [0, 3])
def test_fast_path_summary_equals_row_path(keep_rows: int) -> None:
    """Rows past keep_rows (every row of a keep_rows=0 run) are recorded without building the
    row (MetricsCollector._record_fast): the summary must be the same, value for value."""
    rows, fast = MetricsCollector(SLO), MetricsCollector(SLO, keep_rows=keep_rows)
    for r in mixed_requests():
        assert rows.record(r) is not None
        assert fast.record(r, row=False) is None
    for c in (rows, fast):
        c.add_itl(0.02, 3)
    s_rows = rows.summary(12.0, 2, "h100", 2.0, SLO, UTIL)
    s_fast = fast.summary(12.0, 2, "h100", 2.0, SLO, UTIL)
    assert _same(s_rows, s_fast), [k for k in s_rows if not _same(s_rows[k], s_fast.get(k))]
    # and the figures are the hand-computed ones, not merely equal to each other
    assert s_fast["mean_queue_ms"] == pytest.approx((50 + 100 + 0 + 250 + 400 + 100 + 100) / 7)
    assert s_fast["per_task"]["understand"]["mean_e2el_ms"] == pytest.approx(1600.0)
    assert s_fast["per_task"]["understand"]["mean_ttft_ms"] == pytest.approx(800.0)
    assert s_fast["per_task"]["understand"]["mean_tpot_ms"] == pytest.approx(400.0)
    assert s_fast["preemptions"] == 3
    assert s_fast["per_stage"]["prefill"]["visits"] == 5
    assert s_fast["per_stage"]["transfer"]["visits"] == 0
    # a visit that started but has no end counts as a visit (its queue time is known)
    c = MetricsCollector(SLO, keep_rows=keep_rows)
    r = text_req(0, 0.0, 0.05, 0.1, 1.0, 10)
    r.stages.append(StageRecord("vae_decode", "g1", 0.2, 0.3))
    c.record(r, row=False)
    st = c.summary(12.0, 2, "h100", 2.0, SLO, UTIL)["per_stage"]["vae_decode"]
    assert st["visits"] == 1 and st["mean_queue_ms"] == pytest.approx(100.0)
    assert st["mean_service_ms"] is None


def test_fast_path_keeps_non_finite_times_out_of_the_statistics() -> None:
    """A time that is not finite is undefined (NaN) on both paths, never +-inf in a statistic."""
    def req(i: int, arrival: float, first: float, finish: float, out: int) -> Request:
        r = Request(id=i, arrival=arrival, task="text", model="m", prompt_tokens=10,
                    output_tokens=out)
        r.stages = [StageRecord("prefill", "g0", float(i), i + 0.1, i + 0.2)]
        r.first_token, r.finish = first, finish
        return r
    reqs = [req(0, 0.0, 0.2, 1.2, 6),             # all finite
            req(1, 1.0, 1.2, math.inf, 6),        # e2el, tpot +inf
            req(2, 2.0, -math.inf, 3.0, 6),       # ttft -inf, tpot +inf
            req(3, -math.inf, 3.2, 3.5, 2),       # queue, e2el, ttft +inf
            req(4, 4.0, math.inf, 4.5, 6)]        # ttft +inf, tpot -inf
    rows, fast = MetricsCollector(SLO), MetricsCollector(SLO, keep_rows=0)
    for r in reqs:
        rows.record(r)
        fast.record(r, row=False)
    s_rows = rows.summary(10.0, 1, "h100", 1.0, SLO, UTIL)
    s_fast = fast.summary(10.0, 1, "h100", 1.0, SLO, UTIL)
    assert _same(s_rows, s_fast), [k for k in s_rows if not _same(s_rows[k], s_fast.get(k))]
    assert s_fast["mean_e2el_ms"] == pytest.approx((1200 + 1000 + 500) / 3)
    assert s_fast["mean_ttft_ms"] == pytest.approx(200.0)
    assert s_fast["mean_tpot_ms"] == pytest.approx((200 + 300) / 2)
    assert s_fast["mean_queue_ms"] == pytest.approx(100.0)


def test_per_task_rates_and_every_throughput_key() -> None:
    """Per-task request_throughput and goodput, and every token-throughput key, against figures
    computed by hand from mixed_requests() over 12 s."""
    c = MetricsCollector(SLO)
    for r in mixed_requests():
        c.record(r)
    s = c.summary(12.0, 2, "h100", 2.0, SLO, UTIL)
    d = 12.0
    # SLO: text 0 met, 1 fails (ttft 300), 2 met, 3 fails (ttft 500, tpot 250); understand and
    # edit have no targets (met); generate: e2el 4000 <= 5000 met
    pt = s["per_task"]
    assert pt["text"]["completed"] == 4 and pt["text"]["request_throughput"] == pytest.approx(4 / d)
    assert pt["text"]["goodput"] == pytest.approx(2 / d)
    assert pt["understand"]["request_throughput"] == pytest.approx(1 / d)
    assert pt["understand"]["goodput"] == pytest.approx(1 / d)
    assert pt["generate"]["request_throughput"] == pytest.approx(1 / d)
    assert pt["generate"]["goodput"] == pytest.approx(1 / d)
    assert pt["edit"]["goodput"] == pytest.approx(1 / d)
    assert pt["generate"]["slo_attainment"] == 1.0 and pt["text"]["slo_attainment"] == 0.5
    assert s["request_throughput"] == pytest.approx(7 / d)
    assert s["goodput"] == pytest.approx(5 / d) and s["request_goodput"] == pytest.approx(5 / d)
    # tokens: prompts 4x100 + 40 + 2x50; text out 10+11+1+5 (+3 understand); images in 256 + 330;
    # images out 2 x 3072
    t_in, t_out, i_in, i_out = 540, 30, 586, 6144
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (t_in, t_out)
    assert (s["text_input_tokens"], s["text_output_tokens"]) == (t_in, t_out)
    assert (s["image_input_tokens"], s["image_output_tokens"]) == (i_in, i_out)
    assert s["output_throughput"] == pytest.approx(t_out / d)
    assert s["total_token_throughput"] == pytest.approx((t_in + t_out) / d)
    assert s["text_input_throughput"] == pytest.approx(t_in / d)
    assert s["text_output_throughput"] == pytest.approx(t_out / d)
    assert s["image_input_throughput"] == pytest.approx(i_in / d)
    assert s["image_output_throughput"] == pytest.approx(i_out / d)
    assert s["unified_token_throughput"] == pytest.approx((t_in + t_out + i_in + i_out) / d)
    assert s["num_gpus"] == 2 and s["gpu_hours"] == pytest.approx(2 * d / 3600)
    assert s["usd_per_1k_requests"] == pytest.approx(1000 * 2 * d / 3600 * 2.0 / 7)


def test_record_returns_every_row_past_keep_rows_and_keeps_only_the_first() -> None:
    """The parquet writer needs every row (record() with row=True), kept or not; row=False
    keeps the first keep_rows rows for requests_frame() and returns nothing."""
    c = MetricsCollector(SLO, keep_rows=2)
    rows = [c.record(r) for r in four_requests()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    c = MetricsCollector(SLO, keep_rows=2)
    assert [c.record(r, row=False) for r in four_requests()[:2]] == [None, None]
    assert list(c.requests_frame()["id"]) == [0, 1]
    assert len(c) == 2
    c.record(four_requests()[2])                  # one past keep_rows: no frame
    with pytest.raises(RuntimeError, match="only the first 2 of 3 rows"):
        c.requests_frame()


def test_itl_step_series_are_differenced_per_series() -> None:
    """add_itl_steps takes the first k steps of a decode jump (its linear pieces), each step one
    ITL value of `weight` tokens; the jump's later steps are not added."""
    from sim.engines.latency import DecodeSteps
    c = MetricsCollector(SLO)
    c.add_itl_steps(DecodeSteps(3, [0], [0.010], [0.010]), 3, 2)             # 10, 20, 30 ms
    c.add_itl_steps(DecodeSteps(5, [0, 2], [0.040, 0.5], [0.0, 0.0]), 2, 1)  # 40, 40 ms (of 5)
    c.add_itl(0.005, 4)
    itl = c.itl
    assert itl.count == pytest.approx(2 * 3 + 2 + 4)
    assert itl.mean == pytest.approx((2 * (10 + 20 + 30) + 40 + 40 + 4 * 5) / 12)
    assert itl.quantile(0.99) == pytest.approx(40.0, rel=0.01)
    assert itl.quantile(0.0) == pytest.approx(5.0, rel=0.01)


def test_the_first_20000_rows_are_kept_by_default() -> None:
    """keep_rows defaults to 20,000: the rows of a run that size stay for requests_frame(), one
    more and the frame is refused (requests.parquet has them all)."""
    c = MetricsCollector(SLO)
    r = four_requests()[0]
    for _ in range(20_000):
        c.record(r, row=False)
    assert len(c.requests_frame()) == 20_000
    c.record(r, row=False)
    with pytest.raises(RuntimeError, match="only the first 20000 of 20001 rows"):
        c.requests_frame()


def test_non_finite_finish_and_e2el_columns_are_nan() -> None:
    """column() holds NaN where a time is undefined: a finish of +inf or -inf, and the e2el of
    -inf it gives, are NaN in the columns and left out of the statistics (both paths)."""
    def req(i: int, finish: float) -> Request:
        r = Request(id=i, arrival=float(i), task="generate", model="qi", prompt_tokens=10)
        r.stages = [StageRecord("dit_step", "g0", float(i), i + 0.1, i + 0.2)]
        r.finish = finish
        return r
    for keep in (20_000, 0):
        c = MetricsCollector(SLO, keep_rows=keep)
        for r in (req(0, 0.5), req(1, math.inf), req(2, -math.inf)):
            c.record(r, row=keep > 0)
        assert c.column("finish")[0] == 0.5 and np.isnan(c.column("finish")[1:]).all()
        e2el = c.column("e2el_ms")
        assert e2el[0] == pytest.approx(500.0) and np.isnan(e2el[1:]).all()
        s = c.summary(10.0, 1, "h100", 1.0, SLO, UTIL)
        assert s["mean_e2el_ms"] == pytest.approx(500.0) and s["p99_e2el_ms"] == pytest.approx(500.0)


def test_column_returns_the_integer_columns_and_refuses_unknown_names() -> None:
    c = MetricsCollector(SLO)
    for r in four_requests():
        c.record(r, row=False)
    toks = c.column("output_tokens")
    assert toks.dtype == np.int64 and toks.tolist() == [r.output_tokens for r in four_requests()]
    assert c.column("preemptions").dtype == np.int64
    with pytest.raises(KeyError, match="column 'nope' is not recorded"):
        c.column("nope")


def test_a_queue_time_of_minus_inf_is_nan() -> None:
    """An arrival at +inf gives a queue time of -inf: undefined (NaN), like every non-finite
    time, in the column and the statistics."""
    for keep in (20_000, 0):
        c = MetricsCollector(SLO, keep_rows=keep)
        for i, arrival in enumerate((0.0, math.inf)):
            r = Request(id=i, arrival=arrival, task="generate", model="qi", prompt_tokens=10)
            r.stages = [StageRecord("dit_step", "g0", 0.0, 0.25, 1.0)]
            r.finish = 1.0
            c.record(r, row=keep > 0)
        q = c.column("queue_ms")
        assert q[0] == pytest.approx(250.0) and np.isnan(q[1])
        assert c.summary(10.0, 1, "h100", 1.0, SLO, UTIL)["mean_queue_ms"] == pytest.approx(250.0)


def test_sketch_values_are_folded_in_batches_of_65536() -> None:
    """Buffered ITL and stage values reach their sketches in batches of _FLUSH = 65,536 (the
    rest when read). Counts and quantiles do not depend on the batching, the mean and std do in
    their last bits (moments are combined per batch): summary.json's figures are those of this
    batching, bit for bit, so a change of batch size is a visible change of results."""
    from sim.run.metrics import _FLUSH
    from sim.run.sketch import QuantileSketch
    assert _FLUSH == 65_536
    rng = np.random.default_rng(2)
    n = _FLUSH + 100
    v = rng.random(n) * 0.05
    w = rng.integers(1, 8, n)
    c = MetricsCollector(SLO)
    for x, k in zip(v.tolist(), w.tolist()):
        c.add_itl(x, k)
    ref = QuantileSketch(alpha=0.005)
    ref.add_many(v[:_FLUSH] * 1000.0, w[:_FLUSH])
    ref.add_many(v[_FLUSH:] * 1000.0, w[_FLUSH:])
    assert c.itl.count == ref.count and (c.itl.mean, c.itl.std) == (ref.mean, ref.std)
    # a stage's queue times: one request visiting a stage n times
    r = Request(id=0, arrival=0.0, task="generate", model="qi", prompt_tokens=10)
    # and service times (end - start) of the same visits
    ends = [x + 1.0 + x * x for x in v.tolist()]
    r.stages = [StageRecord("dit_step", "g0", 0.0, x, e) for x, e in zip(v.tolist(), ends)]
    r.finish = 2.0
    c = MetricsCollector(SLO, keep_rows=0)
    c.record(r, row=False)
    q, s = QuantileSketch(), QuantileSketch()
    for part in (slice(0, _FLUSH), slice(_FLUSH, n)):
        q.add_many([x * 1000.0 for x in v[part].tolist()])
        s.add_many([(e - x) * 1000.0 for x, e in zip(v[part].tolist(), ends[part])])
    st = c.summary(10.0, 1, "h100", 1.0, SLO, UTIL)["per_stage"]["dit_step"]
    assert st["visits"] == n and (st["mean_queue_ms"], st["mean_service_ms"]) == (q.mean, s.mean)
