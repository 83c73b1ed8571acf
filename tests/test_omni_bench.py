"""vLLM-Omni ground-truth tooling on CPU: request laws, offline tokenizers and model folders, the
random-weight plugin's registration, the load client against a fake image server, and the
omni_bench driver end to end (fake `vllm serve --omni`), deadlines and error rows included.

What needs a GPU (the real server) is not here; docs/gpu/omni.md has the device commands.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from profiler import omni_bench as OB
from profiler import omni_client as OC
from profiler import omni_models as OM
from profiler import omni_server as OS

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_omni_server.py"


def law(steps=(4, 6, 8, 12), max_side=None):
    return OC.WorkloadLaw.from_yaml("mixed_bursty", steps, max_side)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- request laws

def test_draw_requests_follow_the_simulator_laws():
    """Sides: the workload's Pareto law (P(h > 2 x_min) = 2^-alpha before clipping), multiples of
    16 within [16, max]; steps from the list, near-uniform; arrivals Poisson with mean gap 1/rate;
    prompts of exactly `prompt_words` words. Bounds are 4-sigma binomial / CLT bounds."""
    L = law()
    n, rate = 20000, 2.0
    reqs = OC.draw_requests("generate", n, rate, 1.0, seed=7, law=L, cfg=True)
    h = np.array([r.height for r in reqs])
    w = np.array([r.width for r in reqs])
    assert (h % 16 == 0).all() and (w % 16 == 0).all()
    assert h.min() >= 16 and max(h.max(), w.max()) <= 1328
    p = 2.0 ** -2.5                       # P(side > 512) for x_min 256, alpha 2.5
    frac = float((h > 512).mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n), frac
    steps = np.array([r.steps for r in reqs])
    assert set(steps) == {4, 6, 8, 12}
    for s in (4, 6, 8, 12):
        assert abs((steps == s).mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    gaps = np.diff([0.0] + [r.arrival_s for r in reqs])
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(n)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05          # exponential: CV 1
    r0 = reqs[0]
    assert r0.prompt.startswith(" ") and len(r0.prompt.split()) == r0.prompt_words
    assert all(wd in OM.PROMPT_WORDS for wd in r0.prompt.split())
    assert all(4 <= r.prompt_words <= 512 for r in reqs)
    assert all(r.cfg and r.input_height is None for r in reqs)
    assert len({r.seed for r in reqs}) == n


def test_draw_requests_bursty_reproducible_and_edit_shapes():
    L = law()
    a = OC.draw_requests("edit", 4000, 1.0, 0.25, seed=3, law=L, cfg=True)
    b = OC.draw_requests("edit", 4000, 1.0, 0.25, seed=3, law=L, cfg=True)
    assert [vars(x) for x in a] == [vars(x) for x in b]
    gaps = np.diff([0.0] + [r.arrival_s for r in a])
    assert 1.6 < gaps.std() / gaps.mean() < 2.4                 # Gamma k=0.25: CV = 2
    assert all((r.input_height, r.input_width) == (r.height, r.width) for r in a)
    g = OC.draw_requests("generate", 4000, 1.0, 0.25, seed=3, law=L, cfg=False)
    # common random numbers: the arrival stream does not depend on the task
    assert [r.arrival_s for r in g] == [r.arrival_s for r in a]
    c = OC.draw_requests("edit", 4000, 1.0, 0.25, seed=4, law=L, cfg=True)
    assert [r.height for r in c] != [r.height for r in a]
    seq = OC.draw_requests("generate", 5, None, 1.0, seed=3, law=L, cfg=True)
    assert all(r.arrival_s == 0.0 for r in seq)


def test_draw_requests_rejects_bad_input():
    with pytest.raises(ValueError, match="task="):
        OC.draw_requests("understand", 3, 1.0, 1.0, 0, law(), True)
    with pytest.raises(ValueError, match="rate="):
        OC.draw_requests("generate", 3, 0.0, 1.0, 0, law(), True)
    with pytest.raises(ValueError, match="steps="):
        law(steps=(0, 4))
    with pytest.raises(ValueError, match="--workload="):
        OC.WorkloadLaw.from_yaml("no_such_workload", (4,))


def test_summary_keys_and_values():
    reqs = OC.draw_requests("generate", 4, None, 1.0, 0, law(), True)
    rows = [dict(sent_s=0.0, latency_s=1.0, status=200, error=""),
            dict(sent_s=1.0, latency_s=2.0, status=200, error=""),
            dict(sent_s=1.5, latency_s=0.1, status=500, error="CUDA out of memory"),
            dict(sent_s=None, latency_s=None, status=None, error="not sent")]
    s = OC.summarize(reqs, rows, 9.0)
    assert s["completed"] == 2 and s["failed"] == 1 and s["not_sent"] == 1
    assert s["duration"] == pytest.approx(3.0)                  # first send to last completion
    assert s["request_throughput"] == pytest.approx(2 / 3.0)
    assert s["mean_e2el_ms"] == pytest.approx(1500.0) and s["median_e2el_ms"] == pytest.approx(1500.0)
    assert s["p99_e2el_ms"] == pytest.approx(1000 + 0.99 * 1000)


# ----------------------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    pytest.importorskip("tokenizers")
    tr = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tok")
    OM.write_qwen_tokenizer(d / "tokenizer")
    return tr.Qwen2Tokenizer.from_pretrained(str(d), subfolder="tokenizer")


def test_qwen_tokenizer_counts_match_the_real_one(qwen_tok):
    """The generate template's fixed prefix is the 34 tokens vLLM-Omni drops (pipeline_qwen_image.py
    :363); the edit prefix is 67 tokens (every pre-token a common word: one Qwen2 token each; the
    pipeline drops 64); a prompt of n words is n tokens; specials sit at their real ids."""
    tok = qwen_tok
    gen_prefix = OM.QWEN_GENERATE_TEMPLATE.split("{}")[0]
    edit_prefix = OM.QWEN_EDIT_TEMPLATE.split("{}")[0]
    assert len(tok(gen_prefix).input_ids) == OM.QWEN_GENERATE_DROP == 34
    assert len(tok(edit_prefix).input_ids) == 67
    words = " " + " ".join(OM.PROMPT_WORDS)
    assert len(tok(words).input_ids) == len(OM.PROMPT_WORDS)
    rng = np.random.default_rng(0)
    p = OC.make_prompt(37, rng)
    full = OM.QWEN_GENERATE_TEMPLATE.format(p)
    assert len(tok(full).input_ids) == 34 + 37 + 5              # + <|im_end|> \n <|im_start|> assistant \n
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                     "<|vision_end|>", "<|image_pad|>"])
    assert ids == [151643, 151644, 151645, 151652, 151653, 151655]
    assert len(tok) == 151665 and max(tok(full).input_ids) < 152064


def test_templates_are_vllm_omnis():
    """Our copies of the prompt templates are the installed vLLM-Omni's (source text)."""
    spec = pytest.importorskip("importlib.util").find_spec("vllm_omni")
    if spec is None:
        pytest.skip("vllm_omni not installed")
    base = Path(spec.submodule_search_locations[0]) / "diffusion" / "models" / "qwen_image"
    gen = (base / "pipeline_qwen_image.py").read_text()
    edit = (base / "pipeline_qwen_image_edit.py").read_text()
    assert json.dumps(OM.QWEN_GENERATE_TEMPLATE) in gen and "prompt_template_encode_start_idx = 34" in gen
    assert json.dumps(OM.QWEN_EDIT_TEMPLATE) in edit and "prompt_template_encode_start_idx = 64" in edit


