"""Mutation score of the simulator's core: `python -m sim.tools.mutation [--quick] [options]`.

Prints one line per core module,
`module=<path> tried=<n> killed=<k> equivalent=<e> score=<k/(n-e)> timeout=<t> survived=<s>`
(`uncovered=<u>` when some survivors are run by no test at all), then the surviving mutants (id,
line, change). `killed` counts mutants that made a test of the module's test files fail, error
or hang (`timeout` of them: stopped by the time limit); mutants listed in EQUIVALENT_FILE
(docs/mutation/equivalent.yaml, each with the reason it cannot change behaviour) are counted in
`equivalent` and not run.

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

How it runs (all in forked children of one parent that imported the heavy third-party libraries
once; pytest runs in-process, plugin autoloading off):
1. Baseline: the test files of the chosen modules (MODULES below) run once, unmutated, with a
   probe before every statement inside a function of each core module. It records, per test,
   which statements ran (a fixture's statements count for every test that uses the fixture) and
   its CPU time. Every test must pass. The result is cached under ~/.cache/mmserve-sim/, keyed by
   the contents of sim/, profiler/, tests/ and conf/ (--no-cache: always run it).
2. Each mutant runs only the tests of its module's files that executed its statement, in table
   order, stopping at the first failure (a mutant no test executes survives without a run; one
   in code that runs at import, e.g. a module constant or a default argument, runs them all).
   A test is stopped, and the mutant counted killed by `timeout`, when it spends more CPU time
   than 3x its baseline (its fixtures' setup included) + 1 s: CPU time, so a loaded machine
   does not turn slow into hung. --all-tests: every test of the module's files, as a check of
   the selection.

`--quick`: at most 20 mutants per module, sampled with a fixed seed (`--seed`, default 0). Without
it every mutant runs (hours). Other options: --sample N, --modules SUBSTR..., --ids ID...,
--list, --show ID, --json PATH, --jobs N.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.abc
import importlib.util
import json
import os
import random
import signal
import sys
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
EQUIVALENT_FILE = REPO / "docs" / "mutation" / "equivalent.yaml"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmserve-sim"

# ---------------------------------------------------------------------------------------------
# The core modules and the test files that exercise each (an entry: a file, or the node id of
# one test or of one test function's parameter set). Order matters: a mutant's tests run in this
# order, the most specific and cheapest first. One table: module paths move, this is the one
# place to change (tests/test_mutation.py checks every path exists).
# ---------------------------------------------------------------------------------------------
G = "tests/test_sim_golden.py"
P = "tests/test_sim_properties.py::"       # (single tests of the slow property file)
JUMP = [P + "test_jump_ahead_exact_text_only", P + "test_jump_ahead_exact_image_heavy",
        P + "test_jump_ahead_exact_shared_gpus_under_load"]
MODULES: dict[str, list[str]] = {
    "sim/workloads/laws.py": ["tests/test_workload.py", "tests/test_pd_reuse.py", G],
    "sim/workloads/requests.py": ["tests/test_workload.py", "tests/test_pd_reuse.py",
                                  "tests/test_traces.py", G],
    "sim/workloads/synthetic.py": ["tests/test_workload.py", "tests/test_pd_reuse.py", G],
    "sim/workloads/trace.py": ["tests/test_traces.py", "tests/test_vlm_replay.py",
                               "tests/test_closed_loop.py", "tests/test_bad_input.py"],
    "sim/run/metrics.py": ["tests/test_metrics.py", G],
    "sim/engines/ar.py": ["tests/test_ar.py", "tests/test_ar_plan.py", "tests/test_ar_admission.py",
                          "tests/test_pd_reuse.py", G,
                          "tests/test_perf_ar_aggregate.py",
                          P + "test_small_kv_forces_preemptions_and_all_complete", *JUMP],
    "sim/engines/dit.py": ["tests/test_dit.py", "tests/test_batching.py", G,
                           P + "test_dit_batching_happens_and_respects_max_batch",
                           P + "test_jump_ahead_exact_image_heavy"],
    "sim/engines/omni.py": ["tests/test_omni_costs.py", "tests/test_omni_engine.py", G,
                            P + "test_jump_ahead_exact_image_heavy"],
    "sim/engines/batch.py": ["tests/test_batch.py", G, "tests/test_queueing.py::test_conservation_and_fcfs",
                             "tests/test_queueing.py::test_work_conserving_multi_server",
                             "tests/test_queueing.py::test_littles_law_exact"],
    "sim/engines/queues.py": ["tests/test_queues.py", "tests/test_dit.py", "tests/test_batch.py", G,
                              "tests/test_perf_routing.py", *JUMP],
    "sim/engines/latency.py": ["tests/test_latency.py", "tests/test_omni_engine.py", G],
    "sim/core/gpu.py": ["tests/test_gpu.py", G, *JUMP],
    "sim/core/kernel.py": ["tests/test_eventloop.py", G, *JUMP],
    "sim/policies/routing.py": ["tests/test_routing.py", "tests/test_perf_routing.py"],
    "sim/policies/batching.py": ["tests/test_batching.py", "tests/test_omni_engine.py", G],
    "sim/policies/placement.py": ["tests/test_placement.py", "tests/test_layout.py", "tests/test_pd_reuse.py",
                                  "tests/test_omni_engine.py", G,
                                  "tests/test_perf_routing.py::test_runs_equal_the_scanning_reference"],
    "sim/policies/scaling.py": ["tests/test_scaling.py", G],
    "sim/policies/policy.py": ["tests/test_policy.py", "tests/test_placement.py", "tests/test_layout.py", G],
}

QUICK_PER_MODULE = 20
# third-party modules, and simulator modules that import no core module, imported once in the
# parent (each child inherits them: no import cost); the parent checks no core module came along
PRELOAD = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "simpy", "scipy", "scipy.stats",
           "hypothesis", "pytest", "yaml", "omegaconf", "rich", "tqdm", "_pytest.python",
           "_hypothesis_pytestplugin", "profiler.models", "profiler.schema", "sim.config",
           "sim.names", "sim.rng", "sim.core.records")
# pytest plugins each child loads (entry-point autoloading is off: it imports hydra's plugin and
# assertion-rewrites every plugin module, ~10x the cost of a small test file)
PLUGINS = ("_hypothesis_pytestplugin",)
MEM_LIMIT_BYTES = 6 << 30        # a child that allocates more is killed (counts as killed)
CPU_FACTOR, CPU_SLACK_S = 3.0, 1.0     # a test's CPU limit: 3x its baseline + 1 s
PROBES = "__mutation_probes__"          # the baseline's statement probes (a module global)
CACHE_VERSION = 1


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
    stmt: int = -1      # probe number of its innermost statement inside a function; -1: code
                        # that runs at import (module and class bodies, defaults, decorators)


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


def _walk(tree: ast.AST) -> Iterator[tuple[ast.AST, str, ast.AST | None, ast.stmt | None]]:
    """(node, enclosing qualname, parent, statement) in a fixed depth-first source order, without
    the subtrees that are never mutated; `statement` is the innermost statement around the node
    (the node itself for a statement) that lies in a function's body, None outside functions."""
    def rec(node: ast.AST, qual: str, parent: ast.AST | None, stmt: ast.stmt | None,
            in_func: bool) -> Iterator[tuple[ast.AST, str, ast.AST | None, ast.stmt | None]]:
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
        if in_func and isinstance(node, ast.stmt):
            stmt = node
        yield node, qual, parent, stmt
        func = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if func or isinstance(node, ast.ClassDef):
            qual = node.name if qual == "<module>" else f"{qual}.{node.name}"
        skip = _skip_fields(node)
        for field, value in ast.iter_fields(node):
            if field in skip:
                continue
            items = value if isinstance(value, list) else [value]
            inner = in_func or (func and field == "body")
            for child in items:
                if isinstance(child, ast.AST) and child is not docstring:
                    yield from rec(child, qual, node, stmt, inner)
    yield from rec(tree, "<module>", None, None, False)


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


