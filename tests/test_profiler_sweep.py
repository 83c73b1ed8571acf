"""Profiler runner on the CPU: grid planning, resume after an interruption, OOM recording,
the time budget, schema round-trip, the simulator's column reader, and `check` catching broken
tables."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import conftest as C  # noqa: E402
from profiler_tiny import tiny_spec  # noqa: E402

from profiler import schema  # noqa: E402
from profiler.__main__ import compose, main  # noqa: E402
from profiler.backends.base import SimulatedOOM, is_oom, oom_requested_bytes  # noqa: E402
from profiler.check import check_frame, check_table  # noqa: E402
from profiler.grid import plan_diffusers, plan_vllm  # noqa: E402
from profiler.models import load_model  # noqa: E402
from profiler.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def grid(name="default"):
    return compose([f"grid={name}"]).grid


# ------------------------------------------------------------------ planning
def test_vllm_grid_covers_the_simulators_needs():
    g = grid()
    q = plan_vllm(load_model("qwen2_5_7b"), g)
    pre0 = {p["num_tokens"] for p in q if p["stage"] == "prefill" and p["context_len"] == 0
            and not p["num_decode_seqs"]}
    assert pre0 >= {16, 64, 128, 256, 512, 1024, 2048, 4096, 8192}
    dec = {(p["batch_size"], p["context_len"]) for p in q if p["stage"] == "decode"}
    assert (256, 16384) in dec and (1, 128) in dec and len(dec) >= 63
    assert any(p["context_len"] and p["stage"] == "prefill" for p in q)
    assert any(p.get("num_decode_seqs") for p in q)
    # llama holds 4096 positions: contexts are capped, long prefills split across sequences
    ll = plan_vllm(load_model("llama2_7b"), g)
    assert max(p["context_len"] for p in ll if p["stage"] == "decode") < 4096
    p8k = [p for p in ll if p["stage"] == "prefill" and p["num_tokens"] == 8192]
    assert p8k and p8k[0]["batch_size"] == 3
    # the VLM adds vision points at smart-resized sizes with the model's token rule
    vl = load_model("qwen2_5_vl_7b")
    vis = [p for p in plan_vllm(vl, g) if p["stage"] == "vision_encode"]
    assert vis and all(p["height"] % 28 == 0 and p["width"] % 28 == 0 for p in vis)
    assert all(p["num_tokens"] == (p["height"] // 14) * (p["width"] // 14) // 4 for p in vis)
    assert {p["batch_size"] for p in vis} == {1, 2, 4}


def test_diffusers_grid_edit_and_caps():
    g = grid()
    qi = plan_diffusers(load_model("qwen_image"), g)
    sd = plan_diffusers(load_model("sd3_5_medium"), g)
    spec = load_model("qwen_image")
    dit = [p for p in qi if p["stage"] == "dit_step"]
    assert all(p["batch_size"] == 1 or p["batch_size"] * p["seq_len"] <= g.dit_max_tokens
               for p in dit)
    assert any(p["seq_len"] == 2 * spec.latent_tokens(p["height"], p["width"]) for p in dit)
    sdit = [p for p in sd if p["stage"] == "dit_step"]
    s3 = load_model("sd3_5_medium")
    assert all(p["seq_len"] == s3.latent_tokens(p["height"], p["width"]) for p in sdit)
    assert {p["component"] for p in sd if p["stage"] == "text_encode"} == {
        "clip_l", "clip_g", "t5_xxl"}
    assert not [p for p in qi if p["stage"] == "text_encode"]  # comes from qwen2_5_vl_7b
    assert {(p["height"], p["width"]) for p in dit} >= {(1328, 1328), (1664, 928)}


def test_plan_cli_dry_run(capsys):
    assert main(["plan", "model=sd3_5_medium", "backend=diffusers", "grid=tiny"]) == 0
    out = capsys.readouterr().out
    assert "stage=dit_step" in out and "planned=" in out


# ------------------------------------------------------------------ runner
def cfg_for(tmp_path, *extra):
    return compose(["backend=diffusers", "grid=tiny", "device=cpu", "dtype=float32",
                    "warmup=0", "repeats=1", f"out_dir={tmp_path}", "gpu=cpu-test",
                    "progress=false", "models=[qwen_image]", "grid.vae_batch=[1,2]",
                    "grid.vae_resolutions=[[32,32]]", "grid.dit_resolutions=[[64,64]]", *extra])


def test_resume_after_interruption(tmp_path):
    pytest.importorskip("diffusers")
    cfg = cfg_for(tmp_path)
    seen = []

    def crash_on_third(p):
        seen.append(p)
        if len(seen) == 3:
            raise KeyboardInterrupt  # a crash the runner must not swallow

    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, log=lambda s: None, fault_injector=crash_on_third, spec_loader=tiny_spec)
    path = tmp_path / "cpu-test" / "qwen_image.parquet"
    first = schema.read_table(path)
    assert len(first) == 2  # both completed points survived the crash
    out = run_sweep(cfg, log=lambda s: None, spec_loader=tiny_spec)["qwen_image"]
    assert out["already"] == 2 and out["measured"] == out["planned"] - 2
    df = schema.read_table(path)
    assert len(df) == out["planned"]
    assert not df.apply(schema.point_key, axis=1).duplicated().any()
    # a third run has nothing to do
    again = run_sweep(cfg, log=lambda s: None, spec_loader=tiny_spec)["qwen_image"]
    assert again["measured"] == 0 and again["already"] == again["planned"]


def test_oom_is_recorded_and_the_sweep_goes_on(tmp_path):
    pytest.importorskip("diffusers")
    import torch
    cfg = cfg_for(tmp_path)

    def oom(p):
        if p["stage"] == "vae_decode" and p["batch_size"] == 2:
            raise SimulatedOOM("CUDA out of memory. Tried to allocate 2.50 GiB (GPU 0)")
        if p["stage"] == "dit_step" and p["batch_size"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    out = run_sweep(cfg, log=lambda s: None, fault_injector=oom, spec_loader=tiny_spec)
    df = schema.read_table(out["qwen_image"]["path"])
    o = df[df["status"] == "oom"]
    assert len(o) == out["qwen_image"]["oom"] >= 2
    vd = o[o["stage"] == "vae_decode"]
    assert vd["mem_requested_bytes"].iloc[0] == int(2.5 * 2**30)
    assert (o[o["stage"] == "dit_step"]["mem_requested_bytes"] == 512 * 2**20).all()
    assert o["latency_ms_median"].isna().all()
    assert (df["status"] == "ok").sum() == len(df) - len(o)  # later points still measured
    assert check_frame(df) == [] or all("monotone" in p for p in check_frame(df))


def test_oom_helpers():
    e = SimulatedOOM("CUDA out of memory. Tried to allocate 20.00 MiB")
    assert is_oom(e) and oom_requested_bytes(e) == 20 * 2**20
    assert not is_oom(ValueError("shape mismatch"))


def test_time_budget_stops_cleanly(tmp_path):
    pytest.importorskip("diffusers")
    cfg = cfg_for(tmp_path, "max_minutes=0.000001")
    out = run_sweep(cfg, log=lambda s: None, spec_loader=tiny_spec)["qwen_image"]
    assert out["stopped"] and out["measured"] < out["planned"]


# ------------------------------------------------------------------ schema + check
def analytic_table(tmp_path, model="qwen2_5_7b") -> Path:
    cfg = compose(["backend=analytic", f"models=[{model}]", f"out_dir={tmp_path}",
                   "progress=false"])
    return Path(run_sweep(cfg, log=lambda s: None)[model]["path"])


def test_schema_round_trip(tmp_path):
    path = analytic_table(tmp_path)
    df = schema.read_table(path)
    p2 = schema.write_table(df, tmp_path / "copy.parquet")
    back = schema.read_table(p2)
    pd.testing.assert_frame_equal(df, back)
    assert list(back.columns) == list(schema.COLUMNS)
    assert back["engine"].eq("analytic").all() and back["flops"].gt(0).all()


def _same_column(a, b) -> bool:
    """Equal values, nulls in the same places (NaN or None alike)."""
    a, b = pd.Series(a, dtype=object), pd.Series(b, dtype=object)
    return a.isna().equals(b.isna()) and a[a.notna()].tolist() == b[b.notna()].tolist()


@pytest.mark.parametrize("path", sorted((ROOT / "traces" / "profiles").glob("*/*.parquet")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_read_columns_holds_what_read_table_holds(path):
    """The simulator's pandas-free reader gives every shipped table's rows, values and numeric
    dtypes as read_table's DataFrame has them (int64 without nulls, else float64 with NaN)."""
    cols, df = schema.read_columns(path), schema.read_table(path)
    assert len(cols) == len(df) and list(cols.data) == list(df.columns) == list(schema.COLUMNS)
    for c in schema.COLUMNS:
        if pd.api.types.is_numeric_dtype(df[c]):
            assert cols[c].dtype == df[c].dtype, c
            assert np.array_equal(cols[c], df[c].to_numpy(), equal_nan=True), c
        else:
            assert cols[c].dtype == object and _same_column(cols[c], df[c]), c


