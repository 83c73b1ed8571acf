"""Image + text chat requests for the VLM serving ground truth, drawn the way the simulator draws.

`draw_requests(plan)` gives the requests of one benchmark run: arrival offsets (vLLM's Gamma law,
`sim.workloads.laws.gamma_arrivals(..., vllm_scaling=True)`, as `vllm bench serve --request-rate R
--burstiness k` sends them; all at 0 for rate inf), the task (`understand` with images, or `text`
with a fraction `text_frac`), the user-text length (`prompt_tokens` law for text requests,
`image_prompt_tokens` for image requests), the output length (`output_tokens`, clipped to
`max_output`), and the images: 1..k per image request (`images_per_request` weights), sides from
the simulator's own image law (`sim.workloads.laws.sample_image_sizes`: Pareto heights, aspect ratios
from a set) or, for `image_law="mixed"`, 448^2 / 896^2 / 1344^2 squares mixed with that law, or
for `image_law="probe"` a fixed cycle of sizes. The laws come from `conf/workload/<workload>.yaml`
(default mixed_bursty, the default scenario). Every variable is drawn from its own named stream
(`sim.rng.stream`) for every request, so a seed fixes the run and the same seed gives the same
requests whatever the mix.

`synth_jpeg(h, w, seed)` makes one image: a smooth random colour field with fine noise, JPEG at
quality 90 (about 2.4 bits per pixel, like a photo), different pixels for every (run seed,
request, image), so vLLM's multimodal caches (keyed by a hash of the pixels) never hit and every
image is decoded, resized and encoded as a fresh upload would be.
"""
from __future__ import annotations

import base64
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIXED_SQUARES = (448, 896, 1344)
PROBE_SIZES = ((448, 448), (896, 896), (1344, 1344), (1792, 1792))


@dataclass
class ChatPlan:
    """What one run sends (everything a replay needs is either here or recorded per request)."""
    num_prompts: int
    request_rate: Optional[float] = None      # None = inf (all at once)
    burstiness: float = 1.0
    seed: int = 0
    text_frac: float = 0.25                   # share of text-only requests
    image_law: str = "workload"               # workload | mixed | probe
    images_per_request: dict[int, float] = field(default_factory=lambda: {1: 0.75, 2: 0.2, 3: 0.05})
    max_output: int = 1024                    # clip of the output law (bench wall time)
    fixed_text: Optional[int] = None          # probe: user text length
    fixed_output: Optional[int] = None        # probe: output length
    workload: str = "mixed_bursty"            # conf/workload/<name>.yaml: the laws
    mixed_square_frac: float = 0.75           # image_law=mixed: share of 448/896/1344 squares

    def check(self) -> None:
        from sim.config import ConfigError
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts={self.num_prompts} is invalid; allowed: >= 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ConfigError(f"request_rate={self.request_rate} is invalid; allowed: > 0 or inf")
        if not self.burstiness > 0:
            raise ConfigError(f"burstiness={self.burstiness} is invalid; allowed: > 0")
        if not 0.0 <= self.text_frac <= 1.0:
            raise ConfigError(f"text_frac={self.text_frac} is invalid; allowed: 0 <= text_frac <= 1")
        if self.image_law not in ("workload", "mixed", "probe"):
            raise ConfigError(f"image_law={self.image_law!r} is invalid; allowed: workload, mixed, probe")
        if not self.images_per_request or any(int(k) < 1 or v < 0 for k, v in self.images_per_request.items()) \
                or sum(self.images_per_request.values()) <= 0:
            raise ConfigError(f"images_per_request={self.images_per_request} is invalid; allowed: "
                              f"{{count >= 1: weight >= 0}} with a positive sum")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_request"] = {str(k): v for k, v in self.images_per_request.items()}
        return d


@dataclass
class ChatRequest:
    index: int
    arrival_s: float                          # offset from the first send's schedule origin
    task: str                                 # text | understand
    text_tokens: int                          # user text, in tokens of the served tokenizer
    output_tokens: int
    images: list[tuple[int, int]]             # (height, width) per image, in order


def workload_laws(name: str = "mixed_bursty"):
    """(prompt_tokens, image_prompt_tokens, output_tokens, image) laws of a workload yaml, over
    sim.config's defaults (the same defaults the simulator fills in)."""
    from sim.config import ImageSizeConfig, LengthDist, WorkloadConfig
    cfg = WorkloadConfig()
    raw: dict[str, Any] = {}
    p = ROOT / "conf" / "workload" / f"{name}.yaml"
    if p.exists():
        import yaml
        raw = yaml.safe_load(p.read_text()) or {}
    def law(key: str) -> LengthDist:
        base = getattr(cfg, key)
        return LengthDist(**{**base.__dict__, **(raw.get(key) or {})})
    img = ImageSizeConfig(**{**cfg.image.__dict__, **(raw.get("image") or {})})
    return law("prompt_tokens"), law("image_prompt_tokens"), law("output_tokens"), img


