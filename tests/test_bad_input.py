"""Bad input stops before any simulation with one line naming the file, the row and the field
(or the config key) and what is allowed: trace cells, negative arrivals and token counts, empty
and header-only files, bad JSONL lines, unreadable or damaged profile tables, a negative seed."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from profiler.schema import read_table, write_table
from sim.config import ArrivalConfig, ConfigError, TraceConfig, WorkloadConfig
from sim.engines.latency import read_profile
from sim.workloads import request_source

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "traces" / "workloads" / "example_mixed.csv"


def source(path: Path):
    return request_source(WorkloadConfig(arrival=ArrivalConfig(process="trace"),
                                         trace=TraceConfig(path=str(path))), 0)


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        source(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "allowed" in msg, msg
    return msg


@pytest.fixture
def rows() -> pd.DataFrame:
    return pd.read_csv(EXAMPLE).head(20)


@pytest.mark.parametrize("col, value, field, allowed", [
    ("arrival_time", -3.5, "'arrival' (column 'arrival_time')", "seconds >= 0"),
    ("prompt_tokens", "abc", "'prompt_tokens'", "a whole number of tokens >= 0"),
    ("prompt_tokens", -7, "'prompt_tokens'", "a whole number of tokens >= 0"),
    ("output_tokens", -5, "'output_tokens'", "a whole number of tokens >= 0"),
    ("output_tokens", 2.5, "'output_tokens'", "a whole number of tokens >= 0"),
    ("image_height", 0, "'image_height'", "pixels >= 1"),
    ("steps", "many", "'steps'", "denoising steps"),
    ("cfg", "maybe", "'cfg'", "true or false"),
    ("task", "video", "'task'", "one of ["),
])
def test_bad_cell_names_row_and_field(tmp_path, rows, col, value, field, allowed):
    rows[col] = rows[col].astype(object)
    rows.loc[3, col] = value               # data row 4, file line 5
    p = tmp_path / "t.csv"
    rows.to_csv(p, index=False)
    msg = refused(p)
    assert "row 4 (line 5)" in msg and f"field {field}" in msg and allowed in msg, msg
    assert repr(value) in msg


def test_bad_cell_in_jsonl_and_parquet_names_its_line_or_row(tmp_path, rows):
    rows["output_tokens"] = rows["output_tokens"].astype(object)
    rows.loc[2, "output_tokens"] = -1
    j = tmp_path / "t.jsonl"
    j.write_text("\n".join(rows.to_json(orient="records", lines=True).splitlines()[:2]) + "\n\n"
                 + "\n".join(rows.to_json(orient="records", lines=True).splitlines()[2:]) + "\n")
    assert "line 4, field 'output_tokens'" in refused(j)          # the blank line counts
    q = tmp_path / "t.parquet"
    rows.assign(output_tokens=pd.to_numeric(rows["output_tokens"])).to_parquet(q)
    assert "row 3, field 'output_tokens'" in refused(q)


def test_empty_header_only_and_bad_jsonl(tmp_path, rows):
    e = tmp_path / "empty.csv"
    e.write_text("")
    assert "is empty" in refused(e)
    h = tmp_path / "header.csv"
    h.write_text(",".join(rows.columns) + "\n")
    assert "no request rows" in refused(h)
    j = tmp_path / "bad.jsonl"
    lines = rows.to_json(orient="records", lines=True).splitlines()
    lines[4] = lines[4][:-3]
    j.write_text("\n".join(lines) + "\n")
    assert "line 5 is not valid JSON" in refused(j)
    j.write_text(lines[0] + "\n[1, 2]\n")
    assert "line 2 is a JSON list" in refused(j)
    n = tmp_path / "none.jsonl"
    n.write_text("\n\n")
    assert "no request lines" in refused(n)


def test_bad_vllm_bench_results(tmp_path):
    ok = json.loads((REPO_ROOT / "traces" / "workloads" / "example_vllm_bench.json").read_text())
    p = tmp_path / "r.json"
    p.write_text(json.dumps({**ok, "output_lens": ok["output_lens"][:-1]}))
    assert "field 'output_lens' has" in refused(p)
    p.write_text(json.dumps({**ok, "input_lens": [-4] + ok["input_lens"][1:]}))
    assert "row 1, field 'prompt_tokens'" in refused(p)
    p.write_text('{"input_lens": [1, 2], ')
    assert "line 1 is not valid JSON" in refused(p)
    g = tmp_path / "r.json.gz"
    g.write_bytes(gzip.compress(json.dumps(ok).encode())[:50])
    msg = refused(g)
    assert "cannot be read (" in msg and ("EOFError: " in msg or "BadGzipFile: " in msg), msg


def test_damaged_or_bad_profile_table(tmp_path):
    src = REPO_ROOT / "traces" / "profiles" / "h100" / "qwen2_5_7b.parquet"
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(ConfigError) as e:
        read_profile(cut)
    msg = str(e.value)
    assert "\n" not in msg and str(cut) in msg and "cannot be read" in msg and "allowed" in msg
    df = read_table(src)
    i = int((df["status"] == "ok").to_numpy().nonzero()[0][5])
    df.loc[i, "latency_ms_median"] = -2.0
    bad = tmp_path / "bad.parquet"
    write_table(df, bad)
    with pytest.raises(ConfigError) as e:
        read_profile(bad)
    msg = str(e.value)
    assert f"row {i} (model=qwen2_5_7b" in msg and "field 'latency_ms_median'" in msg
    assert "positive, finite" in msg


def sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180)


def one_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    return lines[0]


def test_cli_one_line_for_a_bad_trace_a_damaged_table_and_a_bad_seed(synthetic_profiles, tmp_path, rows):
    rows.loc[3, "arrival_time"] = -3.5
    t = tmp_path / "neg.csv"
    rows.to_csv(t, index=False)
    msg = one_line(sim(f"profiles_dir={synthetic_profiles}", f"workload.path={t}",
                       f"hydra.run.dir={tmp_path / 'a'}"))
    assert "row 4 (line 5), field 'arrival'" in msg and "-3.5" in msg
    assert not (tmp_path / "a" / "summary.json").exists()

    prof = tmp_path / "prof"
    shutil.copytree(synthetic_profiles, prof)
    tab = prof / "h100" / "qwen_image.parquet"
    tab.write_bytes(tab.read_bytes()[: tab.stat().st_size * 2 // 3])
    msg = one_line(sim(f"profiles_dir={prof}", "workload.num_requests=50",
                       f"hydra.run.dir={tmp_path / 'b'}"))
    assert f"profile table {tab} cannot be read" in msg

    msg = one_line(sim(f"profiles_dir={synthetic_profiles}", "seed=-1", f"hydra.run.dir={tmp_path / 'c'}"))
    assert msg == "error: seed=-1 is invalid; allowed: an integer >= 0 (the root of every random stream)"
