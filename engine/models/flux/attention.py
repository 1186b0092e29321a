"""Flux's attention processor under the mesh: diffusers' FluxAttnProcessor with the attention call
replaced by the mesh's parallel attention (Ulysses / Ring / both).

The sequence is Flux's joint [text, image] token stream. Text and image tokens are split separately
(each unevenly if needed) so every rank keeps a piece of both, and each rank's joint piece is [its
text piece, its image piece]. Rotary embeddings are computed by the model from `txt_ids` / `img_ids`,
which are split the same way, so every token keeps its own position whatever rank it lands on.

Legend: B batch, S tokens (this rank's joint piece), H heads, D head dim.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.plan import SeqContext


class FluxParallelAttnProcessor:
    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q_BSHD, k_BSHD, v_BSHD = self.project(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out_BSHD = self.attend(q_BSHD, k_BSHD, v_BSHD, attention_mask)
        return self.output(attn, out_BSHD.to(q_BSHD.dtype), hidden_states, encoder_hidden_states)

    def project(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """Q, K, V of this rank's joint [text, image] piece, normed and rotated."""
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
        return q_BSHD, k_BSHD, v_BSHD

    def output(self, attn, out_BSHD, hidden_states, encoder_hidden_states):
        """The attention's output projections: image and text apart in a double-stream block."""
        out = out_BSHD.flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        txt, img = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        txt = attn.to_add_out(txt.contiguous())
        return img, txt

    def attend(self, q_BSHD, k_BSHD, v_BSHD, attention_mask) -> torch.Tensor:
        """Attention over this rank's joint [text, image] piece (Chroma's processor adds its mask here)."""
        if attention_mask is not None:
            raise ValueError("shardiff's Flux attention does not take an attention mask")
        return self.attention(q_BSHD, k_BSHD, v_BSHD, self.ctx.joint_sizes("text", "image"))
