"""Discrete-event simulator of multimodal generation serving (SimPy), driven by profile tables."""
