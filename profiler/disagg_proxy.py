"""The proxy in front of several `vllm serve` instances on one host: encoder disaggregation
(E -> PD, E -> P -> D), prefill/decode disaggregation (P -> D) and plain replicas, with every
request's hops timed.

    python -m profiler.disagg_proxy --port 8000 --encode http://127.0.0.1:8101 \
        --decode http://127.0.0.1:8102 --log proxy.jsonl

It speaks the protocol of vLLM's own example proxies (examples/online_serving/
disaggregated_encoder/disagg_epd_proxy.py and disaggregated_prefill's toy proxy; the 0.26.0
wheel ships neither):
1. a request with images (an `image_url` part) goes first to an encoder instance (`--mm-encoder-
   only`, encoder-cache producer) as a non-streaming copy with max_tokens = 1: the encoder runs,
   its connector saves the embeddings, the reply is discarded;
2. with prefill instances (`--prefill`), the same non-streaming max_tokens = 1 copy goes to one,
   with kv_transfer_params {do_remote_decode: true}; the kv_transfer_params of its reply (NIXL:
   where the KV blocks are) ride on the final request;
3. the original request goes to a decode (or prefill+decode, or replica) instance and its
   response is streamed back unchanged.
Instances of a role are chosen round-robin (a replay uses policy.router=round_robin).

Every request appends one JSON line to --log: request id (the client's x-request-id header,
else a counter), wall-clock arrival, image count, and per hop the instance, start and end
offsets from the arrival (s) and HTTP status; `first_byte_s` / `end_s` of the streamed reply.
profiler.disagg_bench turns these into the measured hand-off times of each run.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

MM_TYPES = ("image_url", "audio_url", "input_audio", "video_url")


def has_mm_input(body: dict[str, Any]) -> bool:
    """Does any message carry an image/audio/video part (what the example proxy checks)?"""
    for m in body.get("messages") or ():
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in MM_TYPES
                                             for p in content):
            return True
    return False


def one_token_copy(body: dict[str, Any], kv_params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The non-streaming, one-output-token copy sent to an encoder or prefill instance (vLLM's
    example proxies: max_tokens = 1, stream off, no stream_options). min_tokens is dropped (it
    may not exceed max_tokens)."""
    out = copy.deepcopy(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out.pop("min_tokens", None)
    out["stream"] = False
    out.pop("stream_options", None)
    if kv_params is not None:
        out["kv_transfer_params"] = kv_params
    return out


PREFILL_KV_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                     "remote_block_ids": None, "remote_host": None, "remote_port": None}


