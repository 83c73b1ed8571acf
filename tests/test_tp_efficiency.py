"""TP efficiency report (sim.studies.tp_efficiency): measured t1 / (p t_p) next to the analytic
figure, matched point by point; "not measured" without TP tables; the sweep writes TP tables to
their own set with the TP size in every point's key."""
from __future__ import annotations


import pandas as pd
import pytest

from profiler.models import load_model
from profiler.schema import write_table
from sim.studies import tp_efficiency as TE
from sim.studies.analytic import tp_efficiency
from tests.conftest import _row, decode_ms, prefill_ms

MODEL = "qwen2_5_vl_7b"


def tables(root, p_speedup: dict[int, float]):
    """TP 1 = the synthetic closed forms; TP p = TP 1 / speed-up (so measured eff = speed-up / p)."""
    def rows(div, tp):
        rs = [_row(MODEL, "prefill", prefill_ms(t) / div, batch_size=1, num_tokens=t, context_len=0,
                   num_decode_seqs=0, tp=tp) for t in (16, 256, 1024, 4096)]
        rs += [_row(MODEL, "decode", decode_ms(b, c) / div, batch_size=b, num_tokens=b, context_len=c, tp=tp)
               for b in (1, 32) for c in (128, 1024)]
        return rs
    base = rows(1.0, 1)
    base.append(_row(MODEL, "decode", float("nan"), batch_size=256, num_tokens=256, context_len=1024,
                     status="oom"))
    write_table(pd.DataFrame(base), root / "h100" / f"{MODEL}.parquet")
    for p, s in p_speedup.items():
        rs = rows(s, p)
        write_table(pd.DataFrame(rs[:-1]), root / f"h100-tp{p}" / f"{MODEL}.parquet")   # one point not measured


def test_measured_and_analytic_side_by_side(tmp_path):
    tables(tmp_path, {2: 1.8, 4: 3.0})
    rep = TE.report(MODEL, "h100", tmp_path, (2, 4, 8))
    llm = load_model(MODEL).llm
    for p, s in ((2, 1.8), (4, 3.0)):
        e = rep["tp"][p]
        assert e["status"] == "measured (7 points matched)"          # 8 rows at TP p minus the dropped one
        for x in e["points"]:
            assert x["measured_efficiency"] == pytest.approx(s / p, rel=1e-9)
            tokens = x["num_tokens"] if x["stage"] == "prefill" else x["batch_size"]
            ana = tp_efficiency(x["t1_ms"] / 1e3, llm["num_hidden_layers"], tokens, llm["hidden_size"], 2, p)
            assert x["analytic_efficiency"] == pytest.approx(ana, rel=1e-12)
            assert x["rel_error"] == pytest.approx(ana / (s / p) - 1, rel=1e-9)
        assert e["decode_median_measured_efficiency"] == pytest.approx(s / p)
    assert rep["tp"][8]["status"].startswith("not measured") and rep["tp"][8]["points"] == []
    assert set(rep["tp"][8]["analytic_cases"]) == {"prefill", "decode_b32_c1024"}
    assert all(v["status"].startswith("not measured") for v in rep["pp"].values())


def test_cli_prints_not_measured_without_tables(tmp_path, capsys):
    tables(tmp_path, {})
    assert TE.main([f"model={MODEL}", f"profiles_dir={tmp_path}", "tp=2", f"json={tmp_path / 'r.json'}"]) == 0
    out = capsys.readouterr().out
    assert "== TP 2: not measured" in out and "analytic at the report's cases: prefill" in out
    assert (tmp_path / "r.json").exists()
    assert TE.main([f"model={MODEL}", "tp=1"]) == 2
    assert TE.main(["model=nope"]) == 2
    assert TE.main([f"model={MODEL}", "bogus=1"]) == 2


def test_sweep_keys_points_by_tp_and_writes_its_own_table_set(tmp_path):
    from omegaconf import OmegaConf

    from profiler.sweep import table_for
    cfg = OmegaConf.create({"backend": "vllm", "gpu": "h100", "gpu_spec": "h100", "out_dir": str(tmp_path), "tp": 4})
    assert table_for(cfg, "m") == tmp_path / "h100-tp4" / "m.parquet"
    cfg.tp = 1
    assert table_for(cfg, "m") == tmp_path / "h100" / "m.parquet"
    cfg.backend, cfg.tp = "analytic", 4
    assert table_for(cfg, "m") == tmp_path / "h100-analytic" / "m.parquet"


def test_sweep_dry_run_points_carry_tp(tmp_path, capsys):
    from profiler.__main__ import main as prof_main
    rc = prof_main(["plan", f"model={MODEL}", "tp=2", "stages=[decode]", "grid.decode_batch=[1,4]",
                    "grid.decode_context=[128]", f"out_dir={tmp_path}"])
    out = capsys.readouterr().out + capsys.readouterr().err
    assert rc in (0, None)
    lines = [ln for ln in out.splitlines() if "stage=decode" in ln]
    assert len(lines) == 2 and all("tp=2" in ln for ln in lines)
    assert "h100-tp2" in out
