"""Qwen-Image's attention processor under the mesh: diffusers' QwenDoubleStreamAttnProcessor2_0 with
the attention call replaced by the mesh's parallel attention (Ulysses / Ring / both), and its text
padding mask applied exactly without a masked kernel.

The joint stream is [text, image], as in diffusers: each rank's piece is [its text piece, its image
piece]. Rotary tables arrive already split like the tokens (the plan splits `pos_embed`'s output).

The mask. QwenImagePipeline passes `encoder_hidden_states_mask` only for a batch of prompts of
different lengths (each prompt is padded to the longest; a batch without padding gets None). The mask
removes padded text tokens as keys. Our kernels (and Ring's log-sum-exp merge) take no mask, so each
batch element runs its attention on its valid tokens only: rank r's piece of element b keeps its
valid text tokens and all its image tokens, and the per-rank lengths of those pieces (known on every
rank from the whole mask, which the model passes to every block unsplit) drive the uneven all-to-alls
and ring blocks. A masked-out key has softmax weight exactly 0 in diffusers, so the result is the same
for every valid token. The padded tokens' own rows (queries nothing reads: they only reach other
padded tokens, which every later block masks out again, and the output is the image stream) are set
to 0 instead of diffusers' unused values.

Legend: B batch, S tokens (this rank's joint piece), H heads (this rank's under TP), D head dim.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.plan import SeqContext

from ..qkv import project_qkv


class QwenImageParallelAttnProcessor:
    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image's joint attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("Qwen-Image's attention takes no external attention_mask "
                             "(only encoder_hidden_states_mask)")
        # The unsharded width per head: under TP each rank's Q/K/V hold H/T whole heads.
        head_dim = attn.inner_dim // attn.heads
        q_BSHD, k_BSHD, v_BSHD = project_qkv(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q,
                                             attn.norm_k, head_dim)
        eq_BSHD, ek_BSHD, ev_BSHD = project_qkv(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj,
                                                attn.add_v_proj, attn.norm_added_q, attn.norm_added_k, head_dim)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            q_BSHD = apply_rotary_emb_qwen(q_BSHD, img_freqs, use_real=False)
            k_BSHD = apply_rotary_emb_qwen(k_BSHD, img_freqs, use_real=False)
            eq_BSHD = apply_rotary_emb_qwen(eq_BSHD, txt_freqs, use_real=False)
            ek_BSHD = apply_rotary_emb_qwen(ek_BSHD, txt_freqs, use_real=False)
        q_BSHD = torch.cat([eq_BSHD, q_BSHD], dim=1)
        k_BSHD = torch.cat([ek_BSHD, k_BSHD], dim=1)
        v_BSHD = torch.cat([ev_BSHD, v_BSHD], dim=1)

        n_txt = encoder_hidden_states.shape[1]
        if encoder_hidden_states_mask is None or bool(encoder_hidden_states_mask.all()):
            out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, self.ctx.joint_sizes("text", "image"))
        else:
            out_BSHD = self._masked(q_BSHD, k_BSHD, v_BSHD, encoder_hidden_states_mask.bool(), n_txt,
                                    hidden_states.shape[1])
        out = out_BSHD.flatten(2, 3).to(q_BSHD.dtype)

        txt, img = out[:, :n_txt], out[:, n_txt:]
        img = attn.to_out[0](img.contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)  # dropout
        return img, attn.to_add_out(txt.contiguous())

    def _masked(self, q_BSHD, k_BSHD, v_BSHD, mask_BT: torch.Tensor, n_txt: int, n_img: int) -> torch.Tensor:
        """Attention of each batch element over its valid tokens (see the module doc)."""
        ctx = self.ctx
        text_sizes, image_sizes = ctx.sizes.get("text", [n_txt]), ctx.sizes.get("image", [n_img])
        me = ctx.mesh.coord("sp") if len(text_sizes) > 1 else 0
        assert mask_BT.shape[1] == sum(text_sizes) and text_sizes[me] == n_txt, (mask_BT.shape, text_sizes, n_txt)
        starts = [sum(text_sizes[:r]) for r in range(len(text_sizes))]
        # Valid text tokens of each element on each sp rank (one host read; this path is rare).
        valid = torch.stack([mask_BT[:, s : s + n].sum(1) for s, n in zip(starts, text_sizes)], dim=1).tolist()
        out_BSHD = torch.zeros_like(q_BSHD)
        image_keep = mask_BT.new_ones(n_img)
        for b in range(q_BSHD.shape[0]):
            keep = torch.cat([mask_BT[b, starts[me] : starts[me] + n_txt], image_keep])
            sizes = [t + i for t, i in zip(valid[b], image_sizes)]
            got = self.attention(q_BSHD[b : b + 1, keep], k_BSHD[b : b + 1, keep], v_BSHD[b : b + 1, keep],
                                 sizes if len(sizes) > 1 else None)
            out_BSHD[b : b + 1, keep] = got
        return out_BSHD
