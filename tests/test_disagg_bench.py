"""Several servers and a proxy (profiler.disagg_bench, profiler.disagg_proxy, profiler.connector_timing)
on CPU: layouts and their commands, the proxy's E -> (P) -> D protocol against fake servers, the
driver end to end with a fake `vllm serve`, and the hand-off figures from timing records."""
from __future__ import annotations

import json
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from profiler import disagg_bench as DB
from profiler import disagg_proxy as DP

ROOT = Path(__file__).resolve().parents[1]
VL = "qwen2_5_vl_7b"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- layouts ---------------------------------------------------------------------------------------

def test_layouts_place_roles_and_renumber_gpus_for_the_simulator():
    xs = DB.plan_instances("1e1p1d", [4, 5, 6])
    assert [(x.role, x.gpu, x.port) for x in xs] == [("encoder", 4, 8100), ("prefill", 5, 8101), ("decode", 6, 8102)]
    assert all(x.gpu_mem == 0.9 for x in xs)
    assert DB.sim_pools(VL, xs) == {f"encoder:{VL}": [0], f"prefill:{VL}": [1], f"decode:{VL}": [2]}
    # one card: the encoder takes a small share, the others split the rest; one simulated GPU
    one = DB.plan_instances("1e1pd", [3, 3])
    assert [x.gpu_mem for x in one] == [DB.ENCODER_MEM, 0.78]
    assert DB.sim_pools(VL, one) == {f"encoder:{VL}": [0], f"llm:{VL}": [0]}
    pd = DB.plan_instances("1p1d", [0, 0])
    assert [x.gpu_mem for x in pd] == [0.44, 0.44]
    reps = DB.plan_instances("replicas", [2, 0, 1])
    assert DB.sim_pools(VL, reps) == {f"replica:{VL}": [0, 1, 2]} and [x.name for x in reps] == ["replica0", "replica1", "replica2"]


@pytest.mark.parametrize("layout,gpus,msg", [
    ("1e1pd", [0], "needs 2 GPU indices"), ("1e1p1d", [0, 1], "needs 3"),
    ("replicas", [0, 0], "distinct GPUs"), ("2e1pd", [0, 1], "unknown"),
])
def test_bad_layouts_refused(layout, gpus, msg):
    with pytest.raises(ValueError, match=msg):
        DB.plan_instances(layout, gpus)


def test_start_waves_one_instance_per_card_per_wave():
    w = DB.start_groups(DB.plan_instances("1e1pd", [0, 1]))
    assert [[x.name for x in wave] for wave in w] == [["encoder", "pd"]]
    w = DB.start_groups(DB.plan_instances("1e1pd", [0, 0]))
    assert [[x.name for x in wave] for wave in w] == [["encoder"], ["pd"]]
    w = DB.start_groups(DB.plan_instances("1e1p1d", [0, 1, 1]))
    assert [[x.name for x in wave] for wave in w] == [["encoder", "prefill"], ["decode"]]


def _cmd(layout, gpus, kv="ExampleConnector"):
    xs = DB.plan_instances(layout, gpus)
    enc = any(x.role == "encoder" for x in xs)
    return {x.name: DB.instance_command(["vllm"], VL, Path("/m"), x, kv, Path("/ec"), Path("/kv"),
                                        Path("/t"), 3, has_encoder=enc) for x in xs}


def _json_after(cmd, flag):
    return json.loads(cmd[cmd.index(flag) + 1]) if flag in cmd else None


