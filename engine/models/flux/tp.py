"""Flux's tensor-parallel plans (data): the all-reduce form, and the sequence form's token moves.

The all-reduce form extends the MMDiT plan (engine/models/mmdit.py) with the single-stream blocks.
x_embedder and the final proj_out (a few hundred thousand weights) stay replicated.

The sequence form (`--tp-comm sequence` / `overlap`, parallel/tensor_seq.py) keeps the same
shards and changes only where the tokens live between the TP regions: FLUX_TP_SEQUENCE_PLAN below.
"""

from __future__ import annotations

from shardiff_parallel.tensor_seq import Fused, SequenceTPPlan, SplitInput, Tokens

from ..mmdit import GATHER, MMDIT_TP_PLAN, SINGLE_BLOCK_TP_PLAN

FLUX_TP_PLAN = {
    **MMDIT_TP_PLAN,
    # Single-stream blocks: their AdaLN, then attention and MLP (engine/models/mmdit.py).
    "single_transformer_blocks.*.norm.linear": GATHER,
    **SINGLE_BLOCK_TP_PLAN,
}

_IMAGE, _TEXT = Tokens(("image",)), Tokens(("text",))
# The fused entries (image tokens, the long group) overlap their collective with a matmul in the
# overlap form; the text's 512 tokens are too few for it to pay.
_IMAGE_FUSED = Fused(("image",))
# Single-stream blocks keep [text, image] in gathered (rank-major) order: their work is per token or
# attention without a mask, and the rotary tables are permuted to match, so no reorder copy runs.
_JOINT_RANK_MAJOR = Fused(("text", "image"), rank_major=True)
_Q_K_V = ("attn.to_q", "attn.to_k", "attn.to_v")

# Between the TP regions each TP rank holds 1/T of this sp rank's text and of its image tokens; the
# token-wise Rowwise outputs are reduce-scattered, the inputs of the next column-split region gathered.
FLUX_TP_SEQUENCE_PLAN = SequenceTPPlan(
    split_inputs={
        # x_embedder is replicated and per token: it runs on this rank's 1/T only.
        "hidden_states": SplitInput("image"),
        # context_embedder is column-split with its features all-gathered, which needs the same tokens
        # on every TP rank: the text is split where it returns. img_ids / txt_ids are not split over tp:
        # attention sees the tp-gathered sequence, whose rotary embedding they give.
        "encoder_hidden_states": SplitInput("text", after="context_embedder"),
    },
    gather_outputs={
        # Double-stream blocks: the modulated norms feed Q/K/V (and the text's add_*_proj); each stream is
        # gathered alone, so the processor sees [all text, all image] of its sp rank in the usual order.
        "transformer_blocks.*.norm1": Fused(("image",), into=_Q_K_V),
        "transformer_blocks.*.norm1_context": _TEXT,
        # Single-stream blocks concatenate [text, image] locally before `norm`, whose output feeds both
        # attention and proj_mlp.
        "single_transformer_blocks.*.norm": Fused(("text", "image"), rank_major=True, into=(*_Q_K_V, "proj_mlp")),
    },
    gather_inputs={
        "transformer_blocks.*.ff": Fused(("image",), into=("ff.net.0.proj",)),
        "transformer_blocks.*.ff_context": _TEXT,
    },
    reduce_scatter={
        "transformer_blocks.*.attn.to_out.0": _IMAGE_FUSED,
        "transformer_blocks.*.attn.to_add_out": _TEXT,
        "transformer_blocks.*.ff.net.2": _IMAGE_FUSED,
        "transformer_blocks.*.ff_context.net.2": _TEXT,
        # Rank r gets back [t_r, i_r], which the block's residual and its final [text, image] split
        # expect. time_text_embed's Rowwise (per-sample vectors) keeps the all-reduce.
        "single_transformer_blocks.*.proj_out": _JOINT_RANK_MAJOR,
    },
    # The final norm_out and (replicated) proj_out run on this rank's image tokens.
    gather_output=_IMAGE,
    rank_major_inputs={"single_transformer_blocks.*": {"image_rotary_emb": Tokens(("text", "image"), dim=0)}},
)