def draw_requests(plan: ChatPlan) -> list[ChatRequest]:
    """The requests of one run, in send order (deterministic in `plan`)."""
    from sim.rng import stream
    from sim.workloads.laws import gamma_arrivals, sample_image_sizes, sample_lengths
    plan.check()
    n, seed = plan.num_prompts, plan.seed
    p_law, ip_law, o_law, img_law = workload_laws(plan.workload)
    if plan.request_rate is None:
        t = np.zeros(n)
    else:
        t = gamma_arrivals(n, plan.request_rate, plan.burstiness, stream(seed, "chat.arrivals"),
                           vllm_scaling=True)
    is_text = stream(seed, "chat.tasks").random(n) < plan.text_frac
    p_text = sample_lengths(p_law, n, stream(seed, "chat.lengths.prompt"))
    p_img = sample_lengths(ip_law, n, stream(seed, "chat.lengths.image_prompt"))
    out = np.minimum(sample_lengths(o_law, n, stream(seed, "chat.lengths.output")), plan.max_output)
    counts = sorted((int(k), float(v)) for k, v in plan.images_per_request.items())
    cum = np.cumsum([v for _, v in counts])
    kidx = np.searchsorted(cum / cum[-1], stream(seed, "chat.images.count").random(n), side="right")
    k_img = np.array([counts[min(i, len(counts) - 1)][0] for i in kidx])
    kmax = max(k for k, _ in counts)
    ih, iw = sample_image_sizes(img_law, n * kmax, stream(seed, "chat.images.size"))
    ih, iw = ih.reshape(n, kmax), iw.reshape(n, kmax)
    if plan.image_law == "mixed":
        u = stream(seed, "chat.images.mixed").random((n, kmax, 2))
        sq = np.array(MIXED_SQUARES)[np.minimum((u[..., 1] * len(MIXED_SQUARES)).astype(int), len(MIXED_SQUARES) - 1)]
        use = u[..., 0] < plan.mixed_square_frac
        ih, iw = np.where(use, sq, ih), np.where(use, sq, iw)
    reqs = []
    for i in range(n):
        text = bool(is_text[i])
        if plan.image_law == "probe":
            text = False
            imgs = [PROBE_SIZES[i % len(PROBE_SIZES)]]
        else:
            imgs = [] if text else [(int(ih[i, j]), int(iw[i, j])) for j in range(int(k_img[i]))]
        tt = int(p_text[i]) if text else int(p_img[i])
        if plan.fixed_text is not None:
            tt = plan.fixed_text
        ot = plan.fixed_output if plan.fixed_output is not None else int(out[i])
        reqs.append(ChatRequest(i, float(t[i]), "text" if text else "understand", tt, ot, imgs))
    return reqs


def prompt_text(text_tokens: int, seed: int, index: int, vocab_words: int) -> str:
    """`text_tokens` words `t<id>` (one token each under the served WordLevel tokenizer), ids
    drawn for (seed, request): the prompt of one request."""
    rng = np.random.default_rng([int(seed), int(index), 7])
    ids = rng.integers(0, vocab_words, size=int(text_tokens))
    return " ".join(f"t{i}" for i in ids.tolist())


def synth_jpeg(height: int, width: int, seed: tuple[int, ...], quality: int = 90) -> bytes:
    """A photo-like JPEG of exactly height x width: smooth random colours plus fine noise."""
    from PIL import Image
    rng = np.random.default_rng(list(seed))
    small = (rng.random((max(2, height // 32), max(2, width // 32), 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 13, size=img.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def image_data_url(height: int, width: int, seed: tuple[int, ...]) -> tuple[str, int]:
    """(data URL, JPEG bytes) of one synthetic image."""
    b = synth_jpeg(height, width, seed)
    return "data:image/jpeg;base64," + base64.b64encode(b).decode("ascii"), len(b)


def jpeg_size(data_url: str) -> tuple[int, int]:
    """(height, width) of a data-URL JPEG: what a server decodes (used by tests and checks)."""
    from PIL import Image
    raw = base64.b64decode(data_url.split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return im.height, im.width
