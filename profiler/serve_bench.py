"""Ground truth for the replay validation: real `vllm serve` + `vllm bench serve --save-detailed`.

Runs ON THE GPU HOST (vLLM importable, e.g. PYTHONPATH=/tmp/site:$PWD), one engine start per model:

    python -m profiler.serve_bench --model qwen2_5_7b --out $OUT/h100 [--max-minutes 9] [--dry-run]

1. Writes a model directory from conf/model/<model>.yaml (transformers config.json, bf16; weights
   are dummy, `--load-format dummy`) plus a WordLevel tokenizer whose vocabulary is exactly the
   model's vocab_size (`t0 ..`, with [UNK] <s> </s> as the last three ids), a whitespace
   pre-tokenizer and no post-processor, so decode(encode(x)) round-trips and vLLM's random dataset
   produces the requested prompt lengths (no special tokens are added).
2. Starts `vllm serve` in the background (prefix caching OFF, chunked prefill with the H100
   defaults made explicit), waits for /health, reads the KV-cache capacity from the server log
   and from /metrics (cache_config_info).
3. Runs `vllm bench serve` for a list of runs. The first is `--request-rate inf`; its measured
   request throughput C calibrates the other rates (near-saturation 0.9 C, bursty 0.6 C with
   burstiness 0.5 and 0.25, low Poisson 0.35 C, ShareGPT at C), each sized to about --target-s
   seconds of arrivals. Preemptions / prefix-cache hits per run come from /metrics deltas.
4. After each run: drops `generated_texts`, adds a `provenance` block, writes <out>/<model>__<run>.json
   atomically. A run that does not fit in --max-minutes is shrunk or skipped, a run in flight past
   the deadline is killed, and the server is always stopped; finished runs are already on disk.

Image + text (`--model qwen2_5_vl_7b`): the model dir is a Qwen2.5-VL one (profiler/vlm_model.py:
Qwen2_5_VLConfig, image processor config, Qwen's special tokens at their ids, Qwen2-VL chat
template), checked before the start with transformers (images expand to smart_resize tokens) and
with vLLM's own chat/image path (profiler/mm_preproc.py check); the server gets
`--limit-mm-per-prompt {"image": 3, "video": 0}`; the runs (VLM_RUN_CATALOG) go through
profiler/chat_bench.py, our streaming OpenAI-chat client, which records every request's images;
after the server stops, profiler/mm_preproc.py measures vLLM's API-side image preprocessing by
image size on this host's CPU if the budget leaves time.

Several servers and a proxy on one host (`--layout 1e1pd|1e1p1d|1p1d|replicas --gpus 0,1`):
profiler/disagg_bench.py (encoder / prefill / decode instances pinned to GPUs, vLLM's connectors,
profiler.disagg_proxy in front), the same image + text runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
CONF_MODEL = ROOT / "conf" / "model"
SHAREGPT_GZ = ROOT / "traces" / "validation" / "sharegpt_subset.json.gz"
SPECIAL_TOKENS = ("[UNK]", "<s>", "</s>")   # the last three ids of the vocabulary

# Per-model bench settings. assumed_capacity (req/s at the random I/O below) is only used by
# --dry-run and when the inf run fails; the real run calibrates from the inf run.
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "qwen2_5_7b": dict(input_len=1024, output_len=256, max_model_len=None, n_inf=400,
                       assumed_capacity=14.0),
    # MHA: ~0.5 MiB of KV per token -> ~100k tokens on an 80 GB H100, i.e. ~80 sequences of
    # 1024+384; the inf and near-saturation runs overrun the KV cache and preempt.
    "llama2_7b": dict(input_len=1024, output_len=384, max_model_len=4096, n_inf=240,
                      assumed_capacity=7.0),
    # Image + text chat requests (profiler.chat_bench / chat_requests: the simulator's laws), at
    # most max_images images per request (the server's --limit-mm-per-prompt, videos off).
    "qwen2_5_vl_7b": dict(kind="vlm", input_len=None, output_len=None, max_model_len=None,
                          n_inf=300, assumed_capacity=12.0, max_images=3),
}
# In priority order: when time runs short the last ones are shrunk, then skipped.
DEFAULT_RUNS = ("inf", "sat", "bursty_k0.5", "bursty_k0.25", "poisson_low", "sharegpt")
VLM_DEFAULT_RUNS = ("inf", "sat", "bursty_k0.5", "poisson_low", "mixed_sizes", "probe_img")
CLIENT_OVERHEAD_S = 18.0   # `vllm bench serve` start (import vllm, tokenizer, sampling) + save
CHAT_CLIENT_OVERHEAD_S = 8.0   # profiler.chat_bench: start, images (process pool), save


@dataclass
class RunSpec:
    name: str
    dataset: str = "random"            # random | sharegpt
    rate_frac: Optional[float] = None  # fraction of the calibrated capacity; None = inf
    burstiness: float = 1.0
    seed: int = 0
    num_warmups: int = 0               # vllm bench's own warm-up requests (not recorded)
    num_prompts: int = 0               # filled in by size_run
    request_rate: Optional[float] = None  # filled in by size_run; None = inf
    # isolated-request probes (frontend + engine latency at zero load): fixed lengths, one at a time
    input_len: Optional[int] = None    # None = the model's random input length
    output_len: Optional[int] = None
    range_ratio: float = 0.5
    max_concurrency: Optional[int] = None
    fixed_prompts: Optional[int] = None  # prompt count independent of the rate
    # image + text runs (client "chat" = profiler.chat_bench; "vllm" = vllm bench serve)
    client: str = "vllm"
    text_frac: float = 0.25            # share of text-only requests
    image_law: str = "workload"        # workload | mixed | probe (profiler.chat_requests)


RUN_CATALOG: dict[str, RunSpec] = {
    # first run after the engine start: warm up (first-use kernel paths) before measuring
    "inf": RunSpec("inf", rate_frac=None, seed=11, num_warmups=32),
    "sat": RunSpec("sat", rate_frac=0.9, seed=12),
    "poisson_low": RunSpec("poisson_low", rate_frac=0.35, seed=13),
    "bursty_k0.5": RunSpec("bursty_k0.5", rate_frac=0.6, burstiness=0.5, seed=14),
    "bursty_k0.25": RunSpec("bursty_k0.25", rate_frac=0.6, burstiness=0.25, seed=15),
    # ShareGPT requests are shorter on average than 1024/256; at C it stays below saturation.
    "sharegpt": RunSpec("sharegpt", dataset="sharegpt", rate_frac=1.0, seed=16),
    # Where capacity is decided: offered load above the calibrated capacity C, Poisson and bursty.
    # The queue grows for the whole arrival span, so the KV cache fills and (llama2_7b, MHA)
    # preempts; with --steplog the per-step KV usage and preemptions are on record.
    "over": RunSpec("over", rate_frac=1.3, seed=17),
    "over_bursty_k0.25": RunSpec("over_bursty_k0.25", rate_frac=1.2, burstiness=0.25, seed=18),
    "over_bursty_k0.5": RunSpec("over_bursty_k0.5", rate_frac=1.2, burstiness=0.5, seed=19),
    # A second saturation run with other prompts (seed), same size as `inf`
    "inf_b": RunSpec("inf_b", rate_frac=None, seed=21, num_warmups=32),
}
# Zero-load probes: one request at a time (`--max-concurrency 1`), fixed prompt length, 16 output
# tokens. Client TTFT minus the engine's own prefill time is the API-server (frontend) latency
# that an engine-level profile cannot see; the server's /metrics histograms split it further.
for _n in (32, 512, 2048):
    RUN_CATALOG[f"probe_in{_n}"] = RunSpec(f"probe_in{_n}", rate_frac=None, seed=20, input_len=_n,
                                           output_len=16, range_ratio=0.0, max_concurrency=1,
                                           fixed_prompts=24, num_warmups=4)
# Concurrency ladder: N clients at once (`--max-concurrency N`), fixed 512 / 128 tokens, so waves
# of N prompts prefill together and then decode at batch ~N. Calibration data for the serving
# front end (API-server and client CPU seconds per request and per streamed token, sampled from
# /proc during the run) and for the engine step at batch N under `vllm serve` (step log); kept
# apart from the validation runs (`--out .../ladder`), which stay held out.
for _c in (8, 32, 64, 128):
    RUN_CATALOG[f"conc{_c}"] = RunSpec(f"conc{_c}", rate_frac=None, seed=30, input_len=512,
                                       output_len=128, range_ratio=0.0, max_concurrency=_c,
                                       fixed_prompts=max(24, 3 * _c), num_warmups=8)
# The same at a long context (1536 / 128 tokens): the served decode step's context term.
for _c in (8, 16, 32, 64, 128):
    RUN_CATALOG[f"lconc{_c}"] = RunSpec(f"lconc{_c}", rate_frac=None, seed=31, input_len=1536,
                                        output_len=128, range_ratio=0.0, max_concurrency=_c,
                                        fixed_prompts=max(24, 3 * _c), num_warmups=8)
# A run named twice in --runs is repeated on the same server start (same seed, same requests),
# its files named <run>__s2, ... (e.g. `inf,over,over_bursty_k0.25,inf`: an inf replicate on a
# warm server); qwen2_5_7b's KV cache is large enough never to preempt at these lengths, and
# --num-gpu-blocks-override gives its server a smaller one.

# Qwen2.5-VL (image + text) runs, through profiler.chat_bench: the simulator's understanding
# requests (Pareto image sizes, several aspect ratios, 1-3 images) with text-only ones mixed in.
# C is the request throughput of this catalog's `inf` run (the same request law).
VLM_RUN_CATALOG: dict[str, RunSpec] = {
    "inf": RunSpec("inf", rate_frac=None, seed=41, num_warmups=16, client="chat"),
    "sat": RunSpec("sat", rate_frac=0.9, seed=42, client="chat"),
    "poisson_low": RunSpec("poisson_low", rate_frac=0.35, seed=43, client="chat"),
    "bursty_k0.5": RunSpec("bursty_k0.5", rate_frac=0.6, burstiness=0.5, seed=44, client="chat"),
    "bursty_k0.25": RunSpec("bursty_k0.25", rate_frac=0.6, burstiness=0.25, seed=45, client="chat"),
    # 3/4 of the images 448^2 / 896^2 / 1344^2 (256 / 1024 / 2304 tokens), 1/4 the Pareto law;
    # heavier than the inf run's law, so at 0.5 C it is loaded well above a 0.5 C run of that law
    "mixed_sizes": RunSpec("mixed_sizes", rate_frac=0.5, seed=46, client="chat", image_law="mixed"),
    "over": RunSpec("over", rate_frac=1.3, seed=47, client="chat"),
    # zero load, one image per request cycling 448^2 .. 1792^2, 32 text / 16 output tokens: the
    # API server's image path + encoder + prefill by image size (client TTFT vs the step log's)
    "probe_img": RunSpec("probe_img", rate_frac=None, seed=48, client="chat", image_law="probe",
                         input_len=32, output_len=16, max_concurrency=1, fixed_prompts=24,
                         num_warmups=4),
    "probe_text": RunSpec("probe_text", rate_frac=None, seed=49, client="chat", text_frac=1.0,
                          input_len=32, output_len=16, max_concurrency=1, fixed_prompts=16,
                          num_warmups=4),
}


def catalog(model: str) -> dict[str, RunSpec]:
    return VLM_RUN_CATALOG if MODEL_SETTINGS[model].get("kind") == "vlm" else RUN_CATALOG


def default_runs(model: str) -> tuple[str, ...]:
    return VLM_DEFAULT_RUNS if MODEL_SETTINGS[model].get("kind") == "vlm" else DEFAULT_RUNS


def run_stems(names: list[str]) -> list[str]:
    """File-name run parts: the k-th repeat (k >= 2) of a name in one call is `<name>__s<k>`
    (same server start, same seed; sim.tools.validate groups it with the first as a replicate)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}__s{seen[n]}")
    return out