def test_edit_processor_expands_the_image(tmp_path):
    tr = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")          # transformers 5's Qwen2-VL image processor
    from PIL import Image
    OM.write_qwen_tokenizer(tmp_path / "processor", with_processor=True)
    proc = tr.Qwen2VLProcessor.from_pretrained(str(tmp_path), subfolder="processor")
    img = Image.new("RGB", (448, 336))
    txt = OM.QWEN_EDIT_TEMPLATE.format(OC.make_prompt(9, np.random.default_rng(1)))
    out = proc(text=[txt], images=img, padding=True, return_tensors="pt")
    grid = out.image_grid_thw[0].tolist()
    assert grid == [1, 336 // 14, 448 // 14]                   # smart_resize keeps multiples of 28
    n_img = grid[0] * grid[1] * grid[2] // 4
    assert int((out.input_ids == 151655).sum()) == n_img
    assert out.input_ids.shape[1] == 67 - 1 + n_img + 9 + 5


def test_flux_tokenizers_pad_to_the_pipeline_lengths(tmp_path):
    pytest.importorskip("tokenizers")
    tr = pytest.importorskip("transformers")
    OM.write_clip_tokenizer(tmp_path / "tokenizer")
    OM.write_t5_tokenizer(tmp_path / "tokenizer_2")
    clip = tr.CLIPTokenizer.from_pretrained(str(tmp_path), subfolder="tokenizer")
    t5 = tr.T5TokenizerFast.from_pretrained(str(tmp_path), subfolder="tokenizer_2")
    p = OC.make_prompt(300, np.random.default_rng(2))
    a = clip([p], padding="max_length", max_length=77, truncation=True).input_ids[0]
    b = t5([p], padding="max_length", max_length=512, truncation=True).input_ids[0]
    assert len(a) == 77 and a[0] == 49406 and max(a) < 49408 and clip.model_max_length == 77
    assert len(b) == 512 and max(b) < 32128 and b[-1] in (0, 1)


# ----------------------------------------------------------------------------- model folders

def _meta_params(module_factory) -> int:
    import torch
    with torch.device("meta"):
        m = module_factory()
    return sum(p.numel() for p in m.parameters())


def test_model_dirs_hold_the_public_architectures(tmp_path):
    """Full-size configs instantiate (on the meta device) to the published parameter counts:
    Qwen-Image MMDiT 20.4B, Qwen2.5-VL-7B 8.3B, FLUX.1-dev DiT 11.9B, T5-XXL encoder 4.76B,
    CLIP-L 123M (a wrong width or depth moves these by far more than the bounds)."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    tr = pytest.importorskip("transformers")
    q = tmp_path / "qie"
    man = OM.write_model_dir("qwen_image_edit", q)
    assert man["pipeline"] == "QwenImageEditPipeline" and (q / OM.MARKER).exists()
    idx = json.loads((q / "model_index.json").read_text())
    assert idx["_class_name"] == "QwenImageEditPipeline" and "processor" in idx
    tcfg = diffusers.QwenImageTransformer2DModel.load_config(str(q), subfolder="transformer")
    n = _meta_params(lambda: diffusers.QwenImageTransformer2DModel.from_config(tcfg))
    assert 20.2e9 < n < 20.7e9, n
    vcfg = diffusers.AutoencoderKLQwenImage.load_config(str(q), subfolder="vae")
    assert 0.10e9 < _meta_params(lambda: diffusers.AutoencoderKLQwenImage.from_config(vcfg)) < 0.16e9
    ecfg = tr.AutoConfig.from_pretrained(str(q), subfolder="text_encoder")
    n = _meta_params(lambda: tr.Qwen2_5_VLForConditionalGeneration._from_config(ecfg))
    assert 8.2e9 < n < 8.4e9, n
    assert ecfg.image_token_id == 151655 and ecfg.text_config.num_hidden_layers == 28
    assert ecfg.vision_config.depth == 32 and ecfg.vision_config.out_hidden_size == 3584
    f = tmp_path / "flux"
    OM.write_model_dir("flux1_dev", f)
    fcfg = diffusers.FluxTransformer2DModel.load_config(str(f), subfolder="transformer")
    n = _meta_params(lambda: diffusers.FluxTransformer2DModel.from_config(fcfg))
    assert 11.8e9 < n < 12.0e9, n
    t5 = tr.AutoConfig.from_pretrained(str(f), subfolder="text_encoder_2")
    n = _meta_params(lambda: tr.T5EncoderModel(t5))
    assert 4.6e9 < n < 4.9e9, n
    cl = tr.AutoConfig.from_pretrained(str(f), subfolder="text_encoder")
    assert 0.11e9 < _meta_params(lambda: tr.CLIPTextModel(cl)) < 0.13e9
    fv = diffusers.AutoencoderKL.load_config(str(f), subfolder="vae")
    assert fv["latent_channels"] == 16 and fv["use_quant_conv"] is False


def test_tiny_model_dir_runs_a_qwen_image_step(tmp_path):
    """Tiny shapes through the same builders: the transformer takes the latent and text shapes the
    VAE and text encoder configs imply (a real forward on the CPU)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    tiny = {"transformer": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 32,
                            "joint_attention_dim": 64, "axes_dims_rope": [8, 12, 12]},
            "text_encoder": {"text": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "intermediate_size": 128}}}
    d = tmp_path / "qi"
    OM.write_model_dir("qwen_image", d, shapes=tiny)
    assert OM.write_model_dir("qwen_image", d, shapes=tiny)["shapes_override"] == tiny   # idempotent
    cfg = diffusers.QwenImageTransformer2DModel.load_config(str(d), subfolder="transformer")
    m = diffusers.QwenImageTransformer2DModel.from_config(cfg).eval()
    te = json.loads((d / "text_encoder" / "config.json").read_text())
    assert te["text_config"]["hidden_size"] == cfg["joint_attention_dim"] == 64
    gh, gw = 256 // 16, 320 // 16
    with torch.no_grad():
        out = m(hidden_states=torch.randn(1, gh * gw, cfg["in_channels"]),
                encoder_hidden_states=torch.randn(1, 7, 64),
                encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, gh, gw)]], return_dict=False)[0]
    assert out.shape == (1, gh * gw, 4 * cfg["out_channels"])


