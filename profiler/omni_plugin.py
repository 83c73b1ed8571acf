"""vLLM-Omni general plugin that serves the built-in pipelines with random weights.

`install_plugin(dir)` writes a dist-info whose entry point (group `vllm_omni.general_plugins`,
read by vllm_omni/plugins/__init__.py:load_omni_general_plugins in the API server, the stage
process and each diffusion worker) calls `register()`. Put `dir` and the repository root on the
server's PYTHONPATH; without them the server loads the real pipelines (and then needs weights).

`register()` replaces QwenImagePipeline, QwenImageEditPipeline and FluxPipeline in vLLM-Omni's
diffusion registry with the subclasses of profiler/omni_pipelines.py. The architecture names
stay the built-in ones, so everything keyed on them (pre/post-processing hooks, multimodal
input support, request batching support) is unchanged.
"""
from __future__ import annotations

from pathlib import Path

ENTRY_GROUP = "vllm_omni.general_plugins"
DIST = "mmsim_omni_random-0.1.dist-info"
MODULE = "profiler.omni_pipelines"
# architecture -> (subclass, pre-process hook, post-process hook): the hook names are those of
# vllm_omni/diffusion/registry.py (_DIFFUSION_PRE/POST_PROCESS_FUNCS); omni_pipelines re-exports them
REPLACED: dict[str, tuple[str, str | None, str | None]] = {
    "QwenImagePipeline": ("RandomQwenImagePipeline", None, "get_qwen_image_post_process_func"),
    "QwenImageEditPipeline": ("RandomQwenImageEditPipeline", "get_qwen_image_edit_pre_process_func",
                              "get_qwen_image_edit_post_process_func"),
    "FluxPipeline": ("RandomFluxPipeline", None, "get_flux_post_process_func"),
}


def register() -> None:
    """The entry point. Idempotent (vLLM-Omni may call it more than once per process)."""
    from vllm_omni.diffusion.registry import register_diffusion_model
    for arch, (cls, pre, post) in REPLACED.items():
        register_diffusion_model(arch, MODULE, cls, pre_process_func_name=pre,
                                 post_process_func_name=post)


def install_plugin(directory: str | Path) -> Path:
    """Write the dist-info that registers `register`; returns the directory for PYTHONPATH."""
    d = Path(directory) / DIST
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: mmsim-omni-random\nVersion: 0.1\n")
    (d / "entry_points.txt").write_text(f"[{ENTRY_GROUP}]\nmmsim_omni_random = profiler.omni_plugin:register\n")
    return Path(directory)
