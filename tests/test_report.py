"""A run's picture: timeline.parquet (per-pool utilization over time) against the summary's own
utilization, the sampler leaving results unchanged, report.html self-contained with its four
figures, what a reader must know (extrapolated tables, closed loop) in the printed table and in
the report, and the report's numpy reading of the parquet files against pandas on random
tables."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_cfg, rel_close
from sim.run.output import print_summary
from sim.run.report import (COLUMNS, TIMELINE_COLUMNS, _pool_lines, _positive_s, _slo_met, _tasks,
                            read_columns, render, write_report)
from sim.run.runner import Run

REPO_ROOT = Path(__file__).resolve().parents[1]
SAME = ("duration", "completed", "mean_e2el_ms", "p99_e2el_ms", "median_ttft_ms", "mean_tpot_ms",
        "slo_attainment", "total_input_tokens")


@pytest.mark.parametrize("policy", ["baseline", "disaggregated", "modality_aware"])
def test_timeline_adds_up_to_the_summary(synthetic_profiles, tmp_path, policy):
    cfg = make_cfg(synthetic_profiles, {"policy.name": policy, "workload.num_requests": 400,
                                        "workload.arrival.rate": 4.0})
    s = Run(cfg, tmp_path).run()
    tl = pd.read_parquet(tmp_path / "timeline.parquet")
    ends = tl.drop_duplicates("t_end")
    assert 1 <= len(ends) <= 240
    assert ends["t_start"].iloc[0] == 0.0 and rel_close(ends["t_end"].iloc[-1], s["duration"])
    assert (ends["t_start"].iloc[1:].to_numpy() == ends["t_end"].iloc[:-1].to_numpy()).all()
    assert tl["utilization"].between(0.0, 1.0 + 1e-9).all()
    u = s["utilization"]
    # every GPU's busy time, whatever pool it was in when: the same total
    total = u["mean_gpu"] * s["num_gpus"] * s["duration"]
    assert rel_close(tl["busy_gpu_s"].sum(), total, 1e-9)
    if policy != "modality_aware":         # fixed pools: each pool's time-weighted mean too
        span = tl["t_end"] - tl["t_start"]
        for pool, g in tl.assign(cap=tl["gpus"] * span).groupby("pool"):
            assert rel_close(g["busy_gpu_s"].sum() / g["cap"].sum(), u["per_pool"][pool], 1e-9), pool


def test_sampler_leaves_results_unchanged(synthetic_profiles, tmp_path):
    cfg = dict(workload__num_requests=300, workload__arrival__rate=3.0, policy__name="modality_aware")
    with_sampler = Run(make_cfg(synthetic_profiles, **cfg), tmp_path).run()
    without = Run(make_cfg(synthetic_profiles, **cfg)).run()
    assert (tmp_path / "timeline.parquet").exists()
    for k in SAME:
        assert with_sampler[k] == without[k], k


def test_report_is_self_contained_with_its_figures(synthetic_profiles, tmp_path):
    cfg = make_cfg(synthetic_profiles, {"workload.num_requests": 300})
    s = Run(cfg, tmp_path).run()
    path = write_report(tmp_path, s, "serve: policy=baseline")
    assert gc.get_freeze_count() == 0       # the report unfroze what it froze
    text = path.read_text()
    for h in ("Latency CDFs by task", "Throughput and SLO attainment", "GPU utilization per pool",
              "Stage breakdown"):
        assert f"<h2>{h}</h2>" in text, h
    assert text.count("<svg") == 4 and "missing" not in text.split("</style>")[1]
    for fetch in ("<script", "<img", "<link", "src=", "url(http"):
        assert fetch not in text, fetch
    for task in s["per_task"]:
        assert f"<td>{task}</td>" in text
    assert len(text) < 1_000_000


def test_report_without_requests_says_so(synthetic_profiles, tmp_path):
    cfg = make_cfg(synthetic_profiles, {"workload.num_requests": 50, "output.write_requests": False})
    s = Run(cfg, tmp_path).run()
    text = write_report(tmp_path, s, "t").read_text()
    assert text.count("requests.parquet was not written") == 2 and text.count("<svg") == 2


def fake_summary(**kw) -> dict:
    s = {"completed": 10, "duration": 5.0, "request_throughput": 2.0, "goodput": 2.0,
         "slo_attainment": 1.0, "max_concurrency": None, "per_task": {}, "per_stage": {},
         "latency_model": {"out_of_grid_lookups": {}, "out_of_range_policy": "error",
                           "engines": {"qwen2_5_vl_7b": ["vllm"]}}}
    s.update(kw)
    return s


def test_table_and_report_say_what_the_numbers_rest_on(capsys):
    s = fake_summary(max_concurrency=32, analytic_tables=["qwen_image"], profile_tables={
        "qwen_image": "analytic (roofline, not measured): x", "qwen2_5_vl_7b": "measured (vllm): y"},
        latency_model={
        "out_of_grid_lookups": {"qwen_image/dit_step": 1200, "qwen2_5_vl_7b/prefill/pure": 3},
        "out_of_range_policy": "extrapolate",
        "engines": {"qwen_image": ["analytic"], "qwen2_5_vl_7b": ["vllm"]}})
    print_summary(s, "t")
    out = capsys.readouterr().out
    assert "EXTRAPOLATED: 1,203 latency lookups" in out and "qwen_image/dit_step 1,200" in out
    assert "ANALYTIC: roofline, not measured" in out and "closed loop: at most 32" in out
    html = render(s, "t", None, None)
    assert html.count('class="warn"') == 2 and "EXTRAPOLATED" in html
    print_summary(fake_summary(), "t")
    out = capsys.readouterr().out
    assert "EXTRAPOLATED" not in out and "ANALYTIC" not in out and "open loop" in out


def test_extrapolated_run_says_so_in_its_printed_table(synthetic_profiles, tmp_path):
    trace = tmp_path / "long.csv"      # a 100k-token context: past the synthetic decode grid
    trace.write_text("arrival_time,task,prompt_tokens,output_tokens\n0,text,100000,4\n1,text,20,4\n")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "sim", f"profiles_dir={synthetic_profiles}",
                        f"workload.path={trace}", "latency.out_of_range=extrapolate",
                        f"hydra.run.dir={out}"], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    assert "EXTRAPOLATED" in p.stdout
    s = json.loads((out / "summary.json").read_text())
    assert sum(s["latency_model"]["out_of_grid_lookups"].values()) > 0
    assert "EXTRAPOLATED" in (out / "report.html").read_text()
    assert f"report: {out / 'report.html'}" in p.stdout


# --- the report's numpy reading against the pandas frame pd.read_parquet gives ------------------

FLOATS = st.one_of(st.none(), st.just(float("nan")), st.just(0.0),
                   st.floats(-1e3, 1e9, allow_nan=False), st.floats(1e-3, 10.0))
TASKS = st.sampled_from(["text", "understand", "generate", "edit", "zeta", "alpha"])


def through_parquet(columns: dict[str, pa.Array]) -> tuple[dict, pd.DataFrame]:
    """(read_columns, the pandas frame) of one parquet file holding `columns`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.parquet"
        pq.write_table(pa.table(columns), path)
        with pq.ParquetFile(path) as f:
            df = f.read().to_pandas()
        return read_columns(path, list(columns)), df


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_request_columns_are_what_pandas_reads(data):
    """Per task (in the report's order): the positive latencies in seconds the CDFs are drawn
    from, and slo_met with a null as met, equal to the pandas expressions on the same file."""
    n = data.draw(st.integers(0, 300))
    cells = lambda s: data.draw(st.lists(s, min_size=n, max_size=n))   # noqa: E731
    cols, df = through_parquet({
        "task": pa.array(cells(TASKS), pa.string()),
        "arrival": pa.array(cells(FLOATS), pa.float64()),
        "finish": pa.array(cells(FLOATS), pa.float64()),
        "e2el_ms": pa.array(cells(FLOATS), pa.float64()),
        "ttft_ms": pa.array(cells(FLOATS), pa.float64()),
        "slo_met": pa.array(cells(st.one_of(st.none(), st.booleans())), pa.bool_())})
    assert list(cols) == COLUMNS
    for c in ("arrival", "finish"):
        assert cols[c].dtype == np.float64 and np.array_equal(cols[c], df[c].to_numpy(), equal_nan=True)
    assert _tasks(cols["task"]) == _tasks(df["task"])
    for t in _tasks(df["task"]):
        for c in ("e2el_ms", "ttft_ms"):
            want = df.loc[df["task"] == t, c].dropna().to_numpy() / 1000.0
            want = want[want > 0]
            got = _positive_s(cols, c, t)
            assert got.dtype == want.dtype and np.array_equal(got, want), (t, c)
    want = df["slo_met"].fillna(True).to_numpy(dtype=bool)
    assert np.array_equal(_slo_met(cols["slo_met"]), want)


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pool_lines_are_pandas_groupby(data):
    """The utilization figure's lines equal those of timeline.groupby("pool", sort=True): pools
    in sorted order, a null pool left out, rows in file order, the mean GPU count to the last bit
    (NaN skipped; groups long enough for numpy's pairwise summation)."""
    n = data.draw(st.integers(0, 400))
    cells = lambda s: data.draw(st.lists(s, min_size=n, max_size=n))   # noqa: E731
    pools = st.one_of(st.none(), st.sampled_from(["prefill", "decode", "dit", "Dit", "gpu", "é"]))
    gpus = st.one_of(st.just(float("nan")), st.floats(0.0, 1e12), st.sampled_from([1.0, 2.0, 0.1]))
    cols, tl = through_parquet({
        "t_start": pa.array(cells(FLOATS), pa.float64()),
        "t_end": pa.array(cells(FLOATS), pa.float64()),
        "pool": pa.array(cells(pools), pa.string()),
        "gpus": pa.array(cells(gpus), pa.float64()),
        "utilization": pa.array(cells(FLOATS), pa.float64())})
    assert list(cols) == TIMELINE_COLUMNS
    want = [(pool, g["gpus"].mean(), np.c_[g["t_start"], g["t_end"]].ravel(),
             np.repeat(g["utilization"].to_numpy() * 100, 2))
            for pool, g in tl.groupby("pool", sort=True)]
    got = _pool_lines(cols)
    assert [w[0] for w in want] == [g[0] for g in got]
    for (pool, gw, xw, yw), (_, gg, xg, yg) in zip(want, got):
        assert gg == gw or (np.isnan(gg) and np.isnan(gw)), pool
        assert np.array_equal(xg, xw, equal_nan=True) and np.array_equal(yg, yw, equal_nan=True)