def test_read_columns_conforms_a_table_to_the_contract(tmp_path):
    """A table with only the required columns, a null status, nulls in integer and string
    columns and a column outside the contract reads as the contract's columns: the optional
    ones all null, the status ok, an integer column with a null as float64 with NaN, a string
    column as objects with None; a table without a required column is refused."""
    base = pd.DataFrame([dict(C.PROVENANCE, model="m", stage="decode", batch_size=b, tp=1,
                              num_tokens=b, context_len=c, height=None, width=None,
                              latency_ms_median=v, latency_ms_p10=v, latency_ms_p90=v)
                         for b, c, v in [(1, 16, 1.5), (2, None, 2.5), (4, 64, 3.5)]])
    base["status"] = ["ok", None, "oom"]
    base["gpu"] = ["h100", None, "h100"]
    base["not_in_contract"] = 7
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pandas(base, preserve_index=False), path)
    cols = schema.read_columns(path)
    assert len(cols) == 3 and list(cols.data) == list(schema.COLUMNS)
    assert cols["status"].tolist() == ["ok", "ok", "oom"]
    assert cols["gpu"].dtype == object and cols["gpu"].tolist() == ["h100", None, "h100"]
    assert cols["batch_size"].dtype == np.int64 and cols["batch_size"].tolist() == [1, 2, 4]
    assert cols["context_len"].dtype == np.float64
    assert np.array_equal(cols["context_len"], [16.0, np.nan, 64.0], equal_nan=True)
    assert np.isnan(cols["seq_len"]).all() and cols["seq_len"].dtype == np.float64
    assert cols["extra"].tolist() == [None] * 3
    sel = cols.select(cols["batch_size"] > 1)
    assert len(sel) == 2 and sel["latency_ms_median"].tolist() == [2.5, 3.5]
    assert len(cols) == 3                                   # (select makes a new table)
    empty = tmp_path / "empty.parquet"
    schema.write_table(schema.empty_frame(), empty)
    e = schema.read_columns(empty)
    assert len(e) == 0 and all(len(v) == 0 for v in e.data.values())
    assert e["batch_size"].dtype == np.int64 and e["stage"].dtype == object
    pq.write_table(pa.Table.from_pandas(base.drop(columns=["latency_ms_median"]), preserve_index=False), path)
    with pytest.raises(schema.SchemaError, match="lacks required columns.*latency_ms_median"):
        schema.read_columns(path)


