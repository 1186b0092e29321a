"""Tensor-parallel pieces shared by the transformer families: the MMDiT joint-block plan (Flux and
SD3) and the check that a TP degree splits heads and MLP width evenly (Flux, SD3, PixArt).

Megatron-style pairs: a column-split linear feeds a row-split one, with only elementwise work between
them, so each pair costs one all-reduce. Attention heads follow the column split of Q/K/V (each rank
computes H/T whole heads; the processors infer the head count from head_dim). The AdaLN modulation
linears (a quarter of Flux's weights) and the embedders' output layers produce small vectors that
replicated code consumes, so they are column-split and all-gathered.
"""

from __future__ import annotations

from shardiff_parallel.tensor import Colwise, Rowwise

# The MLP width is 4 × hidden in every model using these plans (Flux hard-codes it; SD3 and PixArt's
# FeedForward default).
MLP_RATIO = 4

COL, GATHER, ROW = Colwise(), Colwise(gather=True), Rowwise()

# A double-stream (joint) block's image and text attention and MLPs (Flux, SD3, Chroma, HunyuanImage).
JOINT_BLOCK_TP_PLAN = {
    "transformer_blocks.*.attn.to_[qkv]": COL,
    "transformer_blocks.*.attn.add_[qkv]_proj": COL,
    "transformer_blocks.*.attn.to_out.0": ROW,
    "transformer_blocks.*.attn.to_add_out": ROW,
    "transformer_blocks.*.ff.net.0.proj": COL,
    "transformer_blocks.*.ff.net.2": ROW,
    "transformer_blocks.*.ff_context.net.0.proj": COL,
    "transformer_blocks.*.ff_context.net.2": ROW,
}
# A single-stream block (Flux's form): proj_out reads cat([attention out, MLP hidden]), both column-split.
SINGLE_BLOCK_TP_PLAN = {
    "single_transformer_blocks.*.attn.to_[qkv]": COL,
    "single_transformer_blocks.*.proj_mlp": COL,
    "single_transformer_blocks.*.proj_out": Rowwise(blocks=(1, MLP_RATIO)),
}

# Embedders and the double-stream (joint) blocks.
MMDIT_TP_PLAN = {
    # Embedders: timestep / guidance / pooled-text MLPs (col → row), T5 context projection (gathered).
    "time_text_embed.*.linear_1": COL,
    "time_text_embed.*.linear_2": ROW,
    "context_embedder": GATHER,
    # Double-stream blocks: AdaLN, then image and text attention and MLPs.
    "transformer_blocks.*.norm1.linear": GATHER,
    "transformer_blocks.*.norm1_context.linear": GATHER,
    **JOINT_BLOCK_TP_PLAN,
    # Output AdaLN (the final proj_out is replicated).
    "norm_out.linear": GATHER,
}


def check_tp_widths(info, tp: int) -> None:
    """ValueError unless --tp splits the heads, the key/value heads (grouped-query attention), the
    MLP width and the family's further `tp_widths` evenly (from configs, no weights)."""
    if tp == 1:
        return
    mlp = info.mlp_width or info.num_heads * info.head_dim * MLP_RATIO
    widths = [("attention heads", info.num_heads), ("MLP width", mlp)]
    if info.num_kv_heads and info.num_kv_heads != info.num_heads:
        widths.insert(1, ("key/value heads", info.num_kv_heads))
    widths += list(info.tp_widths)
    for what, n in widths:
        if n % tp:
            ok = [d for d in range(2, 9) if all(m % d == 0 for _, m in widths)]
            raise ValueError(
                f"--tp {tp} does not divide the model's {n} {what}; TP degrees that work for this model: "
                + (", ".join(map(str, ok)) if ok else "none (use --ulysses / --ring)")
            )
