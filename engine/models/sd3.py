"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, MMDiT): its parallel plan and attention processor.

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

from parallel.attention import ParallelAttention
from parallel.plan import ModelPlan, SeqContext, SeqDim

from .dit_tp import SD3_TP_PLAN
from .qkv import project_qkv


class SD3ParallelAttnProcessor:
    """diffusers' JointAttnProcessor2_0 with the attention call replaced by the mesh's parallel attention."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("shardiff's SD3 attention does not take an attention mask")
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


def sd3_call_kwargs(request) -> dict:
    kwargs = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance,
        num_images_per_prompt=request.num_images_per_prompt,
    )
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    return kwargs


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
