"""vLLM 0.26.0's own API-server image path, run on the CPU without an engine: prompt-length check
and per-image preprocessing cost by image size.

    python -m profiler.mm_preproc check   --model-dir /tmp/serve_bench/qwen2_5_vl_7b
    python -m profiler.mm_preproc measure --model-dir /tmp/serve_bench/qwen2_5_vl_7b --out preproc.json

What a chat request with images goes through in `vllm serve`'s API process before the engine core
sees it (vllm/renderers/hf.py `HfRenderer.render_messages`, renderers/base.py
`_process_multimodal`): `parse_chat_messages` (data URL -> base64 decode -> PIL decode, by
vLLM's MediaConnector), the chat template (`safe_apply_chat_template`, tokenized), then the
multimodal processor's `apply` (HF Qwen2-VL image processor: resize, normalise, patchify; hashing;
prompt update to one <|image_pad|> per image token), under `set_default_torch_num_threads()` as
the server runs it. Both run here with vLLM's own functions on a `ModelConfig` of the served model
dir (no GPU, no engine), the processor built without the multimodal cache (every image is new, as
in the benchmark, whose images are all distinct).

`check`: for requests drawn by profiler.chat_requests (mixed sizes, text-only ones, several images)
the prompt vLLM builds has exactly `chat_bench.expected_prompt_tokens` tokens; exit 1 otherwise.
serve_bench runs it before the engine start, so a broken image path costs seconds, not a start.
`measure`: per image size (squares 224..2240 and three aspect ratios), repeated, the wall time of
decode (parse_chat_messages), template and processor apply (with vLLM's per-stage timing), on this
host's CPU: the API-server preprocessing cost by image size, measured apart from any load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

MEASURE_SIZES = ((224, 224), (448, 448), (672, 672), (896, 896), (1120, 1120), (1344, 1344),
                 (1792, 1792), (2240, 2240), (448, 796), (796, 448), (747, 1328))


class VllmRender:
    """vLLM's chat-request preprocessing for one model dir (as the API server runs it)."""

    def __init__(self, model_dir: str, tokenizer_dir: Optional[str] = None, max_images: int = 3):
        from vllm.config import ModelConfig
        from vllm.multimodal import MULTIMODAL_REGISTRY
        from vllm.renderers.hf import resolve_chat_template_content_format
        from vllm.tokenizers import get_tokenizer
        tok_dir = tokenizer_dir or str(Path(model_dir) / "tokenizer")
        self.mc = ModelConfig(model=str(model_dir), tokenizer=tok_dir, dtype="bfloat16",
                              limit_mm_per_prompt={"image": max_images, "video": 0}, seed=0)
        self.tok = get_tokenizer(tok_dir)
        try:
            self.proc = MULTIMODAL_REGISTRY.create_processor(self.mc, tokenizer=self.tok)
        except TypeError:
            self.proc = MULTIMODAL_REGISTRY.create_processor(self.mc)
        self.fmt = resolve_chat_template_content_format(None, None, "auto", self.tok, model_config=self.mc)

    def __call__(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """Prompt length and timings (s) of one chat request's messages."""
        from vllm.entrypoints.chat_utils import parse_chat_messages
        from vllm.multimodal.processing.context import TimingContext
        from vllm.multimodal.processing.inputs import ProcessorInputs
        from vllm.renderers.hf import safe_apply_chat_template
        from vllm.utils.torch_utils import set_default_torch_num_threads
        t0 = time.perf_counter()
        conv, mm_data, _ = parse_chat_messages(messages, self.mc, content_format=self.fmt)
        t1 = time.perf_counter()
        ids = safe_apply_chat_template(self.mc, self.tok, conv, add_generation_prompt=True)
        t2 = time.perf_counter()
        out: dict[str, Any] = {"decode_s": t1 - t0, "template_s": t2 - t1, "apply_s": 0.0, "stages": {}}
        if mm_data:
            ctx = TimingContext(enabled=True)
            with set_default_torch_num_threads():
                mm = self.proc.apply(ProcessorInputs(ids, self.proc.info.parse_mm_data(mm_data)), ctx)
            out["apply_s"] = time.perf_counter() - t2
            out["stages"] = dict(ctx.stage_secs)
            out["prompt_tokens"] = len(mm["prompt_token_ids"])
        else:
            out["prompt_tokens"] = len(ids)
        return out


def check(model_dir: str, tokenizer_dir: Optional[str] = None, model: str = "qwen2_5_vl_7b",
          n: int = 10, seed: int = 3) -> list[dict[str, Any]]:
    """vLLM's prompt length of drawn requests == the client's expected count; raises otherwise."""
    from profiler.chat_bench import build_payloads, expected_prompt_tokens
    from profiler.chat_requests import ChatPlan, draw_requests
    from profiler.vlm_model import FIRST_SPECIAL_ID, vlm_shape
    itok = vlm_shape(model)["image_tokenizer"]
    render = VllmRender(model_dir, tokenizer_dir)
    reqs = draw_requests(ChatPlan(num_prompts=n, seed=seed, image_law="mixed", text_frac=0.25,
                                  images_per_request={1: 0.5, 2: 0.3, 3: 0.2}, max_output=16))
    bodies, _ = build_payloads(reqs, "m", seed, FIRST_SPECIAL_ID)
    rows = []
    for r, b in zip(reqs, bodies):
        got = render(json.loads(b)["messages"])
        exp, img = expected_prompt_tokens(r, itok)
        rows.append({"images": r.images, "text_tokens": r.text_tokens, "expected": exp,
                     "vllm": got["prompt_tokens"], "apply_s": round(got["apply_s"], 4)})
    bad = [x for x in rows if x["expected"] != x["vllm"]]
    if bad:
        raise AssertionError(f"vLLM's prompt lengths differ from the expected ones: {bad}")
    if render.fmt != "openai":
        raise AssertionError(f"chat template content format {render.fmt!r}, expected 'openai'")
    return rows


def measure(model_dir: str, tokenizer_dir: Optional[str] = None, model: str = "qwen2_5_vl_7b",
            sizes=MEASURE_SIZES, repeats: int = 5, budget_s: float = 60.0) -> dict[str, Any]:
    """Per image size: median decode / template / apply times over `repeats` distinct images (one
    image and 32 text tokens per request), stopping when `budget_s` is spent."""
    from profiler.chat_requests import image_data_url, prompt_text
    from profiler.vlm_model import FIRST_SPECIAL_ID, image_tokens, vlm_shape
    itok = vlm_shape(model)["image_tokenizer"]
    render = VllmRender(model_dir, tokenizer_dir)
    text = prompt_text(32, 0, 0, FIRST_SPECIAL_ID)
    warm, _ = image_data_url(448, 448, (999, 0, 0))
    render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": warm}},
                                          {"type": "text", "text": text}]}])       # first-use paths
    t_end = time.monotonic() + budget_s
    rows = []
    for k in range(repeats):                  # round-robin over sizes: a short budget still covers all
        for h, w in sizes:
            if time.monotonic() > t_end:
                break
            url, nbytes = image_data_url(h, w, (1000 + k, h, w))
            got = render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "text", "text": text}]}])
            rows.append({"h": h, "w": w, "tokens": image_tokens(h, w, itok), "jpeg_bytes": nbytes,
                         **{k2: v for k2, v in got.items() if k2 != "stages"},
                         **{f"stage_{s}": v for s, v in got["stages"].items()}})
    by: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["h"], r["w"]), []).append(r)
    summary = []
    for (h, w), rs in by.items():
        rec = {"h": h, "w": w, "pixels": h * w, "tokens": rs[0]["tokens"], "n": len(rs),
               "jpeg_bytes": int(statistics.median(r["jpeg_bytes"] for r in rs))}
        for key in sorted({k for r in rs for k in r if k.endswith("_s") or k.startswith("stage_")}):
            vals = [r[key] for r in rs if key in r]
            rec[f"median_{key}_ms" if not key.startswith("stage_") else f"median_{key}_ms"] = \
                round(statistics.median(vals) * 1e3, 3)
        summary.append(rec)
    import platform
    return {"model": model, "model_dir": str(model_dir), "what": "vLLM API-server image preprocessing on "
            "the CPU, no engine: decode = parse_chat_messages (base64 + PIL), template = chat template "
            "+ tokenization, apply = multimodal processor (HF image processor, hashing, prompt update)",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "repeats": repeats,
            "summary": summary, "rows": rows}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.mm_preproc", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["check", "measure"])
    ap.add_argument("--model", default="qwen2_5_vl_7b")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--out", default=None, help="measure: JSON output (atomic)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=60.0)
    a = ap.parse_args(argv)
    if a.what == "check":
        try:
            rows = check(a.model_dir, a.tokenizer_dir, a.model)
        except AssertionError as e:
            print(f"[mm_preproc] check FAILED: {e}", flush=True)
            return 1
        print(f"[mm_preproc] check ok: {len(rows)} requests, vLLM prompt lengths = expected "
              f"({[r['vllm'] for r in rows]})", flush=True)
        return 0
    res = measure(a.model_dir, a.tokenizer_dir, a.model, repeats=a.repeats, budget_s=a.budget_s)
    for r in res["summary"]:
        print(f"[mm_preproc] {r['h']}x{r['w']} ({r['tokens']} tokens, {r['jpeg_bytes'] // 1024} KB): "
              f"decode {r.get('median_decode_s_ms')} ms, apply {r.get('median_apply_s_ms')} ms", flush=True)
    if a.out:
        p = Path(a.out)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
