"""Mutation score of the simulator's core: `python -m sim.mutation [--quick] [options]`.

Prints one line per core module,
`module=<path> tried=<n> killed=<k> equivalent=<e> score=<k/(n-e)> timeout=<t> survived=<s>`,
then the surviving mutants (id, line, change). `killed` counts mutants that made a test of the
module's test files fail, error or hang (`timeout` of them: killed by the time limit); mutants
listed in EQUIVALENT_FILE (docs/mutation/equivalent.yaml, each with the reason it cannot change
behaviour) are counted in `equivalent` and not run.

Mutants: single-node changes of the module's AST (an own mutator: mutmut 3 cannot sample with a
fixed seed nor report per module, cosmic-ray runs one fresh pytest process per mutant):
comparison flips (< <=, > >=, == !=, is / is not, in / not in), arithmetic flips (+ -, * /,
// -> *, % -> //, ** -> *), boolean flips (and / or, `not x` -> x, True / False, -x -> x),
off-by-one constants (int n -> n+1, float x -> x+1), augmented assignments (+= -=, ...),
dropped returns (`return x` -> `return None`, an early bare `return` -> pass) and
break <-> continue. Not mutated: docstrings, annotations, f-strings, `raise` and `assert`
statements (messages and internal sanity checks). A mutant's id is
`<module path>::<function qualname>:<change>#<k>` (k-th such change in that function), so it
survives edits elsewhere in the file.

How it runs: the parent imports the heavy third-party libraries once, then forks one child per
mutant (`--jobs` at a time); the child compiles the mutated AST into the target module through
an import hook and runs pytest in-process (`-x`) on the module's test files only (MODULES
below). A child that outlives its time limit (3x the unmutated run of those files, at least
`--min-timeout` seconds) is killed with its process group. The unmutated files are run first
and must pass.

`--quick`: at most 20 mutants per module, sampled with a fixed seed (`--seed`, default 0), under
10 minutes on a 2-core machine. Without it every mutant runs (hours). Other options: --sample N,
--modules SUBSTR..., --ids ID..., --list, --show ID, --json PATH.
"""
from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.util
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = REPO / "docs" / "mutation" / "equivalent.yaml"

# ---------------------------------------------------------------------------------------------
# The core modules and the test files that exercise each (run in this order, -x: the fastest,
# most specific files first). One table: module paths move, this is the one place to change.
# ---------------------------------------------------------------------------------------------
P = "tests/test_sim_properties.py::"       # (long names below: node ids of single tests)
MODULES: dict[str, list[str]] = {
    "sim/workload.py": ["tests/test_workload.py", "tests/test_sim_golden.py"],
    "sim/metrics.py": ["tests/test_metrics.py", "tests/test_sim_golden.py"],
    "sim/servers/ar.py": ["tests/test_ar.py", "tests/test_sim_golden.py",
                          "tests/test_perf_ar_aggregate.py::test_aggregate_matches_plain_loop_with_preemptions",
                          P + "test_small_kv_forces_preemptions_and_all_complete",
                          P + "test_jump_ahead_exact_text_only"],
    "sim/servers/dit.py": ["tests/test_dit.py", "tests/test_sim_golden.py", P + "test_dit_batching_happens_and_respects_max_batch",
                           P + "test_jump_ahead_exact_image_heavy"],
    "sim/servers/batch.py": ["tests/test_batch.py", "tests/test_sim_golden.py", "tests/test_queueing.py::test_conservation_and_fcfs",
                             "tests/test_queueing.py::test_work_conserving_multi_server"],
    "sim/servers/jobs.py": ["tests/test_jobs.py", "tests/test_dit.py", "tests/test_batch.py", "tests/test_sim_golden.py",
                            "tests/test_perf_routing.py::test_free_engines_match_the_scan",
                            "tests/test_perf_routing.py::test_sjf_order_matches_a_stable_sort",
                            P + "test_jump_ahead_exact_shared_gpus_under_load"],
    "sim/gpu.py": ["tests/test_gpu.py", "tests/test_sim_golden.py", P + "test_jump_ahead_exact_text_only",
                   P + "test_jump_ahead_exact_image_heavy", P + "test_jump_ahead_exact_shared_gpus_under_load"],
    "sim/latency.py": ["tests/test_latency.py", "tests/test_sim_golden.py"],
    "sim/policies/routing.py": ["tests/test_routing.py",
                                "tests/test_perf_routing.py::test_least_loaded_with_unreported_increases"],
    "sim/policies/baseline.py": ["tests/test_baseline.py", "tests/test_sim_golden.py",
                                 "tests/test_perf_routing.py::test_runs_equal_the_scanning_reference"],
    "sim/policies/disaggregated.py": ["tests/test_disaggregated.py", "tests/test_modality_aware.py",
                                      "tests/test_sim_golden.py",
                                      "tests/test_perf_routing.py::test_runs_equal_the_scanning_reference"],
    "sim/policies/modality_aware.py": ["tests/test_modality_aware.py", "tests/test_sim_golden.py",
                                       "tests/test_perf_routing.py::test_runs_equal_the_scanning_reference"],
}

