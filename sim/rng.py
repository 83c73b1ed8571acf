"""Named random streams from one root seed: each consumer draws from its own stream, so adding
a draw in one place never shifts another's numbers, and compared policies see the same arrivals."""
from __future__ import annotations

import zlib

import numpy as np


def stream(seed: int, name: str) -> np.random.Generator:
    """Independent generator for (root seed, stream name); stable across runs and platforms."""
    key = zlib.crc32(name.encode())
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), key])))