class Proxy:
    def __init__(self, encode: list[str], prefill: list[str], decode: list[str],
                 log_path: Optional[Path] = None):
        if not decode:
            raise ValueError("--decode: at least one instance (decode, prefill+decode or replica)")
        self.encode, self.prefill, self.decode = encode, prefill, decode
        self._rr = {k: itertools.cycle(v) for k, v in (("e", encode), ("p", prefill), ("d", decode)) if v}
        self._ids = itertools.count()
        self.log_path = log_path
        self._log = open(log_path, "a", buffering=1) if log_path else None
        self.session = None

    def pick(self, role: str) -> str:
        return next(self._rr[role])

    def write(self, rec: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(rec) + "\n")

    async def _one_shot(self, url: str, body: dict[str, Any], rid: str) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{url}/v1/chat/completions", json=body,
                                     headers={"x-request-id": rid}) as r:
            text = await r.text()
            try:
                obj = json.loads(text) if text else {}
            except ValueError:
                obj = {"raw": text[:500]}
            return r.status, obj

    async def chat(self, request):
        from aiohttp import web
        t_arr = time.perf_counter()
        wall = time.time()
        body = await request.json()
        rid = request.headers.get("x-request-id") or f"proxy-{next(self._ids)}"
        rec: dict[str, Any] = {"rid": rid, "t_arrive": wall, "images": 0, "hops": []}
        mm = has_mm_input(body)
        if mm:
            rec["images"] = sum(1 for m in body.get("messages") or () if isinstance(m.get("content"), list)
                                for p in m["content"] if isinstance(p, dict) and p.get("type") in MM_TYPES)

        def fail(status: int, msg: str):
            rec.update(status=status, error=msg[:500], end_s=time.perf_counter() - t_arr)
            self.write(rec)
            return web.json_response({"error": {"message": msg[:500], "code": status}}, status=status)

        try:
            if mm and self.encode:
                url = self.pick("e")
                t0 = time.perf_counter() - t_arr
                st, _ = await self._one_shot(url, one_token_copy(body), rid)
                rec["hops"].append({"role": "encode", "url": url, "start_s": t0,
                                    "end_s": time.perf_counter() - t_arr, "status": st})
                if st != 200:
                    return fail(502, f"encoder {url} answered {st}")
            if self.prefill:
                url = self.pick("p")
                t0 = time.perf_counter() - t_arr
                st, obj = await self._one_shot(url, one_token_copy(body, dict(PREFILL_KV_PARAMS)), rid)
                rec["hops"].append({"role": "prefill", "url": url, "start_s": t0,
                                    "end_s": time.perf_counter() - t_arr, "status": st})
                if st != 200:
                    return fail(502, f"prefill {url} answered {st}")
                if obj.get("kv_transfer_params"):
                    body = dict(body, kv_transfer_params=obj["kv_transfer_params"])
            url = self.pick("d")
            t0 = time.perf_counter() - t_arr
            hop = {"role": "decode", "url": url, "start_s": t0}
            rec["hops"].append(hop)
            async with self.session.post(f"{url}/v1/chat/completions", json=body,
                                         headers={"x-request-id": rid}) as r:
                hop["status"] = r.status
                resp = web.StreamResponse(status=r.status, headers={
                    "Content-Type": r.headers.get("Content-Type", "text/event-stream")})
                await resp.prepare(request)
                first = None
                async for chunk in r.content.iter_any():
                    if first is None:
                        first = time.perf_counter() - t_arr
                    await resp.write(chunk)
                await resp.write_eof()
            end = time.perf_counter() - t_arr
            hop["end_s"] = end
            rec.update(status=hop["status"], first_byte_s=first, end_s=end)
            self.write(rec)
            return resp
        except Exception as e:  # noqa: BLE001 - the client gets an error, the log says which hop
            return fail(502, f"{type(e).__name__}: {e}")

    async def health(self, _request):
        from aiohttp import web
        out, ok = {}, True
        for url in dict.fromkeys(self.encode + self.prefill + self.decode):
            try:
                async with self.session.get(f"{url}/health") as r:
                    out[url] = r.status
                    ok &= r.status == 200
            except Exception as e:  # noqa: BLE001
                out[url], ok = str(e)[:100], False
        return web.json_response(out, status=200 if ok else 503)

    async def models(self, _request):
        from aiohttp import web
        async with self.session.get(f"{self.decode[0]}/v1/models") as r:
            return web.json_response(await r.json(), status=r.status)

    def app(self):
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        async def start(_app):
            self.session = ClientSession(timeout=ClientTimeout(total=None, sock_read=3600),
                                         connector=TCPConnector(limit=0, keepalive_timeout=60))

        async def stop(_app):
            if self.session is not None:
                await self.session.close()
            if self._log is not None:
                self._log.close()

        a = web.Application(client_max_size=1 << 30)
        a.router.add_post("/v1/chat/completions", self.chat)
        a.router.add_get("/health", self.health)
        a.router.add_get("/v1/models", self.models)
        a.on_startup.append(start)
        a.on_cleanup.append(stop)
        return a


def urls(s: Optional[str]) -> list[str]:
    return [u.strip().rstrip("/") for u in (s or "").split(",") if u.strip() and u.strip() != "disable"]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.disagg_proxy", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--encode", default="", help="comma list of encoder instances (empty: no E stage)")
    ap.add_argument("--prefill", default="", help="comma list of prefill instances (empty: no P stage)")
    ap.add_argument("--decode", required=True,
                    help="comma list of decode / prefill+decode / replica instances")
    ap.add_argument("--log", default=None, help="JSON lines, one per request")
    a = ap.parse_args(argv)
    from aiohttp import web
    p = Proxy(urls(a.encode), urls(a.prefill), urls(a.decode), Path(a.log) if a.log else None)
    print(f"[disagg_proxy] :{a.port} encode={p.encode} prefill={p.prefill} decode={p.decode}", flush=True)
    web.run_app(p.app(), host=a.host, port=a.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
