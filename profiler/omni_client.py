"""Image-serving load client for vLLM-Omni's OpenAI image API: requests drawn the way the
simulator draws them, sent open-loop on a Poisson / Gamma schedule (or one at a time), every
outcome recorded.

Requests (`draw_requests`): image sides from the workload's Pareto law and aspect ratios
(`sim.workloads.laws.sample_image_sizes`, conf/workload/<name>.yaml `image:`), prompt lengths from its
`image_prompt_tokens` law (`sim.workloads.laws.sample_lengths`), inter-arrival gaps Gamma(k, 1/(rate k))
(`sim.workloads.laws.gamma_arrivals`, k = 1 Poisson, k < 1 bursty, as `vllm bench serve --burstiness`),
denoising steps drawn uniformly from a list. Each concern has its own named stream
(`sim.rng.stream`), so one seed gives the same requests whatever else changes.
Edit requests take an input image of the drawn size and ask for an output of the same size (the
simulator's convention; vLLM-Omni's `size=auto` does the same).

Outcomes (`run_requests`): per request the scheduled and actual send times (seconds from the
run's start, `time.perf_counter`), latency to the last response byte, HTTP status (-1: no
response, -2: cancelled at the deadline), the error text, the response size, and the server's
own `metrics` (`stage_durations`, `peak_memory_mb`) when the response carries them. A failure or
an out-of-memory answer is a row like any other, never dropped.
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from profiler.omni_models import PROMPT_WORDS

ROOT = Path(__file__).resolve().parents[1]
CONF_WORKLOAD = ROOT / "conf" / "workload"
STATUS_NO_RESPONSE = -1
STATUS_CANCELLED = -2
ERROR_TEXT_MAX = 400


@dataclass
class ImageRequest:
    """One request as sent: what the simulator's trace needs plus what the API needs."""
    index: int
    task: str                      # generate | edit
    arrival_s: float               # scheduled send time, s from the run's start
    height: int                    # output image
    width: int
    steps: int
    cfg: bool                      # true CFG (a negative prompt is sent)
    prompt_words: int
    seed: int                      # per-request sampling seed (also identifies it in the stage log)
    input_height: Optional[int] = None
    input_width: Optional[int] = None
    prompt: str = field(default="", repr=False)


@dataclass
class WorkloadLaw:
    """The image-size and prompt-length laws of a workload yaml, plus the step choices."""
    image: dict[str, Any]
    prompt_tokens: dict[str, Any]
    steps: tuple[int, ...]
    name: str = "mixed_bursty"

    @classmethod
    def from_yaml(cls, name: str, steps: tuple[int, ...], max_side: Optional[int] = None) -> "WorkloadLaw":
        import yaml
        path = CONF_WORKLOAD / f"{name}.yaml"
        if not path.exists():
            raise ValueError(f"--workload={name!r}: {path} does not exist; allowed: "
                             f"{sorted(p.stem for p in CONF_WORKLOAD.glob('*.yaml'))}")
        raw = yaml.safe_load(path.read_text()) or {}
        from sim.config import ImageSizeConfig, LengthDist
        image = asdict(ImageSizeConfig(**(raw.get("image") or {})))
        if max_side is not None:
            image["max"] = int(max_side)
        prompt = asdict(LengthDist(**(raw.get("image_prompt_tokens") or
                                      {"dist": "lognormal", "mean": 60, "cv": 0.6, "min": 4, "max": 512})))
        if not steps or any(int(s) < 1 for s in steps):
            raise ValueError(f"steps={steps!r} is invalid; allowed: a non-empty list of integers >= 1")
        return cls(image=image, prompt_tokens=prompt, steps=tuple(int(s) for s in steps), name=name)


def make_prompt(n_words: int, rng: np.random.Generator) -> str:
    """n words of PROMPT_WORDS after a leading space: exactly n tokens in the Qwen2 tokenizer of
    profiler.omni_models (each word is one "Ġword" token)."""
    idx = rng.integers(0, len(PROMPT_WORDS), size=max(0, n_words))
    return " " + " ".join(PROMPT_WORDS[i] for i in idx)


