"""What the Next-DiT families share (Lumina2, Z-Image): refined streams joined into one, split per stack.

Both models embed the caption and the image apart, refine each alone (`context_refiner` over the
text, with its padding mask; `noise_refiner` over the image), then join them in forward — per
sample, real tokens only, padded to the batch's longest — and run `layers` over the joint stream.
The joining is the model's own Python between the stacks, so each stack is split on its own
(parallel/plan/runs.py's LayerRun): the text over the sp ranks for the context refiner, the image for
the noise refiner, the joint stream for the main layers. The refiners' outputs are gathered back before
the join (one all-gather each: the text is short, the image is one layer's input); the joint stream
stays split through the final per-token layer, which is gathered instead (64 features per token,
not the model width).

Rotary tables are per token and arrive whole at every block (the model computes them once), so the
runs split them too. Padding masks are read once per stack into key lengths; attention then leaves
padded keys out (parallel/blocks.py), on every layout.

Legend: B batch, S tokens (this rank's piece), H heads, D head dim.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.plan import LayerRun, RunState

STACKS = (("context_refiner", "text"), ("noise_refiner", "image"), ("layers", "joint"))
"""The model's stacks of blocks in the order forward runs them, and the token group of each."""


def stack_runs(processor_cls, *, stream: str, rotary: str, mask: str,
               per_token: tuple[str, ...] = ()) -> tuple[LayerRun, ...]:
    """The three LayerRuns, given the processor class and the names of the blocks' forward arguments;
    each block's processor reads its stack's token group and key lengths from its run."""
    return tuple(
        LayerRun(layers=layers, tokens=tokens, stream=stream, per_token={rotary: 1, **{p: 1 for p in per_token}},
                 key_mask=mask, gather=layers != "layers", attention={processor_cls.MODULE: processor_cls})
        for layers, tokens in STACKS
    )


def complex_rotary(x_BSHD: torch.Tensor, freqs_BSF: torch.Tensor) -> torch.Tensor:
    """Both models' rotary embedding: pairs of features as complex numbers times e^{iθ} (fp32)."""
    with torch.amp.autocast("cuda", enabled=False):
        return apply_rotary_emb(x_BSHD, freqs_BSF, use_real=False)


class StackAttention:
    """The parallel-attention call of a processor in one stack: this call's split sizes and key
    lengths of its token group, from the stack's run (`RunState`)."""

    MODULE = "attn"
    """Name of the attention module inside each block."""

    def __init__(self, run: RunState, attention: ParallelAttention):
        self.run = run
        self.attention = attention

    def total_tokens(self, local: int) -> int:
        sizes = self.run.sizes
        return sum(sizes) if sizes else local

    def attend(self, q_BSHD, k_BSHD, v_BSHD, *, masked: bool, scale: float | None = None) -> torch.Tensor:
        key_lengths = None
        if masked:
            assert self.run.mask_read, f"no LayerRun read the {self.run.tokens} mask"
            key_lengths = self.run.key_lengths
        return self.attention(q_BSHD, k_BSHD, v_BSHD, self.run.sizes, scale=scale, key_lengths=key_lengths)
