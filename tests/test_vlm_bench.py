"""Image + text serving ground truth (issue 20): the Qwen2.5-VL model dir that `vllm serve` loads
with dummy weights (profiler.vlm_model), the request laws (profiler.chat_requests), the streaming
chat client (profiler.chat_bench) against a fake OpenAI chat server, and serve_bench's image and
overload runs (dry run and the whole driver against a fake `vllm` CLI).
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from profiler import chat_requests as CR  # noqa: E402
from profiler import vlm_model as VM  # noqa: E402

TEXT_RESULT = ROOT / "traces" / "validation" / "h100" / "qwen2_5_7b__sat__r3.json.gz"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- model dir

@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("vlm") / "qwen2_5_vl_7b"
    cfg = VM.write_vlm_model_dir("qwen2_5_vl_7b", d)
    return d, cfg


def test_vlm_config_is_the_yaml_shape_with_qwen_token_ids(vlm_dir):
    d, cfg = vlm_dir
    s = VM.vlm_shape("qwen2_5_vl_7b")
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert (cfg["image_token_id"], cfg["video_token_id"], cfg["vision_start_token_id"],
            cfg["vision_end_token_id"]) == (151655, 151656, 151652, 151653)
    t, v = cfg["text_config"], cfg["vision_config"]
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        assert t[k] == s["llm"][k], k
    assert t["rope_parameters"]["mrope_section"] == [16, 24, 24]
    assert t["rope_parameters"]["rope_theta"] == s["llm"]["rope_theta"]
    for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
              "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size",
              "fullatt_block_indexes"):
        assert v[k] == s["vision"][k], k
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    pp = json.loads((d / "preprocessor_config.json").read_text())
    assert pp["min_pixels"] == s["image_tokenizer"]["min_pixels"] == pp["size"]["shortest_edge"]
    assert pp["max_pixels"] == s["image_tokenizer"]["max_pixels"] == pp["size"]["longest_edge"]
    assert pp["image_processor_type"] == "Qwen2VLImageProcessor" and pp["processor_class"] == "Qwen2_5_VLProcessor"
    from transformers import AutoConfig
    back = AutoConfig.from_pretrained(str(d))
    assert type(back).__name__ == "Qwen2_5_VLConfig" and back.get_text_config().vocab_size == 152064


def test_vlm_tokenizer_specials_lengths_and_template(vlm_dir):
    d, cfg = vlm_dir
    V = cfg["text_config"]["vocab_size"]
    VM.check_vlm_tokenizer(d / "tokenizer", V)          # raises on any mismatch
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(d / "tokenizer"))
    assert len(tok) == V and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("[UNK]") == V - 1
    # the client's prompt text: n words -> n tokens
    txt = CR.prompt_text(57, seed=3, index=9, vocab_words=VM.FIRST_SPECIAL_ID)
    assert len(tok.encode(txt, add_special_tokens=False)) == 57
    # a mutant: the text models' tokenizer (no Qwen specials) is refused
    from profiler.serve_bench import make_tokenizer
    make_tokenizer(V).save_pretrained(str(d / "wrong_tok"))
    with pytest.raises(AssertionError):
        VM.check_vlm_tokenizer(d / "wrong_tok", V)


def test_vlm_processor_expands_images_as_smart_resize(vlm_dir):
    """What vLLM 0.26 builds (Qwen2_5_VLProcessor.from_pretrained(model dir, tokenizer=served),
    use_fast): every image becomes (H'/28)(W'/28) <|image_pad|> tokens, the text keeps its length.
    Needs torch + torchvision (the GPU host has both; serve_bench runs this check before the
    engine starts)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    d, _ = vlm_dir
    from profiler.models import load_model
    spec = load_model("qwen2_5_vl_7b")
    got = VM.check_vlm_processor(d, d / "tokenizer")
    assert [n for _, _, n in got] == [spec.image_input_tokens(h, w) for h, w, _ in got]
    assert dict(((h, w), n) for h, w, n in got)[(1344, 1344)] == 2304


