"""vLLM 0.26.0's disk connectors with every hand-off timed: what the encoder-cache connector and
the KV connector move between two `vllm serve` instances, in bytes and seconds.

vLLM loads a connector class by name from a module path (ECTransferConfig.ec_connector_module_path,
KVTransferConfig.kv_connector_module_path), so a server started with

    --ec-transfer-config '{"ec_connector": "TimedECExampleConnector",
                           "ec_connector_module_path": "profiler.connector_timing",
                           "ec_role": "ec_producer",
                           "ec_connector_extra_config": {"shared_storage_path": "/dev/shm/ec",
                                                         "timing_log": "/tmp/conn"}}'

runs vLLM's own ECExampleConnector (embeddings saved with safetensors to shared_storage_path by
the encoder instance, loaded onto the GPU by the prefill/decode instance) and writes one JSON
line per save and per load to <timing_log>/<ec|kv>_<pid>.jsonl:

    {"t": wall-clock end, "conn": "ec", "op": "save" | "load", "items": n, "bytes": b, "s": seconds}

Timing: a save is the connector's whole save call (device -> host copy, which synchronises, and
the file write); a load is the connector's whole load call followed by a CUDA synchronise (file
read, host -> device copy and, for KV, the scatter into the paged cache), so the clock stops
when the data is usable. The KV connector saves layer by layer inside the forward pass; its
records are per layer call and carry `layer`. Bytes are those of the tensors moved
(numel x element size), not of the files. NIXL's transfers need no wrapper: the decode
instance's /metrics reports vllm:nixl_xfer_time_seconds and vllm:nixl_bytes_transferred.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

LOG_KEY = "timing_log"


def nbytes(t: Any) -> int:
    return int(t.numel()) * int(t.element_size())


def _sync() -> None:
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


class TimingLog:
    """Appends one JSON line per hand-off to <folder>/<conn>_<pid>.jsonl (None: off)."""

    def __init__(self, folder: Optional[str], conn: str):
        self.f = None
        self.conn = conn
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.f = open(Path(folder) / f"{conn}_{os.getpid()}.jsonl", "a", buffering=1)

    def write(self, op: str, items: int, nbytes_: int, seconds: float, **extra: Any) -> None:
        if self.f is None or items <= 0:
            return
        rec = {"t": round(time.time(), 6), "conn": self.conn, "op": op, "items": int(items),
               "bytes": int(nbytes_), "s": round(seconds, 9), "pid": os.getpid()}
        rec.update(extra)
        self.f.write(json.dumps(rec) + "\n")


def read_timing_logs(folder: str | Path, t0: Optional[float] = None, t1: Optional[float] = None
                     ) -> list[dict[str, Any]]:
    """Every record under `folder` whose time lies in [t0, t1] (a run's wall-clock span)."""
    out = []
    for p in sorted(Path(folder).glob("*.jsonl")):
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if (t0 is None or r["t"] >= t0) and (t1 is None or r["t"] <= t1):
                out.append(r)
    return out


def _ec_base():
    from vllm.distributed.ec_transfer.ec_connector.example_connector import ECExampleConnector
    return ECExampleConnector


def _kv_base():
    from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector
    return ExampleConnector


def _make_ec(base: type) -> type:
    class TimedECExampleConnector(base):  # type: ignore[misc, valid-type]
        """vLLM's ECExampleConnector, each save and load timed (module docstring)."""

        def __init__(self, vllm_config: Any, role: Any):
            super().__init__(vllm_config=vllm_config, role=role)
            cfg = vllm_config.ec_transfer_config
            self._timing = TimingLog(cfg.get_from_extra_config(LOG_KEY, None), "ec")

        def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
            if not self.is_producer:
                return super().save_caches(encoder_cache, mm_hash, **kwargs)
            t = time.perf_counter()
            super().save_caches(encoder_cache, mm_hash, **kwargs)
            dt = time.perf_counter() - t
            self._timing.write("save", 1, nbytes(encoder_cache[mm_hash]), dt,
                               tokens=int(encoder_cache[mm_hash].shape[0]))

        def start_load_caches(self, encoder_cache, **kwargs) -> None:
            meta = self._get_connector_metadata()
            todo = [m.mm_hash for m in getattr(meta, "mm_datas", ()) if m.mm_hash not in encoder_cache]
            t = time.perf_counter()
            super().start_load_caches(encoder_cache, **kwargs)
            if todo:
                _sync()
            dt = time.perf_counter() - t
            got = [encoder_cache[h] for h in todo if h in encoder_cache]
            self._timing.write("load", len(got), sum(nbytes(x) for x in got), dt,
                               tokens=sum(int(x.shape[0]) for x in got))

    return TimedECExampleConnector


def _make_kv(base: type) -> type:
    class TimedExampleConnector(base):  # type: ignore[misc, valid-type]
        """vLLM's (KV) ExampleConnector, each layer save and each load timed (module docstring)."""

        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None):
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
            self._timing = TimingLog(self._kv_transfer_config.get_from_extra_config(LOG_KEY, None), "kv")

        def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
            meta = self._get_connector_metadata()
            stores = [r for r in getattr(meta, "requests", ()) if r.is_store]
            t = time.perf_counter()
            super().save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)
            dt = time.perf_counter() - t
            if stores:
                per_tok = nbytes(kv_layer[0, :, 0]) if len(kv_layer.shape) >= 4 else nbytes(kv_layer[0, 0])
                toks = sum(len(r.slot_mapping) for r in stores)
                self._timing.write("save", len(stores), toks * per_tok, dt, tokens=toks, layer=layer_name)

        def start_load_kv(self, forward_context, **kwargs) -> None:
            meta = self._get_connector_metadata()
            loads = [r for r in getattr(meta, "requests", ()) if not r.is_store]
            t = time.perf_counter()
            super().start_load_kv(forward_context, **kwargs)
            if loads:
                _sync()
            dt = time.perf_counter() - t
            if loads:
                toks = sum(len(r.slot_mapping) for r in loads)
                per_tok = 0
                for layer in getattr(forward_context, "no_compile_layers", {}).values():
                    kv = getattr(layer, "kv_cache", None)
                    if kv is not None and hasattr(kv, "shape") and len(kv.shape) >= 4:
                        per_tok += nbytes(kv[0, :, 0])
                self._timing.write("load", len(loads), toks * per_tok, dt, tokens=toks)

    return TimedExampleConnector


def __getattr__(name: str) -> Any:
    """The classes are built on first use, so importing this module needs no vLLM."""
    if name == "TimedECExampleConnector":
        cls = _make_ec(_ec_base())
    elif name == "TimedExampleConnector":
        cls = _make_kv(_kv_base())
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls
