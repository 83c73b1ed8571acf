"""A stand-in for `vllm serve <dir> --omni` (vLLM-Omni's OpenAI image API) for CPU tests.

Run as the `vllm` CLI: `python fake_omni_server.py serve <dir> --omni --host H --port P [...]`.
Semantics kept from vLLM-Omni 0.26.0: its request scheduler (FIFO; batches of consecutive
same-shape requests up to --max-num-seqs, default 1; the --request-batch-max-wait-ms admission
wait, default 0), /health, /v1/images/generations (JSON) and
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
    """vLLM-Omni's RequestScheduler semantics: a FIFO waiting queue; a batch starts from the head
    and takes the following requests while they share the head's shape key (height, width, steps,
    CFG), up to max_num_seqs (head-of-line: the first different one stops it); before a batch, an
    admission wait of up to max_wait_ms that ends early once the queue is full or has been
    stable for min(50 ms, max_wait/5) (vllm_omni/diffusion/diffusion_engine.py:466-520).
    A batch of B costs service_s * (1 + 0.5 (B - 1))."""

    def __init__(self, max_num_seqs: int = 1, max_wait_ms: float = 0.0) -> None:
        self.max_num_seqs, self.max_wait_s = max(1, max_num_seqs), max_wait_ms / 1000.0
        self.waiting: list[tuple[tuple, dict, asyncio.Future]] = []
        self.wake = asyncio.Event()
        self.stagelog = os.environ.get("MMSIM_OMNI_STAGELOG")
        self.task: asyncio.Task | None = None

    def submit(self, kind: str, h: int, w: int, steps: int, seed: int, cfg: bool) -> asyncio.Future:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.loop())
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(((h, w, steps, cfg), dict(kind=kind, h=h, w=w, steps=steps, seed=seed, cfg=cfg), fut))
        self.wake.set()
        return fut

    async def admission(self) -> None:
        if self.max_wait_s <= 0:
            return
        start = stable = time.monotonic()
        last, window = -1, min(0.05, self.max_wait_s / 5)
        while True:
            now, n = time.monotonic(), len(self.waiting)
            if n >= self.max_num_seqs or (n > 0 and now - stable >= window) or now - start >= self.max_wait_s:
                return
            if n > last:
                stable, last = now, n
            await asyncio.sleep(0.002)

    async def loop(self) -> None:
        while True:
            while not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            await self.admission()
            key = self.waiting[0][0]
            batch = []
            while self.waiting and len(batch) < self.max_num_seqs and self.waiting[0][0] == key:
                batch.append(self.waiting.pop(0))
            await self.run(batch)

    async def run(self, batch: list) -> None:
        (h, w, steps, cfg), p0, _ = batch[0]
        t0 = time.time()
        if max(h, w) > OOM_SIDE:
            for _, _, fut in batch:
                fut.set_exception(MemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
            return
        s = service_s(h, w, steps, cfg) * (1 + 0.5 * (len(batch) - 1))
        await asyncio.sleep(s)
        t1 = time.time()
        stages = {"FakePipeline.text_encoder.forward": 0.1 * s, "FakePipeline.diffuse": 0.8 * s,
                  "FakePipeline.vae.decode": 0.1 * s, "FakePipeline.text_encoder_2.forward": 0.02 * s}
        if p0["kind"] == "edit":
            stages["FakePipeline.vae.encode"] = 0.05 * s
        if self.stagelog:
            rec = {"request_ids": [f"img_{p['kind']}-{p['seed']}" for _, p, _ in batch],
                   "batch_size": len(batch), "seeds": [p["seed"] for _, p, _ in batch],
                   "height": h, "width": w, "num_inference_steps": steps,
                   "negative_prompt": [p["cfg"] for _, p, _ in batch], "t_start": t0, "t_end": t1,
                   "forward_s": t1 - t0, "pipeline": "Fake", "stage_durations": stages}
            with open(self.stagelog, "a") as f:
                f.write(json.dumps(rec) + "\n")
        for _, p, fut in batch:
            fut.set_result(dict(stages, **{"fake.cfg_passes": 2 if p["cfg"] else 1, "fake.steps": steps,
                                           "fake.batch": len(batch)}))


def size_of(s: str) -> tuple[int, int]:
    w, h = (int(x) for x in s.split("x"))
    return h, w


def make_app(max_num_seqs: int = 1, max_wait_ms: float = 0.0) -> web.Application:
    eng = Engine(max_num_seqs, max_wait_ms)

    async def health(_req: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def generations(req: web.Request) -> web.Response:
        body = await req.json()
        h, w = size_of(body["size"])
        try:
            stages = await eng.submit("gen", h, w, int(body.get("num_inference_steps") or 50),
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
            await eng.submit("edit", h, w, int(form.get("num_inference_steps") or 50),
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
    def opt(name: str, default: str) -> str:
        return argv[argv.index(name) + 1] if name in argv else default
    port = int(opt("--port", "8091"))
    seqs, wait = int(opt("--max-num-seqs", "1")), float(opt("--request-batch-max-wait-ms", "0.0"))
    print(f"INFO [RequestBatch] engine init max_num_seqs={seqs} max_wait_ms={wait}", flush=True)
    print("INFO Defaulting to diffusion attention backend FLASH_ATTN (fake)", flush=True)
    web.run_app(make_app(seqs, wait), host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
