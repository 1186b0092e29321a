"""The batch part of a plan: the guidance branches a pipeline batches into one call, split over the cfg axis.

Pipelines that run [uncond, cond] (PAG: [uncond, cond, perturbed] or [cond, perturbed]) as one batch
give each cfg rank whole branches, contiguous and in the pipeline's order; the first output is
gathered back over cfg after the call, so the pipeline combines the branches as on one process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..sharding import gather_pieces, map_first, split_sizes, take_piece
from .context import Installed, SeqContext


@dataclass(frozen=True)
class BatchSplit:
    inputs: Mapping[str, int]
    """forward kwarg → batch dim, split over the cfg axis. A dict-valued kwarg (SDXL's
    added_cond_kwargs) has every tensor in it split along that dim; a list (Z-Image's per-sample
    latents and captions) is the batch itself."""
    output_dim: int | None = 0
    """Batch dim of the first output, gathered back over the cfg axis. None: the outputs stay this
    rank's branches — residuals for a model on the same mesh that takes them so (parallel/plan/residuals.py)."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "BatchState":
        # Also on one cfg rank: the state holds the branch count the caller announces.
        return BatchState(self, ctx)


class BatchState(Installed):
    """One model's batch split: the branches of the calls (announced by the caller) and of this rank."""

    def __init__(self, split: BatchSplit, ctx: SeqContext):
        super().__init__()
        self.split, self.mesh = split, ctx.mesh
        self.calls = self.mesh.size("cfg") > 1
        self.branches: int | None = None
        """Guidance branches the pipeline batches in the next calls, set by whoever calls the pipeline:
        [uncond, cond] = 2, PAG's [uncond, cond, perturbed] = 3 or [cond, perturbed] = 2, one = 1. The
        cfg ranks take whole branches, contiguous and in order (`split_sizes(branches, cfg)`: 3 over 2 →
        [2, 1]). None: as many branches as cfg ranks (equal parts of the batch)."""
        self.branch_range: tuple[int, int] | None = None
        """Branches [start, stop) of the current call that this rank computes; None: all of them (no
        cfg split)."""
        self.rows: tuple[int, int] | None = None
        """(whole batch, this rank's) along dim 0 in the current call, from its first batched tensor
        input split along dim 0; None: no such input."""

    def per_rank(self) -> list[int]:
        """Branches of each cfg rank."""
        parts = self.mesh.size("cfg")
        branches = self.branches or parts
        if branches < parts:
            raise ValueError(
                f"--cfg {parts} needs at least {parts} guidance branches, but this call runs {branches}: the "
                "unconditional branch needs guidance on, the perturbed one --pag-scale"
            )
        return split_sizes(branches, parts)

    def before(self, arguments: dict) -> bool:
        # Each cfg rank runs whole branches: contiguous runs of the batch, in the pipeline's order.
        per_rank, me = self.per_rank(), self.mesh.coord("cfg")
        start = sum(per_rank[:me])
        self.branch_range = (start, start + per_rank[me])
        self.rows = None
        for name, dim in self.split.inputs.items():
            if arguments.get(name) is not None:
                x = arguments[name]
                arguments[name] = batch_piece(x, dim, per_rank, me, name)
                if self.rows is None and isinstance(x, torch.Tensor) and x.ndim and dim == 0:
                    self.rows = (x.shape[0], arguments[name].shape[0])
        return False

    def after(self, output):
        if self.split.output_dim is None:
            return output
        return map_first(output, self._gather)

    def _gather(self, x):
        if isinstance(x, list):
            # Per-sample outputs (Z-Image): the list is the batch; gathered as one stacked tensor.
            return list(self._gather(torch.stack(x)).unbind(0))
        dim = self.split.output_dim % x.ndim
        per_rank = self.per_rank()
        rows = x.shape[dim] // per_rank[self.mesh.coord("cfg")]
        return gather_pieces(x, dim, [n * rows for n in per_rank], self.mesh.group("cfg"))


def batch_piece(x, dim: int, per_rank: list[int], index: int, name: str):
    """This cfg rank's branches of a batched input: `per_rank[i]` branches on rank i, in batch order."""
    if isinstance(x, dict):
        return {k: batch_piece(v, dim, per_rank, index, f"{name}.{k}") for k, v in x.items()}
    if isinstance(x, list):
        # A list of per-sample tensors (Z-Image takes its latents and captions so): the list is the batch.
        branches = sum(per_rank)
        if len(x) % branches:
            raise ValueError(f"{name} holds {len(x)} samples, which its {branches} guidance branches do not divide: "
                             "CFG parallelism needs guidance on (the pipeline must batch both branches)")
        rows = len(x) // branches
        start = sum(per_rank[:index]) * rows
        return x[start : start + per_rank[index] * rows]
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        return x  # a scalar timestep or flag: the same for every branch
    branches = sum(per_rank)
    if x.shape[dim] % branches:
        raise ValueError(
            f"{name} has batch {x.shape[dim]}, which its {branches} guidance branches do not divide: CFG "
            "parallelism needs guidance on (the pipeline must batch the unconditional and conditional branches)"
        )
    rows = x.shape[dim] // branches
    return take_piece(x, dim % x.ndim, [n * rows for n in per_rank], index)