def test_write_model_dir_rejects_unknown():
    with pytest.raises(ValueError, match="allowed"):
        OM.write_model_dir("sdxl", "/tmp/never")


# ----------------------------------------------------------------------------- plugin

def test_plugin_entry_point_is_found(tmp_path):
    """The dist-info omni_bench puts on the server's PYTHONPATH registers `register` in the group
    vLLM-Omni's load_omni_general_plugins reads (vllm_omni/plugins/__init__.py:14)."""
    from profiler import omni_plugin as P
    plug = P.install_plugin(tmp_path / "plug")
    code = ("from importlib.metadata import entry_points; "
            f"print([e.value for e in entry_points(group={P.ENTRY_GROUP!r})])")
    env = dict(os.environ, PYTHONPATH=f"{plug}:{ROOT}")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "profiler.omni_plugin:register" in out.stdout
    assert P.ENTRY_GROUP == "vllm_omni.general_plugins"


def test_plugin_replaces_the_builtin_pipelines():
    """With vLLM-Omni importable: register() swaps the three architectures for our subclasses,
    the pre/post hooks resolve from our module, and request batching support is inherited."""
    pytest.importorskip("vllm_omni")
    try:
        from vllm_omni.diffusion import registry as R
    except Exception as e:  # noqa: BLE001 - a CPU-only vllm may not import everything
        pytest.skip(f"vllm_omni.diffusion.registry does not import here: {e}")
    from types import SimpleNamespace

    from profiler import omni_pipelines as OP
    from profiler import omni_plugin as P
    P.register()
    for arch, (cls, pre, post) in P.REPLACED.items():
        assert R.DiffusionModelRegistry._try_load_model_cls(arch) is getattr(OP, cls)
        for hook in (pre, post):
            if hook:
                assert callable(getattr(OP, hook))
        assert (pre or "") == (R._DIFFUSION_PRE_PROCESS_FUNCS.get(arch) or "")
        assert post == R._DIFFUSION_POST_PROCESS_FUNCS[arch]
    assert OP.RandomQwenImagePipeline.supports_request_batch is True
    assert getattr(OP.RandomQwenImageEditPipeline, "supports_request_batch", False) is False
    assert R._DIFFUSION_MODELS["QwenImagePipeline"][0] == P.MODULE
    od = SimpleNamespace(model_class_name="QwenImagePipeline", custom_pipeline_args=None)
    from vllm_omni.diffusion.diffusion_engine import supports_request_batch
    assert supports_request_batch(od) is True


