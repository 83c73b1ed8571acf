"""Garbage-collection pauses of every Python process of a `vllm serve` run and of its client.

Why: loaded qwen2_5_7b runs show server-wide stalls of 40-130 ms every 1-6 s (the step log's
record times jump, and every streaming request sees the same inter-token gap at the same moment),
which the engine-level tables cannot contain. CPython's cyclic collector stops the whole
interpreter while it runs, and a full (generation-2) collection of a process holding a tokenizer
and hundreds of live requests can take that long. This module records each collection's start
(time.time(), the step log's clock), duration, generation and the process it ran in, so the
stalls can be attributed (API server, engine core, client) and their rate and length measured.

`install(dir)` writes a `sitecustomize.py` into `dir`; put `dir` first on PYTHONPATH and set
MMSIM_GCLOG to an output folder (profiler/serve_bench.py --gclog does both for the server and the
client). Each process appends to `<folder>/gc_<pid>.jsonl`: a header line {"pid", "cmd",
"threshold", "frozen"} when it first logs, then one line per collection {"t", "d", "g", "n"}
(start, seconds, generation, objects collected); the header is written again (with "ppid")
whenever the process's command line changes (vLLM retitles its engine core). Collections of the
youngest generation shorter than `MMSIM_GCLOG_MIN_MS` (default 0.5 ms) are counted, not logged
({"skipped": n} at a clean exit). Any `sitecustomize` that `dir` shadows is still imported.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

SITECUSTOMIZE = r'''# written by profiler.gclog: log this process's garbage collections to $MMSIM_GCLOG
import os as _os


def _mmsim_cmdline():
    """This process's command line as it is now (vLLM retitles its engine core)."""
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:300]
    except OSError:
        import sys
        return " ".join(sys.argv)[:300]


def _mmsim_gclog():
    import atexit, gc, json, sys, time
    folder = _os.environ.get("MMSIM_GCLOG")
    if not folder:
        return
    min_s = float(_os.environ.get("MMSIM_GCLOG_MIN_MS", "0.5")) / 1e3
    st = {"pid": None, "f": None, "t": 0.0, "p": 0.0, "skipped": 0, "cmd": None}
    clock, wall = time.perf_counter, time.time

    def out():
        pid = _os.getpid()
        if st["pid"] != pid:          # first record, or a forked child: its own file
            st["pid"], st["skipped"], st["cmd"] = pid, 0, None
            st["f"] = open(_os.path.join(folder, "gc_%d.jsonl" % pid), "a", buffering=1)
        cmd = _mmsim_cmdline()        # re-read: a process may retitle itself (vLLM's EngineCore)
        if cmd != st["cmd"]:
            st["cmd"] = cmd
            st["f"].write(json.dumps({"pid": pid, "ppid": _os.getppid(), "cmd": cmd,
                                      "threshold": gc.get_threshold(),
                                      "frozen": gc.get_freeze_count()}) + "\n")
        return st["f"]

    def cb(phase, info):
        if phase == "start":
            st["t"], st["p"] = wall(), clock()
            return
        d = clock() - st["p"]
        if d < min_s and info.get("generation", 0) == 0:
            st["skipped"] += 1
            return
        out().write(json.dumps({"t": round(st["t"], 6), "d": round(d, 6),
                                "g": info.get("generation"), "n": info.get("collected")}) + "\n")

    def bye():
        if st["f"] is not None and st["pid"] == _os.getpid():
            st["f"].write(json.dumps({"skipped": st["skipped"]}) + "\n")
            st["f"].close()

    try:
        _os.makedirs(folder, exist_ok=True)
    except OSError:
        return
    gc.callbacks.append(cb)
    atexit.register(bye)


