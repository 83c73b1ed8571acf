"""A stand-in for `vllm serve <dir> --omni` (vLLM-Omni's OpenAI image API) for CPU tests.

Run as the `vllm` CLI: `python fake_omni_server.py serve <dir> --omni --host H --port P [...]`.
Semantics kept from vLLM-Omni 0.26.0 with its defaults: one request at a time in arrival order
(max_num_seqs 1, RequestScheduler FIFO), /health, /v1/images/generations (JSON) and
/v1/images/edits (multipart, the input image required), a `metrics` block with stage durations
on generations only, and one stage-log line per executed batch (as profiler/omni_pipelines.py
writes them) when MMSIM_OMNI_STAGELOG is set.

Service time (simulated, fast): FAKE_BASE_S + FAKE_PER_STEP_S * steps * (h*w / 512**2), times 2
with a negative prompt (two CFG passes). An output side above FAKE_OOM_SIDE answers HTTP 500
with a CUDA out-of-memory message, as the real server does when the worker runs out of memory.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time

from aiohttp import web

BASE_S = float(os.environ.get("FAKE_BASE_S", "0.01"))
PER_STEP_S = float(os.environ.get("FAKE_PER_STEP_S", "0.001"))
OOM_SIDE = int(os.environ.get("FAKE_OOM_SIDE", "100000"))
PNG_1PX = base64.b64encode(b"fake png bytes").decode()


def service_s(h: int, w: int, steps: int, cfg: bool) -> float:
    return BASE_S + PER_STEP_S * steps * (h * w / 512 ** 2) * (2 if cfg else 1)


class Engine:
    """FIFO, one request at a time (vLLM-Omni's default diffusion scheduler)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.stagelog = os.environ.get("MMSIM_OMNI_STAGELOG")

    async def run(self, kind: str, h: int, w: int, steps: int, seed: int, cfg: bool) -> dict:
        async with self.lock:          # asyncio.Lock wakes waiters in FIFO order
            t0 = time.time()
            if max(h, w) > OOM_SIDE:
                raise MemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            s = service_s(h, w, steps, cfg)
            await asyncio.sleep(s)
            t1 = time.time()
            stages = {"QwenImagePipeline.text_encoder.forward": 0.1 * s,
                      "QwenImagePipeline.diffuse": 0.8 * s, "QwenImagePipeline.vae.decode": 0.1 * s}
            if self.stagelog:
                rec = {"request_ids": [f"img_{kind}-{seed}"], "batch_size": 1, "seeds": [seed],
                       "height": h, "width": w, "num_inference_steps": steps,
                       "negative_prompt": [cfg], "t_start": t0, "t_end": t1, "forward_s": t1 - t0,
                       "pipeline": "Fake", "stage_durations": stages}
                with open(self.stagelog, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            return stages


def size_of(s: str) -> tuple[int, int]:
    w, h = (int(x) for x in s.split("x"))
    return h, w


def make_app() -> web.Application:
    eng = Engine()

    async def health(_req: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def generations(req: web.Request) -> web.Response:
        body = await req.json()
        h, w = size_of(body["size"])
        try:
            stages = await eng.run("gen", h, w, int(body.get("num_inference_steps") or 50),
                                   int(body.get("seed") or 0), body.get("negative_prompt") is not None)
        except MemoryError as e:
            return web.json_response({"detail": f"Image generation failed: {e}"}, status=500)
        return web.json_response({"created": int(time.time()), "data": [{"b64_json": PNG_1PX}],
                                  "output_format": "png", "size": body["size"],
                                  "metrics": {"stage_durations": stages, "peak_memory_mb": 1234.5}})

    async def edits(req: web.Request) -> web.Response:
        form = await req.post()
        img = form.get("image")
        if img is None or not img.file.read():
            return web.json_response({"detail": "Field 'image' or 'url' is required"}, status=422)
        h, w = size_of(form["size"])
        try:
            await eng.run("edit", h, w, int(form.get("num_inference_steps") or 50),
                          int(form.get("seed") or 0), form.get("negative_prompt") is not None)
        except MemoryError as e:
            return web.json_response({"detail": f"Image edit failed: {e}"}, status=500)
        return web.json_response({"created": int(time.time()), "data": [{"b64_json": PNG_1PX}],
                                  "output_format": "png", "size": form["size"]})

    app = web.Application(client_max_size=64 * 2 ** 20)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_post("/v1/images/edits", edits)
    return app


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "serve" or "--omni" not in argv:
        raise SystemExit(f"fake vllm: expected `serve <dir> --omni ...`, got {argv}")
    port = int(argv[argv.index("--port") + 1])
    print("INFO [RequestBatch] engine init max_num_seqs=1 max_wait_ms=0.0", flush=True)
    print("INFO Defaulting to diffusion attention backend FLASH_ATTN (fake)", flush=True)
    web.run_app(make_app(), host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
