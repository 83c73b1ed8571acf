"""OmniCosts (sim/engines/omni.py) read from a vLLM-Omni table set, hand-computed (issue 22).

One synthetic <gpu>-vllm-omni set beside the diffusers tables of tests/test_omni_engine.py,
with every kind of row profiler.omni_table writes for Qwen-Image (laws in ms, all (bi)linear so
the latency model reads them exactly):

    dit_step (batch 1, seq_len x num_tokens grid)   50 + 0.01 s + 0.004 t
    text_encode, component text_encoder (b 1-4)      3 + 0.002 b t
    vae_decode (b 1-2, extra.first_use_ms = 30)      5 + 1e-5 b p
    preprocess api_generate, three rows, no size     100, 120, 200      (median 120)
    preprocess api_edit, by input size               256^2: 60, 1024^2: 90
    preprocess pipeline_generate / pipeline_edit     8 / 100
    postprocess api, by output size                  256^2: 10, 1024^2: 70

Between two sized rows a law is linear in pixels: 512 x 512 (262,144 px) lies a fifth of the way
from 256^2 (65,536) to 1024^2 (1,048,576), so api_edit gives 66 ms there and api 22 ms;
512 x 1024 lies 7/15 of the way: api 38 ms.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import GPU, _row, prefill_ms, qwen_vl_rows
from profiler.schema import write_table
from sim.core.gpu import GPU as SimGPU
from sim.core.kernel import Kernel
from sim.core.records import Request
from sim.engines.latency import LatencyModel
from sim.engines.omni import (OmniCosts, OmniRequestEngine, OmniStepEngine, _spans_text,
                              qwen_geometry)
from test_omni_engine import qwen_image_rows

OMNI = f"{GPU}-vllm-omni"
SEQS, TEXTS = (64, 1024, 4096, 8192, 16384), (1, 64, 2048)


def omni_dit_ms(s, t):
    return 50.0 + 0.01 * s + 0.004 * t


def te_ms(b, t):
    return 3.0 + 0.002 * b * t


def omni_vae_ms(b, p):
    return 5.0 + 1e-5 * b * p


def vo(stage, ms, **axes):
    return dict(_row("qwen_image", stage, ms, **axes), engine="vllm-omni")


def dit_grid_rows():
    return [vo("dit_step", omni_dit_ms(s, t), batch_size=1, seq_len=s, num_tokens=t,
               component="transformer") for s in SEQS for t in TEXTS]


def omni_rows():
    rows = dit_grid_rows()
    rows += [vo("text_encode", te_ms(b, t), batch_size=b, num_tokens=t, component="text_encoder")
             for b in (1, 2, 4) for t in (16, 64, 256, 1024, 4096)]
    rows += [vo("vae_decode", omni_vae_ms(b, s * s), batch_size=b, height=s, width=s, component="vae",
                extra=json.dumps({"first_use_ms": 30.0})) for b in (1, 2) for s in (256, 512, 1024, 2048)]
    rows += [vo("preprocess", ms, batch_size=1, component="api_generate") for ms in (100.0, 200.0, 120.0)]
    rows += [vo("preprocess", ms, batch_size=1, height=s, width=s, component="api_edit")
             for s, ms in ((1024, 90.0), (256, 60.0))]
    rows += [vo("preprocess", 8.0, batch_size=1, component="pipeline_generate"),
             vo("preprocess", 100.0, batch_size=1, component="pipeline_edit")]
    rows += [vo("postprocess", ms, batch_size=1, height=s, width=s, component="api")
             for s, ms in ((256, 10.0), (1024, 70.0))]
    return rows


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """<root>/h100: diffusers + vLLM tables; h100-vllm-omni: the full set above;
    h100-pre-only: the dit grid and api_generate rows only; nodit: vLLM + the diffusers VAE rows,
    no transformer rows."""
    r = tmp_path_factory.mktemp("omni_costs")
    vl = pd.DataFrame(qwen_vl_rows())
    write_table(vl, r / GPU / "qwen2_5_vl_7b.parquet")
    write_table(pd.DataFrame(qwen_image_rows()), r / GPU / "qwen_image.parquet")
    write_table(pd.DataFrame(omni_rows()), r / OMNI / "qwen_image.parquet")
    pre = dit_grid_rows() + [vo("preprocess", 120.0, batch_size=1, component="api_generate")]
    write_table(pd.DataFrame(pre), r / "h100-pre-only" / "qwen_image.parquet")
    write_table(vl, r / "nodit" / "qwen2_5_vl_7b.parquet")
    write_table(pd.DataFrame([x for x in qwen_image_rows() if x["stage"] != "dit_step"]),
                r / "nodit" / "qwen_image.parquet")
    return r


def costs_of(root, omni=OMNI, gpu=GPU, **kw):
    return OmniCosts("qwen_image", LatencyModel(root, gpu), LatencyModel(root, omni) if omni else None, **kw)


def gen(i=0, h=512, w=512, p=59, steps=2, cfg=True):
    return Request(i, 0.0, "generate", "qwen_image", p, output_image=(h, w), steps=steps, cfg=cfg)


def edit(i=0, ih=256, iw=1024, h=512, w=512, p=59, steps=2, cfg=True):
    return Request(i, 0.0, "edit", "qwen_image", p, input_images=((ih, iw),), output_image=(h, w),
                   steps=steps, cfg=cfg)


# --- the API server's and the pipeline's laws (_row_law) ----------------------------------------------


def test_api_and_pipeline_times_are_the_tables_rows_in_seconds(root):
    """api_generate: the median of its rows (120 ms; their mean would be 140); api_edit by the
    input's pixels (height x width, not the output's), api by the output's; pipeline_<task>
    the prepare phase before the encode. Outside the sized rows the end row holds."""
    c = costs_of(root)
    j = c.job(gen())
    assert c.api_pre_s(j) == pytest.approx(0.120, rel=1e-12)
    assert c.api_post_s(j) == pytest.approx(0.022, rel=1e-12)            # 512 x 512 out
    assert c.prepare((j,))[0] == ("preprocess", pytest.approx(0.008, rel=1e-12))
    assert c.api_post_s(c.job(gen(h=512, w=1024))) == pytest.approx(0.038, rel=1e-12)
    assert c.api_post_s(c.job(gen(h=2048, w=2048))) == pytest.approx(0.070, rel=1e-12)
    e = c.job(edit(ih=256, iw=1024, h=1024, w=1024))                     # input 262,144 px
    assert c.api_pre_s(e) == pytest.approx(0.066, rel=1e-12)
    assert c.api_post_s(e) == pytest.approx(0.070, rel=1e-12)
    assert c.prepare((e,))[0] == ("preprocess", pytest.approx(0.100, rel=1e-12))
    assert c.api_pre_s(c.job(edit(ih=128, iw=128))) == pytest.approx(0.060, rel=1e-12)
    assert c.api_pre_s(c.job(edit(ih=2048, iw=1024))) == pytest.approx(0.090, rel=1e-12)


def test_without_api_rows_the_api_times_are_zero(root):
    for c in (costs_of(root, omni=None), costs_of(root, omni="h100-pre-only")):
        e = c.job(edit())
        assert c.api_pre_s(e) == 0.0 and c.api_post_s(e) == 0.0
        assert c.prepare((e,))[0][0] != "preprocess"          # no pipeline_edit row: no phase
    c = costs_of(root, omni="h100-pre-only")
    j = c.job(gen())
    assert c.api_pre_s(j) == pytest.approx(0.120, rel=1e-12) and c.api_post_s(j) == 0.0


def test_hops_work_has_no_pipeline_phase(root):
    """work="hops" (the other policies' work) has no vLLM-Omni pipeline CPU phase, even where
    the table has pipeline_<task> rows."""
    c = costs_of(root, work="hops")
    assert all(st != "preprocess" for st, _ in c.prepare((c.job(gen()),)))


# --- the condition encode beyond the table's batches, the transformer, the decode ----------------------


def test_text_encode_beyond_the_largest_measured_batch_scales_by_vllms_ratio(root):
    """text_encoder rows at batch 1, 2, 4: a batch of 4 reads them as measured; a batch of 8 is
    the batch-1 row times vLLM's prefill(8 x) / prefill(x), per pass (prompt 39 + 59 = 98
    tokens, negative prompt 40)."""
    c = costs_of(root)
    jobs = [c.job(gen(i)) for i in range(8)]
    assert c.encode(jobs[:4]) == [("prefill", pytest.approx((te_ms(4, 98) + te_ms(4, 40)) / 1e3, rel=1e-12))]
    want = sum(te_ms(1, x) * prefill_ms(8 * x) / prefill_ms(x) for x in (98, 40)) / 1e3
    assert c.encode(jobs) == [("prefill", pytest.approx(want, rel=1e-12))]


def test_qwen_geometry_of_generate_and_edit(root):
    """Generate: text stream prompt + 5, negative 1 + 5, no condition image (0 vision tokens).
    Edit (512 x 512 input -> 1024 x 1024 condition, 1,369 Qwen2.5-VL tokens): the template's 64
    tokens are dropped from both passes' text streams."""
    c = costs_of(root)
    g = qwen_geometry(c.spec, c.cond_spec, 59, (512, 512))
    assert (g.seq, g.text, g.neg_text, g.enc_tokens, g.neg_tokens, g.vision_tokens, g.cond) == (
        1024, 64, 6, 98, 40, 0, None)
    e = qwen_geometry(c.spec, c.cond_spec, 59, (512, 512), (512, 512))
    assert (e.seq, e.text, e.neg_text, e.enc_tokens, e.neg_tokens, e.vision_tokens, e.cond) == (
        1024 + 4096, 71 + 1369 + 59 - 64, 71 + 1369 + 1 - 64, 71 + 1369 + 59, 71 + 1369 + 1, 1369, (1024, 1024))


