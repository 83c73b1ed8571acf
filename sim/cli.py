"""Hydra entry point: composes conf/, validates it against sim.config's schema, runs the
selected experiment into the Hydra run directory (requests.parquet, timeline.parquet,
report.html, then summary.json; capacity.json for a capacity plan) and prints its table."""
from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sim.config import ConfigError, SimConfig
from sim.run.folder import register_resolver

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
register_resolver()         # ${unique_dir:...} of conf/config.yaml's run and sweep folders

USER_ERRORS = (ConfigError, FileNotFoundError, KeyError, ValueError)


def register_schema() -> None:
    """sim.config's schema in Hydra's ConfigStore as `sim_schema` (conf/config.yaml's first
    default), once per process: whatever composes conf/ calls it first (0.04 s: a plain run
    whose composition is reused skips it, sim.run.compose_cache)."""
    store = ConfigStore.instance()
    if "sim_schema.yaml" not in store.repo:
        store.store(name="sim_schema", node=SimConfig)


def to_config(cfg: DictConfig) -> SimConfig:
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, SimConfig)
    return obj.check()


def execute(cfg: SimConfig, outdir: Path, multirun: bool) -> dict:
    """Run one experiment into outdir, holding the folder for the run (sim.run.folder). A
    finished result already there is reused when it is the same computation (same code, config
    and input files: sim.run.cache); it is shown exactly as a fresh one. Otherwise the previous
    results are removed first, so the folder never mixes two runs."""
    from sim.run import cache
    from sim.run.folder import RunFolder
    from sim.run.output import write_json_atomic
    key, provenance = cache.run_key(cfg)
    with RunFolder(outdir) as folder:
        hit = cache.cached_result(cfg, outdir, key)
        if hit is not None:
            report = _report(cfg, outdir, hit, only_if_missing=True)
            if not multirun:
                print(f"reused: {shown(cache.result_file(cfg, outdir))} was made by the same code, "
                      f"config and input files (run_key {key[:12]}); output.cache=false re-simulates")
                show(cfg, hit, outdir, report)
            return hit
        folder.clear()

        made: dict[str, Path | None] = {"report": None}

        def finish(result: dict) -> None:       # runs before the result file is written
            result["run_key"] = key
            result["provenance"] = provenance
            made["report"] = _report(cfg, outdir, result)

        result = _execute(cfg, outdir, multirun, finish)
        if cfg.experiment in ("queueing", "capacity"):  # they wrote theirs: add the key
            finish(result)
            write_json_atomic(cache.result_file(cfg, outdir), result)
    if not multirun:
        show(cfg, result, outdir, made["report"])
    return result


def _execute(cfg: SimConfig, outdir: Path, multirun: bool, finish: Callable[[dict], None]) -> dict:
    if cfg.experiment == "queueing":
        from sim.studies.queueing import run_queueing
        return run_queueing(cfg, outdir)
    if cfg.experiment == "capacity":
        from sim.studies.capacity import run_capacity
        return run_capacity(cfg, outdir)
    from sim.run.runner import Run
    progress = cfg.output.progress == "on" or (
        cfg.output.progress == "auto" and not multirun and cfg.workload.num_requests >= 50_000
        and sys.stderr.isatty())
    return Run(cfg, outdir).run(progress=progress, finish=finish)


def _report(cfg: SimConfig, outdir: Path, summary: dict, only_if_missing: bool = False
            ) -> Path | None:
    """report.html of a serving run (None for the queueing and capacity studies, or when
    output.report=false)."""
    if cfg.experiment in ("queueing", "capacity") or not cfg.output.report:
        return None
    path = outdir / "report.html"
    if only_if_missing and path.is_file():
        return path
    from sim.run.report import write_report
    return write_report(outdir, summary, title(cfg, outdir))


def shown(path: Path) -> Path:
    """A path as the user would type it: relative to the working directory when under it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd())
    except ValueError:
        return Path(path)


def title(cfg: SimConfig, outdir: Path) -> str:
    return f"{cfg.experiment}: policy={cfg.policy.name} -> {shown(outdir)}"


def show(cfg: SimConfig, summary: dict, outdir: Path, report: Path | None) -> None:
    """What a single run prints: the same for a fresh and a reused result."""
    if cfg.experiment == "queueing":
        keys = ("offered_load", "utilization", "request_throughput", "mean_queue_ms", "mean_e2el_ms",
                "p99_e2el_ms", "time_avg_in_system", "littles_law_rhs")
        print(f"queueing -> {shown(outdir)}")
        for k in keys:
            print(f"  {k:22s} {summary[k]:.4f}")
    elif cfg.experiment == "capacity":
        from sim.studies.capacity import format_result
        print(format_result(cfg, summary))
        print(f"-> {shown(outdir) / 'capacity.json'}")
    else:
        from sim.run.output import print_summary
        print_summary(summary, title(cfg, outdir))
    if report is not None:
        print(f"report: {shown(report)}")


# Hydra 1.3 composes the config twice per command: Hydra.get_mode composes it only to read
# hydra.mode, then Hydra.run (or multirun) composes it for the job. No file under conf/ sets
# hydra.mode (tests/test_cli.py checks), so on a command line without --multirun, without a
# config directory or primary config of its own and without an override of hydra, hydra.mode or
# hydra.searchpath, that first composition can only read None, which Hydra runs in RUN mode:
# main() answers None there without composing. Any other command line composes as Hydra does.
MODE_KEYS = ("hydra", "hydra.mode", "hydra.searchpath")


def mode_is_unset(argv: list[str]) -> bool:
    """Whether Hydra's mode-only composition of this command line can only read None."""
    from hydra._internal.utils import get_args_parser
    args = get_args_parser().parse_args(argv)     # as hydra.main parses it
    if args.multirun or args.config_path or args.config_dir or args.config_name:
        return False
    return not any(o.split("=", 1)[0].lstrip("~+").split("@", 1)[0].strip() in MODE_KEYS
                   for o in args.overrides)


def main() -> None:
    """`python -m sim`: hydra_main() without the mode-only composition where it can only read
    None (mode_is_unset), and with such a plain run's composition reused when nothing it reads
    has changed (sim.run.compose_cache)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.hydra import Hydra

    from sim.run import compose_cache
    compose_for_mode = Hydra.get_mode
    load_configuration = ConfigLoaderImpl.load_configuration
    try:
        plain = mode_is_unset(sys.argv[1:])
    except SystemExit:             # a command line Hydra refuses: Hydra says why
        plain = False

    def get_mode(self: Hydra, config_name: str | None, overrides: list[str]) -> Any:
        if plain:
            return None
        return compose_for_mode(self, config_name, overrides)

    Hydra.get_mode = get_mode      # type: ignore[method-assign]
    if plain and compose_cache.enabled():
        ConfigLoaderImpl.load_configuration = compose_cache.caching(  # type: ignore[method-assign]
            load_configuration, register_schema)
    else:
        register_schema()
    try:
        hydra_main()
    finally:
        Hydra.get_mode = compose_for_mode      # type: ignore[method-assign]
        ConfigLoaderImpl.load_configuration = load_configuration  # type: ignore[method-assign]


# True while the objects made by importing the program are frozen out of the cyclic GC
# (sim.__main__ freezes them while Hydra composes); the run unfreezes them first
FROZEN_AT_IMPORT = False


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    global FROZEN_AT_IMPORT
    if FROZEN_AT_IMPORT:
        gc.unfreeze()
        FROZEN_AT_IMPORT = False
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    outdir = Path(hc.runtime.output_dir)
    try:
        sim_cfg = to_config(cfg)
        execute(sim_cfg, outdir, multirun)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
