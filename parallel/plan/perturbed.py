"""Perturbed-attention guidance (PAG) under the mesh: the perturbed branch keeps its identity attention
however the batch and the sequence are split.

diffusers' PAG pipelines batch the guidance branches as [uncond, cond, perturbed] (with CFG) or
[cond, perturbed] (without), and for the duration of a call give the PAG layers one of the two
processors registered with `set_pag_applied_layers(layers, pag_attn_processors=(with_cfg, without_cfg))`.
diffusers' own pair chunks its input into 3 or 2 equal parts and runs normal attention on all but the
last part and "identity attention" (every image token attends only to itself) on the last one — on the
whole batch and the whole sequence, which no rank holds under the mesh.

The pair the engine registers instead is two `PerturbedAttention`s (one per branch list): the
perturbed part of the plan (`PerturbedPlan`) makes them when it is installed. Each knows the branches
of the call and, from the plan's batch part (`BatchState.branch_range`), which of them this rank holds
after the cfg split (whole branches, in order, so the perturbed rows are always the last ones), and runs
- the rows of the other branches through the layer's normal processor: the one the layer had before
  the pipeline swapped this one in (the plan's parallel processor, or diffusers' default), unless the
  family's `PerturbedPlan.normal` says otherwise;
- the perturbed rows through the family's perturbed processor. For self-attention that is per token
  (value → output projection): identity on any sequence split, with no communication. For joint
  attention (SD3) the image tokens attend to themselves and to all text tokens — the family's processor
  gathers the short text keys over the sequence-parallel group.
So `--cfg 3` puts one branch on each rank, `--cfg 2` splits [uncond, cond | perturbed] (with CFG) or
[cond | perturbed] (without), and every combination with `--ulysses` / `--ring` / `--tp` gives the
single-process result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention import ParallelAttention
from .batch import BatchState
from .context import Installed, SeqContext

PERTURBED = "perturbed"
WITH_CFG = ("uncond", "cond", PERTURBED)
"""The batch of a PAG pipeline with classifier-free guidance on (diffusers' order)."""
WITHOUT_CFG = ("cond", PERTURBED)


@dataclass(frozen=True)
class PerturbedPlan:
    perturbed: Callable[[SeqContext, ParallelAttention], object]
    """Factory of the processor for the perturbed rows of a PAG layer."""
    normal: Callable[[SeqContext, ParallelAttention], object] | None = None
    """Factory of the processor for the other rows; None: the layer's own processor."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention: ParallelAttention, parts) -> "PerturbedState":
        perturbed = self.perturbed(ctx, attention)
        normal = self.normal(ctx, attention) if self.normal is not None else None
        batch = parts.get("batch")
        return PerturbedState(tuple(PerturbedAttention(batch, b, perturbed, normal) for b in (WITH_CFG, WITHOUT_CFG)))


class PerturbedState(Installed):
    def __init__(self, processors: tuple):
        super().__init__()
        self.processors = processors
        """(with CFG, without CFG) processors, the order a PAG pipeline's `set_pag_applied_layers` takes."""


class PerturbedAttention:
    """One of the two processors a PAG pipeline puts on its PAG layers (see the module doc)."""

    def __init__(self, batch: BatchState | None, branches: tuple[str, ...], perturbed, normal=None):
        assert branches[-1] == PERTURBED and PERTURBED not in branches[:-1]
        self.batch, self.branches, self.perturbed, self.normal = batch, branches, perturbed, normal
        self.own: dict[int, object] = {}
        """id(attention module) → its processor outside PAG calls (`remember`)."""

    def remember(self, model: torch.nn.Module) -> None:
        """Note every attention module's processor; called before each PAG pipeline call, while the
        layers still have their own (the pipeline swaps this one in and restores them afterwards)."""
        self.own = {id(m): m.processor for m in model.modules()
                    if hasattr(m, "processor") and not isinstance(m.processor, PerturbedAttention)}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        announced = self.batch.branches if self.batch is not None else None
        if announced is not None:
            assert announced == len(self.branches), (
                f"the pipeline batches {len(self.branches)} branches, the engine announced {announced}")
        start, stop = (self.batch.branch_range if self.batch is not None else None) or (0, len(self.branches))
        local = self.branches[start:stop]
        batch = hidden_states.shape[0]
        assert batch % len(local) == 0, f"batch {batch} is not {len(local)} branches"
        normal_rows = batch // len(local) * sum(b != PERTURBED for b in local)
        outputs = []
        for rows, processor in ((slice(0, normal_rows), self._normal(attn)), (slice(normal_rows, batch), self.perturbed)):
            if rows.start == rows.stop:
                continue
            args = [_rows(t, rows, batch) for t in (hidden_states, encoder_hidden_states, attention_mask)]
            outputs.append(processor(attn, *args, **{k: _rows(v, rows, batch) for k, v in kwargs.items()}))
        if len(outputs) == 1:
            return outputs[0]
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))
        return torch.cat(outputs)

    def _normal(self, attn):
        if self.normal is not None:
            return self.normal
        assert id(attn) in self.own, "PerturbedAttention.remember was not called before the PAG call"
        return self.own[id(attn)]


def _rows(x, rows: slice, batch: int):
    """The rows of a batched tensor argument; anything else (None, a shared mask, a scale) as is."""
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch:
        return x[rows]
    return x