def test_edit_cfg_step_on_the_grid_reads_both_text_streams(root):
    c = costs_of(root)
    assert c.dit_text
    j = c.job(edit(ih=512, iw=512))
    want = omni_dit_ms(5120, 1435) + omni_dit_ms(5120, 1377)
    assert c.step((j,)) == pytest.approx(want / 1e3, rel=1e-12)


def test_a_batch_of_one_reads_only_the_vllm_omni_grid(root):
    """Batch 1 on the vLLM-Omni grid needs no batch ratio: the diffusers table is not read (here
    it has no transformer rows at all)."""
    c = costs_of(root, gpu="nodit")
    assert c.dit_text
    j = c.job(gen(cfg=True))
    assert c.step((j,)) == pytest.approx((omni_dit_ms(1024, 64) + omni_dit_ms(1024, 6)) / 1e3, rel=1e-12)


def test_first_decode_of_a_size_costs_first_use_ms_more(root):
    c = costs_of(root)
    assert c.first_use_s == pytest.approx(0.030, rel=1e-12)
    decoded = {(512, 512)}
    a, b = c.job(gen(0, 512, 512)), c.job(gen(1, 1024, 1024))
    assert c.decode((a,), decoded) == [("vae_decode", pytest.approx(omni_vae_ms(1, 512 * 512) / 1e3, rel=1e-12))]
    first = c.decode((b,), decoded)
    assert first == [("vae_decode", pytest.approx((omni_vae_ms(1, 1024 ** 2) + 30.0) / 1e3, rel=1e-12))]
    assert decoded == {(512, 512), (1024, 1024)}
    assert c.decode((b,), decoded) == [("vae_decode", pytest.approx(omni_vae_ms(1, 1024 ** 2) / 1e3, rel=1e-12))]
    assert costs_of(root, omni="h100-pre-only").first_use_s == 0.0       # no vae_decode rows there