def _probe_numbers(walked: list) -> dict[int, int]:
    """id(statement) -> probe number, for every statement inside a function, in walk order."""
    out: dict[int, int] = {}
    for node, _, _, stmt in walked:
        if stmt is node:
            out[id(node)] = len(out)
    return out


def enumerate_mutants(module: str) -> list[Mutant]:
    """Every mutant of `module` (repository-relative path), in source order (`before` and
    `after` are filled by describe())."""
    walked = list(_walk(ast.parse((REPO / module).read_text())))
    probes = _probe_numbers(walked)
    out: list[Mutant] = []
    seen: dict[tuple[str, str], int] = {}
    for index, (node, qual, parent, stmt) in enumerate(walked):
        for change, variant in _candidates(node, parent):
            k = seen.get((qual, change), 0)
            seen[(qual, change)] = k + 1
            out.append(Mutant(module, f"{module}::{qual}:{change}#{k}", getattr(node, "lineno", 0),
                              getattr(node, "col_offset", 0), change, "", "", index, variant,
                              probes[id(stmt)] if stmt is not None else -1))
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
        node, _, parent, _ = walked[m.index]
        shown = m.index
        if isinstance(node, (ast.Constant, ast.UnaryOp)) and isinstance(parent, ast.expr):
            while walked[shown][0] is not parent:
                shown -= 1
        after = _node_at(_mutated_tree(src, m.index, m.change, m.variant), shown)
        out.append(replace(m, before=_short(walked[shown][0]),
                           after=_short(after) if after is not None else "pass"))
    return out


