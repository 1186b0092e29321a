"""Random-weight presets of the UNet families (Stable Diffusion 1.5, SDXL) with their real configs.

Same contract as engine/presets.py (weights a pure function of (seed, parameter name), built on the
meta device and materialised in place, our local tokenizer, the real schedulers), but the component
set differs from Flux's: `unet` instead of `transformer`, CLIP text towers only, and Stable
Diffusion's safety checker / feature extractor left out (they cannot be downloaded, and a random
safety checker would black out random images). engine/presets.py registers these specs in PRESETS
and hands building and saving to the methods here.

This module imports engine.presets only inside functions: engine.presets imports it at its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .preset_pipeline import BuildsPipeline

from engine import tokenizer as tok

_TOKEN_IDS = dict(pad_token_id=tok.PAD_ID, bos_token_id=tok.BOS_ID, eos_token_id=tok.EOS_ID)
TINY_VOCAB = 1024  # > tok.VOCAB_SIZE, as in engine/presets.py

# openai/clip-vit-large-patch14 text tower (SD1.5's text_encoder, SDXL's text_encoder).
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    **_TOKEN_IDS,
)
# laion CLIP-ViT-bigG-14 text tower with projection (SDXL's text_encoder_2).
CLIP_BIG_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, **_TOKEN_IDS,
)

# runwayml/stable-diffusion-v1-5 unet/config.json ("attention_head_dim": 8 is really the head count).
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (non-default entries).
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
SD_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
TINY_VAE = {**SD_VAE, "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": 64}

# The real scheduler configs: SD1.5 ships PNDM, SDXL Euler.
SD15_SCHEDULER = ("PNDMScheduler", dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
))
SDXL_SCHEDULER = ("EulerDiscreteScheduler", dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    interpolation_type="linear", prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    use_karras_sigmas=False,
))

TINY_CLIP = {**CLIP_L, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
             "num_hidden_layers": 2, "num_attention_heads": 2}

# Pipeline arguments that are not weights: no safety checker / feature extractor / image encoder
# (nothing to download them from), no invisible watermark (it changes pixels and needs a package).
SD_EXTRA = dict(safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
SDXL_EXTRA = dict(feature_extractor=None, image_encoder=None, add_watermarker=False)


@dataclass(kw_only=True, frozen=True)
class UNetPresetSpec(BuildsPipeline):
    name: str
    family: str  # "sd" or "sdxl"
    pipeline_class: str
    description: str
    default_size: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]  # CLIPTextConfig kwargs
    text_encoder_2: dict[str, Any] | None = None  # SDXL: CLIPTextConfig kwargs of the projection tower
    scheduler: tuple[str, dict[str, Any]] = SD15_SCHEDULER
    extra: dict[str, Any] = field(default_factory=lambda: dict(SD_EXTRA))

    @property
    def model_components(self) -> tuple[str, ...]:
        return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if self.text_encoder_2 else ())

    def empty_model(self, name: str) -> torch.nn.Module:
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        assert name in self.model_components, f"{self.name} has no component {name}"
        with init_empty_weights(include_buffers=False):
            if name == "unet":
                return UNet2DConditionModel(**self.unet)
            if name == "vae":
                return AutoencoderKL(**self.vae)
            if name == "text_encoder":
                return CLIPTextModel(CLIPTextConfig(**self.text_encoder))
            return CLIPTextModelWithProjection(CLIPTextConfig(**self.text_encoder_2))

    def other_components(self, *, with_text_encoders: bool) -> dict[str, Any]:
        import diffusers

        cls_name, config = self.scheduler
        parts: dict[str, Any] = {"scheduler": getattr(diffusers, cls_name)(**config)}
        for t in ("tokenizer", "tokenizer_2")[: 1 + bool(self.text_encoder_2)]:
            parts[t] = tok.make_tokenizer("clip") if with_text_encoders else None
        return parts

    def build_component(self, name: str, *, dtype: torch.dtype, device, seed: int = 0) -> torch.nn.Module:
        from engine.presets import materialize_

        if name not in self.model_components:
            raise ValueError(f"unknown component {name!r}; {self.name} has {', '.join(self.model_components)}")
        return materialize_(self.empty_model(name), prefix=name, seed=seed, device=device, dtype=dtype)


UNET_PRESETS: dict[str, UNetPresetSpec] = {
    "sd1.5": UNetPresetSpec(
        name="sd1.5", family="sd", pipeline_class="StableDiffusionPipeline",
        description="Stable Diffusion 1.5 shapes (0.86B UNet, CLIP-L, PNDM), random weights",
        default_size=512, unet=SD15_UNET, vae=SD_VAE, text_encoder=CLIP_L,
    ),
    "sdxl": UNetPresetSpec(
        name="sdxl", family="sdxl", pipeline_class="StableDiffusionXLPipeline",
        description="SDXL base 1.0 shapes (2.6B UNet, CLIP-L + bigG, Euler), random weights",
        default_size=1024, unet=SDXL_UNET, vae=SDXL_VAE, text_encoder=CLIP_L, text_encoder_2=CLIP_BIG_G,
        scheduler=SDXL_SCHEDULER, extra=dict(SDXL_EXTRA),
    ),
    "sd1.5-tiny": UNetPresetSpec(
        name="sd1.5-tiny", family="sd", pipeline_class="StableDiffusionPipeline",
        description="tiny SD1.5 for CPU tests: 2-level UNet (32, 64), 4-level VAE (scale 8)",
        default_size=64, vae=TINY_VAE, text_encoder=TINY_CLIP,
        unet={**SD15_UNET, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
              "cross_attention_dim": 32, "attention_head_dim": 4, "sample_size": 8,
              "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    ),
    "sdxl-tiny": UNetPresetSpec(
        name="sdxl-tiny", family="sdxl", pipeline_class="StableDiffusionXLPipeline",
        description="tiny SDXL for CPU tests: 2-level UNet (32, 64) with text-time embedding, two CLIPs",
        default_size=64, vae={**TINY_VAE, "scaling_factor": 0.13025}, text_encoder=TINY_CLIP,
        text_encoder_2=TINY_CLIP, scheduler=SDXL_SCHEDULER, extra=dict(SDXL_EXTRA),
        # cross_attention_dim = 32 + 32 (both towers' hidden states concatenated); the add embedding
        # takes the pooled text (32) and 6 time ids × 8.
        unet={**SDXL_UNET, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
              "cross_attention_dim": 64, "attention_head_dim": [2, 4], "transformer_layers_per_block": [1, 2],
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
              "sample_size": 8, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
    ),
}