def test_spans_text_looks_at_batch_one_transformer_rows_only(tmp_path):
    """Batch-1 rows at one text length and batch-2 rows at another do not form the image x
    text grid; nor do other stages' rows."""
    rows = [_row("qwen_image", "dit_step", 10.0, batch_size=b, seq_len=s, num_tokens=t)
            for b, t in ((1, 64), (2, 512)) for s in (256, 1024)]
    write_table(pd.DataFrame(rows), tmp_path / "x" / "qwen_image.parquet")
    assert not _spans_text(LatencyModel(tmp_path, "x"), "qwen_image")


def test_every_diffusion_model_sets_its_text_length():
    """OmniCosts.text_t0 falls back to 64 only for a model without request_defaults.text_tokens;
    every model with a transformer sets it (docs/mutation/equivalent.yaml relies on this)."""
    from profiler.models import available_models, load_model
    specs = [load_model(m) for m in available_models()]
    dit = [s for s in specs if "transformer" in s.components]
    assert len(dit) >= 5 and all(int(s.request_defaults["text_tokens"]) > 0 for s in dit)


# --- provenance -----------------------------------------------------------------------------------


def test_sources_name_the_table_of_each_stage_and_the_extras(root):
    full = costs_of(root).sources()
    assert full["vae_decode"].startswith("vllm-omni:") and "eager VAE" not in full["vae_decode"]
    assert "eager VAE" in full["vae_encode"]             # no vae_encode rows: the diffusers table
    around = full["around the stages"]
    assert around.startswith("vllm-omni:") and around.endswith(
        "(pipeline CPU work; API pre/postprocess; first decode of a size +30.0 ms)")
    pre = costs_of(root, omni="h100-pre-only").sources()
    assert pre["around the stages"].endswith("(API pre/postprocess)")     # api_generate alone
    assert pre["vae_decode"].startswith("synthetic:") and "eager VAE" in pre["vae_decode"]
    none = costs_of(root, omni=None).sources()
    assert "around the stages" not in none and "eager VAE" not in none["vae_decode"]


