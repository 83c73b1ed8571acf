"""A stand-in for `vllm serve`'s OpenAI chat endpoint (streaming) for CPU tests of
profiler.chat_bench and serve_bench's image runs.

It counts prompt tokens the way the real server does with profiler.vlm_model's model dir: the
user text's whitespace words, the chat template's tokens (vlm_model.chat_overhead_tokens) and,
per image, the smart_resize tokens of the image it decodes from the data URL. It streams a role
chunk, then one chunk per output token `max_completion_tokens` (each `itl_s` apart, after a
first-token delay `ttft_s`), a usage chunk and [DONE], like vLLM 0.26.0. Every request it
received is kept (arrival time, decoded image sizes, token counts) and served at /debug/requests.

    python tests/fake_chat_server.py --port 8000      # also /health and /metrics
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from profiler.chat_requests import jpeg_size  # noqa: E402
from profiler.vlm_model import chat_overhead_tokens, image_tokens, vlm_shape  # noqa: E402


def make_app(state: dict):
    from aiohttp import web
    tok = vlm_shape("qwen2_5_vl_7b")["image_tokenizer"]

    async def health(_req):
        return web.Response(text="ok")

    async def metrics(_req):
        state["metrics_calls"] = state.get("metrics_calls", 0) + 1
        n = state["metrics_calls"]
        body = ('vllm:num_preemptions_total{engine="0"} %d\n'
                'vllm:cache_config_info{block_size="16",num_gpu_blocks="64000"} 1.0\n'
                'vllm:time_to_first_token_seconds_sum{engine="0"} %.3f\n'
                'vllm:time_to_first_token_seconds_count{engine="0"} %d\n' % (n, 0.02 * n, n))
        return web.Response(text=body)

    async def debug(_req):
        return web.json_response(state["requests"])

    async def chat(req):
        t_arr = time.perf_counter()
        body = await req.json()
        msgs = body["messages"]
        content = msgs[-1]["content"]
        if isinstance(content, str):
            text, sizes = content, []
        else:
            text = " ".join(p["text"] for p in content if p.get("type") == "text")
            sizes = [jpeg_size(p["image_url"]["url"]) for p in content if p.get("type") == "image_url"]
        n_text = len(text.split())
        prompt = n_text + chat_overhead_tokens(len(sizes)) + sum(image_tokens(h, w, tok) for h, w in sizes)
        n_out = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        state["requests"].append({"t": t_arr, "images": [list(s) for s in sizes], "text_tokens": n_text,
                                  "prompt_tokens": prompt, "max_tokens": n_out,
                                  "min_tokens": body.get("min_tokens"), "ignore_eos": body.get("ignore_eos"),
                                  "stream_options": body.get("stream_options")})
        if state.get("fail_every") and len(state["requests"]) % state["fail_every"] == 0:
            return web.json_response({"error": {"message": "injected failure"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)

        def chunk(obj) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()
        base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": body["model"]}
        await asyncio.sleep(state.get("ttft_s", 0.003) + state.get("ttft_per_token_s", 0.0) * prompt)
        await resp.write(chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
        for i in range(n_out):
            if i:
                await asyncio.sleep(state.get("itl_s", 0.001))
            fin = "length" if i == n_out - 1 else None
            await resp.write(chunk({**base, "choices": [{"index": 0, "delta": {"content": f" t{i}"},
                                                         "finish_reason": fin}]}))
        await resp.write(chunk({**base, "choices": [], "usage": {"prompt_tokens": prompt,
                                                                 "completion_tokens": n_out,
                                                                 "total_tokens": prompt + n_out}}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/requests", debug)
    app.router.add_post("/v1/chat/completions", chat)
    return app


@contextmanager
def serve_in_thread(port: int, **opts):
    """Run the fake server on 127.0.0.1:port in a daemon thread; yields its state dict."""
    from aiohttp import web
    state: dict = {"requests": [], **opts}
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(state))
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    assert ready.wait(10), "fake chat server did not start"
    try:
        yield state
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)


def main(argv=None) -> int:
    from aiohttp import web
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args(argv)
    web.run_app(make_app({"requests": []}), host="127.0.0.1", port=a.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