@pytest.mark.parametrize("h", [14, 16, 28, 100, 256, 447, 448, 449, 896, 1328, 3000, 5000])
@pytest.mark.parametrize("ratio", [1.0, 0.5625, 1.778, 0.1])
def test_client_image_tokens_are_the_simulators(h, ratio):
    """The client's expected token count (HF's smart_resize) and the simulator's image_tokens
    agree over the sizes the laws draw (and beyond: tiny, huge, 10:1)."""
    from profiler.models import load_model
    spec = load_model("qwen2_5_vl_7b")
    w = max(14, int(round(h * ratio)))
    assert VM.image_tokens(h, w, spec.image_tokenizer) == spec.image_input_tokens(h, w)


# ----------------------------------------------------------------------------- request laws

def test_draw_requests_follows_the_simulator_laws_and_seed():
    from sim.rng import stream
    from sim.workloads.laws import gamma_arrivals
    plan = CR.ChatPlan(num_prompts=4000, request_rate=5.0, burstiness=0.5, seed=7, text_frac=0.25)
    reqs = CR.draw_requests(plan)
    again = CR.draw_requests(CR.ChatPlan(**plan.__dict__))
    assert [r.__dict__ for r in reqs] == [r.__dict__ for r in again]        # a seed fixes the run
    t = gamma_arrivals(4000, 5.0, 0.5, stream(7, "chat.arrivals"), vllm_scaling=True)
    assert np.array_equal([r.arrival_s for r in reqs], t)                    # vLLM's law, exactly
    assert t[-1] == pytest.approx(4000 / 5.0)                               # its rescaling
    text = [r for r in reqs if r.task == "text"]
    img = [r for r in reqs if r.task == "understand"]
    assert 0.22 < len(text) / 4000 < 0.28 and all(not r.images for r in text)
    counts = np.bincount([len(r.images) for r in img], minlength=4)
    assert counts[0] == 0 and 0.72 < counts[1] / len(img) < 0.78 and 0.17 < counts[2] / len(img) < 0.23
    _, _, o_law, law = CR.workload_laws()
    sides = np.array([s for r in img for hw in r.images for s in hw])
    assert sides.min() >= 16 and sides.max() <= law.max and np.all(sides % law.round_to == 0)
    h = np.array([hw[0] for r in img for hw in r.images])
    # Pareto(2.5, 256) heights rounded to 16: P(h >= 512) = (256/504)^2.5 = 0.184, clipped at 1328
    assert 0.16 < np.mean(h >= 512) < 0.21 and 0.010 < np.mean(h == law.max) < 0.025
    ratios = {round(w / hh, 1) for r in img for hh, w in r.images if hh < law.max and w < law.max}
    assert len(ratios) >= 5                                                   # several aspect ratios
    assert max(r.output_tokens for r in reqs) <= plan.max_output
    assert np.median([r.text_tokens for r in text]) > 3 * np.median([r.text_tokens for r in img])
    # common random numbers: another text share keeps the arrivals and request i's image sizes
    other = CR.draw_requests(CR.ChatPlan(**{**plan.__dict__, "text_frac": 0.0}))
    assert [r.arrival_s for r in other] == [r.arrival_s for r in reqs]
    assert all(o.images == r.images for o, r in zip(other, reqs) if r.images)


def test_mixed_and_probe_image_laws():
    m = CR.draw_requests(CR.ChatPlan(num_prompts=2000, seed=1, image_law="mixed", text_frac=0.0))
    sizes = [hw for r in m for hw in r.images]
    sq = {(s, s) for s in CR.MIXED_SQUARES}
    share = np.mean([hw in sq for hw in sizes])
    assert 0.72 < share < 0.80                 # 3/4 squares (+ the rare square Pareto draw)
    for s in CR.MIXED_SQUARES:
        assert 0.2 < np.mean([hw == (s, s) for hw in sizes]) < 0.3
    assert all(r.arrival_s == 0.0 for r in m)  # rate inf
    p = CR.draw_requests(CR.ChatPlan(num_prompts=8, seed=2, image_law="probe", fixed_text=32, fixed_output=16))
    assert [r.images[0] for r in p] == list(CR.PROBE_SIZES) * 2
    assert {(r.text_tokens, r.output_tokens, len(r.images)) for r in p} == {(32, 16, 1)}


