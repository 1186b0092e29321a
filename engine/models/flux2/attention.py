"""FLUX.2's single-stream attention under the mesh: diffusers' Flux2ParallelSelfAttnProcessor with the
attention call replaced by the mesh's parallel attention.

The double-stream blocks compute exactly what FLUX.1's do (separate image / text Q/K/V, [text, image]
joint attention, rotary on the joint sequence), so they use Flux's processor
(engine/models/flux/attention.py). The single-stream blocks fuse Q/K/V with the SwiGLU MLP's input
projection (`to_qkv_mlp_proj`: [Q, K, V, gate, up]) and the attention output with the MLP's output
projection (`to_out` reads [attention, MLP]). Under TP each rank holds its share of every one of those
blocks (a packed column / row split, engine/models/flux2/__init__.py), so the proportional split below
finds this rank's Q, K, V, gate and up, as it finds the whole ones on one rank.

Legend: B batch, S tokens (this rank's joint [text, image] piece), H heads (this rank's), D head dim.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.plan import SeqContext


class Flux2SingleStreamParallelAttnProcessor:
    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("shardiff's FLUX.2 attention does not take an attention mask")
        q_BSHD, k_BSHD, v_BSHD, mlp = self.project(attn, hidden_states, image_rotary_emb)
        out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, self.ctx.joint_sizes("text", "image"))
        return self.output(attn, out_BSHD.to(q_BSHD.dtype), mlp)

    def project(self, attn, hidden_states, image_rotary_emb):
        """Q, K, V of this rank's joint piece (normed, rotated) and the MLP's input half."""
        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = proj.split([local_qkv, proj.shape[-1] - local_qkv], dim=-1)
        q_BSHD, k_BSHD, v_BSHD = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        q_BSHD, k_BSHD = attn.norm_q(q_BSHD), attn.norm_k(k_BSHD)
        if image_rotary_emb is not None:
            q_BSHD = apply_rotary_emb(q_BSHD, image_rotary_emb, sequence_dim=1)
            k_BSHD = apply_rotary_emb(k_BSHD, image_rotary_emb, sequence_dim=1)
        return q_BSHD, k_BSHD, v_BSHD, mlp

    @staticmethod
    def output(attn, out_BSHD, mlp):
        """The fused output projection of [attention, MLP]."""
        return attn.to_out(torch.cat([out_BSHD.flatten(2, 3), attn.mlp_act_fn(mlp)], dim=-1))