def _node_at(tree: ast.AST, index: int) -> ast.AST | None:
    for i, (node, _, _, _) in enumerate(_walk(tree)):
        if i == index:
            return node
    return None


def _mutated_tree(src: str, index: int, change: str, variant: int) -> ast.Module:
    tree = ast.parse(src)
    for i, (node, _, parent, _) in enumerate(_walk(tree)):
        if i == index:
            _apply(node, parent, change, variant)
            break
    else:
        raise ValueError(f"no node {index}")
    return ast.fix_missing_locations(tree)


def mutated_code(m: Mutant):
    path = REPO / m.module
    return compile(_mutated_tree(path.read_text(), m.index, m.change, m.variant), str(path), "exec")


def probed_code(module: str):
    """The module compiled with a probe before every statement inside a function:
    `__mutation_probes__[k] = 1` (a bytearray the loader puts in the module's globals), and the
    number of probes."""
    path = REPO / module
    tree = ast.parse(path.read_text())
    probes = _probe_numbers(list(_walk(tree)))
    for node in list(ast.walk(tree)):
        for field, value in ast.iter_fields(node):
            if not (isinstance(value, list) and any(id(v) in probes for v in value)):
                continue
            out = []
            for st in value:
                k = probes.get(id(st))
                if k is not None:
                    hit = ast.Assign(targets=[ast.Subscript(ast.Name(PROBES, ast.Load()), ast.Constant(k),
                                                            ast.Store())], value=ast.Constant(1))
                    out.append(ast.copy_location(hit, st))
                out.append(st)
            setattr(node, field, out)
    return compile(ast.fix_missing_locations(tree), str(path), "exec"), len(probes)


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
# Test entries and items
# ---------------------------------------------------------------------------------------------

def test_entries(mods: list[str]) -> list[str]:
    """The test entries of `mods` for one pytest run, in table order: a file listed whole once,
    node ids only of files not listed whole."""
    whole = {t for m in mods for t in MODULES[m] if "::" not in t}
    out: list[str] = []
    for m in mods:
        for t in MODULES[m]:
            if t not in out and (t in whole or t.split("::")[0] not in whole):
                out.append(t)
    return out


def matches(nodeid: str, entry: str) -> bool:
    """Is test `nodeid` part of table entry `entry` (a file, a test, or a parametrised test)?"""
    return nodeid == entry or nodeid.startswith(entry + "::") or nodeid.startswith(entry + "[")


def module_items(mod: str, order: list[str]) -> list[str]:
    """The baseline's tests that belong to `mod`'s entries, in the table's entry order."""
    out: list[str] = []
    seen: set[str] = set()
    for entry in MODULES[mod]:
        for nid in order:
            if nid not in seen and matches(nid, entry):
                seen.add(nid)
                out.append(nid)
    return out


# ---------------------------------------------------------------------------------------------
# Children: the baseline run and the mutant runs (forked, pytest in-process)
# ---------------------------------------------------------------------------------------------

