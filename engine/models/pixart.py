"""PixArt-Σ (PixArtTransformer2DModel): its parallel plan and self-attention processor.

Image tokens are made inside the model (`pos_embed` patchifies and adds positions), so they are split
where `pos_embed` returns them and gathered where `proj_out` returns them, before the model's own
unpatchify. Each block has self-attention over the image tokens (`attn1`: parallel attention over the
sp group) and cross-attention to the T5 text (`attn2`): its queries are this rank's image tokens and
its keys/values come from the whole text, which every rank has, so `attn2` keeps diffusers' own
processor (text mask included) and needs no communication. Norms, modulation and MLPs are per token.

CFG: the pipeline batches [negative, prompt]; each cfg rank takes one half.

Legend: B batch, S tokens (this rank's piece), H heads, D head dim.
"""

from __future__ import annotations

import torch

from parallel.attention import ParallelAttention
from parallel.plan import ModelPlan, SeqContext, SeqDim

from .dit_tp import PIXART_TP_PLAN
from .qkv import project_qkv


class PixArtParallelSelfAttnProcessor:
    """diffusers' AttnProcessor2_0 for unmasked self-attention, with the parallel attention call."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError("shardiff's PixArt self-attention takes neither a mask nor a context")
        assert attn.spatial_norm is None and attn.group_norm is None and not attn.residual_connection
        q_BSHD, k_BSHD, v_BSHD = project_qkv(
            hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, attn.to_k.out_features // attn.heads
        )
        out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, self.ctx.joint_sizes("image"))
        out = attn.to_out[1](attn.to_out[0](out_BSHD.flatten(2, 3).to(q_BSHD.dtype)))
        return out / attn.rescale_output_factor


PIXART_PLAN = ModelPlan(
    split_modules={"pos_embed": SeqDim("image", 1)},
    gather_modules={"proj_out": SeqDim("image", 1)},
    attention={"transformer_blocks.*.attn1": PixArtParallelSelfAttnProcessor},
    batch_inputs={
        "hidden_states": 0, "encoder_hidden_states": 0, "encoder_attention_mask": 0, "timestep": 0,
        "added_cond_kwargs": 0,
    },
    tensor=PIXART_TP_PLAN,
)


def pixart_call_kwargs(request) -> dict:
    kwargs = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or "",
        guidance_scale=request.guidance,
        num_images_per_prompt=request.num_images_per_prompt,
        # The requested size, exactly (diffusers would snap it to its aspect-ratio bins and resize).
        use_resolution_binning=False,
        clean_caption=False,
    )
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    return kwargs


def pixart_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random T5 embeddings of the real shape (300 tokens by default) for both branches."""
    gen = torch.Generator("cpu").manual_seed(1234)
    tokens = min(text_tokens, 300)
    mask = torch.ones(1, tokens, dtype=torch.long, device=device)
    return dict(
        prompt_embeds=torch.randn(1, tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        prompt_attention_mask=mask, negative_prompt_attention_mask=mask, negative_prompt=None,
        guidance_scale=4.5, use_resolution_binning=False, max_sequence_length=tokens,
    )