def test_bad_plans_name_the_field():
    from sim.config import ConfigError
    for kw, field in ((dict(image_law="huge"), "image_law"), (dict(text_frac=1.5), "text_frac"),
                      (dict(images_per_request={0: 1.0}), "images_per_request"),
                      (dict(request_rate=-1.0), "request_rate")):
        with pytest.raises(ConfigError, match=field):
            CR.draw_requests(CR.ChatPlan(num_prompts=3, **kw))


def test_synthetic_images_are_unique_and_exact_size():
    a = CR.synth_jpeg(300, 533, (1, 0, 0))
    b = CR.synth_jpeg(300, 533, (1, 0, 1))
    assert a != b and CR.synth_jpeg(300, 533, (1, 0, 0)) == a
    url, n = CR.image_data_url(300, 533, (1, 0, 0))
    assert CR.jpeg_size(url) == (300, 533) and n == len(a)
    assert 1.0 < len(a) * 8 / (300 * 533) < 5.0           # photo-like bits per pixel


# ----------------------------------------------------------------------------- the client

def _run_client(tmp_path, port, extra, name="r.json"):
    from profiler import chat_bench
    rc = chat_bench.main(["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--workers", "2",
                          "--result-dir", str(tmp_path), "--result-filename", name] + extra)
    return rc, json.loads((tmp_path / name).read_text())


def test_chat_bench_end_to_end_against_fake_server(tmp_path):
    pytest.importorskip("aiohttp")
    from fake_chat_server import serve_in_thread
    port = _free_port()
    args = ["--num-prompts", "36", "--request-rate", "30", "--burstiness", "0.5", "--seed", "5",
            "--max-output", "12", "--num-warmups", "2"]
    with serve_in_thread(port) as st:
        rc, res = _run_client(tmp_path, port, args)
    assert rc == 0
    n = 36
    # vllm bench serve --save-detailed's keys (those of a committed text run), and ours
    if TEXT_RESULT.exists():
        from profiler.jsonfiles import read_json
        want = set(read_json(TEXT_RESULT)) - {"provenance"}
        assert want <= set(res), sorted(want - set(res))
    for k in ("input_lens", "output_lens", "ttfts", "itls", "start_times", "errors", "images",
              "tasks", "text_prompt_tokens", "expected_prompt_tokens", "image_tokens"):
        assert len(res[k]) == n, k
    assert res["completed"] == n and res["failed"] == 0 and not any(res["errors"])
    assert res["request_rate"] == 30.0 and res["burstiness"] == 0.5 and res["endpoint_type"] == "openai-chat"
    # the server's own prompt counts are the expected ones (template + text + smart_resize tokens)
    assert res["prompt_tokens_mismatches"] == 0 and res["input_lens"] == res["expected_prompt_tokens"]
    assert res["output_lens"] == res["requested_output_tokens"]
    # exactly what was drawn was sent and recorded: the server decoded the same images
    reqs = CR.draw_requests(CR.ChatPlan(num_prompts=n, request_rate=30.0, burstiness=0.5, seed=5, max_output=12))
    assert res["images"] == [[list(hw) for hw in r.images] for r in reqs]
    assert res["tasks"] == [r.task for r in reqs]
    main = st["requests"][2:]                                 # after the two warm-ups
    got = sorted((q["text_tokens"], tuple(map(tuple, q["images"]))) for q in main)
    assert got == sorted((r.text_tokens, tuple(r.images)) for r in reqs)
    assert all(q["ignore_eos"] and q["min_tokens"] == q["max_tokens"] and q["stream_options"]["include_usage"]
               for q in main)
    # sends are never early: each starts at or after its planned offset
    org = res["schedule_origin"]
    assert all(s >= org + off - 1e-9 for s, off in zip(res["start_times"], res["planned_offsets_s"]))
    assert res["planned_offsets_s"] == [r.arrival_s for r in reqs]
    # vLLM's openai-chat timing: TTFT at the role chunk, one ITL per content chunk after it
    assert all(t > 0 for t in res["ttfts"]) and [len(x) for x in res["itls"]] == res["output_lens"]
    # the summary is vLLM's calculate_metrics on these lists (latency, which ends at the usage
    # chunk as in vLLM's client, is not saved per request: see test_calculate_metrics_is_vllms)
    assert res["median_ttft_ms"] == pytest.approx(np.median(res["ttfts"]) * 1e3, rel=1e-9)
    assert res["mean_itl_ms"] == pytest.approx(np.mean([x for r in res["itls"] for x in r]) * 1e3, rel=1e-9)
    e2el = np.array(res["ttfts"]) + np.array([sum(x) for x in res["itls"]])
    assert res["median_e2el_ms"] >= np.median(e2el) * 1e3 - 1e-6
    assert res["request_throughput"] == pytest.approx(n / res["duration"])


