"""Tensor-parallel plans (data) of the SD3 and PixArt transformers; see flux_tp.py for the pattern.

Both attention processors of ours (engine/models/sd3.py, pixart.py) derive head_dim from the layer's
full `out_features`, so they take the column-split Q/K/V unchanged: each rank computes H/T heads.
"""

from __future__ import annotations

from parallel.tensor import Colwise, Rowwise

from .flux_tp import MMDIT_TP_PLAN

_COL, _GATHER, _ROW = Colwise(), Colwise(gather=True), Rowwise()

SD3_TP_PLAN = {
    # Same joint blocks as Flux's double-stream ones (SD3.5's 9-way norm1 and the last block's
    # continuous norm1_context included), plus SD3.5-medium's extra image-only self-attention.
    **MMDIT_TP_PLAN,
    "transformer_blocks.*.attn2.to_[qkv]": _COL,
    "transformer_blocks.*.attn2.to_out.0": _ROW,
}

PIXART_TP_PLAN = {
    "adaln_single.emb.timestep_embedder.linear_1": _COL,
    "adaln_single.emb.timestep_embedder.linear_2": _ROW,
    "adaln_single.linear": _GATHER,
    "caption_projection.linear_1": _COL,
    "caption_projection.linear_2": _ROW,
    "transformer_blocks.*.attn1.to_[qkv]": _COL,
    "transformer_blocks.*.attn1.to_out.0": _ROW,
    "transformer_blocks.*.ff.net.0.proj": _COL,
    "transformer_blocks.*.ff.net.2": _ROW,
    # attn2 (cross-attention to the text) stays replicated: it runs diffusers' own processor, which
    # infers head_dim from the width it is given and would misread a column-split one.
}