def draw_requests(task: str, n: int, rate: Optional[float], burstiness: float, seed: int,
                  law: WorkloadLaw, cfg: bool, max_prompt_words: int = 1000) -> list[ImageRequest]:
    """n requests of one task. rate None: all scheduled at 0 (sequential runs ignore the times)."""
    from sim.config import ImageSizeConfig, LengthDist
    from sim.rng import stream
    from sim.workloads.laws import gamma_arrivals, sample_image_sizes, sample_lengths
    if task not in ("generate", "edit"):
        raise ValueError(f"task={task!r} is invalid; allowed: generate, edit")
    if n < 0:
        raise ValueError(f"n={n} is invalid; allowed: >= 0")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate={rate!r} is invalid; allowed: > 0 requests/s or None")
    img = ImageSizeConfig(**law.image)
    img.check()
    pl = LengthDist(**law.prompt_tokens)
    pl.check("image_prompt_tokens")
    t = (gamma_arrivals(n, rate, burstiness, stream(seed, "arrivals")) if rate is not None
         else np.zeros(n))
    h, w = sample_image_sizes(img, n, stream(seed, "images.output" if task == "generate" else "images.input"))
    words = np.minimum(sample_lengths(pl, n, stream(seed, "lengths.image_prompt")), max_prompt_words)
    steps = np.asarray(law.steps)[stream(seed, "omni.steps").integers(0, len(law.steps), size=n)]
    prompt_rng = stream(seed, "omni.prompt_words")
    out = []
    for i in range(n):
        hi, wi = int(h[i]), int(w[i])
        r = ImageRequest(index=i, task=task, arrival_s=float(t[i]), height=hi, width=wi,
                         steps=int(steps[i]), cfg=bool(cfg), prompt_words=int(words[i]),
                         seed=int(seed) * 100_000 + i)
        if task == "edit":
            r.input_height, r.input_width = hi, wi
        r.prompt = make_prompt(r.prompt_words, prompt_rng)
        out.append(r)
    return out


def input_image_jpeg(height: int, width: int, seed: int = 0) -> bytes:
    """A smooth random picture as a JPEG (q=90): photo-like content and size for edit uploads."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------- sending

def _payload(r: ImageRequest, negative_prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": r.prompt, "size": f"{r.width}x{r.height}", "n": 1,
                            "num_inference_steps": r.steps, "seed": r.seed}
    if r.cfg:
        body["negative_prompt"] = negative_prompt
    return body


async def send_one(session: Any, base_url: str, r: ImageRequest, t0: float, image: Optional[bytes],
                   negative_prompt: str = " ", timeout_s: float = 3600.0) -> dict[str, Any]:
    """POST one request; returns its outcome row (never raises for HTTP or connection errors)."""
    import aiohttp
    body = _payload(r, negative_prompt)
    if r.task == "generate":
        url, kw = f"{base_url}/v1/images/generations", {"json": body}
    else:
        form = aiohttp.FormData()
        form.add_field("image", image or b"", filename="input.jpg", content_type="image/jpeg")
        for k, v in body.items():
            form.add_field(k, str(v))
        url, kw = f"{base_url}/v1/images/edits", {"data": form}
    row: dict[str, Any] = {"index": r.index, "sent_s": None, "latency_s": None, "status": None,
                           "error": "", "response_bytes": 0, "stage_durations": None,
                           "peak_memory_mb": None, "wall_sent": None}
    row["wall_sent"] = time.time()
    start = time.perf_counter()
    row["sent_s"] = start - t0
    try:
        async with session.post(url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kw) as resp:
            data = await resp.read()
            row["latency_s"] = time.perf_counter() - start
            row["status"] = resp.status
            row["response_bytes"] = len(data)
            if resp.status == 200:
                try:
                    obj = json.loads(data)
                    m = obj.get("metrics") or {}
                    row["stage_durations"] = m.get("stage_durations")
                    row["peak_memory_mb"] = m.get("peak_memory_mb")
                    if not obj.get("data"):
                        row["error"] = "200 without images"
                except ValueError as e:
                    row["error"] = f"unparsable 200 body: {e}"[:ERROR_TEXT_MAX]
            else:
                row["error"] = data.decode("utf-8", "replace")[:ERROR_TEXT_MAX]
    except asyncio.CancelledError:      # the run's deadline: the row says so, nothing is lost
        row["status"] = STATUS_CANCELLED
        row["error"] = f"cancelled at the run deadline after {time.perf_counter() - start:.3f} s"
    except Exception as e:  # noqa: BLE001 - a connection error is an outcome, recorded
        row["latency_s"] = time.perf_counter() - start
        row["status"] = STATUS_NO_RESPONSE
        row["error"] = f"{type(e).__name__}: {e}"[:ERROR_TEXT_MAX]
    return row


async def run_requests(base_url: str, reqs: list[ImageRequest], *, sequential: bool = False,
                       deadline_s: Optional[float] = None, negative_prompt: str = " ",
                       images: Optional[dict[tuple[int, int], bytes]] = None,
                       timeout_s: float = 3600.0) -> dict[str, Any]:
    """Sends `reqs` and waits for every answer (or the deadline, seconds from the start).

    Open loop: request i is sent at its `arrival_s` whatever is still in flight. Sequential: one
    at a time, each as soon as the previous one answered (zero-load latency). At the deadline,
    requests not yet sent are recorded as never sent (status None, sent_s None) and those in
    flight as cancelled (status -2). Returns {"t0_wall", "rows", "duration_s"}."""
    import aiohttp
    images = images or {}
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    rows: dict[int, dict[str, Any]] = {}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        t0_wall = time.time()
        end = None if deadline_s is None else t0 + deadline_s

        def img(r: ImageRequest) -> Optional[bytes]:
            return images.get((r.input_height, r.input_width)) if r.task == "edit" else None

        async def one(r: ImageRequest) -> None:
            rows[r.index] = await send_one(session, base_url, r, t0, img(r), negative_prompt, timeout_s)

        tasks: list[asyncio.Task] = []
        try:
            if sequential:
                for r in reqs:
                    if end is not None and time.perf_counter() >= end:
                        break
                    task = loop.create_task(one(r))
                    tasks.append(task)
                    left = None if end is None else max(0.0, end - time.perf_counter())
                    done, _ = await asyncio.wait({task}, timeout=left)
                    if not done:
                        break
            else:
                for r in reqs:
                    due = t0 + r.arrival_s
                    now = time.perf_counter()
                    if end is not None and due >= end:
                        break
                    if due > now:
                        await asyncio.sleep(due - now)
                    tasks.append(loop.create_task(one(r)))
                pending = {t for t in tasks if not t.done()}
                if pending:
                    left = None if end is None else max(0.0, end - time.perf_counter())
                    await asyncio.wait(pending, timeout=left)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - t0
    for r in reqs:      # rows of cancelled tasks are gone with the task: rebuild them
        if r.index not in rows:
            rows[r.index] = {"index": r.index, "sent_s": None, "latency_s": None,
                             "status": None, "error": "not sent before the run deadline",
                             "response_bytes": 0, "stage_durations": None, "peak_memory_mb": None,
                             "wall_sent": None}
    out = []
    for r in reqs:
        out.append(rows[r.index])
    return {"t0_wall": t0_wall, "rows": out, "duration_s": duration}


# ----------------------------------------------------------------------------- results

def percentile(xs: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no data."""
    return float(np.percentile(np.asarray(xs, dtype=float), p)) if xs else math.nan