class _CodeFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves modules from given code objects (a mutant, or the probed baseline), with extra
    globals."""

    def __init__(self, codes: dict[str, tuple[Path, Any, dict]]) -> None:
        self.codes = codes          # module name -> (path, code, globals)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.codes:
            return None
        return importlib.util.spec_from_file_location(fullname, str(self.codes[fullname][0]), loader=self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        _, code, extra = self.codes[module.__name__]
        module.__dict__.update(extra)
        exec(code, module.__dict__)


def _hits(arrays: dict[str, bytearray], clear: bool = True) -> dict[str, list[int]]:
    """The probes set since the last clear, per module (cleared unless told)."""
    out = {}
    for mod, a in arrays.items():
        if any(a):
            out[mod] = [i for i, v in enumerate(a) if v]
            if clear:
                a[:] = bytes(len(a))
    return out


class _Baseline:
    """pytest plugin of the baseline child: per test, the probes it set (its fixtures' setups
    recorded per fixture name, so a test that reuses a fixture another test set up gets them
    too) and its CPU seconds; failures; what ran during collection or between tests."""

    def __init__(self, arrays: dict[str, bytearray]) -> None:
        self.arrays = arrays
        self.order: list[str] = []
        self.fixtures: dict[str, list[str]] = {}
        self.hits: dict[str, dict[str, list[int]]] = {}
        self.fixture_hits: dict[str, dict[str, set[int]]] = {}
        self.fixture_cpu: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.failed: list[str] = []
        self.outside: dict[str, set[int]] = {}      # collection, between tests: run every test
        self.collect_cpu = 0.0

    def _outside(self) -> None:
        for mod, ks in _hits(self.arrays).items():
            self.outside.setdefault(mod, set()).update(ks)

    def pytest_collection_finish(self, session) -> None:
        self.collect_cpu = time.process_time()
        self._outside()
        self.order = [it.nodeid for it in session.items]
        self.fixtures = {it.nodeid: list(getattr(it, "fixturenames", ())) for it in session.items}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._outside()
        t0 = time.process_time()
        yield
        self.cpu[item.nodeid] = time.process_time() - t0
        self.hits[item.nodeid] = _hits(self.arrays)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        before = _hits(self.arrays)
        t0 = time.process_time()
        yield
        dt = time.process_time() - t0
        mine = _hits(self.arrays)
        name = fixturedef.argname
        self.fixture_cpu[name] = max(self.fixture_cpu.get(name, 0.0), dt)
        for mod, ks in mine.items():
            self.fixture_hits.setdefault(name, {}).setdefault(mod, set()).update(ks)
        for part in (before, mine):          # the enclosing test (or fixture) ran them too
            for mod, ks in part.items():
                for k in ks:
                    self.arrays[mod][k] = 1

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and report.nodeid not in self.failed:
            self.failed.append(report.nodeid)

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.failed.append(f"collecting {report.nodeid}")

    def result(self) -> dict:
        return {"order": self.order, "fixtures": self.fixtures, "hits": self.hits,
                "fixture_hits": {f: {m: sorted(k) for m, k in d.items()} for f, d in self.fixture_hits.items()},
                "fixture_cpu": self.fixture_cpu, "cpu": self.cpu, "failed": self.failed,
                "outside": {m: sorted(k) for m, k in self.outside.items()},
                "collect_cpu": self.collect_cpu}


class _Mutant:
    """pytest plugin of a mutant child: remembers the first failing test; stops the run when a
    test (or the collection) spends more CPU time than its limit."""

    def __init__(self, limits: dict[str, float], collect_limit: float, result: Path) -> None:
        self.limits = limits
        self.collect_limit = collect_limit
        self.result = result
        self.failed: str | None = None
        self.current = "collection"
        signal.signal(signal.SIGPROF, self._expired)
        signal.setitimer(signal.ITIMER_PROF, collect_limit)

    def _expired(self, signum, frame) -> None:
        self.result.write_text(json.dumps({"rc": "timeout", "failed": self.current}))
        os._exit(0)

    def pytest_collection_finish(self, session) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        signal.setitimer(signal.ITIMER_PROF, self.limits.get(item.nodeid, 60.0))
        yield
        signal.setitimer(signal.ITIMER_PROF, 0)

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and self.failed is None:
            self.failed = report.nodeid

    def pytest_collectreport(self, report) -> None:
        if report.failed and self.failed is None:
            self.failed = f"collecting {report.nodeid}"


def _pytest_args(stop_first: bool) -> list[str]:
    args = ["-q", "--tb=no", "-p", "no:cacheprovider", "-o", "addopts=", "--no-header"]
    if stop_first:
        args.insert(0, "-x")
    for p in PLUGINS:
        args += ["-p", p]
    return args


def _child_setup() -> None:
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)      # (the parent's handler is inherited)
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT_BYTES, MEM_LIMIT_BYTES))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import hypothesis
    # deterministic examples (the baseline's probes hold for the mutant runs), no deadline (a
    # loaded machine), no example database
    hypothesis.settings.register_profile("mutation", database=None, derandomize=True,
                                         print_blob=False, deadline=None)
    hypothesis.settings.load_profile("mutation")
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"


def _baseline_child(mods: list[str], tests: list[str], result: Path) -> None:
    """Runs in a forked child: the unmutated tests with probes in every core module; never returns."""
    code = 3
    try:
        _child_setup()
        codes, arrays = {}, {}
        for mod in mods:
            c, n = probed_code(mod)
            arrays[mod] = bytearray(n)
            codes[module_name(mod)] = (REPO / mod, c, {PROBES: arrays[mod]})
        sys.meta_path.insert(0, _CodeFinder(codes))
        rec = _Baseline(arrays)
        rc = int(pytest.main(_pytest_args(False) + tests, plugins=[rec]))
        result.write_text(json.dumps({"rc": rc, **rec.result()}))
        code = 0
    except BaseException as e:   # noqa: BLE001 -- report anything, the parent decides
        try:
            result.write_text(json.dumps({"rc": 99, "failed": [f"{type(e).__name__}: {e}"]}))
        except BaseException:
            pass
    finally:
        os._exit(code)


def _mutant_child(m: Mutant, tests: list[str], limits: dict[str, float], collect_limit: float,
                  result: Path) -> None:
    """Runs in a forked child: the mutant's tests; never returns."""
    code = 3
    try:
        _child_setup()
        sys.meta_path.insert(0, _CodeFinder({module_name(m.module): (REPO / m.module, mutated_code(m), {})}))
        rec = _Mutant(limits, collect_limit, result)
        t0 = time.monotonic()
        rc = int(pytest.main(_pytest_args(True) + tests, plugins=[rec]))
        signal.setitimer(signal.ITIMER_PROF, 0)
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
    status: str          # killed | timeout | survived | uncovered | error | equivalent
    line: int = 0
    before: str = ""
    after: str = ""
    by: str | None = None
    seconds: float = 0.0
    tests: int = 0       # how many tests were selected for it


