"""Install-time build of the hot path (sim/compiled.py): `pip install [-e] .` compiles the HOT
modules with mypyc when it can -- mypyc (a build requirement), a C compiler and the Python
headers -- and otherwise installs the pure-Python modules, saying so in one line. Set
MMSERVE_SIM_PURE=1 to skip the compilation. Everything else about the package is in
pyproject.toml."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_mmsim_compiled", ROOT / "sim" / "compiled.py")
assert _spec is not None and _spec.loader is not None
compiled = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compiled)


def say(msg: str) -> None:
    print(f"mmserve-sim: {msg}", file=sys.stderr, flush=True)


class BuildHotPath(build_ext):
    """Puts mypyc's extensions in the placeholder's place (or none when it cannot compile), and
    falls back to pure Python when compiling them fails."""

    def finalize_options(self) -> None:
        self.distribution.ext_modules = self._hot_extensions()
        super().finalize_options()
        self.parallel = self.parallel or os.cpu_count() or 1

    def _hot_extensions(self) -> list:
        # (pip install -e sets editable_mode before this runs; setup.py build_ext --inplace, inplace)
        in_place = bool(self.inplace or getattr(self, "editable_mode", False))
        if os.environ.get("MMSERVE_SIM_PURE", "") not in ("", "0"):
            if in_place:
                for f in compiled.built_files(ROOT):     # an earlier build would still be imported
                    f.unlink()
            say("MMSERVE_SIM_PURE is set: pure-Python hot path installed")
            return []
        if in_place and compiled.up_to_date(ROOT):
            # a reinstall (pip install -e ".[extra]") over a complete build of these sources
            say("the compiled hot path in place is up to date: kept")
            return []
        try:
            from mypyc.build import mypycify
        except ImportError:
            say("mypyc is not available: pure-Python hot path installed")
            return []
        # a compiled class whose base class mypyc cannot import would silently derive from object
        # (sim.core.kernel.Kernel from simpy.Environment): compile only when every base is there
        missing = [m for m in compiled.BASE_MODULES if not _importable(m)]
        if missing:
            say(f"{', '.join(missing)} not importable at build time: pure-Python hot path installed")
            return []
        cwd = os.getcwd()
        os.chdir(ROOT)                  # mypycify takes repository-relative paths
        try:
            # imported modules that are not compiled (simpy, numpy, sim.config...) are only read
            # for their types; untyped or missing third-party ones count as Any
            return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *compiled.HOT],
                            opt_level="3", group_name=compiled.GROUP,
                            target_dir=os.path.join("build", "mypyc"))
        except (Exception, SystemExit) as e:        # a type error mypyc refuses
            say(f"mypyc could not translate the hot path ({_last_line(e)}): pure-Python hot path installed")
            return []
        finally:
            os.chdir(cwd)

    def run(self) -> None:
        if not self.extensions:
            return
        cwd = os.getcwd()
        os.chdir(ROOT)                  # the extensions' sources are repository-relative
        # (setuptools' run() clears self.inplace while it builds, and a failure leaves it so)
        in_place = bool(self.inplace or getattr(self, "editable_mode", False))
        try:
            super().run()
        except (Exception, SystemExit) as e:        # no compiler, no Python headers
            self._remove_outputs(in_place)
            say(f"compiling the hot path failed ({_last_line(e)}): pure-Python hot path installed")
        finally:
            os.chdir(cwd)

    def _remove_outputs(self, in_place: bool) -> None:
        """A failed build must leave no compiled module, neither some of its own nor those of an
        earlier build (a mixed or stale set)."""
        for ext in self.extensions:
            p = self.get_ext_fullpath(ext.name)
            if os.path.exists(p):
                os.remove(p)
        if in_place:
            for f in compiled.built_files(ROOT):
                f.unlink()
        self.extensions = []


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _last_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:100]


# a placeholder, so that setuptools runs build_ext (and tags the wheel as platform-specific);
# BuildHotPath.run puts mypyc's extensions in its place
setup(ext_modules=[Extension(compiled.GROUP + "__mypyc", sources=[])],
      cmdclass={"build_ext": BuildHotPath})
