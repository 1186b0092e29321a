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
TINY_VOCAB = 1024  # > every tokenizer id (the chat kinds' tokens follow the vocabulary), so each has a row
assert tok.CHAT_VOCAB_SIZE < TINY_VOCAB

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

# Qwen2.5-VL's vision token ids as our qwen2.5-vl tokenizer numbers them (the real tokenizer's: 151652 …).
QWEN25_VL_VISION_IDS = {
    field: tok.chat_token_id("qwen2.5-vl", token) for field, token in zip(
        ("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id"), tok.VISION_TOKENS)
}
# Qwen/Qwen-Image text_encoder/config.json: Qwen2.5-VL-7B-Instruct (28 layers × 3584, GQA 28/4 heads,
# M-RoPE sections 16/24/24; its 32-block 1280-wide vision tower, which the edit pipelines run on the input
# images and text prompts never use), with our tokenizer's vision token ids.
QWEN25_VL_7B = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, sliding_window=32768,
        use_sliding_window=False, max_window_layers=28,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
    ),
    tie_word_embeddings=False, **QWEN25_VL_VISION_IDS,
)
# black-forest-labs/FLUX.2-dev text_encoder: Mistral-Small-3.2-24B-Instruct-2506 (Mistral3ForConditionalGeneration,
# the config of Mistral-Small-3.1-24B-Instruct-2503: 40 layers × 5120, GQA 32/8 heads of 128, 24-layer Pixtral
# vision tower; its lm_head is a separate 131072 × 5120 matrix).
MISTRAL_SMALL_3_24B = dict(
    text_config=dict(
        model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=1000000000.0, sliding_window=None,
    ),
    vision_config=dict(
        model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        head_dim=64, hidden_act="silu", image_size=1540, patch_size=14, num_channels=3, rope_theta=10000.0,
    ),
    image_token_index=10, multimodal_projector_bias=False, projector_hidden_act="gelu", spatial_merge_size=2,
    vision_feature_layer=-1, tie_word_embeddings=False,
)
# Qwen/Qwen3-4B (FLUX.2-klein-4B's text encoder as Qwen3ForCausalLM; Z-Image's as the bare Qwen3Model, which
# conditions on its second-to-last hidden states — Tongyi-MAI/Z-Image-Turbo text_encoder/config.json: 36 layers
# × 2560, embeddings tied) and Qwen/Qwen3-8B (FLUX.2-klein-9B's: 36 × 4096, untied).
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_theta=1000000.0, attention_bias=False, tie_word_embeddings=True, use_sliding_window=False, **TOKEN_IDS,
)
QWEN3_8B = {**QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}

# Qwen/Qwen3-VL-8B-Instruct (Qwen-Image 2.1's text encoder, Qwen3VLForConditionalGeneration: 36 layers × 4096,
# GQA 32/8 heads of 128, interleaved M-RoPE sections 24/20/20; its 27-block 1152-wide vision tower of 16-pixel
# patches, DeepStack features from blocks 8, 16, 24), with our tokenizer's vision token ids (Qwen2.5-VL's markers).
QWEN3_VL_8B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
        attention_bias=False,
    ),
    vision_config=dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh",
    ),
    tie_word_embeddings=False, **QWEN25_VL_VISION_IDS,
)