QUICK_PER_MODULE = 20
# third-party modules imported once in the parent (each child inherits them: no import cost)
PRELOAD = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "simpy", "scipy", "scipy.stats",
           "hypothesis", "pytest", "yaml", "omegaconf", "rich", "tqdm", "_pytest.python",
           "_hypothesis_pytestplugin")
# pytest plugins each child loads (entry-point autoloading is off: it imports hydra's plugin and
# assertion-rewrites every plugin module, ~10x the cost of a small test file)
PLUGINS = ("_hypothesis_pytestplugin",)
MEM_LIMIT_BYTES = 6 << 30        # a child that allocates more is killed (counts as killed)


# ---------------------------------------------------------------------------------------------
# Mutants
# ---------------------------------------------------------------------------------------------

_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
          ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
          ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.LShift: ast.RShift,
          ast.RShift: ast.LShift}
_CMPOP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
          ast.NotIn: ast.In}
_BOOLOP = {ast.And: ast.Or, ast.Or: ast.And}


@dataclass(frozen=True)
class Mutant:
    module: str         # repository-relative path
    id: str             # stable: <module>::<qualname>:<change>#<k>
    line: int
    col: int
    change: str         # e.g. "Sub->Add"
    before: str         # source of the node before / after (shortened)
    after: str
    index: int          # position of the node in _walk order
    variant: int        # which operator of a Compare


