"""Flux (FluxTransformer2DModel): its sequence-parallel plan and attention processor.

The sequence is Flux's joint [text, image] token stream. Text and image tokens are split separately
(each unevenly if needed) so every rank keeps a piece of both: the double-stream blocks' text MLPs are
split too, and each rank's joint piece is [its text piece, its image piece]. Rotary embeddings are
computed by the model from `txt_ids`/`img_ids`, which are split the same way, so every token keeps
its own position whatever rank it lands on.

Legend: B batch, S tokens (this rank's joint piece), H heads, D head dim.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from parallel.attention import ParallelAttention
from parallel.plan import ModelPlan, SeqContext, SeqDim

from .flux_tp import FLUX_TP_PLAN, FLUX_TP_SEQUENCE_PLAN
from .sd3 import sd3_call_kwargs


class FluxParallelAttnProcessor:
    """diffusers' FluxAttnProcessor with the attention call replaced by the mesh's parallel attention."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("shardiff's Flux attention does not take an attention mask")
        q_BSHD, k_BSHD, v_BSHD, eq_BSHD, ek_BSHD, ev_BSHD = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        # A fixed head_dim with -1 for heads keeps this independent of how many heads a rank holds.
        q_BSHD = attn.norm_q(q_BSHD.unflatten(-1, (-1, attn.head_dim)))
        k_BSHD = attn.norm_k(k_BSHD.unflatten(-1, (-1, attn.head_dim)))
        v_BSHD = v_BSHD.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            # Double-stream block: prepend this rank's text piece, as the single-rank model does.
            eq_BSHD = attn.norm_added_q(eq_BSHD.unflatten(-1, (-1, attn.head_dim)))
            ek_BSHD = attn.norm_added_k(ek_BSHD.unflatten(-1, (-1, attn.head_dim)))
            ev_BSHD = ev_BSHD.unflatten(-1, (-1, attn.head_dim))
            q_BSHD = torch.cat([eq_BSHD, q_BSHD], dim=1)
            k_BSHD = torch.cat([ek_BSHD, k_BSHD], dim=1)
            v_BSHD = torch.cat([ev_BSHD, v_BSHD], dim=1)
        if image_rotary_emb is not None:
            q_BSHD = apply_rotary_emb(q_BSHD, image_rotary_emb, sequence_dim=1)
            k_BSHD = apply_rotary_emb(k_BSHD, image_rotary_emb, sequence_dim=1)

        out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, self.ctx.joint_sizes("text", "image"))
        out = out_BSHD.flatten(2, 3).to(q_BSHD.dtype)

        if encoder_hidden_states is None:
            return out
        txt, img = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        txt = attn.to_add_out(txt.contiguous())
        return img, txt


FLUX_PLAN = ModelPlan(
    split_inputs={
        "hidden_states": SeqDim("image", 1),
        "img_ids": SeqDim("image", -2),
        "encoder_hidden_states": SeqDim("text", 1),
        "txt_ids": SeqDim("text", -2),
    },
    gather_output=SeqDim("image", 1),
    attention={
        "transformer_blocks.*.attn": FluxParallelAttnProcessor,
        "single_transformer_blocks.*.attn": FluxParallelAttnProcessor,
    },
    batch_inputs={
        "hidden_states": 0, "encoder_hidden_states": 0, "pooled_projections": 0, "timestep": 0, "guidance": 0,
    },
    tensor=FLUX_TP_PLAN,
    tensor_sequence=FLUX_TP_SEQUENCE_PLAN,
)


def flux_call_kwargs(request) -> dict:
    """FluxPipeline arguments that depend on the request beyond size, steps, seed and output type."""
    # StableDiffusion3Pipeline's prompt arguments, plus Flux's true CFG.
    return {**sd3_call_kwargs(request), "true_cfg_scale": request.true_cfg_scale}


def flux_token_counts(info, kwargs: dict, height: int, width: int) -> dict[str, int]:
    """Tokens of each group that FluxPipeline gives the transformer: T5 pads the prompt to
    max_sequence_length; one image token per 2×2 latent patch."""
    import inspect

    from diffusers import FluxPipeline

    text = kwargs.get("max_sequence_length")
    if text is None:
        text = inspect.signature(FluxPipeline.__call__).parameters["max_sequence_length"].default
    m = info.spatial_multiple
    return {"text": text, "image": (height // m) * (width // m)}


def flux_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random prompt embeddings of the real shapes (no text encoders), as the anchors were measured."""
    import torch

    gen = torch.Generator("cpu").manual_seed(1234)
    return dict(
        prompt_embeds=torch.randn(1, text_tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        pooled_prompt_embeds=torch.randn(1, info.pooled_projection_dim, generator=gen).to(device, dtype),
        max_sequence_length=text_tokens,
        guidance_scale=3.5,
    )
