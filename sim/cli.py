"""Hydra entry point: composes conf/, validates it against sim.config's schema, runs the
selected experiment, writes requests.parquet + summary.json into the Hydra run directory."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sim.config import ConfigError, SimConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ConfigStore.instance().store(name="sim_schema", node=SimConfig)

USER_ERRORS = (ConfigError, FileNotFoundError, KeyError, ValueError)


def to_config(cfg: DictConfig) -> SimConfig:
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, SimConfig)
    return obj.check()


def execute(cfg: SimConfig, outdir: Path, multirun: bool) -> dict:
    from sim.output import print_summary
    if cfg.experiment == "queueing":
        from sim.queueing import run_queueing
        summary = run_queueing(cfg, outdir)
    elif cfg.experiment == "capacity":
        from sim.capacity import run_capacity
        summary = run_capacity(cfg, outdir)
    else:
        from sim.runner import Run
        progress = cfg.output.progress == "on" or (
            cfg.output.progress == "auto" and not multirun and cfg.workload.num_requests >= 50_000)
        summary = Run(cfg, outdir).run(progress=progress)
    if multirun:
        return summary
    if cfg.experiment == "queueing":
        keys = ("offered_load", "utilization", "request_throughput", "mean_queue_ms", "mean_e2el_ms",
                "p99_e2el_ms", "time_avg_in_system", "littles_law_rhs")
        print(f"queueing -> {outdir}")
        for k in keys:
            print(f"  {k:22s} {summary[k]:.4f}")
    else:
        print_summary(summary, f"{cfg.experiment}: policy={cfg.policy.name} -> {outdir}")
    return summary


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
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