def _mmsim_chain():
    """Import the sitecustomize this one shadows, if any."""
    import importlib, sys
    here = _os.path.dirname(_os.path.abspath(__file__))
    me = sys.modules.pop("sitecustomize", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if _os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if me is not None:
            sys.modules["sitecustomize"] = me


def _mmsim_stacks():
    """Sample every thread's Python stack every MMSIM_STACKLOG_MS (5) ms, only while the file
    MMSIM_STACKLOG_ON exists (the benchmark's traffic), into <MMSIM_STACKLOG>/stk_<pid>.jsonl."""
    import json, sys, threading, time
    folder, on = _os.environ.get("MMSIM_STACKLOG"), _os.environ.get("MMSIM_STACKLOG_ON")
    if not folder or not on:
        return
    every = float(_os.environ.get("MMSIM_STACKLOG_MS", "5")) / 1e3
    exists, mono, sleep = _os.path.exists, time.monotonic, time.sleep

    held = []                        # the open file, flushed at exit (a daemon thread is not)

    def run():
        me = threading.get_ident()
        pid, f, keys, cmd = _os.getpid(), None, {}, None
        del held[:]
        names, named_at = {}, 0.0
        while True:
            if not exists(on):
                if f is not None:
                    f.flush()
                sleep(0.2)
                continue
            if f is None:
                _os.makedirs(folder, exist_ok=True)
                f = open(_os.path.join(folder, "stk_%d.jsonl" % pid), "a", buffering=1 << 16)
                held.append(f)
            now = mono()
            if now - named_at > 1.0:
                names = {t.ident: t.name for t in threading.enumerate()}
                named_at = now
                c = _mmsim_cmdline()
                if c != cmd:
                    cmd = c
                    f.write(json.dumps({"pid": pid, "cmd": cmd}) + "\n")
            sample = {}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                fr = []
                while frame is not None and len(fr) < 16:
                    co = frame.f_code
                    fr.append("%s:%s:%d" % (_os.path.basename(co.co_filename), co.co_name, frame.f_lineno))
                    frame = frame.f_back
                key = tuple(fr)
                k = keys.get(key)
                if k is None:
                    k = keys[key] = len(keys)
                    f.write(json.dumps({"k": k, "f": fr}) + "\n")
                sample[names.get(ident, str(ident))] = k
            f.write(json.dumps([round(now, 6), sample]) + "\n")
            sleep(every)

    def start():
        threading.Thread(target=run, name="mmsim-stacks", daemon=True).start()

    def bye():
        for fh in held:
            try:
                fh.flush()
            except (OSError, ValueError):
                pass

    import atexit
    atexit.register(bye)

    start()
    _os.register_at_fork(after_in_child=start)


_mmsim_gclog()
_mmsim_stacks()
_mmsim_chain()
'''


def install(directory: str | Path) -> Path:
    """Write the logging sitecustomize.py into `directory`; returns it (put it first on PYTHONPATH)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def gather(folder: str | Path, dst: str | Path, prefix: str = "gc") -> Path:
    """All processes' logs (`<prefix>_<pid>.jsonl`) into one gzipped JSON-lines file: per process
    a header line (with "pid", "cmd") followed by its records, each tagged with "pid" (stack
    samples, which are lists, become {"pid", "m", "s"})."""
    folder, dst = Path(folder), Path(dst)
    with gzip.open(dst, "wt") as out:
        for f in sorted(folder.glob(f"{prefix}_*.jsonl")):
            pid = int(f.stem.split("_")[1])
            for line in f.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:   # a line cut by a kill
                    continue
                if isinstance(rec, list):
                    rec = {"m": rec[0], "s": rec[1]}
                rec.setdefault("pid", pid)
                out.write(json.dumps(rec) + "\n")
    return dst


def read(path: str | Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(processes by pid: their header, with "role"; collections sorted by start time)."""
    procs: dict[int, dict[str, Any]] = {}
    cols: list[dict[str, Any]] = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            if "cmd" in rec:
                rec["role"] = role(rec["cmd"])
                procs[rec["pid"]] = rec
            elif "t" in rec:
                cols.append(rec)
            elif "skipped" in rec and rec["pid"] in procs:
                procs[rec["pid"]]["skipped"] = rec["skipped"]
    cols.sort(key=lambda r: r["t"])
    return procs, cols


def role(cmd: str) -> str:
    """Which part of the run a process is, from its command line."""
    c = cmd.lower()
    if "bench serve" in c or "bench_serve" in c or " bench " in c:
        return "client"
    if "enginecore" in c or "engine_core" in c:
        return "engine_core"
    if "serve" in c:
        return "api_server"
    return "other"        # the multiprocessing resource tracker, vLLM's model-registry probe


def traffic_window(steps: list[dict[str, Any]], span: list[float]) -> tuple[float, float] | None:
    """[first, last] step-log record inside a run's wall span: when the server had requests (the
    span also holds the client's start-up, 20-40 s of dataset sampling)."""
    ts = [r["t"] for r in steps if span[0] <= r["t"] <= span[1]]
    return (min(ts), max(ts)) if ts else None


def run_summary(folder: str | Path, gclog_name: str) -> list[dict[str, Any]]:
    """Per run that names `gclog_name` in its provenance, per process role and generation: the
    collections inside the run's traffic window (count, longest, total), from the step log that
    the same runs name."""
    from profiler.jsonfiles import json_files, read_json, run_name
    from profiler.vllm_steplog import read_steplog, resolve_steplog
    folder = Path(folder)
    procs, cols = read(folder / gclog_name)
    rows = []
    for p in json_files(folder):
        try:
            obj = read_json(p)
        except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError):
            continue
        prov = obj.get("provenance") if isinstance(obj, dict) else None
        if not isinstance(prov, dict) or prov.get("gclog") != gclog_name or "run" not in prov:
            continue
        sl = resolve_steplog(folder, prov.get("steplog"))
        win = traffic_window(read_steplog(sl), prov["wall_span"]) if sl else None
        if win is None:
            continue
        inside = [c for c in cols if win[0] <= c["t"] <= win[1]]
        for r in sorted({procs[c["pid"]]["role"] for c in cols if c["pid"] in procs}):
            for g in (0, 1, 2):
                ds = [c["d"] for c in inside if c["g"] == g and procs.get(c["pid"], {}).get("role") == r]
                rows.append({"run": run_name(p), "window_s": round(win[1] - win[0], 2), "role": r, "gen": g,
                             "logged": len(ds), "max_ms": round(max(ds) * 1e3, 2) if ds else 0.0,
                             "total_ms": round(sum(ds) * 1e3, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m profiler.gclog",
                                 description="garbage collections per run, process and generation")
    ap.add_argument("gclog", help="a gclog_<model>[__tag].jsonl.gz next to its runs' JSONs")
    a = ap.parse_args(argv)
    path = Path(a.gclog)
    procs, cols = read(path)
    print(f"{path.name}: {len(procs)} processes, {len(cols)} logged collections "
          f"(generation 0 only when >= MMSIM_GCLOG_MIN_MS)")
    for pid, h in sorted(procs.items()):
        print(f"  pid {pid:6d} {h['role']:12s} threshold {tuple(h['threshold'])} frozen {h['frozen']:6d}  {h['cmd'][:70]}")
    print("\nwithin each run's traffic window (first to last step-log record):")
    print(f"  {'run':28s} {'window':>7s} {'role':12s} gen {'logged':>6s} {'max ms':>8s} {'total ms':>9s}")
    for r in run_summary(path.parent, path.name):
        if r["logged"]:
            print(f"  {r['run']:28s} {r['window_s']:6.1f}s {r['role']:12s} {r['gen']:3d} {r['logged']:6d} "
                  f"{r['max_ms']:8.2f} {r['total_ms']:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
