"""Component configs that several families share, declared once: text encoders, VAEs, their tiny forms.

Real configs are the published ones (the checkpoint named above each). Token ids come from our own
tokenizer (engine/presets/tokenizer.py), not the real ones: CLIP pools its output at the first eos
id, so model and tokenizer must agree. The tiny forms keep every architectural feature (layers,
heads, gating, tying) at CPU-test sizes.
"""

from __future__ import annotations

from . import tokenizer as tok
from .spec import Component

TOKEN_IDS = dict(pad_token_id=tok.PAD_ID, bos_token_id=tok.BOS_ID, eos_token_id=tok.EOS_ID)
TINY_VOCAB = 1024  # > tok.VOCAB_SIZE, so every tokenizer id has an embedding row
assert tok.VOCAB_SIZE < TINY_VOCAB

# ---------------------------------------------------------------- text encoders

# openai/clip-vit-large-patch14 text tower (FLUX.1, SD1.5, SDXL, SD3's text_encoder).
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, **TOKEN_IDS,
)
# laion CLIP-ViT-bigG-14 text tower with projection (SDXL's text_encoder_2, SD3's text_encoder_2).
CLIP_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, **TOKEN_IDS,
)
# google/t5-v1_1-xxl encoder (FLUX.1, SD3's text_encoder_3, PixArt-Σ).
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False,
    use_cache=False, pad_token_id=tok.PAD_ID, eos_token_id=tok.EOS_ID, decoder_start_token_id=tok.PAD_ID,
)
# google/gemma-2-2b-it (Sana's text encoder).
GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256, sliding_window=4096,
    rms_norm_eps=1e-6, **TOKEN_IDS,
)

TINY_CLIP_L = {**CLIP_L, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_CLIP_G = {**CLIP_G, "vocab_size": TINY_VOCAB, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48,
               "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_T5 = {**T5_XXL, "vocab_size": TINY_VOCAB, "d_model": 96, "d_ff": 128, "d_kv": 32, "num_layers": 2, "num_heads": 2}
TINY_GEMMA2 = {**GEMMA2_2B, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
               "query_pre_attn_scalar": 16}

# ---------------------------------------------------------------- VAEs

# black-forest-labs/FLUX.1-dev vae/config.json.
FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=16,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
# stabilityai/stable-diffusion-3.5-large vae/config.json.
SD3_VAE = {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
# runwayml/stable-diffusion-v1-5 vae/config.json.
SD_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (also PixArt-Σ's).
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# The KL VAEs' tiny form: the same 4 levels (scale 8), narrow.
TINY_KL = dict(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8)

# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (Sana's deep-compression autoencoder).
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
# Three levels (scale 4), the last with linear attention, as the real one's deep levels.
TINY_DC_AE = {**DC_AE_F32C32, "latent_channels": 8, "attention_head_dim": 4,
              "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
              "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
              "encoder_block_out_channels": [8, 16, 16], "decoder_block_out_channels": [8, 16, 16],
              "encoder_layers_per_block": [1, 1, 1], "decoder_layers_per_block": [1, 1, 1],
              "encoder_qkv_multiscales": [[], [], [5]], "decoder_qkv_multiscales": [[], [], [5]]}
# Six levels (scale 32, as the real one: a latent row per 32 image rows), toy widths.
TINY_DC_AE_F32 = {**DC_AE_F32C32, "latent_channels": 8, "attention_head_dim": 4,
                  "encoder_block_out_channels": [4, 4, 8, 8, 16, 16], "decoder_block_out_channels": [4, 4, 8, 8, 16, 16],
                  "encoder_layers_per_block": [1] * 6, "decoder_layers_per_block": [1] * 6}

# ---------------------------------------------------------------- as pipeline components


def clip_text(config: dict, *, projection: bool = False) -> Component:
    return Component("transformers", "CLIPTextModelWithProjection" if projection else "CLIPTextModel", config,
                     "CLIPTextConfig")


def t5_encoder(config: dict) -> Component:
    return Component("transformers", "T5EncoderModel", config, "T5Config")


def gemma2(config: dict) -> Component:
    return Component("transformers", "Gemma2Model", config, "Gemma2Config")


def kl_vae(config: dict) -> Component:
    return Component("diffusers", "AutoencoderKL", config)


def dc_ae(config: dict) -> Component:
    return Component("diffusers", "AutoencoderDC", config)