def test_calculate_metrics_is_vllms():
    """Hand-computed: vLLM's definitions (TPOT = (latency - TTFT) / (out - 1) for out > 1, ITLs
    pooled, failed requests left out, throughput over the whole duration)."""
    from profiler.chat_bench import Outcome, calculate_metrics
    outs = [Outcome(True, latency=1.0, output_tokens=11, prompt_len=100, ttft=0.1, itl=[0.09] * 10, start_time=5.0),
            Outcome(True, latency=2.0, output_tokens=1, prompt_len=50, ttft=2.0, itl=[], start_time=5.5),
            Outcome(True, latency=3.0, output_tokens=21, prompt_len=10, ttft=1.0, itl=[0.1] * 20, start_time=6.0),
            Outcome(False, error="x", start_time=6.1)]
    m = calculate_metrics(outs, dur_s=4.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 160, 33)
    assert m["_output_lens"] == [11, 1, 21, 0]
    assert m["request_throughput"] == 0.75 and m["output_throughput"] == 33 / 4.0
    assert m["median_ttft_ms"] == pytest.approx(1000.0) and m["mean_ttft_ms"] == pytest.approx(1033.333333)
    assert m["mean_tpot_ms"] == pytest.approx((0.09 + 0.1) / 2 * 1e3)          # out == 1 left out
    assert m["median_itl_ms"] == pytest.approx(100.0) and m["p99_e2el_ms"] == pytest.approx(np.percentile([1e3, 2e3, 3e3], 99))
    assert m["max_concurrent_requests"] == 3 and m["max_output_tokens_per_s"] >= 11


def test_chat_bench_records_failed_requests(tmp_path):
    pytest.importorskip("aiohttp")
    from fake_chat_server import serve_in_thread
    port = _free_port()
    with serve_in_thread(port, fail_every=4):
        rc, res = _run_client(tmp_path, port, ["--num-prompts", "12", "--seed", "1", "--max-output", "4"])
    assert rc == 0
    bad = [i for i, e in enumerate(res["errors"]) if e]
    assert len(bad) == 3 and res["failed"] == 3 and res["completed"] == 9
    assert all("400" in res["errors"][i] for i in bad) and all(res["output_lens"][i] == 0 for i in bad)
    assert len(res["images"]) == 12                      # failed requests keep their record


def test_sse_buffer_splits_messages_across_chunks():
    from profiler.chat_bench import SSEBuffer
    b = SSEBuffer()
    assert b.add(b'data: {"a": 1}\n\ndata: {"b"') == ['data: {"a": 1}']
    assert b.add(b': 2}') == ['data: {"b": 2}']             # complete JSON without the separator
    assert b.add(b"data: [DONE]") == ["data: [DONE]"]


# ----------------------------------------------------------------------------- serve_bench

sb = pytest.importorskip("profiler.serve_bench")