class Pool:
    """Forked children, `jobs` at a time, each with a wall-clock limit (a backstop: the CPU
    limits inside the child stop hung tests first)."""

    def __init__(self, jobs: int, tmp: Path) -> None:
        self.jobs = jobs
        self.tmp = tmp
        self.running: dict[int, tuple[Any, Path, float, float]] = {}   # pid -> (key, result, t0, limit)
        self.done: list[tuple[Any, dict]] = []     # results reaped while waiting for a free slot
        self.n = 0

    def submit(self, key: Any, limit: float, target, *args) -> None:
        while len(self.running) >= self.jobs:
            self.done += self._reap(block=True)
        self.n += 1
        result = self.tmp / f"r{self.n}.json"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            target(*args, result)
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
                    out.append((key, {"rc": "timeout", "failed": "wall-clock backstop",
                                      "seconds": now - t0}))
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
            time.sleep(0.02)

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

    def stop(self) -> None:
        """Kill every running child (its process group: pytest's own children too)."""
        for pid in list(self.running):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            del self.running[pid]


def _classify(r: dict) -> tuple[str, str | None]:
    rc = r["rc"]
    if rc == "timeout":
        return "timeout", r.get("failed")
    if rc == 0:
        return "survived", None
    if rc in (1, 2):             # a test failed / a collection error (the mutant broke an import)
        return "killed", r.get("failed")
    if rc == 4:                  # a conftest.py could not be imported (the mutant broke a module it imports)
        return "killed", r.get("failed") or "conftest import failed"
    if rc == 98 or rc == 99:     # crashed (e.g. memory limit) or raised outside pytest
        return "killed", r.get("failed")
    return "error", f"pytest exit code {rc}"


# ---------------------------------------------------------------------------------------------
# The baseline: run, merge, cache
# ---------------------------------------------------------------------------------------------

