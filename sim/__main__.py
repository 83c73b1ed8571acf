"""`python -m sim [+policy=NAME] [+experiment=NAME] [key=value ...]` (Hydra).

Policies and experiments are optional config groups, selected with `+policy=...` (the form the
docs use); a bare `policy=...` is accepted too and rewritten to the `+` form.

Ctrl-C and SIGTERM end the command with one line on stderr (exit 130 / 143): every writer is
atomic, so the run folder holds no partial file, and a sweep keeps its finished runs (re-running
the same command into the same `hydra.sweep.dir` simulates only the others)."""
from __future__ import annotations

import atexit
import gc
import re
import signal
import sys
from typing import Any

OPTIONAL_GROUPS = ("policy", "experiment", "model")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so writers abort and clean up as on Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def normalize_argv(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        m = re.match(r"^(~?)(%s)=(.*)$" % "|".join(OPTIONAL_GROUPS), a)
        out.append(f"+{m.group(2)}={m.group(3)}" if m and not m.group(1) else a)
    return out


def _interrupted_folder() -> str:
    """Where the interrupted command was writing, its temp files removed: the run folder, or
    the sweep folder with how many of its runs finished."""
    from sim.run.folder import TEMP_GLOB, WRITING
    if "sweep" in WRITING:
        root = WRITING["sweep"]
        for p in root.rglob(TEMP_GLOB):
            p.unlink(missing_ok=True)
        done = len(list(root.glob("*/summary.json"))) + len(list(root.glob("*/capacity.json")))
        return (f": sweep {root} keeps its {done} finished runs (the same command with "
                f"hydra.sweep.dir={root} runs the others)")
    if "run" in WRITING:
        out = WRITING["run"]
        for p in out.glob(TEMP_GLOB):
            p.unlink(missing_ok=True)
        return f": no result of this run in {out}"
    return ""


def main() -> None:
    sys.argv = [sys.argv[0]] + normalize_argv(sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with it ignored
    # The cyclic GC has nothing to collect in two phases of the process. The objects made while
    # the program is imported (numpy, pandas, pyarrow, Hydra) live as long as the process: the
    # collector is off meanwhile, and they stay frozen out of it while Hydra composes the config,
    # until sim.cli.hydra_main unfreezes them for the run (sim.cli.FROZEN_AT_IMPORT; the run
    # then tunes the GC itself: sim.run.gc_control).
    # At exit every object is frozen, so the interpreter's last collections skip them: their
    # memory goes back with the process.
    atexit.register(gc.freeze)
    gc.disable()
    try:
        from sim import cli
        gc.freeze()
        cli.FROZEN_AT_IMPORT = True
        gc.enable()
        cli.main()
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        term = isinstance(e, Terminated)
        print(f"interrupted ({'SIGTERM' if term else 'Ctrl-C'}){_interrupted_folder()}",
              file=sys.stderr, flush=True)
        sys.exit(143 if term else 130)


if __name__ == "__main__":
    main()
