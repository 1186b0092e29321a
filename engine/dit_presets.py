"""Random-weight presets of the other transformer families (SD3/SD3.5, PixArt-Σ, Sana), real configs.

Same contract as engine/presets.py (weights a pure function of (seed, parameter name), built on the
meta device and materialised in place, our local tokenizer, the real schedulers) and the same
"spec that builds itself" protocol as engine/unet_presets.py. Components are declared as data:
name → (library, model class, config class or None, config kwargs), so one spec class serves SD3's
three text encoders, PixArt's T5 and Sana's Gemma-2 alike.

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

# ---------------------------------------------------------------- real configs

# openai/clip-vit-large-patch14 and laion CLIP-ViT-bigG-14 text towers with projection (SD3's 1 and 2).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              **_TOKEN_IDS)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, **_TOKEN_IDS)
# google/t5-v1_1-xxl encoder (SD3's text_encoder_3, PixArt-Σ's text_encoder).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False,
              use_cache=False, pad_token_id=tok.PAD_ID, eos_token_id=tok.EOS_ID, decoder_start_token_id=tok.PAD_ID)
# google/gemma-2-2b-it (Sana's text encoder).
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=8192, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                 query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6, **_TOKEN_IDS)

# stabilityai/stable-diffusion-3.5-large transformer/config.json.
SD35_LARGE = dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
                  num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                  pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128, dual_attention_layers=())
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
SD3_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0))

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (SDXL VAE, DPM-Solver++).
PIXART_SIGMA = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, caption_channels=4096,
                    cross_attention_dim=1152, dropout=0.0, in_channels=4, interpolation_scale=2,
                    norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32, norm_type="ada_norm_single",
                    num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, out_channels=8, patch_size=2,
                    sample_size=128, upcast_attention=False, use_additional_conditions=False)
SDXL_VAE = {**SD3_VAE, "latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": None,
            "use_quant_conv": True, "use_post_quant_conv": True}
PIXART_SCHEDULER = ("DPMSolverMultistepScheduler", dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, prediction_type="epsilon",
    solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    timestep_spacing="linspace", steps_offset=0))

# Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json, DC-AE f32c32, flow DPM-Solver.
SANA_1600M = dict(attention_bias=False, attention_head_dim=32, caption_channels=2304, cross_attention_dim=2240,
                  cross_attention_head_dim=112, dropout=0.0, in_channels=32, interpolation_scale=None, mlp_ratio=2.5,
                  norm_elementwise_affine=False, norm_eps=1e-6, num_attention_heads=70, num_cross_attention_heads=20,
                  num_layers=20, out_channels=32, patch_size=1, sample_size=32)
DC_AE_F32C32 = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)
SANA_SCHEDULER = ("DPMSolverMultistepScheduler", dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, algorithm_type="dpmsolver++",
    solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", flow_shift=3.0,
    prediction_type="flow_prediction", use_flow_sigmas=True, timestep_spacing="linspace", steps_offset=0))

# ---------------------------------------------------------------- tiny versions (CPU tests)

TINY_CLIP_L = {**CLIP_L, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_CLIP_G = {**CLIP_G, "vocab_size": TINY_VOCAB, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48,
               "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_T5 = {**T5_XXL, "vocab_size": TINY_VOCAB, "d_model": 96, "d_ff": 128, "d_kv": 32, "num_layers": 2, "num_heads": 2}
TINY_GEMMA2 = {**GEMMA2_2B, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
               "query_pre_attn_scalar": 16}
TINY_KL_VAE = {**SD3_VAE, "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
               "latent_channels": 4, "sample_size": 64}

# ---------------------------------------------------------------- the spec


def _c(library: str, cls: str, config: dict, config_cls: str | None = None) -> tuple:
    return (library, cls, config_cls, config)


@dataclass(kw_only=True, frozen=True)
class DiTPresetSpec(BuildsPipeline):
    name: str
    family: str  # "sd3", "pixart", "sana"
    pipeline_class: str
    description: str
    default_size: int
    components: dict[str, tuple]
    """name → (library, model class, config class or None (diffusers), config kwargs)."""
    tokenizers: dict[str, str]
    """tokenizer attribute → engine.tokenizer kind ("clip" / "t5")."""
    scheduler: tuple[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def transformer(self) -> dict[str, Any]:
        return self.components["transformer"][3]

    @property
    def vae(self) -> dict[str, Any]:
        return self.components["vae"][3]

    @property
    def model_components(self) -> tuple[str, ...]:
        return tuple(self.components)

    def empty_model(self, name: str) -> torch.nn.Module:
        import importlib

        from accelerate import init_empty_weights

        library, cls_name, config_cls, config = self.components[name]
        module = importlib.import_module(library)
        cls = getattr(module, cls_name)
        with init_empty_weights(include_buffers=False):
            model = cls(getattr(module, config_cls)(**config)) if config_cls else cls(**config)
        if cls_name == "T5EncoderModel":
            # init_empty_weights undoes transformers' tying of shared/encoder.embed_tokens (see presets.py).
            model.encoder.embed_tokens.weight = model.shared.weight
        return model

    def other_components(self, *, with_text_encoders: bool) -> dict[str, Any]:
        import diffusers

        cls_name, config = self.scheduler
        parts: dict[str, Any] = {"scheduler": getattr(diffusers, cls_name)(**config)}
        for name, kind in self.tokenizers.items():
            parts[name] = tok.make_tokenizer(kind) if with_text_encoders else None
        return parts

    def build_component(self, name: str, *, dtype: torch.dtype, device, seed: int = 0) -> torch.nn.Module:
        from engine.presets import materialize_

        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; {self.name} has {', '.join(self.components)}")
        return materialize_(self.empty_model(name), prefix=name, seed=seed, device=device, dtype=dtype)


def _sd3(name, description, default_size, transformer, vae, clip_l, clip_g, t5) -> DiTPresetSpec:
    return DiTPresetSpec(
        name=name, family="sd3", pipeline_class="StableDiffusion3Pipeline", description=description,
        default_size=default_size, scheduler=SD3_SCHEDULER,
        components={
            "transformer": _c("diffusers", "SD3Transformer2DModel", transformer),
            "vae": _c("diffusers", "AutoencoderKL", vae),
            "text_encoder": _c("transformers", "CLIPTextModelWithProjection", clip_l, "CLIPTextConfig"),
            "text_encoder_2": _c("transformers", "CLIPTextModelWithProjection", clip_g, "CLIPTextConfig"),
            "text_encoder_3": _c("transformers", "T5EncoderModel", t5, "T5Config"),
        },
        tokenizers={"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "t5"},
        extra=dict(image_encoder=None, feature_extractor=None),
    )


def _pixart(name, description, default_size, transformer, vae, t5) -> DiTPresetSpec:
    return DiTPresetSpec(
        name=name, family="pixart", pipeline_class="PixArtSigmaPipeline", description=description,
        default_size=default_size, scheduler=PIXART_SCHEDULER,
        components={
            "transformer": _c("diffusers", "PixArtTransformer2DModel", transformer),
            "vae": _c("diffusers", "AutoencoderKL", vae),
            "text_encoder": _c("transformers", "T5EncoderModel", t5, "T5Config"),
        },
        tokenizers={"tokenizer": "t5"},
    )


def _sana(name, description, default_size, transformer, vae, gemma) -> DiTPresetSpec:
    return DiTPresetSpec(
        name=name, family="sana", pipeline_class="SanaPipeline", description=description,
        default_size=default_size, scheduler=SANA_SCHEDULER,
        components={
            "transformer": _c("diffusers", "SanaTransformer2DModel", transformer),
            "vae": _c("diffusers", "AutoencoderDC", vae),
            "text_encoder": _c("transformers", "Gemma2Model", gemma, "Gemma2Config"),
        },
        tokenizers={"tokenizer": "t5"},
    )


DIT_PRESETS: dict[str, DiTPresetSpec] = {
    "sd3.5-large": _sd3("sd3.5-large", "SD3.5-large shapes (8B MMDiT, 38 heads; CLIP-L, CLIP-G, T5-XXL), random weights",
                        1024, SD35_LARGE, SD3_VAE, CLIP_L, CLIP_G, T5_XXL),
    # 6 heads: Ulysses 2 divides them, Ulysses 4 does not (as SD3.5-large's 38).
    "sd3-tiny": _sd3("sd3-tiny", "tiny SD3 for CPU tests: 2 joint blocks, 6 heads x 16, 4-level VAE (scale 8)", 64,
                     {**SD35_LARGE, "attention_head_dim": 16, "num_attention_heads": 6, "num_layers": 2,
                      "caption_projection_dim": 96, "joint_attention_dim": 96, "pooled_projection_dim": 80,
                      "in_channels": 4, "out_channels": 4, "pos_embed_max_size": 16, "sample_size": 8},
                     TINY_KL_VAE, TINY_CLIP_L, TINY_CLIP_G, TINY_T5),
    "pixart-sigma": _pixart("pixart-sigma", "PixArt-Σ XL-2 1024 shapes (0.6B DiT, T5-XXL, SDXL VAE), random weights",
                            1024, PIXART_SIGMA, SDXL_VAE, T5_XXL),
    "pixart-tiny": _pixart("pixart-tiny", "tiny PixArt-Σ for CPU tests: 2 blocks, 4 heads x 8", 64,
                           {**PIXART_SIGMA, "attention_head_dim": 8, "num_attention_heads": 4, "num_layers": 2,
                            "cross_attention_dim": 32, "caption_channels": 96, "sample_size": 8,
                            "interpolation_scale": 1},
                           {**TINY_KL_VAE, "scaling_factor": 0.13025, "shift_factor": None}, TINY_T5),
    "sana-1600m": _sana("sana-1600m", "Sana 1600M 1024px shapes (linear-attention DiT, Gemma-2-2B, DC-AE f32), random weights",
                        1024, SANA_1600M, DC_AE_F32C32, GEMMA2_2B),
    "sana-tiny": _sana("sana-tiny", "tiny Sana for CPU tests: 2 blocks, 2 heads x 8, 3-level DC-AE (scale 4)", 32,
                       {**SANA_1600M, "attention_head_dim": 8, "num_attention_heads": 2, "num_layers": 2,
                        "num_cross_attention_heads": 2, "cross_attention_head_dim": 8, "cross_attention_dim": 16,
                        "caption_channels": 32, "in_channels": 8, "out_channels": 8, "sample_size": 8},
                       {**DC_AE_F32C32, "latent_channels": 8, "attention_head_dim": 4,
                        "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
                        "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
                        "encoder_block_out_channels": [8, 16, 16], "decoder_block_out_channels": [8, 16, 16],
                        "encoder_layers_per_block": [1, 1, 1], "decoder_layers_per_block": [1, 1, 1],
                        "encoder_qkv_multiscales": [[], [], [5]], "decoder_qkv_multiscales": [[], [], [5]]},
                       TINY_GEMMA2),
}