def _short(node: ast.AST, n: int = 90) -> str:
    s = ast.unparse(node).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _skip_fields(node: ast.AST) -> set[str]:
    """Fields of `node` not mutated: annotations (never evaluated here: `from __future__ import
    annotations`), decorators."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {"returns", "decorator_list"}
    if isinstance(node, ast.arg):
        return {"annotation"}
    if isinstance(node, ast.AnnAssign):
        return {"annotation"}
    if isinstance(node, ast.ClassDef):
        return {"decorator_list"}
    return set()


def _walk(tree: ast.AST) -> Iterator[tuple[ast.AST, str, ast.AST | None]]:
    """(node, enclosing qualname, parent) in a fixed depth-first source order, without the
    subtrees that are never mutated."""
    def rec(node: ast.AST, qual: str, parent: ast.AST | None) -> Iterator[tuple[ast.AST, str, ast.AST | None]]:
        if isinstance(node, (ast.JoinedStr, ast.Raise, ast.Assert)):
            return
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            docstring = body[0]
        else:
            docstring = None
        yield node, qual, parent
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            qual = node.name if qual == "<module>" else f"{qual}.{node.name}"
        skip = _skip_fields(node)
        for field, value in ast.iter_fields(node):
            if field in skip:
                continue
            items = value if isinstance(value, list) else [value]
            for child in items:
                if isinstance(child, ast.AST) and child is not docstring:
                    yield from rec(child, qual, node)
    yield from rec(tree, "<module>", None)


def _candidates(node: ast.AST, parent: ast.AST | None) -> list[tuple[str, int]]:
    """(change label, variant) pairs that apply to `node`."""
    out: list[tuple[str, int]] = []
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINOP:
        out.append((f"{type(node.op).__name__}->{_BINOP[type(node.op)].__name__}", 0))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMPOP:
                out.append((f"{type(op).__name__}->{_CMPOP[type(op)].__name__}", i))
    elif isinstance(node, ast.BoolOp):
        out.append((f"{type(node.op).__name__}->{_BOOLOP[type(node.op)].__name__}", 0))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        out.append((f"drop-{type(node.op).__name__}", 0))
    elif isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            out.append((f"{v}->{not v}", 0))
        elif isinstance(v, int):
            out.append((f"{v}->{v + 1}", 0))
        elif isinstance(v, float):
            out.append((f"{v!r}->{v + 1.0!r}", 0))
    elif isinstance(node, ast.Return):
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            out.append(("return-None", 0))
        elif node.value is None and parent is not None and _is_early(node, parent):
            out.append(("drop-return", 0))
    elif isinstance(node, ast.Break):
        out.append(("break->continue", 0))
    elif isinstance(node, ast.Continue):
        out.append(("continue->break", 0))
    return out


def _is_early(node: ast.AST, parent: ast.AST) -> bool:
    """A bare return that is not the last statement of its function body."""
    if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return parent.body[-1] is not node
    return True


def _apply(node: ast.AST, parent: ast.AST | None, change: str, variant: int) -> None:
    """Mutate `node` in place (or replace it in `parent`)."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)):
        node.op = _BINOP[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[variant] = _CMPOP[type(node.ops[variant])]()
    elif isinstance(node, ast.BoolOp):
        node.op = _BOOLOP[type(node.op)]()
    elif isinstance(node, ast.UnaryOp):
        # x instead of -x / not x: the operand in the operator's place
        _replace(parent, node, node.operand)
    elif isinstance(node, ast.Constant):
        v = node.value
        node.value = (not v) if isinstance(v, bool) else v + 1 if isinstance(v, int) else v + 1.0
    elif isinstance(node, ast.Return):
        if change == "return-None":
            node.value = ast.Constant(None)
        else:
            _replace(parent, node, ast.Pass())
    elif isinstance(node, ast.Break):
        _replace(parent, node, ast.Continue())
    elif isinstance(node, ast.Continue):
        _replace(parent, node, ast.Break())
    else:
        raise ValueError(f"cannot apply {change} to {type(node).__name__}")


def _replace(parent: ast.AST | None, old: ast.AST, new: ast.AST) -> None:
    assert parent is not None
    ast.copy_location(new, old)
    for field, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, field, new)
            return
        if isinstance(value, list):
            for i, v in enumerate(value):
                if v is old:
                    value[i] = new
                    return
    raise ValueError("node not found in its parent")


def enumerate_mutants(module: str) -> list[Mutant]:
    """Every mutant of `module` (repository-relative path), in source order (`before` and
    `after` are filled by describe())."""
    tree = ast.parse((REPO / module).read_text())
    out: list[Mutant] = []
    seen: dict[tuple[str, str], int] = {}
    for index, (node, qual, parent) in enumerate(_walk(tree)):
        for change, variant in _candidates(node, parent):
            k = seen.get((qual, change), 0)
            seen[(qual, change)] = k + 1
            out.append(Mutant(module, f"{module}::{qual}:{change}#{k}", getattr(node, "lineno", 0),
                              getattr(node, "col_offset", 0), change, "", "", index, variant))
    return out


def describe(ms: list[Mutant]) -> list[Mutant]:
    """The mutants with `before` / `after` source filled in (a constant or sign is shown with
    the expression around it)."""
    out = []
    srcs: dict[str, tuple[str, list]] = {}
    for m in ms:
        if m.module not in srcs:
            src = (REPO / m.module).read_text()
            srcs[m.module] = (src, list(_walk(ast.parse(src))))
        src, walked = srcs[m.module]
        node, _, parent = walked[m.index]
        shown = m.index
        if isinstance(node, (ast.Constant, ast.UnaryOp)) and isinstance(parent, ast.expr):
            while walked[shown][0] is not parent:
                shown -= 1
        after = _node_at(_mutated_tree(src, m.index, m.change, m.variant), shown)
        out.append(replace(m, before=_short(walked[shown][0]),
                           after=_short(after) if after is not None else "pass"))
    return out


def _node_at(tree: ast.AST, index: int) -> ast.AST | None:
    for i, (node, _, _) in enumerate(_walk(tree)):
        if i == index:
            return node
    return None


def _mutated_tree(src: str, index: int, change: str, variant: int) -> ast.Module:
    tree = ast.parse(src)
    for i, (node, _, parent) in enumerate(_walk(tree)):
        if i == index:
            _apply(node, parent, change, variant)
            break
    else:
        raise ValueError(f"no node {index}")
    return ast.fix_missing_locations(tree)


