"""Sana (SanaTransformer2DModel): CFG parallelism only.

The pipeline batches [negative, prompt]; each cfg rank runs one branch of every step, exactly.

Sequence parallelism is refused for now. Sana's self-attention is linear (ReLU kernel), whose split
form is exact and cheap — all-reduce each head's KᵀV and K-sum over the sp group — but every block's
Mix-FFN (GLUMBConv) runs a 3×3 depthwise convolution over the 2-D token grid, which needs the
neighbouring rows of the next and previous rank (a halo exchange inside a diffusers module we do not
fork). Until that exists, `Family.axes` of Sana is {cfg} and the user is told so.

Tensor parallelism is refused with its reason too: Sana-1600M is 3.2 GB in bf16 (it fits any GPU, so
TP would buy no memory, and on NVLinked GPUs TP is slower than the other axes at every size measured
for Flux), its 70 self-attention heads split only over 2, 5 or 7 ranks, and its MLP is convolutions
(1×1, 3×3 depthwise, 1×1 in GLUMBConv), not the linears the TP plans split.
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


SANA_TP_REFUSAL = (
    "Sana-1600M's 3.2 GB of bf16 weights fit any GPU (TP would buy no memory), its 70 attention heads split "
    "only over 2, 5 or 7 ranks, and its Mix-FFN is convolutions, not splittable linears; use --cfg 2 for one "
    "image and --dp for more"
)


# SanaPipeline takes the same arguments as PixArtSigmaPipeline (prompt, mask-carrying embeddings,
# resolution binning, caption cleaning), so the request → kwargs mappings are PixArt's.
sana_call_kwargs = pixart_call_kwargs
sana_bench_kwargs = pixart_bench_kwargs