def test_config_only_from_pretrained_builds_without_weights(tmp_path):
    """The construction patch: HF and diffusers `from_pretrained` build from config inside the
    block (no weight file exists in the folder), and are restored after it."""
    pytest.importorskip("vllm_omni")
    torch = pytest.importorskip("torch")
    try:
        from profiler import omni_pipelines as OP
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"omni_pipelines does not import here: {e}")
    from diffusers.models.autoencoders import AutoencoderKLQwenImage
    from transformers import CLIPTextModel
    d = tmp_path / "f"
    OM.write_model_dir("flux1_dev", d, shapes={"clip_l": {"num_hidden_layers": 1}})
    q = tmp_path / "q"
    OM.write_model_dir("qwen_image", q, shapes={"vae": {"base_dim": 8}})
    before = CLIPTextModel.from_pretrained
    with OP.config_only_from_pretrained():
        clip = CLIPTextModel.from_pretrained(str(d), subfolder="text_encoder", local_files_only=True)
        vae = AutoencoderKLQwenImage.from_pretrained(str(q), subfolder="vae", torch_dtype=torch.bfloat16)
    assert clip.config.num_hidden_layers == 1 and vae.dtype == torch.bfloat16
    assert CLIPTextModel.from_pretrained == before
    with pytest.raises(OSError):                                  # restored: needs weights again
        CLIPTextModel.from_pretrained(str(d), subfolder="text_encoder", local_files_only=True)
    n = OP.fill_dummy(vae)
    assert n == {k for k, _ in vae.named_parameters()}
    vals = torch.cat([p.detach().float().flatten() for p in vae.parameters()])
    assert float(vals.abs().max()) <= 1e-3 and float(vals.std()) > 1e-4


# ----------------------------------------------------------------------------- client

