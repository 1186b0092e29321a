"""ModelInfo readers of the other transformer families (SD3/SD3.5, PixArt-Σ, Sana), from configs only.

engine.model_info calls `dit_info` for these families (preset specs and diffusers directories alike),
so head counts and size limits are checked before any collective, as for Flux.
"""

from __future__ import annotations

import math
from typing import Any

from engine.model_info import ModelInfo

# Pipeline class → family.
DIT_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "PixArtSigmaPipeline": "pixart", "SanaPipeline": "sana"}


def _vae_scale(family: str, vae: dict[str, Any]) -> int:
    # Sana's DC-AE: 2^(levels-1) as SanaPipeline computes it; KL VAEs: the same over block_out_channels.
    channels = vae.get("encoder_block_out_channels" if family == "sana" else "block_out_channels", [0] * 4)
    return 2 ** (len(channels) - 1)


def dit_info(*, family: str, source: str, pipeline_class: str, transformer: dict[str, Any], vae: dict[str, Any],
             default_size: int | None) -> ModelInfo:
    assert family in DIT_FAMILIES.values(), family
    scale = _vae_scale(family, vae)
    patch = int(transformer.get("patch_size", 1 if family == "sana" else 2))
    text_width = {
        "sd3": transformer.get("joint_attention_dim", 4096),
        "pixart": transformer.get("caption_channels", 4096),
        "sana": transformer.get("caption_channels", 2304),
    }[family]
    return ModelInfo(
        source=source,
        family=family,
        pipeline_class=pipeline_class,
        # Sana's self-attention heads; PixArt's attn1 heads; SD3's joint-attention heads.
        num_heads=int(transformer.get("num_attention_heads", 16)),
        head_dim=int(transformer.get("attention_head_dim", 64)),
        num_layers=int(transformer.get("num_layers", 28)),
        num_single_layers=0,
        in_channels=int(transformer.get("in_channels", 4)),
        joint_attention_dim=int(text_width),
        pooled_projection_dim=int(transformer.get("pooled_projection_dim", 0) if family == "sd3" else 0),
        vae_scale_factor=scale,
        # SanaPipeline itself refuses sizes that are not multiples of 32, whatever the VAE.
        spatial_multiple=math.lcm(scale * patch, 32) if family == "sana" else scale * patch,
        # The pipelines' own default: transformer sample_size latent cells.
        default_size=int(default_size or int(transformer.get("sample_size", 128)) * scale),
        uses_guidance_embeds=False,
    )
