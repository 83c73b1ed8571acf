"""CLI: `python -m profiler {import-model,sweep,plan,show,check,e2e,analytic-error,omni-table} ...`.

    python -m profiler import-model <config.json | model_index.json | folder> [--name NAME]
writes conf/model/<name>.yaml from public configs and its roofline tables
(traces/profiles/<gpu>-analytic/<name>.parquet), so the simulator runs the model at once;
`python -m profiler import-model --help` lists the options.

sweep/plan/e2e take Hydra overrides on conf/profiler/config.yaml (compose API), e.g.
    python -m profiler sweep models=[flux1_dev,sd3_5_medium] backend=diffusers max_minutes=8
    python -m profiler sweep model=qwen2_5_7b backend=vllm grid.decode_batch=[1,8,64]
`model=X` is shorthand for `models=[X]`; backend=auto (the default) measures LLMs / VLMs with
vllm and diffusion models with diffusers.
    python -m profiler analytic-error <model>... [--gpu h100]
reports the roofline tables' relative error against the measured ones, per stage.
    python -m profiler omni-table traces/validation/h100_omni/ [--runs probe,warmup] [--dry-run]
writes vLLM-Omni's per-stage table (traces/profiles/<gpu>-vllm-omni/<model>.parquet) from the
zero-load runs of profiler.omni_bench (never from the validation runs): profiler/omni_table.py.
show/check take table paths: python -m profiler check traces/profiles/h100/*.parquet
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf" / "profiler"


def compose(overrides: list[str]):
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    fixed = []
    for o in overrides:
        if o.startswith("model="):
            o = f"models=[{o.split('=', 1)[1]}]"
        fixed.append(o)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return _compose(config_name="config", overrides=fixed)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "import-model":
        from profiler.import_cli import main as import_main
        return import_main(rest)
    if cmd == "omni-table":
        from profiler.omni_table import main as omni_table_main
        return omni_table_main(rest)
    if cmd == "analytic-error":
        from profiler.analytic_error import main as error_main
        return error_main(rest)
    if cmd in ("sweep", "plan"):
        cfg = compose(rest + (["dry_run=true"] if cmd == "plan" else []))
        from profiler.sweep import run_sweep
        summary = run_sweep(cfg)
        for m, s in summary.items():
            print(f"[profiler] {m}: {s}")
        return 0
    if cmd == "e2e":
        cfg = compose(rest)
        from profiler.e2e import run_flux_e2e
        run_flux_e2e(cfg)
        return 0
    if cmd == "show":
        ap = argparse.ArgumentParser(prog="python -m profiler show")
        ap.add_argument("tables", nargs="+")
        ap.add_argument("--stage")
        ap.add_argument("--rows", type=int, default=0)
        a = ap.parse_args(rest)
        from profiler.check import show
        for t in a.tables:
            show(t, a.stage, a.rows)
        return 0
    if cmd == "check":
        ap = argparse.ArgumentParser(prog="python -m profiler check")
        ap.add_argument("tables", nargs="+")
        ap.add_argument("--tol", type=float, default=0.15,
                        help="relative latency drop tolerated before 'not monotone' (noise)")
        ap.add_argument("--strict", action="store_true",
                        help="also fail on non-monotone steps between overhead-bound points")
        a = ap.parse_args(rest)
        from profiler.check import check_table
        bad = 0
        for t in a.tables:
            warns: list[str] = [] if not a.strict else None
            problems = check_table(t, a.tol, warns)
            for w in warns or []:
                print(f"WARN {t}: {w} (a point is overhead-bound: > 3x roofline)")
            if problems:
                bad += 1
                print(f"FAIL {t}")
                for p in problems:
                    print(f"  - {p}")
            else:
                print(f"ok   {t}")
        return 1 if bad else 0
    print(f"unknown command {cmd!r}; allowed: import-model, sweep, plan, show, check, e2e, "
          "analytic-error, omni-table", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