def _tree_key(mods: list[str]) -> str:
    """Hash of everything a baseline depends on: the sources and tests, configs, the table."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{sys.version}|{json.dumps(MODULES, sort_keys=True)}|"
                       f"{sorted(mods)}".encode())
    for top, pats in (("sim", ("*.py",)), ("profiler", ("*.py",)), ("tests", ("*.py", "*.json", "*.yaml")),
                      ("conf", ("*.yaml",))):
        for pat in pats:
            for p in sorted((REPO / top).rglob(pat)):
                if "__pycache__" not in p.parts:
                    h.update(str(p.relative_to(REPO)).encode())
                    h.update(p.read_bytes())
    return h.hexdigest()[:20]


@dataclass
class Baseline:
    order: list[str]
    cpu: dict[str, float]                 # test -> CPU s, its fixtures' setups included
    hits: dict[str, dict[str, set[int]]]  # test -> module -> probes (its fixtures' included)
    outside: dict[str, set[int]]          # module -> probes set outside any test
    collect_cpu: float
    seconds: float
    cached: bool = False
    _items: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def tests_for(self, m: Mutant, everything: bool) -> list[str]:
        items = self._items.get(m.module)
        if items is None:
            items = self._items[m.module] = module_items(m.module, self.order)
        if not (everything or m.stmt < 0 or m.stmt in self.outside.get(m.module, ())):
            items = [t for t in items if m.stmt in self.hits.get(t, {}).get(m.module, ())]
        # files in table order, each file's tests cheapest first (a file's tests stay together:
        # its module fixtures are set up once)
        rank: dict[str, int] = {}
        for t in items:
            rank.setdefault(t.split("::")[0], len(rank))
        return sorted(items, key=lambda t: (rank[t.split("::")[0]], self.cpu.get(t, 0.0)))

    def limits(self, tests: list[str]) -> dict[str, float]:
        return {t: CPU_FACTOR * self.cpu.get(t, 10.0) + CPU_SLACK_S for t in tests}


def _merge(parts: list[dict], entries: list[str], seconds: float) -> Baseline:
    pos = {e: i for i, e in enumerate(entries)}

    def rank(nid: str) -> int:
        return min((pos[e] for e in entries if matches(nid, e)), default=len(entries))

    seq = [(rank(n), i, j, n) for i, p in enumerate(parts) for j, n in enumerate(p["order"])]
    order = [n for *_, n in sorted(seq)]
    cpu: dict[str, float] = {}
    hits: dict[str, dict[str, set[int]]] = {}
    outside: dict[str, set[int]] = {}
    for p in parts:
        for mod, ks in p["outside"].items():
            outside.setdefault(mod, set()).update(ks)
        for nid in p["order"]:
            own = {m: set(k) for m, k in p["hits"].get(nid, {}).items()}
            extra = 0.0
            for f in p["fixtures"].get(nid, []):
                for m, k in p["fixture_hits"].get(f, {}).items():
                    own.setdefault(m, set()).update(k)
                extra += p["fixture_cpu"].get(f, 0.0)
            hits[nid] = own
            cpu[nid] = p["cpu"].get(nid, 0.0) + extra
    return Baseline(order, cpu, hits, outside, max(p["collect_cpu"] for p in parts), seconds)


def _save(b: Baseline, path: Path) -> None:
    doc = {"order": b.order, "cpu": b.cpu, "collect_cpu": b.collect_cpu, "seconds": b.seconds,
           "hits": {t: {m: sorted(k) for m, k in d.items()} for t, d in b.hits.items()},
           "outside": {m: sorted(k) for m, k in b.outside.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def _load(path: Path) -> Baseline | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return Baseline(d["order"], d["cpu"], {t: {m: set(k) for m, k in x.items()} for t, x in d["hits"].items()},
                    {m: set(k) for m, k in d["outside"].items()}, d["collect_cpu"], d["seconds"], True)


def run_baseline(pool: Pool, mods: list[str], jobs: int) -> tuple[Baseline | None, list[str]]:
    """The unmutated tests of `mods`, split over `jobs` children by file (largest first, onto
    the least loaded child by file size: fixtures stay within a file)."""
    entries = test_entries(mods)
    files: dict[str, list[str]] = {}
    for e in entries:
        files.setdefault(e.split("::")[0], []).append(e)
    groups: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(files))))]
    size = [0] * len(groups)
    for f in sorted(files, key=lambda f: -(REPO / f).stat().st_size):
        i = size.index(min(size))
        groups[i] += files[f]
        size[i] += (REPO / f).stat().st_size
    t0 = time.monotonic()
    for i, g in enumerate(groups):
        pool.submit(("baseline", i), 3600.0, _baseline_child, mods, g)
    parts, failed = [], []
    for _, r in pool.drain():
        if r["rc"] != 0 or r.get("failed"):
            failed += r.get("failed") or [f"pytest exit code {r['rc']}"]
        else:
            parts.append(r)
    if failed:
        return None, failed
    return _merge(parts, entries, time.monotonic() - t0), []


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
    assert not loaded, f"a core module was imported in the parent (PRELOAD pulls it in): {loaded}"
    import gc
    gc.collect()
    gc.freeze()     # children's collections skip what the parent loaded


def _run_all(a: argparse.Namespace, pool: Pool, chosen: dict[str, list[Mutant]],
             todo: list[tuple[str, Mutant]], outcomes: dict[str, list[Outcome]]
             ) -> tuple[Baseline | None, list[str]]:
    """The baseline (or its cache), then every mutant of `todo` on `pool`; outcomes appended
    per module. (None, failures) when the unmutated tests fail."""
    # 1. the unmutated tests, with probes: which tests run each statement, and their time
    bmods = list(chosen)
    cache = CACHE_DIR / f"mutation-baseline-{_tree_key(bmods)}.json"
    base = None if a.no_cache else _load(cache)
    if base is None:
        print(f"baseline: {len(test_entries(bmods))} test entries of {len(bmods)} modules...",
              file=sys.stderr, flush=True)
        base, failed = run_baseline(pool, bmods, a.jobs)
        if base is None:
            return None, failed
        _save(base, cache)
    print(f"baseline: {len(base.order)} tests, {sum(base.cpu.values()):.0f} CPU-s, "
          + (f"cached ({cache})" if base.cached else f"{base.seconds:.0f} s"),
          file=sys.stderr, flush=True)
    # 2. the mutants, each on the tests that run its statement
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="mutants", unit="mutant", file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    info: dict[str, tuple[Mutant, int]] = {}

    def collect(results):
        for key, r in results:
            m, n = info[key]
            status, by = _classify(r)
            if status in ("survived", "error") or not sys.stderr.isatty():
                bar.write(f"{status}: {m.id}  line {m.line}: {m.before}  ->  {m.after}"
                          + (f"  [{by}]" if by else ""), file=sys.stderr)
            outcomes[m.module].append(Outcome(m.id, m.module, status, m.line, m.before, m.after,
                                              by, round(float(r.get("seconds", 0)), 2), n))
            bar.update(1)

    collect_limit = CPU_FACTOR * base.collect_cpu + 10.0
    for mod, m in todo:
        tests = base.tests_for(m, a.all_tests)
        if not tests:
            outcomes[mod].append(Outcome(m.id, mod, "uncovered", m.line, m.before, m.after,
                                         "no test runs this statement"))
            bar.write(f"uncovered: {m.id}  line {m.line}: {m.before}  ->  {m.after}", file=sys.stderr)
            bar.update(1)
            continue
        limits = base.limits(tests)
        info[m.id] = (m, len(tests))
        pool.submit(m.id, 2.0 * (sum(limits.values()) + collect_limit) + 60.0, _mutant_child,
                    m, tests, limits, collect_limit)
        collect(pool.poll())
    collect(pool.drain())
    bar.close()
    return base, []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.tools.mutation",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"at most {QUICK_PER_MODULE} mutants per module (fixed-seed sample)")
    ap.add_argument("--sample", type=int, default=None, help="at most N mutants per module")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--modules", nargs="*", default=None,
                    help="only modules whose path contains one of these strings")
    ap.add_argument("--ids", nargs="*", default=None, help="only these mutant ids")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                    help="children at once (default: the CPU count)")
    ap.add_argument("--all-tests", action="store_true",
                    help="run every test of the module's files for each mutant (no selection)")
    ap.add_argument("--no-cache", action="store_true", help="run the baseline even if cached")
    ap.add_argument("--list", action="store_true", help="list the selected mutants, run nothing")
    ap.add_argument("--show", metavar="ID", help="print one mutant's change and exit")
    ap.add_argument("--json", metavar="PATH", help="write every outcome to this JSON file")
    a = ap.parse_args(argv)
    if a.quick and a.sample is None:
        a.sample = QUICK_PER_MODULE
    if a.jobs < 1:
        ap.error(f"--jobs={a.jobs} is invalid; allowed: >= 1")

    from sim import compiled
    forced = os.environ.get("MMSERVE_SIM_PURE", "") not in ("", "0")
    if compiled.built_files(REPO) and not forced and not (a.list or a.show):
        # a mutant is a .py module: mixed with compiled modules it would meet their type checks.
        # The whole run goes pure (the build is set aside for this process, not removed).
        print("mutation: the compiled build is set aside for this run (MMSERVE_SIM_PURE=1)",
              file=sys.stderr, flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "sim.tools.mutation", *(argv or sys.argv[1:])],
                  {**os.environ, "MMSERVE_SIM_PURE": "1"})
    mods = [p for p in MODULES if not a.modules or any(s in p for s in a.modules)]
    if not mods:
        ap.error(f"--modules {a.modules} matches none of {list(MODULES)}")
    missing = sorted({t for p in mods for t in MODULES[p] if not (REPO / t.split("::")[0]).exists()})
    if missing:
        print(f"sim/tools/mutation.py MODULES names test files that do not exist: {missing}",
              file=sys.stderr)
        return 2
    per_module = {p: enumerate_mutants(p) for p in mods}
    if a.show:
        for ms in per_module.values():
            for m in describe([m for m in ms if m.id == a.show]):
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

    def _terminated(signum, frame):     # SIGTERM: stop the children too (finally below)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _terminated)
    outcomes: dict[str, list[Outcome]] = {p: [] for p in chosen}
    todo = [(mod, m) for mod, ms in chosen.items() for m in ms if m.id not in equivalent]
    for mod, ms in chosen.items():
        outcomes[mod] += [Outcome(m.id, mod, "equivalent", m.line, m.before, m.after)
                          for m in ms if m.id in equivalent]
    t_start, cpu_start = time.monotonic(), _children_cpu()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmpd:
        pool = Pool(a.jobs, Path(tmpd))
        try:
            base, failed = _run_all(a, pool, chosen, todo, outcomes)
        finally:
            pool.stop()
        if base is None:
            print("the tests fail without any mutant (fix them first): "
                  + "; ".join(failed[:10]), file=sys.stderr)
            return 1
    elapsed, cpu = time.monotonic() - t_start, _children_cpu() - cpu_start

    report = []
    for mod in chosen:
        os_ = outcomes[mod]
        n = len(os_)
        e = sum(o.status == "equivalent" for o in os_)
        t = sum(o.status == "timeout" for o in os_)
        k = sum(o.status in ("killed", "timeout") for o in os_)
        u = sum(o.status == "uncovered" for o in os_)
        s = sum(o.status == "survived" for o in os_) + u
        err = sum(o.status == "error" for o in os_)
        score = k / (n - e) if n > e else 1.0
        line = (f"module={mod} tried={n} killed={k} equivalent={e} score={score:.2f} "
                f"timeout={t} survived={s}" + (f" uncovered={u}" if u else "")
                + (f" error={err}" if err else ""))
        print(line)
        report.append({"module": mod, "tried": n, "killed": k, "equivalent": e, "score": score,
                       "timeout": t, "survived": s, "uncovered": u, "error": err,
                       "tests": MODULES[mod]})
    for mod in chosen:
        for o in sorted(outcomes[mod], key=lambda o: o.line):
            if o.status in ("survived", "uncovered", "error"):
                print(f"  {o.status}: {o.id}  line {o.line}: {o.before}  ->  {o.after}")
    if stale:
        print(f"equivalent.yaml lists {len(stale)} ids that no longer exist: {stale}")
    run = sum(1 for v in outcomes.values() for o in v if o.status not in ("equivalent", "uncovered"))
    print(f"{sum(len(v) for v in outcomes.values())} mutants ({run} run) in {elapsed:.0f} s, "
          f"{cpu:.0f} CPU-s in children (--jobs {a.jobs}; baseline "
          + ("cached" if base.cached else f"{base.seconds:.0f} s") + ")")
    if a.json:
        doc = {"argv": sys.argv[1:], "seconds": round(elapsed, 1), "cpu_seconds": round(cpu, 1),
               "baseline_seconds": None if base.cached else round(base.seconds, 1),
               "modules": report, "outcomes": [asdict(o) for v in outcomes.values() for o in v]}
        p = Path(a.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, p)
    return 0


def _children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    sys.exit(main())