TINY_CLIP_L = {**CLIP_L, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_CLIP_G = {**CLIP_G, "vocab_size": TINY_VOCAB, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48,
               "num_hidden_layers": 2, "num_attention_heads": 2}
# 4 heads: a sharded T5 splits 2 and 4 ways (the tiny CLIPs' 2 heads split 2 ways, copied beside each other on 4).
TINY_T5 = {**T5_XXL, "vocab_size": TINY_VOCAB, "d_model": 96, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4}
# 8 query heads sharing 4 key/value heads (Gemma-2-2B's 2:1 grouping): a sharded text encoder splits
# the key/value heads too, so 2 and 4 ranks divide them.
TINY_GEMMA2 = {**GEMMA2_2B, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
               "query_pre_attn_scalar": 8}
# Two layers suffice where a pipeline reads the second-to-last hidden states (Z-Image).
TINY_QWEN3_2L = {**QWEN3_4B, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}

_TINY_LM = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, **TOKEN_IDS)
# The LLM encoders' tiny forms keep enough layers for the layer indices their pipelines read at their
# defaults (FLUX.2: hidden states 10/20/30, klein 9/18/27, all of them inner layers as in the real ones).
TINY_QWEN25_VL = dict(
    text_config={**QWEN25_VL_7B["text_config"], **_TINY_LM, "num_hidden_layers": 2, "max_window_layers": 2,
                 # M-RoPE sections: head_dim / 2 rotary pairs, split over time, height, width.
                 "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
    vision_config={**QWEN25_VL_7B["vision_config"], "depth": 1, "hidden_size": 16, "intermediate_size": 32,
                   "num_heads": 2, "out_hidden_size": 32, "fullatt_block_indexes": [0]},
    tie_word_embeddings=False, **QWEN25_VL_VISION_IDS,
)
TINY_QWEN3_VL = dict(
    text_config={**QWEN3_VL_8B["text_config"], **_TINY_LM, "num_hidden_layers": 2,
                 "rope_parameters": {**QWEN3_VL_8B["text_config"]["rope_parameters"], "mrope_section": [2, 3, 3]}},
    vision_config={**QWEN3_VL_8B["vision_config"], "depth": 1, "hidden_size": 16, "intermediate_size": 32,
                   "num_heads": 2, "out_hidden_size": 32, "deepstack_visual_indexes": [0]},
    tie_word_embeddings=False, **QWEN25_VL_VISION_IDS,
)
TINY_MISTRAL3 = {
    **MISTRAL_SMALL_3_24B,
    "text_config": {**MISTRAL_SMALL_3_24B["text_config"], **_TINY_LM, "num_hidden_layers": 31},
    "vision_config": {**MISTRAL_SMALL_3_24B["vision_config"], "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8, "image_size": 28},
}
TINY_QWEN3 = {**QWEN3_4B, **_TINY_LM, "num_hidden_layers": 28}

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

# Qwen/Qwen-Image vae/config.json (AutoencoderKLQwenImage, a causal 3D VAE, 8× spatial; its per-channel
# latent statistics are the class defaults, which are the released ones).
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
# Same levels (scale 8), narrow, 4 latent channels (the statistics of the first four).
TINY_QWEN_IMAGE_VAE = {**QWEN_IMAGE_VAE, "base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                       "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075],
                       "latents_std": [2.8184, 1.4541, 2.3275, 2.6558]}
# Qwen/Qwen-Image-2.1 vae (AutoencoderKLQwenImage21, the class defaults: 16× spatial over five levels, 64 latent
# channels, RGBA in and out, a wider decoder).
QWEN_IMAGE21_VAE = dict(base_dim=96, decoder_base_dim=144, z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=2,
                        attn_scales=[], temperal_downsample=[False, True, True, True], dropout=0.0)
# Same levels (16×), narrow, 8 latent channels (the statistics of the first eight).
TINY_QWEN_IMAGE21_VAE = {**QWEN_IMAGE21_VAE, "base_dim": 4, "decoder_base_dim": 4, "z_dim": 8,
                         "dim_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1,
                         "latents_mean": [0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722],
                         "latents_std": [3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910]}
# black-forest-labs/FLUX.2-dev vae: AutoencoderKLFlux2 as diffusers' scripts/convert_flux2_to_diffusers.py
# builds it (the class defaults): 32 latent channels, 2×2-patchified and batch-normalised (128 per token).
FLUX2_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=32, norm_num_groups=32,
    sample_size=1024, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
    batch_norm_eps=1e-4, batch_norm_momentum=0.1, patch_size=[2, 2],
)
TINY_FLUX2_VAE = {**FLUX2_VAE, **TINY_KL, "latent_channels": 4, "sample_size": 128}

# ---------------------------------------------------------------- as pipeline components


def clip_text(config: dict, *, projection: bool = False) -> Component:
    return Component("transformers", "CLIPTextModelWithProjection" if projection else "CLIPTextModel", config,
                     "CLIPTextConfig")


def t5_encoder(config: dict) -> Component:
    return Component("transformers", "T5EncoderModel", config, "T5Config")


def gemma2(config: dict) -> Component:
    return Component("transformers", "Gemma2Model", config, "Gemma2Config")


def qwen3(config: dict) -> Component:
    return Component("transformers", "Qwen3Model", config, "Qwen3Config")


def kl_vae(config: dict) -> Component:
    return Component("diffusers", "AutoencoderKL", config)


def dc_ae(config: dict) -> Component:
    return Component("diffusers", "AutoencoderDC", config)


def qwen25_vl(config: dict) -> Component:
    return Component("transformers", "Qwen2_5_VLForConditionalGeneration", config, "Qwen2_5_VLConfig")


def qwen3_vl(config: dict) -> Component:
    return Component("transformers", "Qwen3VLForConditionalGeneration", config, "Qwen3VLConfig")


def qwen_image21_vae(config: dict) -> Component:
    return Component("diffusers", "AutoencoderKLQwenImage21", config)


def mistral3(config: dict) -> Component:
    return Component("transformers", "Mistral3ForConditionalGeneration", config, "Mistral3Config")


def qwen3_lm(config: dict) -> Component:
    return Component("transformers", "Qwen3ForCausalLM", config, "Qwen3Config")


def qwen_image_vae(config: dict) -> Component:
    return Component("diffusers", "AutoencoderKLQwenImage", config)


def flux2_vae(config: dict) -> Component:
    return Component("diffusers", "AutoencoderKLFlux2", config)
