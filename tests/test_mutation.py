"""The mutation tool (sim/tools/mutation.py), without running any mutant: every core module and
test file it names exists, mutant ids are unique and stable under edits elsewhere in a file,
every mutant compiles and changes the code, the --quick sample is fixed by its seed, the
baseline's statement probes (one per statement inside a function, none elsewhere) and the
selection of a mutant's tests from them (fixtures included, files in table order, cheapest
first, import-time code runs every test), and every entry of the equivalent-mutants file names
a mutant that exists, with a reason."""
from __future__ import annotations

import ast
import types

import pytest

from sim.tools import mutation as M


def test_module_table_names_existing_files():
    assert len(M.MODULES) >= 17
    for mod, tests in M.MODULES.items():
        assert (M.REPO / mod).is_file(), mod
        assert tests, mod
        for t in tests:
            assert (M.REPO / t.split("::")[0]).is_file(), t


@pytest.mark.parametrize("mod", ["sim/policies/routing.py", "sim/engines/batch.py"])
def test_every_mutant_compiles_and_changes_the_module(mod):
    ms = M.enumerate_mutants(mod)
    assert len({m.id for m in ms}) == len(ms) > 10
    src = ast.dump(ast.parse((M.REPO / mod).read_text()))
    kinds = set()
    for m in M.describe(ms):
        assert m.before != m.after, m.id
        code = M.mutated_code(m)
        assert code.co_filename.endswith(mod)
        assert ast.dump(M._mutated_tree((M.REPO / mod).read_text(), m.index, m.change, m.variant)) != src
        kinds.add(m.change.split("#")[0])
    assert len(kinds) >= 6 and any(k.startswith("return") for k in kinds)


def test_ids_survive_an_edit_elsewhere_in_the_file(tmp_path, monkeypatch):
    mod = "sim/policies/routing.py"
    before = {m.id: (m.change, m.before) for m in M.describe(M.enumerate_mutants(mod))}
    edited = tmp_path / "sim" / "policies" / "routing.py"
    edited.parent.mkdir(parents=True)
    src = (M.REPO / mod).read_text()
    edited.write_text(src.replace("class LeastLoaded", "def _extra(x):\n    return x + 1 < 2\n\n\nclass LeastLoaded", 1))
    monkeypatch.setattr(M, "REPO", tmp_path)
    after = {m.id: (m.change, m.before) for m in M.describe(M.enumerate_mutants(mod))}
    assert set(before) < set(after)
    assert all(after[k] == v for k, v in before.items())


def test_quick_sample_is_fixed_by_the_seed():
    dit, routing = "sim/engines/dit.py", "sim/policies/routing.py"
    per = {m: M.enumerate_mutants(m) for m in (dit, routing)}
    a = M.select(per, 20, 0, None)
    assert [m.id for m in a[dit]] == [m.id for m in M.select(per, 20, 0, None)[dit]]
    assert len(a[dit]) == 20 and len(a[routing]) == 20 < len(per[routing])
    b = M.select(per, 20, 1, None)
    assert [m.id for m in a[dit]] != [m.id for m in b[dit]]
    one = per[dit][3].id
    assert [m.id for ms in M.select(per, 20, 0, [one]).values() for m in ms] == [one]


SRC = '''\
"""doc"""
K = 3                           # import time


def f(x, d=2):
    """f's docstring stays first"""
    if x > K:
        return x - d
    return [y + 1 for y in range(x)]


class C:
    n = 1 + 1                   # import time

    def g(self):
        def inner():
            return 4 * 2
        return inner() - self.n
'''


def test_probes_mark_statements_inside_functions_only(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "REPO", tmp_path)
    (tmp_path / "m.py").write_text(SRC)
    ms = {m.id: m for m in M.enumerate_mutants("m.py")}
    assert ms["m.py::<module>:3->4#0"].stmt == -1            # module constant
    assert ms["m.py::f:2->3#0"].stmt == -1                   # a default: evaluated at import
    assert ms["m.py::C:Add->Sub#0"].stmt == -1               # class body
    inner = ms["m.py::C.g.inner:Mult->Div#0"].stmt
    assert ms["m.py::f:Gt->GtE#0"].stmt >= 0 and inner >= 0
    code, n = M.probed_code("m.py")
    assert n == 6                  # f: if, 2 returns; g: def inner, its return, g's return
    probes = bytearray(n)
    mod = types.ModuleType("m")
    mod.__dict__[M.PROBES] = probes
    exec(code, mod.__dict__)
    assert not any(probes)                                   # importing ran no function body
    assert mod.f.__doc__ == "f's docstring stays first"
    assert mod.f(5) == 3 and mod.C().g() == 6
    assert probes[ms["m.py::f:Gt->GtE#0"].stmt] and probes[inner]
    assert not probes[ms["m.py::f:Add->Sub#0"].stmt]         # the list comprehension's return
    assert probes[ms["m.py::f:Sub->Add#0"].stmt]


