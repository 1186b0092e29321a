"""Sana (SanaTransformer2DModel): CFG parallelism only.

The pipeline batches [negative, prompt]; each cfg rank runs one branch of every step, exactly.

Sequence parallelism is refused for now. Sana's self-attention is linear (ReLU kernel), whose split
form is exact and cheap — all-reduce each head's KᵀV and K-sum over the sp group — but every block's
Mix-FFN (GLUMBConv) runs a 3×3 depthwise convolution over the 2-D token grid, which needs the
neighbouring rows of the next and previous rank (a halo exchange inside a diffusers module we do not
fork). Until that exists, `Family.axes` of Sana is {cfg} and the user is told so.
"""

from __future__ import annotations

import torch

from parallel.plan import ModelPlan

SANA_PLAN = ModelPlan(
    batch_inputs={"hidden_states": 0, "encoder_hidden_states": 0, "encoder_attention_mask": 0, "timestep": 0},
)

SANA_SP_REFUSAL = (
    "Sana's Mix-FFN convolves over the 2-D token grid (3x3 depthwise), which a sequence split would need "
    "halo exchanges for; use --cfg 2 (and --dp for more images)"
)


def sana_call_kwargs(request) -> dict:
    kwargs = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or "",
        guidance_scale=request.guidance,
        num_images_per_prompt=request.num_images_per_prompt,
        use_resolution_binning=False,  # the requested size, exactly
        clean_caption=False,
    )
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    return kwargs


def sana_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random Gemma-2 embeddings of the real shape (300 tokens by default) for both branches."""
    gen = torch.Generator("cpu").manual_seed(1234)
    tokens = min(text_tokens, 300)
    mask = torch.ones(1, tokens, dtype=torch.long, device=device)
    return dict(
        prompt_embeds=torch.randn(1, tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        prompt_attention_mask=mask, negative_prompt_attention_mask=mask, negative_prompt=None,
        guidance_scale=4.5, use_resolution_binning=False, max_sequence_length=tokens,
    )