def test_vlm_dry_run_prints_every_command(capsys):
    assert sb.main(["--model", "qwen2_5_vl_7b", "--out", "/tmp/never_written", "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    serve = [l for l in lines if " serve " in l]
    bench = [l for l in lines if "profiler.chat_bench" in l]
    assert len(serve) == 1 and len(bench) == len(sb.VLM_DEFAULT_RUNS) and len(lines) == 1 + len(bench)
    s = serve[0]
    for flag in ("--load-format dummy", "--no-enable-prefix-caching", "--max-num-batched-tokens 8192",
                 "--max-num-seqs 256", "--tokenizer", """--limit-mm-per-prompt '{"image": 3, "video": 0}'"""):
        assert flag in s, flag
    assert "--max-model-len" not in s
    by = {sb.VLM_DEFAULT_RUNS[i]: b for i, b in enumerate(bench)}
    assert "--request-rate inf" in by["inf"] and "--num-warmups 16" in by["inf"]
    assert "--burstiness 0.5" in by["bursty_k0.5"] and "--image-law mixed" in by["mixed_sizes"]
    assert "--image-law probe" in by["probe_img"] and "--max-concurrency 1" in by["probe_img"]
    c = sb.MODEL_SETTINGS["qwen2_5_vl_7b"]["assumed_capacity"]
    assert f"--request-rate {0.9 * c:.3f}" in by["sat"] and f"--request-rate {0.35 * c:.3f}" in by["poisson_low"]
    for name, b in by.items():
        assert f"--result-filename qwen2_5_vl_7b__{name}.json" in b and "--base-url http://127.0.0.1:8000" in b


def test_overload_runs_and_same_start_repeats_dry_run(capsys):
    assert sb.main(["--model", "llama2_7b", "--out", "/tmp/never_written", "--capacity", "7.0",
                    "--runs", "inf,over,over_bursty_k0.25,inf", "--tag", "o1",
                    "--num-gpu-blocks-override", "5000", "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    bench = [l for l in lines if " bench serve " in l]
    assert "--num-gpu-blocks-override 5000" in lines[0]
    assert [b.split("--result-filename ")[1] for b in bench] == [
        "llama2_7b__inf__o1.json", "llama2_7b__over__o1.json", "llama2_7b__over_bursty_k0.25__o1.json",
        "llama2_7b__inf__s2__o1.json"]
    assert "--request-rate 9.100" in bench[1] and "--burstiness" not in bench[1]
    assert "--request-rate 8.400" in bench[2] and "--burstiness 0.25" in bench[2]
    assert bench[3].split("--result-filename")[0] == bench[0].split("--result-filename")[0]   # same requests
    assert sb.run_stems(["a", "b", "a", "a"]) == ["a", "b", "a__s2", "a__s3"]
    # the text catalog keeps its names and settings
    assert sb.RUN_CATALOG["sat"].rate_frac == 0.9 and sb.RUN_CATALOG["inf"].seed == 11


def test_overload_runs_fit_one_call():
    """llama2_7b: inf + overload + bursty overload + an inf repeat, with a ~250 s engine start,
    fit in 9.3 minutes at its measured capacity; so does the default image command at 12 req/s."""
    for model, runs, c in (("llama2_7b", ["inf", "over", "over_bursty_k0.25", "inf"], 7.13),
                           ("qwen2_5_7b", ["inf", "over", "over_bursty_k0.25", "inf"], 24.2),
                           ("qwen2_5_vl_7b", list(sb.VLM_DEFAULT_RUNS), 12.0)):
        st = sb.MODEL_SETTINGS[model]
        cat = sb.catalog(model)
        total = 250.0 + 25.0 + sum(sb.est_seconds(sb.size_run(cat[r], c, st["n_inf"], 28.0), c) for r in runs)
        assert total < 9.3 * 60, (model, total)


FAKE_VLLM_CHAT = r'''
import sys, runpy
args = sys.argv[1:]
if args[0] == "serve":
    print("INFO GPU KV cache size: 987,654 tokens", flush=True)
    print("INFO Maximum concurrency for 32,768 tokens per request: 30.14x", flush=True)
    port = args[args.index("--port") + 1]
    sys.argv = ["fake_chat_server.py", "--port", port]
    runpy.run_path("@FAKE@", run_name="__main__")
'''


def test_serve_bench_vlm_orchestration_with_fake_vllm(tmp_path, monkeypatch):
    """The whole driver for the image model: model dir + checks, server start, calibration from the
    inf run, chat_bench runs with their images, provenance (image law, CPU samples), a repeat."""
    pytest.importorskip("transformers")
    pytest.importorskip("aiohttp")
    monkeypatch.setattr(VM, "check_vlm_processor", lambda *a, **k: [(448, 448, 256)])   # needs torchvision
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE_VLLM_CHAT.replace("@FAKE@", str(ROOT / "tests" / "fake_chat_server.py")))
    port = _free_port()
    out = tmp_path / "out"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    rc = sb.main(["--model", "qwen2_5_vl_7b", "--out", str(out), "--port", str(port),
                  "--model-dir", str(tmp_path / "m"), "--vllm-cli", f"{sys.executable} {fake}",
                  "--health-timeout", "60", "--runs", "inf,poisson_low,probe_img,inf",
                  "--num-prompts-inf", "30", "--target-s", "1.0"])
    assert rc == 0
    names = sorted(p.name for p in out.glob("qwen2_5_vl_7b__*.json"))
    assert names == ["qwen2_5_vl_7b__inf.json", "qwen2_5_vl_7b__inf__s2.json",
                     "qwen2_5_vl_7b__poisson_low.json", "qwen2_5_vl_7b__probe_img.json"]
    inf = json.loads((out / "qwen2_5_vl_7b__inf.json").read_text())
    low = json.loads((out / "qwen2_5_vl_7b__poisson_low.json").read_text())
    rep = json.loads((out / "qwen2_5_vl_7b__inf__s2.json").read_text())
    assert "generated_texts" not in low and low["prompt_tokens_mismatches"] == 0
    p = low["provenance"]
    assert p["model"] == "qwen2_5_vl_7b" and p["kv_cache_tokens"] == 987654
    assert p["calibrated_capacity_rps"] == pytest.approx(inf["request_throughput"], rel=1e-3)
    assert p["request_rate"] == pytest.approx(0.35 * inf["request_throughput"], rel=1e-3)
    assert p["image_law"] == "workload" and p["client"] == "profiler.chat_bench"
    assert p["limit_mm_per_prompt"] == {"image": 3, "video": 0}
    assert p["workload_laws"]["image"]["alpha"] == 2.5 and p["cpu_samples"]["columns"][1] == "api_server_cpu_s"
    assert "--limit-mm-per-prompt" in p["server_command"] and "profiler.chat_bench" in p["bench_command"]
    assert rep["images"] == inf["images"] and rep["provenance"]["run"] == "inf__s2"
    probe = json.loads((out / "qwen2_5_vl_7b__probe_img.json").read_text())
    assert probe["max_concurrency"] == 1 and [i[0] for i in probe["images"][:4]] == [list(s) for s in CR.PROBE_SIZES]
    summ = json.loads((out / "serve_bench_qwen2_5_vl_7b.json").read_text())
    assert [x["run"] for x in summ["runs"]] == ["inf", "poisson_low", "probe_img", "inf__s2"]


def test_vllm_builds_the_expected_prompt_lengths(vlm_dir):
    """vLLM 0.26.0's own API-side path (parse_chat_messages -> chat template -> multimodal
    processor apply) on the model dir: every drawn request's prompt has exactly the tokens the
    client expects (what serve_bench checks on the GPU host before the engine starts). Needs an
    importable vLLM (the GPU host; a CPU install of the wheel works too)."""
    pytest.importorskip("torchvision")
    vllm = pytest.importorskip("vllm")
    if not hasattr(vllm, "__version__") or not str(vllm.__version__).startswith("0.26"):
        pytest.skip("not vLLM 0.26")
    from profiler import mm_preproc
    d, _ = vlm_dir
    rows = mm_preproc.check(str(d), str(d / "tokenizer"))
    assert len(rows) == 10 and all(r["vllm"] == r["expected"] for r in rows)
    assert sum(len(r["images"]) > 1 for r in rows) >= 2 and any(not r["images"] for r in rows)


def test_steplog_records_mm_cache_stats(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from profiler import vllm_steplog as S
    log = tmp_path / "s.jsonl"
    monkeypatch.setenv("MMSIM_STEPLOG", str(log))
    lg = S.StepLogger(None, 0)
    sch = SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0.1)
    lg.record(sch, None, SimpleNamespace(queries=3, hits=1, requests=2, reset=False))
    lg.record(sch, None, SimpleNamespace(queries=0, hits=0, requests=0, reset=False))
    lg.record(sch, None)
    lg.log()
    recs = S.read_steplog(log)
    assert (recs[0]["mmq"], recs[0]["mmh"]) == (3, 1) and "mmq" not in recs[1] and "mmq" not in recs[2]
