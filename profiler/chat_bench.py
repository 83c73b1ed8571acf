"""A streaming OpenAI-chat benchmark client for image + text requests, recording each request's
images so the run replays exactly.

    python -m profiler.chat_bench --base-url http://127.0.0.1:8000 --model <served model> \
        --num-prompts 300 --request-rate 8.0 --burstiness 0.5 --seed 44 \
        --result-dir D --result-filename qwen2_5_vl_7b__bursty_k0.5.json

Why not `vllm bench serve`: its random-mm dataset does not save per-request image sizes, and the
simulator replays a run request by request. This client sends what `profiler.chat_requests`
draws (arrivals, text lengths, output lengths, 0..k images of drawn sizes, as JPEG data URLs, one
`image_url` part per image before the text) to /v1/chat/completions with `stream: true`,
`max_completion_tokens = min_tokens = N` and `ignore_eos` (exact output lengths), and
`stream_options.include_usage` (the server's own prompt / completion token counts).

Timing follows vLLM 0.26.0's own openai-chat client (`vllm/benchmarks/lib/endpoint_request_func.py`):
start = perf_counter() when the request is issued, TTFT = the first SSE message with `choices`
(vLLM's role chunk, sent with the first token), ITLs = gaps between later `choices` messages,
latency = the last message; request sends are scheduled from precomputed offsets (vLLM's Gamma
law with its rescaling). The result JSON has `vllm bench serve --save-detailed`'s keys and
metrics (same definitions, `calculate_metrics`), so every tool that reads those reads this, plus
per request: `tasks`, `images` ([[h, w], ...]), `text_prompt_tokens` (user text),
`expected_prompt_tokens` (text + chat template + image tokens by the model's smart_resize rule),
`image_tokens`, `image_bytes`; `input_lens` is the server's `usage.prompt_tokens`, as in vLLM.
`prompt_tokens_mismatches` counts requests where the server's count differs from the expected one
(0 when the model dir, tokenizer and processor behave as `profiler.vlm_model` says).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np

from profiler.chat_requests import ChatPlan, ChatRequest, draw_requests, image_data_url, prompt_text
from profiler.vlm_model import chat_overhead_tokens, image_tokens

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class Outcome:
    success: bool = False
    latency: float = 0.0
    output_tokens: int = 0
    prompt_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0
    error: str = ""
    generated_text: str = ""


class SSEBuffer:
    """Complete SSE messages out of streamed bytes (what vLLM's StreamedResponseHandler does)."""

    def __init__(self) -> None:
        import codecs
        self.buf = ""
        self._dec = codecs.getincrementaldecoder("utf-8")()

    def add(self, chunk: bytes) -> list[str]:
        self.buf += self._dec.decode(chunk)
        out = []
        while "\n\n" in self.buf:
            msg, self.buf = self.buf.split("\n\n", 1)
            if msg.strip():
                out.append(msg.strip())
        if self.buf.startswith("data: "):
            body = self.buf.removeprefix("data: ").strip()
            if body == "[DONE]":
                out.append(self.buf.strip())
                self.buf = ""
            elif body:
                try:
                    json.loads(body)
                    out.append(self.buf.strip())
                    self.buf = ""
                except json.JSONDecodeError:
                    pass
        return out


# ----------------------------------------------------------------------------- payloads

def _image_job(args: tuple[int, int, tuple[int, ...]]) -> tuple[str, int]:
    h, w, seed = args
    return image_data_url(h, w, seed)


def build_payloads(reqs: list[ChatRequest], model: str, seed: int, vocab_words: int,
                   workers: int = 0) -> tuple[list[bytes], list[list[int]]]:
    """JSON bodies (serialised before the run: no encoding work on the send path) and the JPEG
    byte sizes per request. Images are made in a process pool when `workers` > 1."""
    jobs = [(h, w, (int(seed), r.index, j)) for r in reqs for j, (h, w) in enumerate(r.images)]
    if workers > 1 and len(jobs) > 8:
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
            made = list(ex.map(_image_job, jobs, chunksize=4))
    else:
        made = [_image_job(j) for j in jobs]
    it = iter(made)
    bodies, sizes = [], []
    for r in reqs:
        text = prompt_text(r.text_tokens, seed, r.index, vocab_words)
        urls = [next(it) for _ in r.images]
        content: Any = text if not r.images else (
            [{"type": "image_url", "image_url": {"url": u}} for u, _ in urls] + [{"type": "text", "text": text}])
        payload = {"model": model, "messages": [{"role": "user", "content": content}],
                   "max_completion_tokens": r.output_tokens, "min_tokens": r.output_tokens,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        bodies.append(json.dumps(payload).encode())
        sizes.append([b for _, b in urls])
    return bodies, sizes


# ----------------------------------------------------------------------------- one request

async def send_one(session, url: str, body: bytes, request_id: Optional[str] = None) -> Outcome:
    out = Outcome()
    st = time.perf_counter()
    out.start_time = st
    last = st
    text: list[str] = []
    headers = {"Content-Type": "application/json"}
    if request_id is not None:          # x-request-id: a proxy's per-hop log names the request
        headers["x-request-id"] = request_id
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:500]}"
                return out
            sse = SSEBuffer()
            async for chunk in resp.content.iter_any():
                chunk = chunk.strip()
                if not chunk:
                    continue
                for msg in sse.add(chunk):
                    if msg.startswith(":"):
                        continue
                    data = msg.removeprefix("data: ")
                    if data == "[DONE]":
                        continue
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if obj.get("error"):
                        out.error = json.dumps(obj["error"])[:500]
                        return out
                    if choices := obj.get("choices"):
                        if out.ttft == 0.0:
                            out.ttft = now - st
                        else:
                            out.itl.append(now - last)
                        text.append(choices[0].get("delta", {}).get("content") or "")
                    elif usage := obj.get("usage"):
                        out.output_tokens = int(usage.get("completion_tokens") or 0)
                        if usage.get("prompt_tokens") is not None:
                            out.prompt_len = int(usage["prompt_tokens"])
                    last = now
        out.generated_text = "".join(text)
        out.latency = last - st
        out.success = out.ttft > 0.0
        if not out.success:
            out.error = "no token streamed"
    except Exception:  # noqa: BLE001 - a failed request is recorded with its error, not dropped
        out.success = False
        out.error = "".join(traceback.format_exception(*sys.exc_info()))[-1000:]
    return out