def test_test_entries_list_a_file_once():
    mods = ["sim/engines/dit.py", "sim/engines/ar.py"]
    entries = M.test_entries(mods)
    assert len(entries) == len(set(entries))
    assert M.G in entries and "tests/test_dit.py" in entries
    assert all("::" not in e or e.split("::")[0] not in entries for e in entries)
    assert M.matches("tests/a.py::t[x-1]", "tests/a.py::t") and M.matches("tests/a.py::t", "tests/a.py")
    assert not M.matches("tests/a.py::t2", "tests/a.py::t")


def test_a_mutant_runs_the_tests_that_ran_its_statement(monkeypatch):
    monkeypatch.setitem(M.MODULES, "x.py", ["tests/u.py", "tests/g.py"])
    part = {"order": ["tests/g.py::slow", "tests/g.py::fast", "tests/u.py::b", "tests/u.py::a",
                      "tests/other.py::z"],
            "fixtures": {"tests/g.py::slow": ["runs"], "tests/g.py::fast": ["runs"],
                         "tests/u.py::b": [], "tests/u.py::a": [], "tests/other.py::z": []},
            "hits": {"tests/g.py::slow": {}, "tests/g.py::fast": {}, "tests/u.py::b": {"x.py": [1]},
                     "tests/u.py::a": {"x.py": [1, 2]}, "tests/other.py::z": {"x.py": [1]}},
            "fixture_hits": {"runs": {"x.py": [1, 3]}}, "fixture_cpu": {"runs": 5.0},
            "cpu": {"tests/g.py::slow": 2.0, "tests/g.py::fast": 0.1, "tests/u.py::b": 0.5,
                    "tests/u.py::a": 0.2, "tests/other.py::z": 0.1},
            "outside": {"x.py": [4]}, "collect_cpu": 1.0}
    base = M._merge([part], ["tests/u.py", "tests/g.py"], 9.0)

    def mutant(stmt):
        return M.Mutant("x.py", f"x.py::f:s{stmt}", 1, 0, "c", "", "", 0, 0, stmt)
    # files in table order, each file's tests cheapest first; a fixture's statements count
    # for every test that uses it; other modules' tests never
    assert base.tests_for(mutant(1), False) == ["tests/u.py::a", "tests/u.py::b",
                                                "tests/g.py::fast", "tests/g.py::slow"]
    assert base.tests_for(mutant(2), False) == ["tests/u.py::a"]
    assert base.tests_for(mutant(3), False) == ["tests/g.py::fast", "tests/g.py::slow"]
    assert base.tests_for(mutant(5), False) == []                      # no test runs it
    everything = ["tests/u.py::a", "tests/u.py::b", "tests/g.py::fast", "tests/g.py::slow"]
    assert base.tests_for(mutant(4), False) == everything              # ran outside any test
    assert base.tests_for(mutant(-1), False) == everything             # import-time code
    assert base.tests_for(mutant(5), True) == everything               # --all-tests
    # CPU limits: 3x the test's time with its fixtures' setup, + 1 s
    assert base.limits(["tests/g.py::fast"]) == {"tests/g.py::fast": pytest.approx(3 * 5.1 + 1)}


def test_equivalent_file_lists_existing_mutants_with_reasons():
    eq = M.load_equivalent()
    assert eq
    ids = {m.id for mod in M.MODULES for m in M.enumerate_mutants(mod)}
    stale = sorted(set(eq) - ids)
    assert not stale, f"docs/mutation/equivalent.yaml lists mutants that no longer exist: {stale}"
    for k, v in eq.items():
        assert len(str(v["why"]).split()) >= 5, k


@pytest.mark.parametrize("rc, outcome", [(0, "survived"), (1, "killed"), (2, "killed"), (4, "killed"),
                                         (98, "killed"), (99, "killed"), ("timeout", "timeout"),
                                         (3, "error"), (5, "error")])
def test_a_mutant_is_killed_by_any_red_run_of_its_tests(rc, outcome):
    # 4: pytest could not import a conftest.py, as when the mutant breaks a module the tests'
    # conftest imports (latency.py's module constants); 3 (internal error), 5 (no tests): the
    # tool's fault, reported as errors
    assert M._classify({"rc": rc})[0] == outcome