def mutated_code(m: Mutant):
    path = REPO / m.module
    return compile(_mutated_tree(path.read_text(), m.index, m.change, m.variant), str(path), "exec")


def module_name(path: str) -> str:
    return path[:-3].replace("/", ".")


# ---------------------------------------------------------------------------------------------
# Equivalent mutants (docs/mutation/equivalent.yaml: id -> {why: ..., ...})
# ---------------------------------------------------------------------------------------------

def load_equivalent(path: Path = EQUIVALENT_FILE) -> dict[str, dict[str, Any]]:
    import yaml
    if not path.exists():
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SystemExit(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); allowed: "
                         "a mapping of mutant id -> {why: ...}")
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: the top level must be a mapping of mutant id -> entry")
    for mid, entry in doc.items():
        if not isinstance(entry, dict) or not str(entry.get("why", "")).strip():
            raise SystemExit(f"{path}: entry {mid!r}: field 'why' is missing; allowed: a mapping "
                             "with a non-empty 'why' (the reason the change cannot alter behaviour)")
    return doc


# ---------------------------------------------------------------------------------------------
# Running one mutant (in a forked child)
# ---------------------------------------------------------------------------------------------

class _MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the target module from the mutated code object."""

    def __init__(self, name: str, path: Path, code) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(fullname, str(self.path), loader=self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(self.code, module.__dict__)


class _FirstFailure:
    """pytest plugin: remembers the first failing test or collection error."""

    def __init__(self) -> None:
        self.failed: str | None = None

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and self.failed is None:
            self.failed = report.nodeid

    def pytest_collectreport(self, report) -> None:
        if report.failed and self.failed is None:
            self.failed = f"collecting {report.nodeid}"


def _child(m: Mutant | None, module: str, tests: list[str], result: Path) -> None:
    """Runs in the forked child: never returns."""
    code = 3
    try:
        os.setpgid(0, 0)
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT_BYTES, MEM_LIMIT_BYTES))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        if m is not None:
            sys.meta_path.insert(0, _MutantFinder(module_name(module), REPO / module, mutated_code(m)))
        import hypothesis
        hypothesis.settings.register_profile("mutation", database=None, derandomize=True,
                                             print_blob=False)
        hypothesis.settings.load_profile("mutation")
        import pytest
        os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        rec = _FirstFailure()
        t0 = time.monotonic()
        args = ["-x", "-q", "--tb=no", "-p", "no:cacheprovider", "-o", "addopts=", "--no-header"]
        for p in PLUGINS:
            args += ["-p", p]
        rc = int(pytest.main(args + tests, plugins=[rec]))
        result.write_text(json.dumps({"rc": rc, "failed": rec.failed,
                                      "seconds": time.monotonic() - t0}))
        code = 0
    except BaseException as e:   # noqa: BLE001 -- report anything, the parent decides
        try:
            result.write_text(json.dumps({"rc": 99, "failed": f"{type(e).__name__}: {e}"}))
        except BaseException:
            pass
    finally:
        os._exit(code)


@dataclass
class Outcome:
    id: str
    module: str
    status: str          # killed | timeout | survived | error | equivalent
    line: int = 0
    before: str = ""
    after: str = ""
    by: str | None = None
    seconds: float = 0.0


class Pool:
    """Forked children, `jobs` at a time, each with its own time limit."""

    def __init__(self, jobs: int, tmp: Path) -> None:
        self.jobs = jobs
        self.tmp = tmp
        self.running: dict[int, tuple[Any, Path, float, float]] = {}   # pid -> (key, result, t0, limit)
        self.done: list[tuple[Any, dict]] = []     # results reaped while waiting for a free slot
        self.n = 0

    def submit(self, key: Any, m: Mutant | None, module: str, tests: list[str], limit: float) -> None:
        while len(self.running) >= self.jobs:
            self.done += self._reap(block=True)
        self.n += 1
        result = self.tmp / f"r{self.n}.json"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(m, module, tests, result)
        self.running[pid] = (key, result, time.monotonic(), limit)

    def _reap(self, block: bool) -> list[tuple[Any, dict]]:
        out = []
        while True:
            now = time.monotonic()
            for pid, (key, result, t0, limit) in list(self.running.items()):
                if now - t0 > limit:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    os.waitpid(pid, 0)
                    del self.running[pid]
                    out.append((key, {"rc": "timeout", "seconds": now - t0}))
            try:
                pid, status = os.waitpid(-1, os.WNOHANG) if self.running else (0, 0)
            except ChildProcessError:
                pid = 0
            if pid:
                key, result, t0, _ = self.running.pop(pid)
                try:
                    r = json.loads(result.read_text())
                except (OSError, ValueError):
                    r = {"rc": 98, "failed": f"child exited with status {status} (no result)"}
                r.setdefault("seconds", time.monotonic() - t0)
                out.append((key, r))
                continue
            if out or not block or not self.running:
                return out
            time.sleep(0.05)

    def drain(self) -> list[tuple[Any, dict]]:
        out = list(self.done)
        self.done.clear()
        while self.running:
            out += self._reap(block=True)
        return out

    def poll(self) -> list[tuple[Any, dict]]:
        out = list(self.done)
        self.done.clear()
        return out + self._reap(block=False)


def _classify(r: dict) -> tuple[str, str | None]:
    rc = r["rc"]
    if rc == "timeout":
        return "timeout", None
    if rc == 0:
        return "survived", None
    if rc in (1, 2):             # a test failed / a collection error (the mutant broke an import)
        return "killed", r.get("failed")
    if rc == 98 or rc == 99:     # crashed (e.g. memory limit) or raised outside pytest
        return "killed", r.get("failed")
    return "error", f"pytest exit code {rc}"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def select(per_module: dict[str, list[Mutant]], sample: int | None, seed: int,
           ids: list[str] | None) -> dict[str, list[Mutant]]:
    out = {}
    for mod, ms in per_module.items():
        if ids:
            ms = [m for m in ms if m.id in ids]
        elif sample is not None and len(ms) > sample:
            picked = set(random.Random(f"{seed}:{mod}").sample(range(len(ms)), sample))
            ms = [m for i, m in enumerate(ms) if i in picked]
        if ms:
            out[mod] = ms
    return out


def _preload() -> None:
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    targets = {module_name(p) for p in MODULES}
    loaded = [m for m in sys.modules if m in targets]
    assert not loaded, f"a core module was imported in the parent: {loaded}"
    import gc
    gc.collect()
    gc.freeze()     # children's collections skip what the parent loaded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.mutation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"at most {QUICK_PER_MODULE} mutants per module (fixed-seed sample)")
    ap.add_argument("--sample", type=int, default=None, help="at most N mutants per module")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--modules", nargs="*", default=None,
                    help="only modules whose path contains one of these strings")
    ap.add_argument("--ids", nargs="*", default=None, help="only these mutant ids")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    ap.add_argument("--min-timeout", type=float, default=30.0,
                    help="least time limit per mutant, seconds (default 30)")
    ap.add_argument("--list", action="store_true", help="list the selected mutants, run nothing")
    ap.add_argument("--show", metavar="ID", help="print one mutant's change and exit")
    ap.add_argument("--json", metavar="PATH", help="write every outcome to this JSON file")
    a = ap.parse_args(argv)
    if a.quick and a.sample is None:
        a.sample = QUICK_PER_MODULE
    if a.jobs < 1:
        ap.error(f"--jobs={a.jobs} is invalid; allowed: >= 1")

    built = sorted(str(p.relative_to(REPO)) for p in (REPO / "sim").rglob("*.so"))
    if built and not (a.list or a.show):
        print(f"compiled modules present ({built[:3]}...): mutants of the .py would mix with "
              "compiled code; run `python -m sim.compile --clean` first", file=sys.stderr)
        return 2
    mods = [p for p in MODULES if not a.modules or any(s in p for s in a.modules)]
    if not mods:
        ap.error(f"--modules {a.modules} matches none of {list(MODULES)}")
    missing = sorted({t for p in mods for t in MODULES[p] if not (REPO / t.split("::")[0]).exists()})
    if missing:
        print(f"sim/mutation.py MODULES names test files that do not exist: {missing}", file=sys.stderr)
        return 2
    per_module = {p: enumerate_mutants(p) for p in mods}
    if a.show:
        for ms in per_module.values():
            for m in describe([m for m in ms if m.id == a.show]):
                if m.id == a.show:
                    print(f"{m.id}\n  {m.module}:{m.line}:{m.col}\n  - {m.before}\n  + {m.after}")
                    return 0
        print(f"no mutant {a.show!r}", file=sys.stderr)
        return 2
    equivalent = load_equivalent()
    known = {m.id for ms in per_module.values() for m in ms}
    stale = sorted(k for k in equivalent if k not in known and any(k.startswith(p + "::") for p in mods))
    chosen = {mod: describe(ms) for mod, ms in select(per_module, a.sample, a.seed, a.ids).items()}
    if a.list:
        for mod, ms in chosen.items():
            for m in ms:
                tag = "  [equivalent]" if m.id in equivalent else ""
                print(f"{m.id}  line {m.line}: {m.before}  ->  {m.after}{tag}")
        return 0

    _preload()
    os.chdir(REPO)
    outcomes: dict[str, list[Outcome]] = {p: [] for p in chosen}
    todo = [(mod, m) for mod, ms in chosen.items() for m in ms if m.id not in equivalent]
    for mod, ms in chosen.items():
        outcomes[mod] += [Outcome(m.id, mod, "equivalent", m.line, m.before, m.after)
                          for m in ms if m.id in equivalent]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmpd:
        pool = Pool(a.jobs, Path(tmpd))
        # 1. the unmutated test files of every module must pass; their time sets the limit
        base: dict[str, float] = {}
        for mod in chosen:
            pool.submit(("base", mod), None, mod, MODULES[mod], 900.0)
        for (_, mod), r in pool.drain():
            if r["rc"] != 0:
                print(f"module={mod}: its test files fail without any mutant (pytest {r['rc']}, "
                      f"first failure {r.get('failed')}); fix them first", file=sys.stderr)
                return 1
            base[mod] = float(r["seconds"])
        limits = {mod: max(a.min_timeout, 3.0 * t + 10.0) for mod, t in base.items()}
        # 2. the mutants
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="mutants", unit="mutant", file=sys.stderr,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        by_id = {m.id: m for _, m in todo}

        def collect(results):
            for key, r in results:
                m = by_id[key]
                status, by = _classify(r)
                if status in ("survived", "error") or not sys.stderr.isatty():
                    bar.write(f"{status}: {m.id}  line {m.line}: {m.before}  ->  {m.after}"
                              + (f"  [{by}]" if by else ""), file=sys.stderr)
                outcomes[m.module].append(Outcome(m.id, m.module, status, m.line, m.before,
                                                  m.after, by, round(float(r.get("seconds", 0)), 2)))
                bar.update(1)

        for mod, m in todo:
            pool.submit(m.id, m, mod, MODULES[mod], limits[mod])
            collect(pool.poll())
        collect(pool.drain())
        bar.close()
    elapsed = time.monotonic() - t_start

    report = []
    for mod in chosen:
        os_ = outcomes[mod]
        n = len(os_)
        e = sum(o.status == "equivalent" for o in os_)
        t = sum(o.status == "timeout" for o in os_)
        k = sum(o.status in ("killed", "timeout") for o in os_)
        s = sum(o.status == "survived" for o in os_)
        err = sum(o.status == "error" for o in os_)
        score = k / (n - e) if n > e else 1.0
        line = (f"module={mod} tried={n} killed={k} equivalent={e} score={score:.2f} "
                f"timeout={t} survived={s}" + (f" error={err}" if err else ""))
        print(line)
        report.append({"module": mod, "tried": n, "killed": k, "equivalent": e, "score": score,
                       "timeout": t, "survived": s, "error": err, "tests": MODULES[mod],
                       "baseline_s": round(base[mod], 2)})
    for mod in chosen:
        for o in sorted(outcomes[mod], key=lambda o: o.line):
            if o.status in ("survived", "error"):
                print(f"  {o.status}: {o.id}  line {o.line}: {o.before}  ->  {o.after}")
    if stale:
        print(f"equivalent.yaml lists {len(stale)} ids that no longer exist: {stale}")
    print(f"{sum(len(v) for v in outcomes.values())} mutants in {elapsed:.0f} s "
          f"(--jobs {a.jobs}; limits: {', '.join(f'{m} {v:.0f}s' for m, v in limits.items())})")
    if a.json:
        doc = {"argv": sys.argv[1:], "seconds": round(elapsed, 1), "modules": report,
               "outcomes": [asdict(o) for v in outcomes.values() for o in v]}
        p = Path(a.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