# Server-side latency histograms diffed per run (sum, count, cumulative buckets): the engine
# core's queue / prefill / decode times next to the API server's TTFT and E2E latency.
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
              "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
              "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds",
              "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
              "vllm:request_time_per_output_token_seconds",
              # KV hand-offs of a NixlConnector (disaggregated prefill/decode; absent otherwise)
              "vllm:nixl_xfer_time_seconds", "vllm:nixl_post_time_seconds",
              "vllm:nixl_bytes_transferred", "vllm:nixl_num_descriptors")


# ----------------------------------------------------------------------------- model dir

def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
        return yaml.safe_load(path.read_text())
    except ImportError:  # minimal fallback: the llm keys we need are unique "key: value" lines
        out: dict[str, Any] = {}
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*([A-Za-z_0-9]+):\s*([^#\[{]+?)\s*(#.*)?$", line)
            if m:
                v = m.group(2)
                try:
                    v = json.loads(v.lower() if v.lower() in ("true", "false") else v)
                except ValueError:
                    pass
                out[m.group(1)] = v
        return {"name": out.get("name"), "dtype": out.get("dtype"), "components": {"llm": out}}


def llm_shape(model: str) -> dict[str, Any]:
    raw = _read_yaml(CONF_MODEL / f"{model}.yaml")
    llm = dict(raw["components"]["llm"])
    llm["dtype"] = raw.get("dtype", "bfloat16")
    return llm


def make_tokenizer(vocab_size: int):
    """WordLevel tokenizer t0..t{V-4} + [UNK] <s> </s> at ids V-3..V-1, whitespace pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    n = vocab_size - len(SPECIAL_TOKENS)
    vocab = {f"t{i}": i for i in range(n)}
    for j, s in enumerate(SPECIAL_TOKENS):
        vocab[s] = n + j
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(list(SPECIAL_TOKENS))   # already in the vocab: ids are reused
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>",
                                   clean_up_tokenization_spaces=False,
                                   model_max_length=1 << 20)


def write_model_dir(model: str, path: Path) -> dict[str, Any]:
    """config.json (+ tokenizer) for `vllm serve --load-format dummy`. Returns the config dict."""
    s = llm_shape(model)
    V = int(s["vocab_size"])
    common = dict(vocab_size=V, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                  num_hidden_layers=s["num_hidden_layers"],
                  num_attention_heads=s["num_attention_heads"],
                  num_key_value_heads=s["num_key_value_heads"],
                  max_position_embeddings=int(s["max_position_embeddings"]),
                  rope_theta=float(s.get("rope_theta", 10000.0)),
                  rms_norm_eps=float(s.get("rms_norm_eps", 1e-6)),
                  tie_word_embeddings=bool(s.get("tie_word_embeddings", False)),
                  bos_token_id=V - 2, eos_token_id=V - 1, pad_token_id=V - 1)
    kind = s.get("kind", "llama")
    if kind == "qwen2":
        from transformers import Qwen2Config as C
        arch = "Qwen2ForCausalLM"
    elif kind == "llama":
        from transformers import LlamaConfig as C
        arch = "LlamaForCausalLM"
    else:
        raise ValueError(f"model={model!r}: llm kind {kind!r} not supported by serve_bench")
    cfg = C(**common, architectures=[arch])
    cfg.dtype = s["dtype"]            # transformers 5 name
    cfg.torch_dtype = s["dtype"]      # older readers
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(path))
    # belt and braces: both dtype spellings in the file, whatever this transformers writes
    cj = json.loads((path / "config.json").read_text())
    cj["torch_dtype"] = cj["dtype"] = s["dtype"]
    cj.setdefault("rope_theta", common["rope_theta"])
    (path / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True))
    make_tokenizer(V).save_pretrained(str(tokenizer_dir(path)))
    return cj


def tokenizer_dir(model_dir: Path) -> Path:
    """The tokenizer lives in its own folder, passed as --tokenizer: with config.json beside it,
    transformers 5's AutoTokenizer would pick the model type's class (Qwen2Tokenizer,
    LlamaTokenizer), which rebuilds its own pre-tokenizer and breaks the WordLevel round trip."""
    return Path(model_dir) / "tokenizer"


def check_tokenizer(tok_dir: Path, vocab_size: int, lengths=(1, 7, 512, 1536), seed: int = 0) -> None:
    """What vLLM's RandomDataset does: consecutive allowed ids -> decode -> encode == same ids."""
    import numpy as np
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.vocab_size == vocab_size, (tok.vocab_size, vocab_size)
    assert tok.num_special_tokens_to_add() == 0
    allowed = np.array(sorted(set(range(vocab_size)) - set(tok.all_special_ids)))
    rng = np.random.default_rng(seed)
    for n in lengths:
        ids = allowed[(int(rng.integers(0, vocab_size)) + np.arange(n)) % len(allowed)].tolist()
        text = tok.decode(ids)
        back = tok.encode(text, add_special_tokens=False)
        assert back == ids and tok(text).input_ids == ids, f"round trip failed at length {n}"


# ----------------------------------------------------------------------------- commands

def vllm_cli(choice: str = "auto") -> list[str]:
    """The `vllm` CLI: the console script if asked for / only option, else `python -m`."""
    if choice == "module":
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    if choice not in ("auto", ""):
        return shlex.split(choice)
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    for p in (shutil.which("vllm"), "/tmp/site/bin/vllm"):
        if p and Path(p).exists():
            return [p]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def serve_command(cli: list[str], model_dir: Path, port: int, max_model_len: Optional[int],
                  max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                  gpu_mem: float = 0.9, max_images: Optional[int] = None,
                  num_gpu_blocks_override: Optional[int] = None) -> list[str]:
    cmd = cli + ["serve", str(model_dir), "--tokenizer", str(tokenizer_dir(model_dir)),
                 "--load-format", "dummy", "--dtype", "bfloat16",
                 "--no-enable-prefix-caching", "--enable-chunked-prefill",
                 "--max-num-batched-tokens", str(max_num_batched_tokens),
                 "--max-num-seqs", str(max_num_seqs), "--gpu-memory-utilization", str(gpu_mem),
                 "--host", "127.0.0.1", "--port", str(port), "--seed", "0"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if max_images:        # a VLM: images per prompt (memory profiling sizes the encoder for it)
        cmd += ["--limit-mm-per-prompt", json.dumps({"image": int(max_images), "video": 0})]
    if num_gpu_blocks_override:
        cmd += ["--num-gpu-blocks-override", str(int(num_gpu_blocks_override))]
    return cmd


def preproc_command(what: str, model_dir: Path, model: str, out: Optional[Path] = None,
                    budget_s: float = 45.0) -> list[str]:
    """profiler.mm_preproc: vLLM's API-side image path on the CPU (check / measure)."""
    cmd = [sys.executable, "-m", "profiler.mm_preproc", what, "--model", model, "--model-dir", str(model_dir)]
    if what == "measure":
        cmd += ["--out", str(out), "--budget-s", f"{budget_s:.0f}"]
    return cmd


def chat_bench_command(model_dir: Path, port: int, run: RunSpec, result_dir: Path,
                       result_filename: str, model: str) -> list[str]:
    """profiler.chat_bench for an image + text run (same python as this driver)."""
    rate = "inf" if run.request_rate is None else f"{run.request_rate:.3f}"
    cmd = [sys.executable, "-m", "profiler.chat_bench", "--base-url", f"http://127.0.0.1:{port}",
           "--model", str(model_dir), "--tokenizer", str(tokenizer_dir(model_dir)),
           "--model-conf", model, "--num-prompts", str(run.num_prompts), "--request-rate", rate,
           "--seed", str(run.seed), "--text-frac", str(run.text_frac), "--image-law", run.image_law]
    if run.request_rate is not None and run.burstiness != 1.0:
        cmd += ["--burstiness", str(run.burstiness)]
    if run.input_len is not None:
        cmd += ["--fixed-text", str(run.input_len)]
    if run.output_len is not None:
        cmd += ["--fixed-output", str(run.output_len)]
    if run.max_concurrency:
        cmd += ["--max-concurrency", str(run.max_concurrency)]
    if run.num_warmups:
        cmd += ["--num-warmups", str(run.num_warmups)]
    cmd += ["--result-dir", str(result_dir), "--result-filename", result_filename]
    return cmd


def bench_command(cli: list[str], model_dir: Path, port: int, run: RunSpec, input_len: int,
                  output_len: int, result_dir: Path, result_filename: str,
                  sharegpt_path: Path) -> list[str]:
    cmd = cli + ["bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
                 "--model", str(model_dir), "--tokenizer", str(tokenizer_dir(model_dir))]
    if run.dataset == "sharegpt":
        cmd += ["--dataset-name", "sharegpt", "--dataset-path", str(sharegpt_path)]
    else:
        cmd += ["--dataset-name", "random", "--random-input-len", str(run.input_len or input_len),
                "--random-output-len", str(run.output_len or output_len),
                "--random-range-ratio", str(run.range_ratio)]
    rate = "inf" if run.request_rate is None else f"{run.request_rate:.3f}"
    cmd += ["--ignore-eos", "--num-prompts", str(run.num_prompts), "--request-rate", rate]
    if run.request_rate is not None and run.burstiness != 1.0:
        cmd += ["--burstiness", str(run.burstiness)]
    if run.max_concurrency:
        cmd += ["--max-concurrency", str(run.max_concurrency)]
    if run.num_warmups:
        cmd += ["--num-warmups", str(run.num_warmups)]
    cmd += ["--seed", str(run.seed), "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--save-result", "--save-detailed",
            "--result-dir", str(result_dir), "--result-filename", result_filename]
    return cmd


def size_run(run: RunSpec, capacity: float, n_inf: int, target_s: float,
             sharegpt_speedup: float = 1.0) -> RunSpec:
    """Rate and prompt count of a run for a calibrated capacity C (req/s at the random I/O)."""
    r = RunSpec(**{k: getattr(run, k) for k in run.__dataclass_fields__})
    if run.fixed_prompts:
        r.request_rate, r.num_prompts = None, run.fixed_prompts
    elif run.rate_frac is None:
        r.request_rate, r.num_prompts = None, n_inf
    else:
        r.request_rate = max(0.2, run.rate_frac * capacity * (sharegpt_speedup if run.dataset == "sharegpt" else 1.0))
        r.num_prompts = max(30, int(round(r.request_rate * target_s)))
    return r


def est_seconds(run: RunSpec, capacity: float) -> float:
    """Rough wall time of a run: arrivals span N/R, drained at <= capacity, + client start."""
    chat = run.client == "chat"
    over = CHAT_CLIENT_OVERHEAD_S if chat else CLIENT_OVERHEAD_S
    warm = run.num_warmups if chat else 0     # (the text runs' sizing predates warm-up counting)
    if run.max_concurrency == 1:      # an image request: API preprocessing + encoder + prefill too
        return (run.num_prompts + warm) * (0.6 if run.image_law == "probe" else 0.25) + over
    if run.max_concurrency and run.fixed_prompts:     # waves of N: prefill + output steps of ~15 ms
        waves = -(-(run.num_prompts + run.num_warmups) // run.max_concurrency)
        return waves * (0.5 + 0.015 * (run.output_len or 256)) + over
    if run.request_rate is None:
        return (run.num_prompts + warm) / max(capacity, 0.1) + over
    span = run.num_prompts / min(run.request_rate, max(capacity, 0.1))
    return span * 1.1 + over


def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of a process (all its threads) from /proc, or None once it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuSampler(threading.Thread):
    """Samples the CPU seconds of named processes every `period` s while a run goes on: the API
    server (`vllm serve`'s own process; the engine core is a child) and the benchmark client are
    single-threaded asyncio loops whose per-token work delays first tokens under load. The series
    (not just totals) lets an analysis cut out the client's start-up and result saving."""

    def __init__(self, pids: dict[str, int], period: float = 0.25):
        super().__init__(daemon=True)
        self.pids, self.period = pids, period
        self.t0 = time.time()
        self.rows: list[list[float]] = []
        self._stop_ev = threading.Event()

    def sample(self) -> None:
        row = [round(time.time() - self.t0, 3)]
        for pid in self.pids.values():
            c = cpu_seconds(pid)
            row.append(round(c, 3) if c is not None else float("nan"))
        self.rows.append(row)

    def run(self) -> None:
        while not self._stop_ev.is_set():
            self.sample()
            self._stop_ev.wait(self.period)

    def stop(self) -> dict[str, Any]:
        self._stop_ev.set()
        self.join(timeout=2.0)
        # NaN (a process already gone) is not JSON: keep the last good value's column as null
        rows = [[None if isinstance(x, float) and math.isnan(x) else x for x in r] for r in self.rows]
        return {"t0_wall": round(self.t0, 3), "period_s": self.period,
                "columns": ["t_s"] + [f"{k}_cpu_s" for k in self.pids], "rows": rows}


def parent_age_s() -> Optional[float]:
    """Seconds since the parent process (the shell running this command line) started."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stat = Path(f"/proc/{os.getppid()}/stat").read_text()
        start = int(stat.rsplit(")", 1)[1].split()[19]) / tick
        up = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, up - start)
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------- server side

BENCH_MODULES = ("vllm", "aiohttp", "tqdm", "PIL", "pybase64", "numpy", "transformers", "tokenizers")
VLM_MODULES = ("torchvision", "yaml")    # the HF image/video processors; the workload laws


def preflight(cli: list[str], vlm: bool = False) -> list[str]:
    """Modules `vllm serve` / `vllm bench serve` (and, for a VLM, the image processor and our
    client) import; a missing one fails fast, before the GPU time of an engine start is spent."""
    if cli[-1] != "vllm.entrypoints.cli.main":
        return []                       # a console script or fake CLI: its own environment
    mods = BENCH_MODULES + (VLM_MODULES if vlm else ())
    return [m for m in mods if importlib.util.find_spec(m) is None]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001 - any failure means "not ready"
        return -1, str(e)


def parse_kv_log(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"GPU KV cache size: ([\d,]+) tokens", text)
    if m:
        out["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    m = re.search(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text)
    if m:
        out["max_concurrency_at_max_model_len"] = float(m.group(2))
        out["max_model_len"] = int(m.group(1).replace(",", ""))
    m = re.search(r"num_gpu_blocks(?:=|: |\s+is\s+)(\d+)", text)
    if m:
        out["num_gpu_blocks"] = int(m.group(1))
    return out


def parse_metrics(text: str) -> dict[str, Any]:
    """Counters we diff per run, and cache_config_info labels."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(vllm:[A-Za-z_:0-9]+?)(?:_total)?(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$", line)
        if not m:
            continue
        name, labels, val = m.group(1), m.group(2) or "", m.group(3)
        hist = next((h for h in HISTOGRAMS if name in (h + "_sum", h + "_count", h + "_bucket")), None)
        if hist is not None:
            le = re.search(r'le="([^"]+)"', labels)
            key = name if le is None else f"{name}|{le.group(1)}"
            try:
                out[key] = out.get(key, 0.0) + float(val)
            except ValueError:
                pass
            continue
        if name == "vllm:cache_config_info":
            for k, v in re.findall(r'(\w+)="([^"]*)"', labels):
                out[f"cache_config.{k}"] = v
            continue
        if name in ("vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:prefix_cache_queries",
                    "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success"):
            try:
                out[name] = out.get(name, 0.0) + float(val)
            except ValueError:
                pass
    return out


def histogram_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per-run server histograms: count, sum, mean and cumulative bucket counts (le -> n)."""
    out: dict[str, Any] = {}
    for h in HISTOGRAMS:
        n = after.get(h + "_count", 0.0) - before.get(h + "_count", 0.0)
        if n <= 0:
            continue
        tot = after.get(h + "_sum", 0.0) - before.get(h + "_sum", 0.0)
        buckets = {k.split("|", 1)[1]: after[k] - before.get(k, 0.0)
                   for k in after if k.startswith(h + "_bucket|")}
        out[h.split(":", 1)[1]] = dict(count=n, sum=tot, mean=tot / n, buckets=buckets)
    return out


def gpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and q.stdout.strip():
            name, mem, drv = [x.strip() for x in q.stdout.strip().splitlines()[0].split(",")]
            info.update(nvidia_smi_name=name, gpu_memory_total=mem, driver_version=drv)
    except Exception:  # noqa: BLE001
        pass
    return info


def torch_gpu_name_proc() -> Optional[subprocess.Popen]:
    """torch.cuda.get_device_name in a child that exits (no CUDA context kept in this process)."""
    try:
        return subprocess.Popen([sys.executable, "-c",
                                 "import torch,json;print(json.dumps({'gpu': torch.cuda.get_device_name(0),"
                                 "'torch_version': torch.__version__, 'cuda': torch.version.cuda}))"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except Exception:  # noqa: BLE001
        return None


def pkg_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_sha() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def stop_group(p: subprocess.Popen, grace: float = 20.0) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=10)


def finalize_result(src: Path, dst: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(src.read_text())
    obj.pop("generated_texts", None)
    # ~2.5x smaller files: per-token gaps and TTFTs to 0.1 us (they are perf_counter differences)
    if isinstance(obj.get("itls"), list):
        obj["itls"] = [[round(x, 7) for x in row] if isinstance(row, list) else row for row in obj["itls"]]
    if isinstance(obj.get("ttfts"), list):
        obj["ttfts"] = [round(x, 7) if isinstance(x, float) else x for x in obj["ttfts"]]
    obj["provenance"] = provenance
    tmp = dst.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, dst)
    src.unlink(missing_ok=True)
    return obj


def prepare_sharegpt(dst_dir: Path) -> Path:
    """vLLM 0.26.0's ShareGPTDataset uses plain open(): hand it the decompressed JSON."""
    import gzip
    out = dst_dir / "sharegpt_subset.json"
    if not out.exists():
        with gzip.open(SHAREGPT_GZ, "rb") as f:
            out.write_bytes(f.read())
    return out


# ----------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(x == "--layout" or x.startswith("--layout=") for x in args):
        # several servers and a proxy (1e1pd, 1e1p1d, 1p1d, replicas): profiler.disagg_bench
        from profiler import disagg_bench
        return disagg_bench.main(args)
    ap = argparse.ArgumentParser(prog="python -m profiler.serve_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(MODEL_SETTINGS))
    ap.add_argument("--out", required=True, help="folder for <model>__<run>.json, logs")
    ap.add_argument("--runs", default=None,
                    help=f"comma list, in order (a name given twice is repeated on the same server "
                         f"start as <run>__s2); default {','.join(DEFAULT_RUNS)} (text models), "
                         f"{','.join(VLM_DEFAULT_RUNS)} (qwen2_5_vl_7b); known: text "
                         f"{','.join(RUN_CATALOG)}; vlm {','.join(VLM_RUN_CATALOG)}")
    ap.add_argument("--max-minutes", type=float, default=9.0,
                    help="hard budget for everything incl. server start and stop")
    ap.add_argument("--since-parent", action="store_true",
                    help="count --max-minutes from the start of the parent shell (so time spent by "
                         "earlier commands of the same line, e.g. install.sh, counts; ignored if > 5 min)")
    ap.add_argument("--target-s", type=float, default=28.0, help="seconds of arrivals per finite-rate run")
    ap.add_argument("--capacity", type=float, default=None,
                    help="req/s used to size runs instead of calibrating from the inf run")
    ap.add_argument("--num-prompts-inf", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-dir", default=None, help="default /tmp/serve_bench/<model>")
    ap.add_argument("--vllm-cli", default="auto", help="auto | module | path to a vllm script")
    ap.add_argument("--health-timeout", type=float, default=360.0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--num-gpu-blocks-override", type=int, default=None,
                    help="vllm serve --num-gpu-blocks-override: a smaller KV cache (KV pressure and "
                         "preemptions on a model whose cache is large); the replay reads the "
                         "server's KV capacity from the provenance")
    ap.add_argument("--tag", default="", help="suffix of the result names (<model>__<run>__<tag>.json), "
                    "e.g. r2 for a replicate of the same seeds and rates (pass --capacity to keep the rates)")
    ap.add_argument("--steplog", action="store_true",
                    help="log every engine step of the server (profiler/vllm_steplog.py) to "
                         "<out>/steplog_<model>[__tag].jsonl; runs record their wall-time span")
    ap.add_argument("--gclog", action="store_true",
                    help="log the garbage collections of every Python process of the server and of "
                         "the client (profiler/gclog.py) to <out>/gclog_<model>[__tag].jsonl.gz")
    ap.add_argument("--stacklog", action="store_true",
                    help="with --gclog: also sample every thread's Python stack every 5 ms in every "
                         "process while a benchmark runs, to <out>/stacks_<model>[__tag].jsonl.gz")
    ap.add_argument("--preproc-budget-s", type=float, default=45.0,
                    help="image models: seconds for `profiler.mm_preproc measure` (vLLM's API-side image "
                         "preprocessing by image size, on this CPU) after the server stops, if the "
                         "budget leaves them; 0 = off")
    ap.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    a = ap.parse_args(argv)

    if a.stacklog and not a.gclog:
        ap.error("--stacklog needs --gclog (the same sitecustomize carries both)")
    t0 = time.monotonic()
    deadline = t0 + a.max_minutes * 60.0
    if a.since_parent:
        age = parent_age_s()
        if age is not None and age < 300:
            deadline -= age
    st = dict(MODEL_SETTINGS[a.model])
    vlm = st.get("kind") == "vlm"
    I = a.input_len or st["input_len"]
    O = a.output_len or st["output_len"]
    n_inf = a.num_prompts_inf or st["n_inf"]
    max_model_len = st["max_model_len"]
    out = Path(a.out)
    model_dir = Path(a.model_dir or f"/tmp/serve_bench/{a.model}")
    staging = Path(f"/tmp/serve_bench/{a.model}_staging")
    runs = []
    cat = catalog(a.model)
    names = [x.strip() for x in (a.runs or ",".join(default_runs(a.model))).split(",") if x.strip()]
    for r in names:
        if r not in cat:
            ap.error(f"unknown run {r!r} for {a.model}; known: {list(cat)}")
        runs.append(cat[r])
    stems = run_stems(names)
    cli = vllm_cli(a.vllm_cli)
    sharegpt_path = staging / "sharegpt_subset.json"
    srv_cmd = serve_command(cli, model_dir, a.port, max_model_len, gpu_mem=a.gpu_memory_utilization,
                            max_images=st.get("max_images"),
                            num_gpu_blocks_override=a.num_gpu_blocks_override)
    capacity = a.capacity or st["assumed_capacity"]
    suffix = f"__{a.tag}" if a.tag else ""

    def run_command(rr: RunSpec, fname: str) -> list[str]:
        if rr.client == "chat":
            return chat_bench_command(model_dir, a.port, rr, staging, fname, a.model)
        return bench_command(cli, model_dir, a.port, rr, I, O, staging, fname, sharegpt_path)

    if a.dry_run:
        if vlm:
            print(f"# model dir: {model_dir} (Qwen2_5_VLConfig config.json, preprocessor_config.json, "
                  f"chat template from conf/model/{a.model}.yaml + WordLevel tokenizer with Qwen's "
                  f"special tokens; profiler/vlm_model.py); tokenizer and processor checked before the start")
        else:
            print(f"# model dir: {model_dir} (config.json from conf/model/{a.model}.yaml + WordLevel tokenizer)")
            print(f"# sharegpt: gunzip {SHAREGPT_GZ} > {sharegpt_path}")
        print(shlex.join(srv_cmd) + f" > {out}/server_{a.model}{suffix}.log 2>&1 &")
        print(f"# wait for http://127.0.0.1:{a.port}/health (<= {a.health_timeout:.0f} s)")
        print(f"# rates below assume capacity {capacity} req/s; a real run calibrates them from 'inf'")
        if vlm and cli[-1] == "vllm.entrypoints.cli.main":
            print(f"# before the start: {shlex.join(preproc_command('check', model_dir, a.model))}")
        total = 0.0
        for r, stem in zip(runs, stems):
            rr = size_run(r, capacity, n_inf, a.target_s)
            total += est_seconds(rr, capacity)
            print(shlex.join(run_command(rr, f"{a.model}__{stem}{suffix}.json")))
        print(f"# estimated run time {total:.0f} s after the server start (~210-300 s on a fresh H100)")
        if vlm and a.preproc_budget_s > 0:
            print(f"# after the stop, if {a.preproc_budget_s:.0f} s are left: "
                  + shlex.join(preproc_command("measure", model_dir, a.model,
                                               out / f"preproc_{a.model}{suffix}.json", a.preproc_budget_s)))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    staging.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    def log(msg: str) -> None:
        print(f"[serve_bench {time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    missing = preflight(cli, vlm)
    if missing:
        print(f"[serve_bench] error: modules missing for vllm serve/bench: {missing} "
              f"(PYTHONPATH={os.environ.get('PYTHONPATH')})", file=sys.stderr)
        return 2
    tq = torch_gpu_name_proc()
    if vlm:
        from profiler import vlm_model
        cfg = vlm_model.write_vlm_model_dir(a.model, model_dir)
        vocab = int(cfg["text_config"]["vocab_size"])
        vlm_model.check_vlm_tokenizer(tokenizer_dir(model_dir), vocab)
        expanded = vlm_model.check_vlm_processor(model_dir, tokenizer_dir(model_dir))
        cfg = dict(cfg, max_position_embeddings=cfg["text_config"]["max_position_embeddings"])
        log(f"model dir {model_dir}: {cfg.get('architectures')} vocab {vocab}, tokenizer round trip ok, "
            f"processor expands images as smart_resize says: {expanded}")
        if cli[-1] == "vllm.entrypoints.cli.main":       # vLLM's own chat + image path, no engine
            chk = subprocess.run(preproc_command("check", model_dir, a.model), capture_output=True,
                                 text=True, timeout=240, cwd=ROOT)
            tail = (chk.stdout + chk.stderr).strip().splitlines()[-3:]
            if chk.returncode != 0:
                print(f"[serve_bench] error: vLLM's image path check failed: {tail}", file=sys.stderr)
                return 2
            log(f"vLLM image path check: {tail[-1] if tail else ''}")
    else:
        cfg = write_model_dir(a.model, model_dir)
        check_tokenizer(tokenizer_dir(model_dir), int(cfg["vocab_size"]))
        log(f"model dir {model_dir}: {cfg.get('architectures')} vocab {cfg['vocab_size']}, tokenizer round trip ok")
    if any(r.dataset == "sharegpt" for r in runs):
        prepare_sharegpt(staging)
    server_log = out / f"server_{a.model}{suffix}.log"
    base = dict(model=a.model, model_dir=str(model_dir), server_command=shlex.join(srv_cmd),
                engine="vllm", engine_version=pkg_version("vllm"), torch_version=pkg_version("torch"),
                transformers_version=pkg_version("transformers"), git_sha=git_sha(),
                hostname=os.uname().nodename, random_input_len=I, random_output_len=O,
                random_range_ratio=0.5, max_num_seqs=256, max_num_batched_tokens=8192,
                enable_prefix_caching=False, load_format="dummy", dtype="bfloat16",
                max_model_len=max_model_len or int(cfg["max_position_embeddings"]))
    if a.num_gpu_blocks_override:
        base["num_gpu_blocks_override"] = a.num_gpu_blocks_override
    if vlm:
        from profiler.chat_requests import workload_laws
        from profiler.vlm_model import vlm_shape
        laws = workload_laws("mixed_bursty")
        base.update(random_input_len=None, random_output_len=None, random_range_ratio=None,
                    client="profiler.chat_bench", limit_mm_per_prompt={"image": st["max_images"], "video": 0},
                    image_tokenizer=vlm_shape(a.model)["image_tokenizer"],
                    workload_laws={k: dict(v.__dict__) for k, v in zip(
                        ("prompt_tokens", "image_prompt_tokens", "output_tokens", "image"), laws)})
    base.update(gpu_info())
    # the torch child must be gone before vLLM profiles GPU memory (another process's CUDA context
    # appearing or vanishing mid-profiling trips vLLM's memory accounting)
    if tq is not None:
        try:
            so, _ = tq.communicate(timeout=90)
            base.update(json.loads(so.strip().splitlines()[-1]))
        except Exception:  # noqa: BLE001
            tq.kill()
            tq.wait()
    summary: dict[str, Any] = {"model": a.model, "runs": [], "skipped": []}
    srv_env = dict(os.environ)
    if a.steplog:
        from profiler.vllm_steplog import install_plugin
        plug = install_plugin(staging / "steplog_plugin")
        srv_env["PYTHONPATH"] = os.pathsep.join(
            [str(plug), str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
        srv_env["MMSIM_STEPLOG"] = str((out / f"steplog_{a.model}{suffix}.jsonl").resolve())
        base["steplog"] = f"steplog_{a.model}{suffix}.jsonl"
    bench_env = dict(os.environ)
    if vlm:       # profiler.chat_bench runs from this checkout whatever the caller's PYTHONPATH
        bench_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    if a.gclog:
        from profiler import gclog
        gc_site = gclog.install(staging / "gclog_site")
        gc_dir = staging / f"gclog{suffix}"
        shutil.rmtree(gc_dir, ignore_errors=True)
        for env in (srv_env, bench_env):
            env["PYTHONPATH"] = os.pathsep.join([str(gc_site)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
            env["MMSIM_GCLOG"] = str(gc_dir)
        base["gclog"] = f"gclog_{a.model}{suffix}.jsonl.gz"
        if a.stacklog:
            stk_dir, stk_on = staging / f"stacks{suffix}", staging / f"stacks_on{suffix}"
            shutil.rmtree(stk_dir, ignore_errors=True)
            stk_on.unlink(missing_ok=True)
            for env in (srv_env, bench_env):
                env["MMSIM_STACKLOG"], env["MMSIM_STACKLOG_ON"] = str(stk_dir), str(stk_on)
            base["stacklog"] = f"stacks_{a.model}{suffix}.jsonl.gz"
    srv = None
    logf = open(server_log, "w")
    try:
        log("starting: " + shlex.join(srv_cmd))
        srv = subprocess.Popen(srv_cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                               env=srv_env)
        ready_by = min(time.monotonic() + a.health_timeout, deadline - 30)
        while True:
            if srv.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {srv.returncode}; see {server_log}")
            if http_get(f"http://127.0.0.1:{a.port}/health", 2.0)[0] == 200:
                break
            if time.monotonic() > ready_by:
                raise RuntimeError(f"vllm serve not healthy after {time.monotonic() - t0:.0f} s; see {server_log}")
            time.sleep(2.0)
        base["server_start_s"] = round(time.monotonic() - t0, 1)
        log(f"server healthy after {base['server_start_s']} s")
        logf.flush()
        base.update(parse_kv_log(server_log.read_text(errors="replace")))
        code, mtext = http_get(f"http://127.0.0.1:{a.port}/metrics")
        if code == 200:
            base.update({k: v for k, v in parse_metrics(mtext).items() if k.startswith("cache_config.")})
        if "kv_cache_tokens" not in base and "cache_config.num_gpu_blocks" in base:
            base["kv_cache_tokens"] = int(base["cache_config.num_gpu_blocks"]) * int(base.get("cache_config.block_size", 16))
        log(f"KV cache: {base.get('kv_cache_tokens')} tokens; gpu {base.get('gpu') or base.get('nvidia_smi_name')}")

        calibrated = a.capacity is not None
        for r, run_stem in zip(runs, stems):
            rr = size_run(r, capacity, n_inf, a.target_s)
            left = deadline - time.monotonic() - 25.0          # 25 s to stop the server
            est = est_seconds(rr, capacity)
            if est > left:                                     # shrink to fit, else skip
                over = CHAT_CLIENT_OVERHEAD_S if rr.client == "chat" else CLIENT_OVERHEAD_S
                scale = (left - over) / max(est - over, 1e-6)
                rr.num_prompts = int(rr.num_prompts * scale)
                if rr.num_prompts < (12 if rr.client == "chat" and rr.fixed_prompts else 30):
                    log(f"skip {run_stem}: {est:.0f} s estimated, {left:.0f} s left")
                    summary["skipped"].append(run_stem)
                    continue
                log(f"shrinking {run_stem} to {rr.num_prompts} prompts to fit {left:.0f} s")
            stem = f"{a.model}__{run_stem}{suffix}"
            fname = f"{stem}.json"
            cmd = run_command(rr, fname)
            log(f"run {run_stem}: " + shlex.join(cmd))
            _, m0 = http_get(f"http://127.0.0.1:{a.port}/metrics")
            before = parse_metrics(m0)
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            wall_start = time.time()
            blog = open(out / f"bench_{stem}.log", "w")
            if a.gclog and a.stacklog:
                stk_on.touch()           # the samplers run while this file exists
            bp = subprocess.Popen(cmd, stdout=blog, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=bench_env)
            cpu = CpuSampler({"api_server": srv.pid, "client": bp.pid})
            cpu.start()
            try:
                bp.wait(timeout=max(5.0, deadline - time.monotonic() - 20.0))
            except subprocess.TimeoutExpired:
                cpu.stop()
                log(f"run {run_stem} past the deadline: killed, result lost")
                stop_group(bp, grace=3.0)
                summary["skipped"].append(run_stem)
                blog.close()
                break
            blog.close()
            cpu_series = cpu.stop()
            if a.gclog and a.stacklog:
                stk_on.unlink(missing_ok=True)
            src = staging / fname
            if bp.returncode != 0 or not src.exists():
                log(f"run {run_stem} failed (rc {bp.returncode}); see bench_{stem}.log")
                summary["skipped"].append(run_stem)
                continue
            _, m1 = http_get(f"http://127.0.0.1:{a.port}/metrics")
            after = parse_metrics(m1)
            delta = {k.split(":", 1)[1] + "_delta": after[k] - before.get(k, 0.0)
                     for k in after if k.startswith("vllm:") and k in before
                     and not any(k.startswith(h) for h in HISTOGRAMS)}
            delta["histograms"] = histogram_deltas(before, after)
            prov = dict(base, run=run_stem, dataset_name=rr.dataset if rr.client != "chat" else f"chat_{rr.image_law}",
                        request_rate=rr.request_rate if rr.request_rate is not None else "inf",
                        burstiness=rr.burstiness, num_prompts=rr.num_prompts, seed=rr.seed,
                        calibrated_capacity_rps=round(capacity, 4), bench_command=shlex.join(cmd),
                        random_input_len=rr.input_len or I, random_output_len=rr.output_len or O,
                        random_range_ratio=rr.range_ratio, max_concurrency=rr.max_concurrency,
                        measured_at=started, server_metrics=delta, cpu_samples=cpu_series,
                        wall_span=[round(wall_start, 3), round(time.time(), 3)])
            if rr.dataset == "sharegpt":
                prov["dataset_path"] = str(SHAREGPT_GZ.relative_to(ROOT))
            if rr.client == "chat":
                prov.update(text_frac=rr.text_frac, image_law=rr.image_law,
                            random_input_len=None, random_output_len=None, random_range_ratio=None)
            obj = finalize_result(src, out / fname, prov)
            log(f"run {run_stem}: {obj.get('completed')} done, {obj.get('request_throughput', 0):.2f} req/s, "
                f"median TTFT {obj.get('median_ttft_ms', 0):.0f} ms, preemptions {delta.get('num_preemptions_delta')}"
                + (f", prompt-token mismatches {obj.get('prompt_tokens_mismatches')}" if rr.client == "chat" else ""))
            summary["runs"].append({"run": run_stem, "file": fname,
                                    "request_throughput": obj.get("request_throughput"),
                                    "request_rate": prov["request_rate"], "num_prompts": rr.num_prompts,
                                    "preemptions": delta.get("num_preemptions_delta")})
            if r.rate_frac is None and not r.fixed_prompts and not calibrated and obj.get("request_throughput"):
                capacity = float(obj["request_throughput"])
                calibrated = True
                log(f"calibrated capacity {capacity:.2f} req/s")
    except Exception as e:  # noqa: BLE001 - report, stop the server, keep finished runs
        log(f"error: {e}")
        summary["error"] = str(e)
    finally:
        if srv is not None:
            stop_group(srv)
        logf.close()
        left = deadline - time.monotonic() - 10.0
        if vlm and a.preproc_budget_s > 0 and cli[-1] == "vllm.entrypoints.cli.main" and left > 30:
            pp = out / f"preproc_{a.model}{suffix}.json"
            budget = min(a.preproc_budget_s, left - 25.0)
            try:
                subprocess.run(preproc_command("measure", model_dir, a.model, pp, budget),
                               capture_output=True, timeout=left, cwd=ROOT)
                summary["preproc"] = pp.name if pp.exists() else None
                log(f"image preprocessing by size: {pp if pp.exists() else 'not written'}")
            except subprocess.TimeoutExpired:
                log("image preprocessing measurement past the deadline: stopped")
        if a.steplog:      # runs name the .jsonl; readers (vllm_steplog.resolve_steplog) take .gz too
            from profiler.vllm_steplog import gzip_steplog
            gzip_steplog(out / base["steplog"])
        if a.gclog:
            from profiler import gclog
            gclog.gather(gc_dir, out / base["gclog"])
            if a.stacklog:
                stk_on.unlink(missing_ok=True)
                gclog.gather(stk_dir, out / base["stacklog"], prefix="stk")
        summary["provenance"] = base
        summary["elapsed_s"] = round(time.monotonic() - t0, 1)
        (out / f"serve_bench_{a.model}{suffix}.json").write_text(json.dumps(summary, indent=2))
        log(f"done: {len(summary['runs'])} runs, skipped {summary['skipped']}")
    return 0 if summary["runs"] and "error" not in summary else 1


if __name__ == "__main__":
    sys.exit(main())