def _serve_fake(monkeypatch, **env):
    """The fake image server in-process on a free port; returns (base_url, stop)."""
    pytest.importorskip("aiohttp")
    from aiohttp import web
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    import importlib.util
    spec = importlib.util.spec_from_file_location("fake_omni_server", FAKE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    port = free_port()

    async def start():
        runner = web.AppRunner(mod.make_app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner
    return f"http://127.0.0.1:{port}", start


def _run_against_fake(start, coro_factory):
    async def main():
        runner = await start()
        try:
            return await coro_factory()
        finally:
            await runner.cleanup()
    return asyncio.run(main())


def test_client_open_loop_and_errors(monkeypatch):
    """Open loop: requests are sent on schedule whatever is in flight (all 30, due within 30 ms,
    go out before the first of 30 x 150 ms services answers), every request gets a row, a request
    the server cannot serve (an out-of-memory answer) is a failed row with the server's message,
    not a missing one, and generations carry the server's metrics."""
    url, start = _serve_fake(monkeypatch, FAKE_BASE_S=0.15, FAKE_PER_STEP_S=0.0, FAKE_OOM_SIDE=1100)
    reqs = OC.draw_requests("generate", 30, 40.0, 1.0, seed=5, law=law(max_side=1024), cfg=True)
    for i, r in enumerate(reqs):
        r.arrival_s = 0.001 * i
    reqs[3].height = reqs[3].width = 1328                        # over FAKE_OOM_SIDE
    res = _run_against_fake(start, lambda: OC.run_requests(url, reqs))
    rows = res["rows"]
    assert [r["index"] for r in rows] == list(range(30))
    assert rows[3]["status"] == 500 and "out of memory" in rows[3]["error"]
    ok = [r for i, r in enumerate(rows) if i != 3]
    assert all(r["status"] == 200 and r["error"] == "" for r in ok)
    assert all(r["stage_durations"] and r["peak_memory_mb"] == 1234.5 for r in ok)
    # CFG requests carry the negative prompt (two passes), with the drawn step counts
    assert all(r["stage_durations"]["fake.cfg_passes"] == 2 for r in ok)
    assert [r["stage_durations"]["fake.steps"] for r in ok] == [q.steps for i, q in enumerate(reqs) if i != 3]
    first_answer = min(r["sent_s"] + r["latency_s"] for r in ok)
    assert max(r["sent_s"] for r in rows) < first_answer          # open loop: nobody waited
    assert all(r["sent_s"] >= q.arrival_s for r, q in zip(rows, reqs))
    assert max(r["latency_s"] for r in ok) > 10 * 0.15            # they queued at the server
    cols = OC.columns(reqs, rows, "qwen_image")
    assert len(cols["latency_s"]) == 30 and cols["status"][3] == 500 and cols["cfg"][0] is True


def test_client_sequential_and_edits(monkeypatch):
    """One at a time: each request is sent after the previous answer; edits upload the image."""
    url, start = _serve_fake(monkeypatch, FAKE_BASE_S=0.01, FAKE_PER_STEP_S=0.0)
    reqs = OC.draw_requests("edit", 6, None, 1.0, seed=2, law=law(max_side=512), cfg=True)
    images = OB.make_images(reqs)
    assert set(images) == {(r.input_height, r.input_width) for r in reqs}
    assert all(v[:2] == b"\xff\xd8" for v in images.values())  # JPEG
    res = _run_against_fake(start, lambda: OC.run_requests(url, reqs, sequential=True, images=images))
    rows = res["rows"]
    assert all(r["status"] == 200 for r in rows)                 # 422 without the image
    for a, b in zip(rows, rows[1:]):
        assert b["sent_s"] >= a["sent_s"] + a["latency_s"]
    assert all(r["stage_durations"] is None for r in rows)       # edits answer without metrics


def test_client_deadline_records_every_request(monkeypatch):
    """At the deadline, requests in flight are cancelled rows (-2) and unsent ones are rows with
    status None: nothing is dropped."""
    url, start = _serve_fake(monkeypatch, FAKE_BASE_S=0.5, FAKE_PER_STEP_S=0.0)
    reqs = OC.draw_requests("generate", 10, None, 1.0, seed=1, law=law(), cfg=False)
    for i, r in enumerate(reqs):
        r.arrival_s = 0.05 * i                                     # all due within 0.5 s
    res = _run_against_fake(start, lambda: OC.run_requests(url, reqs, deadline_s=0.3))
    st = [r["status"] for r in res["rows"]]
    assert len(st) == 10 and OC.STATUS_CANCELLED in st and None in st
    assert all(s in (200, OC.STATUS_CANCELLED, None) for s in st)
    assert all(r["error"] for r in res["rows"] if r["status"] != 200)


# ----------------------------------------------------------------------------- driver

def _bench(tmp_path, model, args, monkeypatch, **env):
    pytest.importorskip("aiohttp")
    pytest.importorskip("tokenizers")
    for k, v in {"FAKE_BASE_S": 0.01, "FAKE_PER_STEP_S": 0.0005, **env}.items():
        monkeypatch.setenv(k, str(v))
    out = tmp_path / "out"
    rc = OB.main(["--model", model, "--out", str(out), "--port", str(free_port()),
                  "--model-dir", str(tmp_path / "m"), "--vllm-cli", f"{sys.executable} {FAKE}",
                  "--health-timeout", "60", "--target-s", "3"] + args)
    return rc, out


def _read(p: Path) -> dict:
    return json.loads(gzip.decompress(p.read_bytes()))


def test_omni_bench_end_to_end_with_fake_server(tmp_path, monkeypatch):
    """The driver: model folder, plugin, server start/health, warmup + probe + open-loop runs,
    capacity from the probe, rates as fractions of it, stage-log batches matched by seed, the
    failed request kept, provenance with the scheduler defaults and their sources, server stopped;
    a run repeated without a new --tag is written beside the first, never over it."""
    rc, out = _bench(tmp_path, "flux1_dev", ["--runs", "warmup,probe,sat,bursty_k0.25,probe"], monkeypatch,
                     FAKE_OOM_SIDE=1200)
    assert rc == 0
    files = sorted(p.name for p in out.glob("flux1_dev__*.json.gz"))
    assert [f for f in files if "warmup" not in f and "probe__" not in f] == [
        "flux1_dev__bursty_k0.25.json.gz", "flux1_dev__probe.json.gz", "flux1_dev__sat.json.gz"]
    assert len([f for f in files if f.startswith("flux1_dev__probe__")]) == 1
    assert len([f for f in files if f.startswith("flux1_dev__warmup__")]) == 1
    warm = _read(next(out.glob("flux1_dev__warmup__*.json.gz")))
    assert warm["validation"] is False
    assert any(s == 500 for s in warm["requests"]["status"])    # 1328x1328 > FAKE_OOM_SIDE
    probe = _read(out / "flux1_dev__probe.json.gz")
    ok = [x for x, s in zip(probe["requests"]["latency_s"], probe["requests"]["status"]) if s == 200]
    cap = len(ok) / sum(ok)
    sat = _read(out / "flux1_dev__sat.json.gz")
    assert sat["provenance"]["calibrated_capacity_rps"] == pytest.approx(cap, rel=1e-4)
    assert sat["request_rate"] == pytest.approx(0.85 * cap, rel=1e-4)
    assert sat["num_prompts"] == len(sat["requests"]["status"]) == max(8, round(0.85 * cap * 3))
    assert probe["request_rate"] == "sequential" and probe["max_concurrency"] == 1
    seeds = set(sat["requests"]["seed"])
    logged = [s for b in sat["batches"] for s in b["seeds"]]
    assert logged and set(logged) <= seeds
    assert sat["completed"] + sat["failed"] + sat["not_sent"] == sat["num_prompts"]
    prov = sat["provenance"]
    assert prov["engine"] == "vllm-omni" and prov["pipeline"] == "FluxPipeline"
    assert prov["server_settings"]["max_num_seqs"]["value"] == 1
    assert "async_omni_engine.py" in prov["server_settings"]["max_num_seqs"]["source"]
    assert prov["server_log_facts"]["request_batch_init"].endswith("max_num_seqs=1 max_wait_ms=0.0")
    assert "--omni" in prov["server_command"] and "--enable-diffusion-pipeline-profiler" in prov["server_command"]
    assert prov["cfg"] is False and prov["steps_choices"] == [4, 6, 8, 12]
    summ = json.loads(next(out.glob("omni_bench_flux1_dev__*.json")).read_text())
    assert summ["capacity_rps"] == pytest.approx(cap, rel=1e-3) and not summ["skipped"]
    assert next(out.glob("server_flux1_dev__*.log.gz")).exists()
    # a trace the simulator replays as is: the same arrivals, sizes and steps come back as Requests
    import pandas as pd

    from sim.config import WorkloadConfig
    from sim.workloads import request_source
    p = tmp_path / "t.csv"
    req = sat["requests"]
    pd.DataFrame({k: req[k] for k in ("arrival_time", "task", "model", "prompt_tokens", "output_height",
                                     "output_width", "steps", "cfg")}).to_csv(p, index=False)
    back = list(request_source(WorkloadConfig(path=str(p)), seed=0))
    assert [r.steps for r in back] == req["steps"]
    assert [r.output_image for r in back] == list(zip(req["output_height"], req["output_width"]))
    assert [r.arrival for r in back] == pytest.approx([t - req["arrival_time"][0] for t in req["arrival_time"]]) \
        or [r.arrival for r in back] == pytest.approx(req["arrival_time"])


def test_runs_are_cut_or_skipped_to_fit():
    """shrink_to: a run that fits is kept; one that does not is cut to the most requests that
    fit (its estimate then fits), or skipped (None) below 4 requests."""
    c = 0.5
    rr = OB.size_run(OB.RUN_CATALOG["sat"], c, 90.0)
    assert OB.shrink_to(rr, c, 1e6) is rr
    cut = OB.shrink_to(rr, c, 40.0)
    assert cut is not None and 4 <= cut.n < rr.n
    assert OB.est_seconds(cut, c) <= 40.0 < OB.est_seconds(replace(cut, n=cut.n + 1), c)
    assert OB.shrink_to(rr, c, 10.0) is None
    probe = OB.size_run(OB.RUN_CATALOG["probe"], c, 90.0)
    assert probe.n == 16 and OB.est_seconds(probe, c) == pytest.approx(16 / c + 5.0)


def test_omni_bench_dry_run_prints_the_plan(capsys):
    assert OB.main(["--model", "qwen_image_edit", "--out", "/tmp/none", "--dry-run",
                    "--runs", "probe,sat", "--max-num-seqs", "4", "--step-execution"]) == 0
    txt = capsys.readouterr().out
    assert "serve /tmp/omni_bench/qwen_image_edit --omni" in txt
    assert "--max-num-seqs 4" in txt and "--step-execution" in txt
    assert "run probe: 16 edit requests, one at a time" in txt and "input=" in txt


def test_omni_bench_rejects_unknown_run():
    with pytest.raises(SystemExit):
        OB.main(["--model", "qwen_image", "--out", "/tmp/none", "--runs", "probe,nope", "--dry-run"])


def test_stagelog_reader_and_log_facts(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"t_end": 10.0, "seeds": [1]}) + "\n" + json.dumps({"t_end": 20.0}) +
                 "\n" + '{"t_end": 15.0, "seeds": [')              # a line cut by a killed server
    assert [r["t_end"] for r in OB.read_stagelog(p, 5.0, 12.0)] == [10.0]
    assert OB.read_stagelog(tmp_path / "none.jsonl", 0, 1) == []
    facts = OS.log_facts("x Registered diffusion model FluxPipeline -> profiler.omni_pipelines.RandomFluxPipeline\n"
                         "y [RequestBatch] engine init max_num_seqs=1 max_wait_ms=0.0\n"
                         "z Model loading took 55.2 GiB and 12.5 seconds\n")
    assert facts["request_batch_init"].endswith("max_wait_ms=0.0")
    assert facts["registered"] == ["Registered diffusion model FluxPipeline -> profiler.omni_pipelines.RandomFluxPipeline"]
    assert "55.2 GiB" in facts["model_loading"]