# ----------------------------------------------------------------------------- the run

async def run_requests(base_url: str, bodies: list[bytes], offsets: list[float],
                       max_concurrency: Optional[int] = None, timeout_s: float = 3600.0,
                       request_ids: Optional[list[str]] = None) -> tuple[list[Outcome], float, float]:
    """Send body i at offset i (s from the start; sorted), at most max_concurrency in flight;
    returns the outcomes in send order, the benchmark duration (start to last finish) and the
    perf_counter origin the offsets count from (no request starts before origin + offset)."""
    import aiohttp
    url = base_url.rstrip("/") + "/v1/chat/completions"
    conn = aiohttp.TCPConnector(limit=max_concurrency or 0, limit_per_host=max_concurrency or 0,
                                ttl_dns_cache=300, use_dns_cache=True, keepalive_timeout=60,
                                enable_cleanup_closed=True, force_close=False)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def limited(session, body, rid=None):
        if sem is None:
            return await send_one(session, url, body, rid)
        async with sem:
            return await send_one(session, url, body, rid)

    async with aiohttp.ClientSession(connector=conn, trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        t0 = time.perf_counter()
        tasks = []
        for i, (body, off) in enumerate(zip(bodies, offsets)):
            wait = off - (time.perf_counter() - t0)
            if wait > 0:
                await asyncio.sleep(wait)
            rid = request_ids[i] if request_ids is not None else None
            tasks.append(asyncio.create_task(limited(session, body, rid)))
        outs = await asyncio.gather(*tasks)
        dur = time.perf_counter() - t0
    return list(outs), dur, t0


def calculate_metrics(outs: list[Outcome], dur_s: float, percentiles=PERCENTILES) -> dict[str, Any]:
    """vLLM 0.26.0's `calculate_metrics` (benchmarks/serve.py) on our outcomes, same keys."""
    ttfts, tpots, itls, e2els, out_lens = [], [], [], [], []
    total_in, completed = 0, 0
    for o in outs:
        if not o.success:
            out_lens.append(0)
            continue
        n = o.output_tokens or max(1, len(o.itl) + 1)
        out_lens.append(n)
        total_in += o.prompt_len
        if n > 1:
            tpots.append((o.latency - o.ttft) / (n - 1))
        itls += o.itl
        ttfts.append(o.ttft)
        e2els.append(o.latency)
        completed += 1
    ok = [o for o in outs if o.success]
    max_tok_s, max_conc = 0.0, 0
    if ok:
        t_min = min(o.start_time for o in ok)
        t_max = max(o.start_time + o.latency for o in ok)
        nsec = int(np.ceil(t_max - t_min)) + 1
        tok = np.zeros(nsec)
        conc = np.zeros(nsec)
        for o in ok:
            tt = o.start_time + o.ttft + np.concatenate(([0.0], np.cumsum(o.itl)))
            b = (tt - t_min).astype(int)
            np.add.at(tok, b[(b >= 0) & (b < nsec)], 1)
            conc[int(o.start_time - t_min):int(o.start_time + o.latency - t_min) + 1] += 1
        max_tok_s, max_conc = float(tok.max()), int(conc.max())
    m: dict[str, Any] = {
        "duration": dur_s, "completed": completed, "failed": len(outs) - completed,
        "total_input_tokens": total_in, "total_output_tokens": int(sum(out_lens)),
        "request_throughput": completed / dur_s, "request_goodput": None,
        "output_throughput": sum(out_lens) / dur_s,
        "total_token_throughput": (total_in + sum(out_lens)) / dur_s,
        "max_output_tokens_per_s": max_tok_s, "max_concurrent_requests": max_conc, "rtfx": 0.0,
    }
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        a = np.asarray(vals or [0.0], float) * 1e3
        m[f"mean_{name}_ms"] = float(a.mean())
        m[f"median_{name}_ms"] = float(np.median(a))
        m[f"std_{name}_ms"] = float(a.std())
        for p in percentiles:
            m[f"p{int(p) if p == int(p) else p}_{name}_ms"] = float(np.percentile(a, p))
    m["_output_lens"] = out_lens
    return m


def expected_prompt_tokens(r: ChatRequest, tok: dict[str, Any]) -> tuple[int, int]:
    """(prompt tokens the server should count, of which image tokens) for one request."""
    img = sum(image_tokens(h, w, tok) for h, w in r.images)
    return r.text_tokens + chat_overhead_tokens(len(r.images)) + img, img


def build_result(plan: ChatPlan, reqs: list[ChatRequest], outs: list[Outcome], dur: float,
                 sizes: list[list[int]], tok: dict[str, Any], model: str, tokenizer: str,
                 max_concurrency: Optional[int], origin: float = 0.0) -> dict[str, Any]:
    m = calculate_metrics(outs, dur)
    out_lens = m.pop("_output_lens")
    exp = [expected_prompt_tokens(r, tok) for r in reqs]
    mism = [i for i, (o, (e, _)) in enumerate(zip(outs, exp)) if o.success and o.prompt_len != e]
    res: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": "openai-chat",
        "backend": "openai-chat", "label": None, "model_id": model, "tokenizer_id": tokenizer,
        "num_prompts": len(reqs),
        "request_rate": "inf" if plan.request_rate is None else plan.request_rate,
        "burstiness": plan.burstiness, "max_concurrency": max_concurrency,
    }
    res.update({k: m[k] for k in ("duration", "completed", "failed", "total_input_tokens",
                                  "total_output_tokens", "request_throughput", "request_goodput",
                                  "output_throughput", "total_token_throughput")})
    res.update({
        "input_lens": [o.prompt_len if o.success else e for o, (e, _) in zip(outs, exp)],
        "output_lens": out_lens,
        "ttfts": [o.ttft for o in outs],
        "itls": [o.itl for o in outs],
        "start_times": [o.start_time for o in outs],
        "generated_texts": [o.generated_text for o in outs],
        "errors": [o.error for o in outs],
    })
    res.update({k: v for k, v in m.items() if k not in res})
    res.update({
        "tasks": [r.task for r in reqs],
        "images": [[[h, w] for h, w in r.images] for r in reqs],
        "image_bytes": sizes,
        "image_tokens": [i for _, i in exp],
        "text_prompt_tokens": [r.text_tokens for r in reqs],
        "expected_prompt_tokens": [e for e, _ in exp],
        "requested_output_tokens": [r.output_tokens for r in reqs],
        "planned_offsets_s": [r.arrival_s for r in reqs],
        "schedule_origin": origin,
        "chat_overhead_tokens": chat_overhead_tokens(0),
        "prompt_tokens_mismatches": len(mism),
        "prompt_tokens_mismatch_examples": [[i, outs[i].prompt_len, exp[i][0]] for i in mism[:10]],
        "chat_plan": plan.to_json(),
        "image_tokenizer": {k: tok[k] for k in ("patch_size", "merge_size", "min_pixels", "max_pixels")},
    })
    return res


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def parse_counts(s: str) -> dict[int, float]:
    """'1:0.75,2:0.2,3:0.05' -> {1: 0.75, 2: 0.2, 3: 0.05}."""
    out = {}
    for part in s.split(","):
        k, _, v = part.partition(":")
        out[int(k)] = float(v) if v else 1.0
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.chat_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True, help="served model name (vllm serve's model path)")
    ap.add_argument("--tokenizer", default=None, help="recorded as tokenizer_id")
    ap.add_argument("--model-conf", default="qwen2_5_vl_7b",
                    help="conf/model/<name>.yaml: image_tokenizer for the expected prompt tokens")
    ap.add_argument("--num-prompts", type=int, required=True)
    ap.add_argument("--request-rate", default="inf")
    ap.add_argument("--burstiness", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-frac", type=float, default=0.25)
    ap.add_argument("--image-law", default="workload", choices=["workload", "mixed", "probe"])
    ap.add_argument("--images-per-request", default="1:0.75,2:0.2,3:0.05")
    ap.add_argument("--max-output", type=int, default=1024)
    ap.add_argument("--fixed-text", type=int, default=None)
    ap.add_argument("--fixed-output", type=int, default=None)
    ap.add_argument("--workload", default="mixed_bursty")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--num-warmups", type=int, default=0)
    ap.add_argument("--vocab-words", type=int, default=151643, help="ids 0..N-1 are t<id> words")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument("--result-dir", required=True)
    ap.add_argument("--result-filename", required=True)
    ap.add_argument("--request-id-prefix", default=None,
                    help="send x-request-id <prefix><index> with every measured request (a proxy logs it)")
    a = ap.parse_args(argv)

    from profiler.vlm_model import vlm_shape
    tok = vlm_shape(a.model_conf)["image_tokenizer"]
    rate = None if str(a.request_rate).lower() == "inf" else float(a.request_rate)
    plan = ChatPlan(num_prompts=a.num_prompts, request_rate=rate, burstiness=a.burstiness,
                    seed=a.seed, text_frac=a.text_frac, image_law=a.image_law,
                    images_per_request=parse_counts(a.images_per_request), max_output=a.max_output,
                    fixed_text=a.fixed_text, fixed_output=a.fixed_output, workload=a.workload)
    t_start = time.perf_counter()
    reqs = draw_requests(plan)
    bodies, sizes = build_payloads(reqs, a.model, a.seed, a.vocab_words, a.workers)
    print(f"[chat_bench] {len(reqs)} requests ({sum(r.task == 'understand' for r in reqs)} with "
          f"{sum(len(r.images) for r in reqs)} images, {sum(map(sum, sizes)) / 1e6:.1f} MB of JPEG) "
          f"built in {time.perf_counter() - t_start:.1f} s", flush=True)
    if a.num_warmups:
        wplan = ChatPlan(**{**plan.__dict__, "num_prompts": a.num_warmups, "request_rate": None,
                            "seed": a.seed + 100_003})
        wreqs = draw_requests(wplan)
        wb, _ = build_payloads(wreqs, a.model, wplan.seed, a.vocab_words, a.workers)
        wouts, _, _ = asyncio.run(run_requests(a.base_url, wb, [0.0] * len(wb), a.max_concurrency, a.timeout_s))
        bad = [o.error for o in wouts if not o.success]
        print(f"[chat_bench] {len(wouts)} warm-up requests, {len(bad)} failed", flush=True)
        if bad:
            print(f"[chat_bench] first warm-up error: {bad[0]}", flush=True)
    rids = [f"{a.request_id_prefix}{r.index}" for r in reqs] if a.request_id_prefix else None
    outs, dur, origin = asyncio.run(run_requests(a.base_url, bodies, [r.arrival_s for r in reqs],
                                                 a.max_concurrency, a.timeout_s, rids))
    res = build_result(plan, reqs, outs, dur, sizes, tok, a.model, a.tokenizer or a.model,
                       a.max_concurrency, origin)
    if rids is not None:
        res["request_ids"] = rids
    out_dir = Path(a.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / a.result_filename, res)
    print(f"[chat_bench] {res['completed']}/{len(reqs)} completed in {dur:.1f} s: "
          f"{res['request_throughput']:.2f} req/s, median TTFT {res['median_ttft_ms']:.0f} ms, "
          f"median TPOT {res['median_tpot_ms']:.1f} ms, prompt-token mismatches "
          f"{res['prompt_tokens_mismatches']}", flush=True)
    errs = [e for e in res["errors"] if e]
    if errs:
        print(f"[chat_bench] first error: {errs[0][:500]}", flush=True)
    return 0 if res["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
