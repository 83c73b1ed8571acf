"""Stage servers (engines) that run on simulated GPUs: AR (vLLM V1-like), DiT, batch encoders."""