def test_connector_flags_per_role():
    c = _cmd("1e1pd", [0, 1])
    assert "--mm-encoder-only" in c["encoder"] and "--mm-encoder-only" not in c["pd"]
    e, p = _json_after(c["encoder"], "--ec-transfer-config"), _json_after(c["pd"], "--ec-transfer-config")
    assert e["ec_role"] == "ec_producer" and p["ec_role"] == "ec_consumer"
    assert e["ec_connector"] == "TimedECExampleConnector" and e["ec_connector_module_path"] == "profiler.connector_timing"
    assert e["ec_connector_extra_config"] == {"shared_storage_path": "/ec", "timing_log": "/t"}
    assert "--kv-transfer-config" not in c["pd"]
    # 1e1p1d: the prefill instance consumes embeddings and produces KV; decode only consumes KV
    c = _cmd("1e1p1d", [0, 1, 2], kv="NixlConnector")
    assert _json_after(c["prefill"], "--ec-transfer-config")["ec_role"] == "ec_consumer"
    assert _json_after(c["prefill"], "--kv-transfer-config") == {"kv_connector": "NixlConnector", "kv_role": "kv_producer"}
    assert _json_after(c["decode"], "--kv-transfer-config") == {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}
    assert "--ec-transfer-config" not in c["decode"]
    # 1p1d without an encoder: no encoder-cache flags at all; ExampleConnector is the timed one
    c = _cmd("1p1d", [0, 1])
    assert all("--ec-transfer-config" not in v for v in c.values())
    kv = _json_after(c["prefill"], "--kv-transfer-config")
    assert kv["kv_connector"] == "TimedExampleConnector" and kv["kv_role"] == "kv_producer"
    # replicas: plain servers
    c = _cmd("replicas", [0, 1])
    assert all("--ec-transfer-config" not in v and "--kv-transfer-config" not in v for v in c.values())
    for v in c.values():
        assert "--no-enable-prefix-caching" in v and v[v.index("--limit-mm-per-prompt") + 1] == '{"image": 3, "video": 0}'


def test_multicast_off_and_gpu_pinned_in_every_instance_env():
    for x in DB.plan_instances("1e1p1d", [2, 3, 2]):
        env = DB.instance_env(x, ROOT)
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
        assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["CUDA_VISIBLE_DEVICES"] == str(x.gpu)
        assert env["PYTHONPATH"].split(":")[0] == str(ROOT)
    ports = {DB.instance_env(x, ROOT)["VLLM_NIXL_SIDE_CHANNEL_PORT"] for x in DB.plan_instances("1e1p1d", [0, 1, 2])}
    assert len(ports) == 3


def test_dry_run_prints_one_line_per_command(capsys):
    assert DB.main(["--layout", "1p1d", "--gpus", "0,1", "--out", "/tmp/x", "--dry-run",
                    "--kv-connector", "ExampleConnector"]) == 0
    out = capsys.readouterr().out.splitlines()
    serves = [ln for ln in out if " serve " in ln]
    assert len(serves) == 2 and all("NCCL_NVLS_ENABLE=0" in ln for ln in serves)
    assert sum("profiler.disagg_proxy" in ln for ln in out) == 1
    assert sum("profiler.chat_bench" in ln and "--request-id-prefix" in ln for ln in out) == 4
    assert any('"prefill:qwen2_5_vl_7b": [0], "decode:qwen2_5_vl_7b": [1]' in ln for ln in out)
    # serve_bench --layout is the same driver
    from profiler import serve_bench as sb
    assert sb.main(["--model", VL, "--layout", "replicas", "--gpus", "0,1", "--out", "/tmp/x", "--dry-run"]) == 0
    assert "replica1=GPU1" in capsys.readouterr().out


# --- proxy -----------------------------------------------------------------------------------------

def test_one_token_copy_and_mm_detection():
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:x"}}, {"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 40, "min_tokens": 40, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}
    c = DP.one_token_copy(body, {"do_remote_decode": True})
    assert c["max_tokens"] == 1 and c["max_completion_tokens"] == 1 and "min_tokens" not in c
    assert c["stream"] is False and "stream_options" not in c and c["kv_transfer_params"] == {"do_remote_decode": True}
    assert body["min_tokens"] == 40 and body["stream"] is True          # the original untouched
    assert DP.has_mm_input(body) and not DP.has_mm_input({"messages": [{"content": "text"}]})
    assert DP.urls("http://a:1/, disable ,http://b:2") == ["http://a:1", "http://b:2"]


def _fake_cli(tmp_path: Path) -> Path:
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(
        "import runpy, sys\n"
        "args = sys.argv[1:]\n"
        "port = args[args.index('--port') + 1]\n"
        f"sys.argv = ['fake_chat_server.py', '--port', port]\n"
        f"runpy.run_path({str(ROOT / 'tests' / 'fake_chat_server.py')!r}, run_name='__main__')\n")
    return fake


