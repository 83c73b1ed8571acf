"""Gather a sweep: `python -m sim.tools.gather <multirun_dir> [--out sweep.parquet]`: every
summary.json under the folder into one parquet (default <multirun_dir>/sweep.parquet) and the
comparison table on the terminal, as at the end of a multirun (sim.run.sweep says what the
columns are)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sim.run.sweep import gather, print_comparison, write_parquet


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.tools.gather",
                                 description="Gather every summary.json of a sweep into one parquet.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="parquet path (default <sweep_dir>/sweep.parquet)")
    a = ap.parse_args(argv)
    try:
        df = gather(a.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"error: no summary.json under {a.sweep_dir}", file=sys.stderr)
        return 1
    out = Path(a.out) if a.out else Path(a.sweep_dir) / "sweep.parquet"
    write_parquet(df, out)
    print_comparison(df, f"sweep {a.sweep_dir}: {len(df)} runs")
    print(f"gathered {len(df)} runs, {len(df.columns)} columns -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
