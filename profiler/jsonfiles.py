"""Result files that may be stored plain (`x.json`) or gzip-compressed (`x.json.gz`).

Ground truth is committed compressed to keep the tracked tree small (every device call carries
it); a freshly measured result is plain until it is committed. Every reader of bench results goes
through these functions so both forms are found and read alike, and a run is named by its file
name without either suffix (`qwen2_5_7b__sat__r2` for both forms).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

SUFFIXES = (".json.gz", ".json")     # longest first: ".json.gz" also ends in ".gz", not ".json"


def is_json_file(path: str | Path) -> bool:
    return str(path).endswith(SUFFIXES)


def run_name(path: str | Path) -> str:
    """The file name without `.json` / `.json.gz`."""
    name = Path(path).name
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return Path(path).stem


def read_text(path: str | Path) -> str:
    path = Path(path)
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text()


def read_json(path: str | Path) -> Any:
    return json.loads(read_text(path))


def json_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """`*.json` and `*.json.gz` in `folder` (and below it if `recursive`), sorted by path; where
    both forms of one run exist the plain one is returned only."""
    folder = Path(folder)
    glob = folder.rglob if recursive else folder.glob
    found = {p for s in SUFFIXES for p in glob("*" + s) if p.is_file()}
    plain = {p for p in found if p.name.endswith(".json")}
    keep = [p for p in found if p in plain or p.with_name(p.name[:-3]) not in plain]
    return sorted(keep)


def write_json_gz(obj: Any, path: str | Path) -> Path:
    """Writes `obj` as gzip-compressed JSON, atomically, with no timestamp in the gzip header (the
    same object gives the same bytes)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(json.dumps(obj).encode("utf-8"))
    tmp.replace(path)
    return path