@pytest.mark.parametrize("layout,gpus,kv", [("1e1pd", "0,0", None), ("1e1p1d", "0,1,2", "ExampleConnector")])
def test_driver_end_to_end_with_fake_servers(tmp_path, monkeypatch, layout, gpus, kv):
    """Servers, proxy and runs: results carry the layout, per-hop times and per-instance metrics;
    only image requests visit the encoder; every request reaches the decode instance."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("PIL")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    out = tmp_path / "out"
    args = ["--layout", layout, "--gpus", gpus, "--out", str(out), "--port", str(_free_port()),
            "--model-dir", str(tmp_path / "m"), "--vllm-cli", f"{sys.executable} {_fake_cli(tmp_path)}",
            "--health-timeout", "60", "--runs", "inf,poisson_low", "--num-prompts-inf", "24",
            "--target-s", "1.0", "--ec-path", str(tmp_path / "ec"), "--kv-path", str(tmp_path / "kv")]
    if kv:
        args += ["--kv-connector", kv]
    args += ["--base-port", str(_free_port())]
    rc = DB.main(args)
    assert rc == 0
    res = json.loads((out / f"{VL}__{layout}__poisson_low.json").read_text())
    inf = json.loads((out / f"{VL}__{layout}__inf.json").read_text())
    p = res["provenance"]
    assert p["layout"]["name"] == layout and p["layout"]["router"] == "round_robin"
    want = {"1e1pd": {f"encoder:{VL}": [0], f"llm:{VL}": [0]},
            "1e1p1d": {f"encoder:{VL}": [0], f"prefill:{VL}": [1], f"decode:{VL}": [2]}}[layout]
    assert p["layout"]["pools"] == want
    assert p["calibrated_capacity_rps"] == pytest.approx(inf["request_throughput"], rel=1e-3)
    assert set(p["server_metrics_by_instance"]) == {x["instance"] for x in p["layout"]["roles"]}
    n_img = sum(1 for im in res["images"] if im)
    hops = p["proxy_hops"]
    assert hops["encode"]["requests"] == n_img and hops["decode"]["requests"] == res["completed"]
    assert hops["errors"] == 0 and res["completed"] == res["num_prompts"]
    if layout == "1e1p1d":
        assert hops["prefill"]["requests"] == res["completed"]
    assert res["request_ids"][0] == "poisson_low-0"
    recs = [json.loads(ln) for ln in (out / f"proxy_{VL}__{layout}.jsonl").read_text().splitlines()]
    assert {r["rid"].split("-")[0] for r in recs} >= {"inf", "poisson_low"}
    for r in recs:
        roles = [h["role"] for h in r["hops"]]
        assert roles[-1] == "decode" and (roles[0] == "encode") == (r["images"] > 0)
        starts = [h["start_s"] for h in r["hops"]]
        assert starts == sorted(starts)


# --- hand-off figures ------------------------------------------------------------------------------

def test_handoff_summary_sums_and_rates():
    recs = [{"conn": "ec", "op": "save", "items": 1, "bytes": 4_000_000, "s": 0.002},
            {"conn": "ec", "op": "save", "items": 1, "bytes": 2_000_000, "s": 0.004},
            {"conn": "ec", "op": "load", "items": 2, "bytes": 6_000_000, "s": 0.003},
            {"conn": "kv", "op": "save", "items": 1, "bytes": 1000, "s": 0.001, "layer": "l0"}]
    h = DB.handoff_summary(recs)
    assert h["ec"]["save"] == {"calls": 2, "items": 2, "bytes_total": 6_000_000, "seconds_total": pytest.approx(0.006),
                               "gb_s": pytest.approx(1.0), "median_call_ms": pytest.approx(3.0),
                               "median_call_bytes": 3_000_000.0}
    assert h["ec"]["load"]["gb_s"] == pytest.approx(2.0) and h["kv"]["save"]["calls"] == 1
    assert "load" not in h["kv"]


def test_nixl_summary_from_histograms():
    m = {"histograms": {"nixl_xfer_time_seconds": {"count": 4, "sum": 0.02, "mean": 0.005},
                        "nixl_bytes_transferred": {"count": 4, "sum": 4e8, "mean": 1e8}}}
    s = DB.nixl_summary(m)
    assert s["transfers"] == 4 and s["gb_s"] == pytest.approx(20.0) and s["mean_transfer_ms"] == pytest.approx(5.0)
    assert DB.nixl_summary({"histograms": {}}) == {}


class _T:
    """A tensor stand-in: shape, numel, element_size, [0, :, 0] slicing of a 5-d KV layer."""

    def __init__(self, shape, esize=2):
        self.shape, self.esize = tuple(shape), esize

    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    def element_size(self):
        return self.esize

    def __getitem__(self, idx):
        keep = [s for s, i in zip(self.shape, idx) if isinstance(i, slice)] + list(self.shape[len(idx):])
        return _T(keep, self.esize)


def _fake_vllm(monkeypatch):
    class ECBase:
        def __init__(self, vllm_config, role):
            self._meta = None
            self.is_producer = vllm_config.ec_transfer_config.ec_role == "ec_producer"

        def _get_connector_metadata(self):
            return self._meta

        def save_caches(self, encoder_cache, mm_hash, **kw):
            self.saved = mm_hash

        def start_load_caches(self, encoder_cache, **kw):
            for m in self._meta.mm_datas:
                encoder_cache.setdefault(m.mm_hash, _T((m.num_token, 3584)))

    class KVBase:
        def __init__(self, vllm_config, role, kv_cache_config=None):
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._meta = None

        def _get_connector_metadata(self):
            return self._meta

        def save_kv_layer(self, *a, **k):
            pass

        def start_load_kv(self, *a, **k):
            pass

    ec_mod = types.ModuleType("ec_example")
    ec_mod.ECExampleConnector = ECBase
    kv_mod = types.ModuleType("kv_example")
    kv_mod.ExampleConnector = KVBase
    import profiler.connector_timing as CT
    monkeypatch.setattr(CT, "_ec_base", lambda: ECBase)
    monkeypatch.setattr(CT, "_kv_base", lambda: KVBase)
    for n in ("TimedECExampleConnector", "TimedExampleConnector"):
        monkeypatch.delitem(CT.__dict__, n, raising=False)
    return CT


def test_timed_connectors_log_bytes_and_seconds(tmp_path, monkeypatch):
    CT = _fake_vllm(monkeypatch)

    class Cfg:
        def __init__(self, role):
            self.ec_role = role

        def get_from_extra_config(self, k, d):
            return str(tmp_path / "t") if k == CT.LOG_KEY else d

    NS = types.SimpleNamespace
    prod = CT.TimedECExampleConnector(NS(ec_transfer_config=Cfg("ec_producer")), "worker")
    prod.save_caches({"h1": _T((1024, 3584))}, "h1")
    cons = CT.TimedECExampleConnector(NS(ec_transfer_config=Cfg("ec_consumer")), "worker")
    cons._meta = NS(mm_datas=[NS(mm_hash="h1", num_token=1024), NS(mm_hash="h2", num_token=256)])
    cache = {"h2": _T((256, 3584))}                     # already there: not loaded again
    cons.start_load_caches(cache)
    kv = CT.TimedExampleConnector(NS(kv_transfer_config=Cfg(None)), "worker")
    kv._meta = NS(requests=[NS(is_store=True, slot_mapping=list(range(100))),
                            NS(is_store=False, slot_mapping=list(range(7)))])
    kv.save_kv_layer("layers.0", _T((50, 2, 16, 4, 128)), None)
    fc = NS(no_compile_layers={f"l{i}": NS(kv_cache=_T((50, 2, 16, 4, 128))) for i in range(3)})
    kv.start_load_kv(fc)
    recs = CT.read_timing_logs(tmp_path / "t")
    by = {(r["conn"], r["op"]): r for r in recs}
    assert by[("ec", "save")]["bytes"] == 1024 * 3584 * 2 and by[("ec", "save")]["tokens"] == 1024
    assert by[("ec", "load")]["items"] == 1 and by[("ec", "load")]["bytes"] == 1024 * 3584 * 2
    assert by[("kv", "save")]["bytes"] == 100 * 2 * 4 * 128 * 2 and by[("kv", "save")]["layer"] == "layers.0"
    assert by[("kv", "load")]["bytes"] == 7 * 3 * 2 * 4 * 128 * 2
    assert all(r["s"] >= 0 for r in recs) and len(recs) == 4
    # the run window filters by wall clock
    assert CT.read_timing_logs(tmp_path / "t", t0=max(r["t"] for r in recs) + 1) == []


# --- one-GPU hand-off measurement: the fit ------------------------------------------------------

def test_fit_line_recovers_latency_and_bandwidth():
    from profiler.handoff_bench import fit_line
    b = np.array([1e6, 4e6, 16e6, 64e6, 128e6])
    s = 300e-6 + b / 2.5e9
    f = fit_line(b, s)
    assert f["gb_s"] == pytest.approx(2.5, rel=1e-9) and f["latency_us"] == pytest.approx(300.0, rel=1e-6)
    assert f["max_abs_rel_err"] < 1e-9 and f["points"] == 5
    g = fit_line(b, b / 4e9 - 1e-5)            # a negative floor is noise: through the origin
    assert g["latency_us"] == 0.0 and g["gb_s"] == pytest.approx(4.0, rel=0.01)


def test_fit_links_from_sweep_and_from_server_records(tmp_path, capsys):
    from profiler import handoff_bench as HB
    pairs = [{"conn": "ec", "op": "pair", "items": 1, "bytes": n * 7168, "s": 1e-3 + n * 7168 / 1.6e9, "t": 0}
             for n in (64, 256, 1024, 4096)]
    res = HB.fit_links(pairs, "test sweep")
    assert res["links"]["encoder"]["gb_s"] == pytest.approx(1.6, rel=1e-6)
    assert res["links"]["encoder"]["latency_us"] == pytest.approx(1000.0, rel=1e-6)
    assert "test sweep" in res["links"]["encoder"]["source"]
    # server records: saves per item + loads (their time per byte added); KV per step of layer saves
    recs = [{"conn": "ec", "op": "save", "items": 1, "bytes": n, "s": 2e-4 + n / 4e9, "t": 1.0} for n in (1e6, 8e6, 3e7)]
    recs += [{"conn": "ec", "op": "load", "items": 1, "bytes": 1e7, "s": 1e7 / 4e9, "t": 2.0}]
    for step, toks in enumerate((100, 400, 1600)):
        for layer in range(4):
            recs.append({"conn": "kv", "op": "save", "items": 1, "bytes": toks * 1000, "s": 1e-5 + toks * 1000 / 8e9,
                         "t": 10.0 * step + 1e-3 * layer, "pid": 7, "layer": f"l{layer}"})
    recs += [{"conn": "kv", "op": "load", "items": 1, "bytes": 4e6, "s": 4e6 / 8e9, "t": 50.0, "pid": 8}]
    items = HB.handoff_items(recs)
    assert len(items["kv"][0]) == 3 and list(items["kv"][0]) == [4e5, 1.6e6, 6.4e6]
    res = HB.fit_links(recs, "served")
    assert res["links"]["encoder"]["gb_s"] == pytest.approx(2.0, rel=1e-6)        # 1/(1/4 + 1/4)
    assert res["links"]["kv"]["gb_s"] == pytest.approx(4.0, rel=1e-6)
    assert res["links"]["kv"]["latency_us"] == pytest.approx(40.0, rel=1e-6)      # 4 layers x 10 us
    # the CLI writes what sim.tools.validate --handoff reads
    d = tmp_path / "records"
    d.mkdir()
    (d / "ec_1.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    assert HB.main(["fit", str(d), "--out", str(tmp_path / "h.json")]) == 0
    from sim.tools.validate import load_handoff
    assert load_handoff(tmp_path / "h.json")["encoder"]["gb_s"] == pytest.approx(1.6, rel=1e-4)
    assert HB.main(["sweep", "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3584 x bf16" in out and "0.5, 1.8, 7.3, 16.5, 29.4, 66.1, 117.4 MB" in out


def test_fit_takes_sweep_pairs_and_served_kv_together():
    from profiler import handoff_bench as HB
    recs = [{"conn": "ec", "op": "pair", "items": 1, "bytes": b, "s": 1e-3 + b / 2e9, "t": 0} for b in (1e6, 1e7, 1e8)]
    recs += [{"conn": "ec", "op": "save", "items": 1, "bytes": 1e6, "s": 9.0, "t": 0}]      # pairs win for ec
    for step, toks in enumerate((100, 800)):
        recs.append({"conn": "kv", "op": "save", "items": 1, "bytes": toks * 1000, "s": toks * 1000 / 5e9,
                     "t": 10.0 * step, "pid": 3, "layer": "l0"})
    recs.append({"conn": "kv", "op": "load", "items": 1, "bytes": 1e6, "s": 1e6 / 5e9, "t": 30.0})
    links = HB.fit_links(recs, "both")["links"]
    assert links["encoder"]["gb_s"] == pytest.approx(2.0, rel=1e-6)
    assert links["kv"]["gb_s"] == pytest.approx(2.5, rel=1e-6)