def test_check_passes_good_and_catches_bad(tmp_path, capsys):
    good = analytic_table(tmp_path)
    assert check_table(good) == []
    assert main(["check", str(good)]) == 0
    df = schema.read_table(good)
    # non-monotone: a bigger decode batch made faster
    bad = df.copy()
    i = bad[(bad["stage"] == "decode") & (bad["batch_size"] == 64)].index[0]
    bad.loc[i, "latency_ms_median"] = 0.01
    bad.loc[i, "latency_ms_p10"] = 0.01
    p_bad = schema.write_table(bad, tmp_path / "nonmono.parquet")
    probs = check_table(p_bad)
    assert any("monotone" in p for p in probs)
    assert main(["check", str(p_bad)]) == 1
    # negative / infinite latency
    neg = df.copy()
    neg.loc[neg.index[0], "latency_ms_median"] = -1.0
    assert check_table(schema.write_table(neg, tmp_path / "neg.parquet"))
    inf = df.copy()
    inf.loc[inf.index[0], "latency_ms_median"] = float("inf")
    assert check_table(schema.write_table(inf, tmp_path / "inf.parquet"))
    # duplicate points
    dup = pd.concat([df, df.iloc[:1]])
    assert any("duplicate" in p for p in check_table(schema.write_table(dup, tmp_path / "d.parquet")))
    # a corrupt file
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file")
    assert check_table(junk) and main(["check", str(junk)]) == 1


def test_show_prints_summary(tmp_path, capsys):
    path = analytic_table(tmp_path, "qwen2_5_vl_7b")
    assert main(["show", str(path), "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "vision_encode" in out and "decode" in out


def test_shipped_tables_pass_check():
    tables = sorted((ROOT / "traces" / "profiles").glob("*/*.parquet"))
    if not tables:
        pytest.skip("no shipped profile tables")
    for t in tables:
        df = schema.read_table(t)
        assert schema.validate_rows(df) == [], t
        assert df["git_sha"].notna().all() and df["gpu"].notna().all(), t