# --- the engines apply the API times as delays (api_delays) ---------------------------------------------


class Flow:
    __slots__ = ("req", "done", "then")

    def __init__(self, req, done, then=None):
        self.req, self.done, self.then = req, done, then

    def finish(self, now):
        self.done[self.req.id] = now
        if self.then is not None:
            self.then(now)


def run(engine, reqs):
    """Each (t, request) submitted at t; returns (done time by id, engine)."""
    env = Kernel()
    SimGPU(env, 0, 0).add(engine)
    done: dict[int, float] = {}
    for t, r in reqs:
        env.timer(t, lambda ev, r=r: engine.submit(Flow(r, done), env.now))
    env.run_all()
    return done


def lone_gen_ms():
    """A 512 x 512 generate, prompt 59, 2 steps, CFG, its size decoded before."""
    return (8.0 + te_ms(1, 98) + te_ms(1, 40) + 2 * (omni_dit_ms(1024, 64) + omni_dit_ms(1024, 6))
            + omni_vae_ms(1, 512 * 512))


@pytest.mark.parametrize("kind", ["request", "step"])
def test_api_delays_wrap_the_request_and_are_off_by_default(root, kind):
    """api_delays: the request reaches the queue 120 ms after it is sent (its first stage starts
    then) and is answered 22 ms after its decode ends; without the flag (the default) neither."""
    c = costs_of(root)
    make = OmniRequestEngine if kind == "request" else OmniStepEngine
    r = gen()
    done = run(make(c, api_delays=True, warm_sizes=[(512, 512)]), [(0.0, r)])
    assert r.stages[0].stage == "preprocess" and r.stages[0].start == pytest.approx(0.120, rel=1e-12)
    assert r.stages[-1].end == pytest.approx(0.120 + lone_gen_ms() / 1e3, rel=1e-12)
    assert done[0] == pytest.approx(0.120 + lone_gen_ms() / 1e3 + 0.022, rel=1e-12)
    r2 = gen()
    done = run(make(c, warm_sizes=[(512, 512)]), [(0.0, r2)])
    assert r2.stages[0].start == 0.0
    assert done[0] == pytest.approx(lone_gen_ms() / 1e3, rel=1e-12)


@pytest.mark.parametrize("api", [False, True])
def test_no_api_rows_answer_at_the_batch_end_before_the_next_batch_forms(root, api):
    """Without api rows api_delays changes nothing: a request is answered at its batch's end,
    before the engine forms its next batch, so a closed-loop client's next request (sent on
    the answer) joins the request waiting with its batch key (max_num_seqs 2)."""
    c = costs_of(root, omni=None)
    eng = OmniRequestEngine(c, 2, api_delays=api)
    env = Kernel()
    SimGPU(env, 0, 0).add(eng)
    done: dict[int, float] = {}
    a, b, nxt = gen(0, steps=2), gen(1, steps=2), gen(2, steps=2)
    env.timer(0.0, lambda ev: eng.submit(Flow(a, done, lambda now: eng.submit(Flow(nxt, done), now)), env.now))
    env.timer(0.001, lambda ev: eng.submit(Flow(b, done), env.now))
    env.run_all()
    pair = sum(ph.t * ph.k for ph in c.phases([c.job(gen(1)), c.job(gen(2))]))
    assert done[0] == pytest.approx(c.job(gen()).work, rel=1e-12)
    assert done[1] == done[2] == pytest.approx(done[0] + pair, rel=1e-12)
    assert [s.start for s in nxt.stages] == [s.start for s in b.stages]
