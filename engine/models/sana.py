"""Sana (SanaTransformer2DModel): CFG parallelism only.

The pipeline batches [negative, prompt]; each cfg rank runs one branch of every step, exactly.

Sequence parallelism is refused for now. Sana's self-attention is linear (ReLU kernel), whose split
form is exact and cheap — all-reduce each head's KᵀV and K-sum over the sp group — but every block's
Mix-FFN (GLUMBConv) runs a 3×3 depthwise convolution over the 2-D token grid, which needs the
neighbouring rows of the next and previous rank (a halo exchange inside a diffusers module we do not
fork). Until that exists, `Family.axes` of Sana is {cfg} and the user is told so.
"""

from __future__ import annotations

from parallel.plan import ModelPlan

from .pixart import pixart_bench_kwargs, pixart_call_kwargs

SANA_PLAN = ModelPlan(
    batch_inputs={"hidden_states": 0, "encoder_hidden_states": 0, "encoder_attention_mask": 0, "timestep": 0},
)

SANA_SP_REFUSAL = (
    "Sana's Mix-FFN convolves over the 2-D token grid (3x3 depthwise), which a sequence split would need "
    "halo exchanges for; use --cfg 2 (and --dp for more images)"
)


# SanaPipeline takes the same arguments as PixArtSigmaPipeline (prompt, mask-carrying embeddings,
# resolution binning, caption cleaning), so the request → kwargs mappings are PixArt's.
sana_call_kwargs = pixart_call_kwargs
sana_bench_kwargs = pixart_bench_kwargs
