"""Measures per-stage latency tables on a real GPU (vLLM for AR stages, diffusers for diffusion)."""