def summarize(reqs: list[ImageRequest], rows: list[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """`vllm bench serve`-style summary keys over the completed (HTTP 200) requests."""
    good = [row["status"] == 200 and not row["error"] for row in rows]
    ok = [row for row, g in zip(rows, good) if g]
    lat_ms = [row["latency_s"] * 1e3 for row in ok]
    sent = [row for row in rows if row["sent_s"] is not None]
    if ok:
        # duration: from the first send to the last completion, as vLLM measures a run
        first = min(row["sent_s"] for row in sent)
        last = max(row["sent_s"] + row["latency_s"] for row in ok)
        dur = max(last - first, 1e-9)
    else:
        dur = duration_s
    return {
        "duration": dur, "num_prompts": len(reqs), "completed": len(ok),
        "failed": len(sent) - len(ok), "not_sent": len(rows) - len(sent),
        "request_throughput": len(ok) / dur if dur > 0 else math.nan,
        "mean_e2el_ms": float(np.mean(lat_ms)) if lat_ms else math.nan,
        "median_e2el_ms": percentile(lat_ms, 50), "std_e2el_ms": float(np.std(lat_ms)) if lat_ms else math.nan,
        "p90_e2el_ms": percentile(lat_ms, 90), "p99_e2el_ms": percentile(lat_ms, 99),
        "output_pixels_per_s": sum(r.height * r.width for r, g in zip(reqs, good) if g) / dur
        if dur > 0 else math.nan,
    }


def columns(reqs: list[ImageRequest], rows: list[dict[str, Any]], model: str) -> dict[str, list[Any]]:
    """Per-request columns (one list per field, request order). The first names are the
    simulator's trace columns (sim/traces.py ALIASES), so a run is a replayable trace as is."""
    def col(f):
        return [f(r, row) for r, row in zip(reqs, rows)]
    return {
        "arrival_time": col(lambda r, w: r.arrival_s),
        "task": col(lambda r, w: r.task),
        "model": col(lambda r, w: model),
        "prompt_tokens": col(lambda r, w: r.prompt_words),
        "image_height": col(lambda r, w: r.input_height),
        "image_width": col(lambda r, w: r.input_width),
        "output_height": col(lambda r, w: r.height),
        "output_width": col(lambda r, w: r.width),
        "steps": col(lambda r, w: r.steps),
        "cfg": col(lambda r, w: r.cfg),
        "seed": col(lambda r, w: r.seed),
        "sent_s": col(lambda r, w: None if w["sent_s"] is None else round(w["sent_s"], 6)),
        "latency_s": col(lambda r, w: None if w["latency_s"] is None else round(w["latency_s"], 6)),
        "status": col(lambda r, w: w["status"]),
        "error": col(lambda r, w: w["error"]),
        "response_bytes": col(lambda r, w: w["response_bytes"]),
        "stage_durations": col(lambda r, w: w["stage_durations"]),
        "peak_memory_mb": col(lambda r, w: w["peak_memory_mb"]),
        "wall_sent": col(lambda r, w: None if w["wall_sent"] is None else round(w["wall_sent"], 6)),
    }
