"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline, SD3Transformer2DModel, MMDiT): plans, call,
config reader, presets.

The model patchifies the latent image itself (`pos_embed`, which also adds the positional embedding
of each patch), so the image tokens are split where `pos_embed` returns them and gathered where
`proj_out` returns them, just before the model's own unpatchify. The text tokens are split where
`context_embedder` returns them: every rank keeps a piece of both, as for Flux, and each joint block's
attention runs over the concatenation [image piece, text piece] of every rank (token order across
ranks does not matter to unmasked attention). Everything else in a block is per token or per sample.

CFG: the pipeline batches [negative, prompt]; each cfg rank takes one half of every batched input.

Legend: B batch, S tokens (this rank's joint piece), H heads, D head dim.
"""

from __future__ import annotations

import torch

from engine.presets.components import (
    CLIP_G, CLIP_L, SD3_VAE, T5_XXL, TINY_CLIP_G, TINY_CLIP_L, TINY_KL, TINY_T5, clip_text, kl_vae, t5_encoder,
)
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.plan import ModelPlan, SeqContext, SeqDim

from .dit import dit_info
from .family import Family, prompt_kwargs, vae_scale
from .mmdit import COL, MMDIT_TP_PLAN, ROW, check_tp_widths
from .qkv import project_qkv


class SD3ParallelAttnProcessor:
    """diffusers' JointAttnProcessor2_0 with the attention call replaced by the mesh's parallel attention."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("shardiff's SD3 attention does not take an attention mask")
        # Processors derive head_dim from the layer's full out_features, so they take a column-split
        # Q/K/V (TP) unchanged: each rank computes H/T heads.
        head_dim = attn.to_k.out_features // attn.heads
        q_BSHD, k_BSHD, v_BSHD = project_qkv(
            hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, head_dim
        )
        groups = ("image",)
        if encoder_hidden_states is not None:
            eq_BSHD, ek_BSHD, ev_BSHD = project_qkv(
                encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k, head_dim,
            )
            # SD3 puts the image first: [image, text], unlike Flux.
            q_BSHD = torch.cat([q_BSHD, eq_BSHD], dim=1)
            k_BSHD = torch.cat([k_BSHD, ek_BSHD], dim=1)
            v_BSHD = torch.cat([v_BSHD, ev_BSHD], dim=1)
            groups = ("image", "text")

        out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, self.ctx.joint_sizes(*groups))
        out = out_BSHD.flatten(2, 3).to(q_BSHD.dtype)

        img = out[:, : hidden_states.shape[1]]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        if encoder_hidden_states is None:
            return img
        txt = out[:, hidden_states.shape[1] :].contiguous()
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


SD3_TP_PLAN = {
    # Same joint blocks as Flux's double-stream ones (SD3.5's 9-way norm1 and the last block's
    # continuous norm1_context included), plus SD3.5-medium's extra image-only self-attention.
    **MMDIT_TP_PLAN,
    "transformer_blocks.*.attn2.to_[qkv]": COL,
    "transformer_blocks.*.attn2.to_out.0": ROW,
}

SD3_PLAN = ModelPlan(
    split_modules={"pos_embed": SeqDim("image", 1), "context_embedder": SeqDim("text", 1)},
    gather_modules={"proj_out": SeqDim("image", 1)},
    attention={
        "transformer_blocks.*.attn": SD3ParallelAttnProcessor,
        # SD3.5-medium's extra image-only self-attention in its first blocks.
        "transformer_blocks.*.attn2": SD3ParallelAttnProcessor,
    },
    batch_inputs={"hidden_states": 0, "encoder_hidden_states": 0, "pooled_projections": 0, "timestep": 0},
    tensor=SD3_TP_PLAN,
)


def sd3_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random embeddings of the real shapes: 77 CLIP tokens + `text_tokens` T5 tokens, both branches."""
    gen = torch.Generator("cpu").manual_seed(1234)
    tokens = 77 + text_tokens

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return dict(
        prompt_embeds=rand(1, tokens, info.joint_attention_dim),
        negative_prompt_embeds=rand(1, tokens, info.joint_attention_dim),
        pooled_prompt_embeds=rand(1, info.pooled_projection_dim),
        negative_pooled_prompt_embeds=rand(1, info.pooled_projection_dim),
        guidance_scale=4.5,
    )


def read_sd3_info(configs, *, source: str, pipeline_class: str, default_size: int | None):
    t = configs["transformer"]
    return dit_info(t, family="sd3", source=source, pipeline_class=pipeline_class, default_size=default_size,
                    vae_scale_factor=vae_scale(configs["vae"]), text_width=t.get("joint_attention_dim", 4096),
                    pooled_width=t.get("pooled_projection_dim", 0))


# ---------------------------------------------------------------- presets

# stabilityai/stable-diffusion-3.5-large transformer/config.json.
SD35_LARGE = dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
                  num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                  pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128, dual_attention_layers=())
SD3_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0))


def sd3_preset(name, description, default_size, transformer, vae, clip_l, clip_g, t5) -> PresetSpec:
    return PresetSpec(
        name=name, family="sd3", pipeline_class="StableDiffusion3Pipeline", description=description,
        default_size=default_size, scheduler=SD3_SCHEDULER,
        components={
            "transformer": Component("diffusers", "SD3Transformer2DModel", transformer),
            "vae": kl_vae(vae),
            "text_encoder": clip_text(clip_l, projection=True),
            "text_encoder_2": clip_text(clip_g, projection=True),
            "text_encoder_3": t5_encoder(t5),
        },
        tokenizers={"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "t5"},
        extra=dict(image_encoder=None, feature_extractor=None),
    )


PRESETS = (
    sd3_preset("sd3.5-large", "SD3.5-large shapes (8B MMDiT, 38 heads; CLIP-L, CLIP-G, T5-XXL), random weights",
               1024, SD35_LARGE, SD3_VAE, CLIP_L, CLIP_G, T5_XXL),
    # 6 heads: Ulysses 2 divides them, Ulysses 4 does not (as SD3.5-large's 38).
    sd3_preset("sd3-tiny", "tiny SD3 for CPU tests: 2 joint blocks, 6 heads x 16, 4-level VAE (scale 8)", 64,
               {**SD35_LARGE, "attention_head_dim": 16, "num_attention_heads": 6, "num_layers": 2,
                "caption_projection_dim": 96, "joint_attention_dim": 96, "pooled_projection_dim": 80,
                "in_channels": 4, "out_channels": 4, "pos_embed_max_size": 16, "sample_size": 8},
               {**SD3_VAE, **TINY_KL, "latent_channels": 4, "sample_size": 64}, TINY_CLIP_L, TINY_CLIP_G, TINY_T5),
)

FAMILY = Family(
    name="sd3", pipelines=("StableDiffusion3Pipeline",), plan=SD3_PLAN, read_info=read_sd3_info,
    call_kwargs=prompt_kwargs, bench_kwargs=sd3_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "cfg", "tp"}), check_tp=check_tp_widths,
)
