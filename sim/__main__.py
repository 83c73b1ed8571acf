"""`python -m sim [+policy=NAME] [+experiment=NAME] [key=value ...]` (Hydra).

Policies and experiments are optional config groups, selected with `+policy=...` (the form the
docs use); a bare `policy=...` is accepted too and rewritten to the `+` form."""
from __future__ import annotations

import re
import sys

OPTIONAL_GROUPS = ("policy", "experiment", "model")


def normalize_argv(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        m = re.match(r"^(~?)(%s)=(.*)$" % "|".join(OPTIONAL_GROUPS), a)
        out.append(f"+{m.group(2)}={m.group(3)}" if m and not m.group(1) else a)
    return out


def main() -> None:
    sys.argv = [sys.argv[0]] + normalize_argv(sys.argv[1:])
    from sim.cli import hydra_main
    hydra_main()


if __name__ == "__main__":
    main()
