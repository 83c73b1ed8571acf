"""The package's shape (issue 15), checked on the sources so that it stays true: SimPy's private
fields are touched only inside sim/core (the kernel owns the inlining), the modules' top-level
imports form no cycle, a run imports no offline tool or study, and each name family has one
definition that the rest imports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIMPY_PRIVATE = {"_queue", "_eid", "_now", "_value", "_ok", "_active_proc", "_defused"}


def _modules(pkg: str = "sim") -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / pkg).rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = p
    return out


def _tree(p: Path) -> ast.Module:
    return ast.parse(p.read_text(), filename=str(p))


def test_simpy_privates_are_touched_only_in_sim_core():
    """`x._queue` and friends outside sim/core would be a second event API (the kernel's
    inlining must stay in one owner). A module's own attributes of those names (self._now of a
    class that is not the kernel) would be caught too: there are none."""
    offenders = []
    for name, p in _modules().items():
        if name.startswith("sim.core"):
            continue
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.Attribute) and node.attr in SIMPY_PRIVATE:
                offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert offenders == []


def _top_level_imports(name: str, p: Path, known: set[str]) -> set[str]:
    """The sim modules `name` imports when it is imported (module level, including if-blocks
    and try-blocks, not function bodies nor TYPE_CHECKING blocks)."""
    deps: set[str] = set()
    pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]

    def visit(stmts: list[ast.stmt]) -> None:
        for s in stmts:
            if isinstance(s, ast.Import):
                deps.update(a.name for a in s.names)
            elif isinstance(s, ast.ImportFrom):
                base = s.module or ""
                if s.level:
                    up = pkg.split(".")
                    up = up[:len(up) - (s.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in s.names)
            elif isinstance(s, ast.If):
                if "TYPE_CHECKING" in ast.unparse(s.test):
                    visit(s.orelse)
                else:
                    visit(s.body + s.orelse)
            elif isinstance(s, ast.Try):
                visit(s.body + s.orelse + s.finalbody + [x for h in s.handlers for x in h.body])

    visit(_tree(p).body)
    return {d for d in deps if d in known and d != name}


def test_no_import_cycle():
    mods = _modules("sim") | _modules("profiler")
    known = set(mods)
    graph = {n: _top_level_imports(n, p, known) for n, p in mods.items()}
    # a package's __init__ importing its own submodules is how Python packages expose them: the
    # edge submodule -> package is the one that closes a cycle, so it is dropped
    for n in graph:
        graph[n] = {d for d in graph[n] if not n.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    assert cycles == []


@pytest.mark.parametrize("policy", ["baseline", "modality_aware"])
def test_a_run_imports_no_offline_tool_or_study(tmp_path, synthetic_profiles, policy):
    """The run path (the CLI, the runner, the policy's parts, the outputs and the report) needs
    neither sim.tools nor sim.studies: a small run in a fresh interpreter loads none of them."""
    code = f"""
import atexit, sys
def report():
    bad = sorted(m for m in sys.modules if m.startswith(("sim.tools", "sim.studies")))
    print("LOADED:" + ",".join(bad))
atexit.register(report)
sys.argv = ["sim", "+policy={policy}", "profiles_dir={synthetic_profiles}",
            "workload.num_requests=60", "hydra.run.dir={tmp_path / 'run'}", "output.cache=false"]
import sim.__main__
sim.__main__.main()
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert p.stdout.strip().splitlines()[-1] == "LOADED:"


def _assigned_strings(values: set[str]) -> list[str]:
    """Where a module binds one of `values` as a bare string literal at module level or in a
    class body (a second definition of the name), outside sim/names.py and the profiler's
    definitions."""
    found = []
    for name, p in _modules().items():
        if name == "sim.names":
            continue
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
                v = node.value.value
                if isinstance(v, str) and v in values:
                    found.append(f"{p.relative_to(ROOT)}:{node.lineno} = {v!r}")
    return found


def test_stage_and_task_names_are_bound_once():
    """Stage and task names are constants of sim.names (bound from the profiler's schema):
    nothing in sim/ binds a constant to one of them again."""
    from profiler.models import TASKS
    from profiler.schema import STAGES
    assert _assigned_strings(set(STAGES) | set(TASKS)) == []


def test_policy_names_come_from_the_registry():
    """sim.policies.POLICIES is the one list: every name has its Hydra config group entry
    (conf/policy/<name>.yaml naming itself) and nothing else; the schema refuses other names."""
    import yaml
    from sim.config import ConfigError, PolicyConfig
    from sim.policies import POLICIES
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "conf" / "policy").glob("*.yaml")}
    assert set(files) == set(POLICIES)
    for name, d in files.items():
        assert (d.get("policy") or d).get("name", name) == name
    for name in POLICIES:
        PolicyConfig(name=name).check()
    with pytest.raises(ConfigError, match="policy.name"):
        PolicyConfig(name="not_a_policy").check()