def test_run_sizing_fits_a_call():
    """With the default runs and an assumed capacity, a call's runs fit its budget or are cut."""
    for model, plan in OB.MODELS.items():
        c = 1.0 / plan.assumed_service_s
        rr = OB.size_run(OB.RUN_CATALOG["over"], c, 90.0)
        assert rr.rate == pytest.approx(1.3 * c) and rr.n == round(1.3 * c * 90)
        cut = OB.shrink_to(rr, c, 60.0)
        assert cut is None or (cut.n < rr.n and OB.est_seconds(cut, c) <= 60.0 + 1e-6)


# ----------------------------------------------------------------------------- bundle

def test_bundle_pins_and_scripts():
    txt = (ROOT / "profiler" / "gpu" / "requirements-omni.txt").read_text()
    pins = dict(line.split("#")[0].strip().split("==") for line in txt.splitlines()
                if line.split("#")[0].strip())
    assert pins["vllm-omni"] == "0.26.0" and pins["diffusers"] == "0.38.0" and pins["cache-dit"] == "1.3.0"
    assert not {"av", "gguf", "torchsde", "x-transformers", "openai-whisper", "accelerate"} & set(pins)
    for sh in ("make_omni_bundle.sh", "install_omni.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "profiler" / "gpu" / sh)], check=True)


# ----------------------------------------------------------------------------- profiler backend

def test_plan_vllm_omni_shapes():
    """Points name the request shape that measures them; edits use vLLM-Omni's ~1 MP condition
    (pipeline_qwen_image_edit.py:101) for the VAE encode, the VL encoder and the DiT sequence."""
    from profiler.grid import plan_vllm_omni, qwen_edit_condition
    from profiler.models import load_model
    grid = {"omni_resolutions": [[512, 512], [1328, 1328]], "omni_batch": [1, 4], "dit_max_tokens": 16384,
            "omni_text_words": [8], "omni_text_batch": [1], "omni_edit_resolutions": [[512, 768]]}
    spec = load_model("qwen_image")
    pts = plan_vllm_omni(spec, grid)
    dit = [p for p in pts if p["stage"] == "dit_step" and p["served"] == "qwen_image"]
    assert {(p["batch_size"], p["height"]) for p in dit} == {(1, 512), (4, 512), (1, 1328)}  # 4 x 6889 > cap
    assert all(p["num_tokens"] == 64 and p["words"] == 59 for p in dit)
    assert qwen_edit_condition(512, 768) == (832, 1248)           # 1 MP at 3:2, multiples of 32
    e = {p["stage"]: p for p in pts if p["served"] == "qwen_image_edit"}
    assert e["dit_step"]["seq_len"] == 32 * 48 + 52 * 78
    n_img = (840 // 14) * (1260 // 14) // 4                        # smart_resize(832, 1248) = 840 x 1260
    assert e["text_encode"]["num_tokens"] == 71 + n_img + 59 and e["text_encode"]["component"] == "text_encoder_vl"
    assert e["dit_step"]["num_tokens"] == 71 + n_img + 59 - 64
    assert (e["vae_encode"]["height"], e["vae_encode"]["width"]) == (832, 1248)
    t = [p for p in pts if p["stage"] == "text_encode" and p["served"] == "qwen_image"]
    assert [p["num_tokens"] for p in t] == [39 + 8]
    f = plan_vllm_omni(load_model("flux1_dev"), grid)
    assert {p["component"] for p in f if p["stage"] == "text_encode"} == {"clip_l", "t5_xxl"}
    with pytest.raises(ValueError, match="vllm_omni"):
        plan_vllm_omni(load_model("sd3_5_medium"), grid)


def test_vllm_omni_backend_against_fake_server(tmp_path, monkeypatch):
    """The backend end to end against the fake server, whose stage durations are exact functions
    of the batch (0.8 s of `diffuse`, 0.1 s of text encode and VAE decode, 0.05 s of VAE encode per
    second of service; service = (base + per_step * steps * pixels/512^2) * (1 + 0.5 (B - 1))):
    dit_step is the per-step slope, B requests sent together form a batch of B, edits go to the
    second server, rows carry engine vllm-omni into <gpu>-vllm-omni/, and a rerun resumes."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from profiler.__main__ import compose
    from profiler.schema import read_table, validate_rows
    from profiler.sweep import run_sweep
    base, per_step = 0.01, 0.05
    monkeypatch.setenv("FAKE_BASE_S", str(base))
    monkeypatch.setenv("FAKE_PER_STEP_S", str(per_step))
    cfg = compose(["model=qwen_image", "backend=vllm_omni", "grid=tiny", f"out_dir={tmp_path}",
                   "device=cpu", f"vllm_omni.vllm_cli={sys.executable} {FAKE}",
                   f"vllm_omni.port={free_port()}", "vllm_omni.health_timeout=60",
                   f"vllm_omni.log_dir={tmp_path / 'logs'}", "vllm_omni.max_wait_ms=300", "progress=false"])
    summ = run_sweep(cfg, log=lambda m: None)
    path = tmp_path / "h100-vllm-omni" / "qwen_image.parquet"
    assert summ["qwen_image"]["path"] == str(path)
    df = read_table(path)
    assert validate_rows(df) == [] and set(df["engine"]) == {"vllm-omni"}
    assert set(df["status"]) == {"ok"}, df[["stage", "batch_size", "error"]].to_string()

    def svc(h, w, steps, b):
        return (base + per_step * steps * h * w / 512 ** 2) * (1 + 0.5 * (b - 1))
    for _, r in df.iterrows():
        b = int(r["batch_size"])
        ex = json.loads(r["extra"])
        rh, rw = ex["req_height"], ex["req_width"]
        if r["stage"] == "dit_step":
            want = 0.8 * (svc(rh, rw, 2, b) - svc(rh, rw, 1, b)) * 1e3
        elif r["stage"] in ("text_encode", "vae_decode"):
            want = 0.1 * np.mean([svc(rh, rw, n, b) for n in (1, 1, 2, 2)]) * 1e3
        else:                                                      # vae_encode of the edit
            want = 0.05 * np.mean([svc(rh, rw, n, b) for n in (1, 1, 2, 2)]) * 1e3
        assert r["latency_ms_median"] == pytest.approx(want, rel=1e-6), (r["stage"], rh, rw, b)
    assert set(df[df["stage"] == "dit_step"]["batch_size"]) == {1, 2}
    assert "vae_encode" in set(df["stage"])                        # from the edit server
    assert len(list((tmp_path / "logs").glob("server_qwen_image_edit__*.log.gz"))) == 1
    again = run_sweep(cfg, log=lambda m: None)
    assert again["qwen_image"]["already"] == len(df) and again["qwen_image"]["measured"] == 0
