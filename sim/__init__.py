"""Discrete-event simulator of multimodal generation serving (SimPy), driven by profile tables."""
from sim import compiled as _compiled

_compiled.check()       # a compiled build older than its sources is set aside (sim/compiled.py)
