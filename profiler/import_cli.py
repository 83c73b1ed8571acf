"""`python -m profiler import-model`: public configs -> conf/model/<name>.yaml + roofline tables.

Writes the registry entry (profiler.hf_import) and, unless --no-tables, the analytic tables
`<profiles-dir>/<gpu>-analytic/<name>.parquet` (engine=analytic, the same grid the GPU sweep
measures), so `python -m sim model=<name> ...` runs at once and says it runs on roofline
numbers; `python -m profiler sweep model=<name>` replaces them with measured ones on a GPU.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from profiler.hf_import import ConfigImportError, entry_yaml, import_model, write_entry
from profiler.models import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m profiler import-model",
        description="Registry entry (conf/model/<name>.yaml) from a Hugging Face config.json "
                    "(LLM / VLM) or a diffusers model_index.json with its component configs, "
                    "plus its roofline (analytic) profile tables.")
    ap.add_argument("source", help="config.json, model_index.json, or the folder holding it")
    ap.add_argument("--name", help="registry name (default: from --hf-id / the folder name)")
    ap.add_argument("--hf-id", help="public model id recorded as hf_id (default: the config's "
                    "_name_or_path when it is an org/name id, else empty)")
    ap.add_argument("--edit-hf-id", help="diffusion: the edit model sharing this DiT "
                    "(FLUX.1-Kontext, Qwen-Image-Edit): edit-shaped DiT points are profiled")
    ap.add_argument("--dtype", default="bfloat16", help="serving / profiling dtype (bfloat16)")
    ap.add_argument("--max-model-len", type=int, help="LLM / VLM: serving context limit "
                    "(vLLM --max-model-len); default: the config's max_position_embeddings")
    ap.add_argument("--tasks", help="comma list, a subset of what the family serves")
    ap.add_argument("--steps", type=int, help="diffusion: denoising steps per request")
    cfg = ap.add_mutually_exclusive_group()
    cfg.add_argument("--cfg", dest="cfg", action="store_true", default=None,
                     help="diffusion: two denoiser passes per step (classifier-free guidance)")
    cfg.add_argument("--no-cfg", dest="cfg", action="store_false")
    ap.add_argument("--height", type=int, help="diffusion: default output height")
    ap.add_argument("--width", type=int, help="diffusion: default output width")
    ap.add_argument("--max-sequence-length", type=int,
                    help="diffusion: the pipeline's T5 max_sequence_length")
    ap.add_argument("--text-tokens", type=int, help="diffusion: text tokens in the DiT sequence")
    ap.add_argument("--condition-encoder", help="Qwen-Image: registry entry of its VL encoder")
    ap.add_argument("--ignore-field", action="append", default=[], metavar="KEY",
                    help="accept a config key this importer does not know (recorded)")
    ap.add_argument("--conf-dir", default=str(CONF_DIR), help="registry folder (conf/model)")
    ap.add_argument("--profiles-dir", default="traces/profiles",
                    help="where the roofline tables go (<dir>/<gpu>-analytic/<name>.parquet)")
    ap.add_argument("--gpus", default="h100", help="comma list of GPU specs for roofline "
                    "tables (profiler/backends/analytic.py GPU_SPECS)")
    ap.add_argument("--no-tables", action="store_true", help="write the entry only")
    ap.add_argument("--force", action="store_true", help="replace an existing entry")
    ap.add_argument("--dry-run", action="store_true", help="print the entry; write nothing")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every field used")
    return ap


def next_commands(e: dict) -> list[str]:
    n = e["name"]
    if e["family"] == "llm":
        sim = f"python -m sim model={n} workload=poisson_text cluster=h100x1 workload.num_requests=2000"
    elif e["family"] == "vlm":
        sim = (f"python -m sim model={n} workload=poisson_text cluster=h100x1 "
               "'workload.mix={text: 0.5, understand: 0.5}' workload.num_requests=2000")
    else:
        sim = (f"python -m sim model={n} workload=poisson_text cluster=h100x1 'workload.mix={{text: 0, "
               "generate: 1}' workload.image.max=1024 workload.arrival.rate=2 workload.num_requests=500")
    return [sim, f"python -m profiler sweep model={n}      # on a GPU: measured tables"]


def write_tables(name: str, conf_dir: Path, profiles_dir: Path, gpus: list[str]) -> list[tuple[str, dict]]:
    from profiler.__main__ import compose
    from profiler.backends.analytic import GPU_SPECS
    from profiler.models import load_model
    from profiler.sweep import run_sweep
    out = []
    for g in gpus:
        if g not in GPU_SPECS:
            raise ConfigImportError(f"--gpus {g!r} is invalid; allowed: {sorted(GPU_SPECS)}")
        cfg = compose(["backend=analytic", f"models=[{name}]", f"out_dir={profiles_dir}",
                       f"gpu_spec={g}", "progress=false", "resume=false", "device=cpu"])
        s = run_sweep(cfg, log=lambda _m: None,
                      spec_loader=lambda n: load_model(n, str(conf_dir)))[name]
        out.append((g, s))
    return out


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    cmd = "python -m profiler import-model " + " ".join(shlex.quote(x) for x in argv)
    try:
        res = import_model(
            a.source, a.name, dtype=a.dtype, max_model_len=a.max_model_len, hf_id=a.hf_id,
            edit_hf_id=a.edit_hf_id,
            tasks=[t.strip() for t in a.tasks.split(",")] if a.tasks else None,
            ignore_fields=tuple(a.ignore_field), registry=Path(a.conf_dir), steps=a.steps,
            cfg=a.cfg, height=a.height, width=a.width,
            max_sequence_length=a.max_sequence_length, text_tokens=a.text_tokens,
            condition_encoder=a.condition_encoder)
        if a.dry_run:
            print(entry_yaml(res, cmd), end="")
            return 0
        from profiler.sweep import git_sha
        path = write_entry(res, Path(a.conf_dir), cmd, a.force, git_sha())
        report(res, path, a.verbose)
        if not a.no_tables:
            prof = Path(a.profiles_dir)
            prof = prof if prof.is_absolute() else ROOT / prof
            for g, s in write_tables(res.name, Path(a.conf_dir), prof,
                                     [x.strip() for x in a.gpus.split(",") if x.strip()]):
                print(f"[import] roofline tables ({g}, engine=analytic, not measured): "
                      f"{s['path']} ({s['measured']} points)")
    except ConfigImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("next:")
    for c in next_commands(res.entry):
        print(f"  {c}")
    return 0


def report(res, path: Path, verbose: bool) -> None:
    from profiler.models import load_model
    e = res.entry
    spec = load_model(e["name"], str(path.parent))
    w = spec.weights_bytes()
    comps = ", ".join(f"{k}={v['kind']}" for k, v in e["components"].items())
    print(f"[import] {path}: {e['name']} ({e['family']}; components {comps})")
    line = f"  weights {w / 1e9:.2f} GB ({w // spec.dtype_bytes:,} parameters, {e['dtype']})"
    if spec.llm is not None:
        line += f"; KV cache {spec.kv_bytes_per_token():,} B/token"
    print(line)
    print(f"  fields used: {len(res.used)}; defaults taken: {len(res.defaults)}; ignored (no "
          f"effect on latency or memory): {len(res.ignored)} (listed in the entry's `source`)")
    for d in res.defaults:
        print(f"  default: {d}")
    for n in res.notes:
        print(f"  note: {n}")
    if verbose:
        for u in res.used:
            print(f"  used: {u}")
