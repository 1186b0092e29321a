"""The ModelInfo of a patchifying DiT (SD3, PixArt, Sana, …) from its transformer config: each family's
reader says only what differs (text width, patch size, VAE scale, size rule)."""

from __future__ import annotations

from .family import ModelInfo


def dit_info(transformer: dict, *, family: str, source: str, pipeline_class: str, default_size: int | None,
             vae_scale_factor: int, text_width: int, pooled_width: int = 0, patch: int = 2,
             spatial_multiple: int | None = None, tp_widths: tuple[tuple[str, int], ...] = ()) -> ModelInfo:
    return ModelInfo(
        source=source,
        family=family,
        pipeline_class=pipeline_class,
        num_heads=int(transformer.get("num_attention_heads", 16)),
        head_dim=int(transformer.get("attention_head_dim", 64)),
        num_layers=int(transformer.get("num_layers", 28)),
        num_single_layers=0,
        in_channels=int(transformer.get("in_channels", 4)),
        joint_attention_dim=int(text_width),
        pooled_projection_dim=int(pooled_width),
        vae_scale_factor=vae_scale_factor,
        spatial_multiple=spatial_multiple or vae_scale_factor * int(transformer.get("patch_size", patch)),
        # The pipelines' own default: transformer sample_size latent cells.
        default_size=int(default_size or int(transformer.get("sample_size", 128)) * vae_scale_factor),
        uses_guidance_embeds=False,
        patch_size=int(transformer.get("patch_size", patch)),
        tp_widths=tp_widths,
    )
