"""The perturbed branch of perturbed-attention guidance (PAG) for self-attention layers: identity
attention, each token attending only to itself, so the output is its own value through the output
projection — what diffusers' PAGIdentitySelfAttnProcessor2_0 (PixArt-Σ, SD, SDXL) and
PAGIdentitySanaLinearAttnProcessor2_0 (Sana) compute for their perturbed rows.

Per token, so it needs no communication and stays identity under any sequence split; under TP the
column-split `to_v` and row-split `to_out[0]` give the usual partial sums. The normal rows keep the
layer's own processor (parallel/plan/perturbed.py).
"""

from __future__ import annotations

from shardiff_parallel.plan import PerturbedPlan


class ValueIdentityAttention:
    def __init__(self, ctx=None, attention=None):
        pass  # per token: needs neither the split lengths nor the parallel attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:  # a UNet's [B, C, H, W] feature map as tokens
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, H, W)
        if getattr(attn, "residual_connection", False):
            out = out + residual
        return out / getattr(attn, "rescale_output_factor", 1.0)


VALUE_IDENTITY = PerturbedPlan(perturbed=ValueIdentityAttention)
"""The PAG entry of the plans whose PAG layers are plain self-attention (normal rows: the layer's own processor)."""
