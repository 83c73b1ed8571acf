"""Tiny random configs for the profiler's CPU tests (same code path as the GPU sweeps)."""
from __future__ import annotations

import dataclasses

from profiler.models import load_model

TINY = {
    "flux1_dev": {
        "transformer": dict(kind="flux_dit", patch_size=1, in_channels=64, num_layers=1,
                            num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                            joint_attention_dim=32, pooled_projection_dim=16,
                            guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
        "t5_xxl": dict(kind="t5_encoder", d_model=32, d_ff=64, d_kv=8, num_layers=1,
                       num_heads=4, vocab_size=100, feed_forward_proj="gated-gelu",
                       max_length=16),
        "clip_l": dict(kind="clip_text", hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                       vocab_size=100, projection_dim=16),
        "vae": dict(kind="autoencoder_kl", in_channels=3, out_channels=3, latent_channels=16,
                    block_out_channels=[32, 32, 32, 32], layers_per_block=1,
                    use_quant_conv=False, use_post_quant_conv=False, norm_num_groups=32),
    },
    "qwen_image": {
        "transformer": dict(kind="qwen_image_mmdit", patch_size=2, in_channels=64,
                            out_channels=16, num_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32,
                            axes_dims_rope=[4, 6, 6]),
        "vae": dict(kind="qwen_image_vae", base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4],
                    num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True]),
    },
    "sd3_5_medium": {
        "transformer": dict(kind="sd3_dit", sample_size=16, patch_size=2, in_channels=16,
                            out_channels=16, num_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32,
                            caption_projection_dim=32, pooled_projection_dim=16,
                            pos_embed_max_size=32, dual_attention_layers=[0], qk_norm="rms_norm"),
        "clip_l": dict(kind="clip_text", hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                       vocab_size=100, projection_dim=16),
        "clip_g": dict(kind="clip_text", hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                       vocab_size=100, projection_dim=16),
        "t5_xxl": dict(kind="t5_encoder", d_model=32, d_ff=64, d_kv=8, num_layers=1,
                       num_heads=4, vocab_size=100, feed_forward_proj="gated-gelu",
                       max_length=16),
        "vae": dict(kind="autoencoder_kl", in_channels=3, out_channels=3, latent_channels=16,
                    block_out_channels=[32, 32, 32, 32], layers_per_block=1,
                    use_quant_conv=False, use_post_quant_conv=False, norm_num_groups=32),
    },
}


def tiny_spec(name: str):
    spec = load_model(name)
    comps = {k: dict(v) for k, v in TINY[name].items()}
    return dataclasses.replace(spec, components=comps,
                               request_defaults={**spec.request_defaults, "text_tokens": 8})
