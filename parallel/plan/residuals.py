"""The residual part of a plan: inputs that another model of the same mesh computed for this one and
that the model adds to its own pieces (a ControlNet's per-block samples).

Such a model (a ControlNet, with `SequenceSplit.residual_output` / `BatchSplit(output_dim=None)`) leaves
them as this rank's piece of the tokens and of the batch: no all-gather. Each residual tensor arrives
either as this rank's piece (its model ran under the same mesh) or whole (it did not, e.g. a test
feeding residuals by hand); only a whole one is cut, any other length is an error.

A residual's token group may not be split yet when the call starts (SD3 makes its tokens inside
forward): a list of residuals then waits — the model reads it only later, after it makes its tokens —
and is split in place the moment its group's split is known. A lone tensor cannot wait (the model
would read the whole one), nor may a list still wait when the call returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..sharding import take_piece
from .batch import BatchState, batch_piece
from .context import Installed, SeqContext, SeqDim


@dataclass(frozen=True)
class Residuals:
    inputs: Mapping[str, SeqDim | None]
    """forward kwarg (a tensor, or a tuple / list of tensors) → its token group, split over sp like the
    model's own tokens; None: split over the batch only (UNets). Split over cfg with the batch part's
    inputs, along dim 0."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "ResidualState | None":
        batch = parts.get("batch")
        batch = batch if batch is not None and batch.calls else None
        if ctx.mesh.size("sp") == 1 and batch is None:
            return None
        return ResidualState(self, ctx, batch)


class ResidualState(Installed):
    calls = True

    def __init__(self, residuals: Residuals, ctx: SeqContext, batch: BatchState | None):
        super().__init__()
        self.residuals, self.ctx, self.batch = residuals, ctx, batch
        self.waiting: dict[str, list] = {}
        """Residual input name → the list the model reads, waiting for its group's split in this call."""

    def before(self, arguments: dict) -> bool:
        self.waiting = {}
        for name, where in self.residuals.inputs.items():
            if arguments.get(name) is not None:
                arguments[name] = self.take(arguments[name], where, name)
        return False

    def after(self, output):
        assert not self.waiting, f"residual inputs {list(self.waiting)} were never split: their tokens never came"
        return output

    def take(self, x, where: SeqDim | None, name: str):
        """This rank's piece of residual input `x`: its batch piece now; its token piece now, or — when
        its group's split is not known yet (made inside forward) — as a list filled in once it is."""
        if self.batch is not None and self.batch.rows is not None:
            x = _each(x, lambda t: self._batch(t, name))
        if self.ctx.mesh.size("sp") == 1 or where is None:
            return x
        if where.tokens in self.ctx.sizes:
            return _each(x, lambda t: self._tokens(t, where, name))
        assert isinstance(x, (tuple, list)), f"{name}: a lone residual tensor cannot wait for its group's split"
        pending = self.waiting[name] = list(x)

        def split() -> None:
            del self.waiting[name]
            pending[:] = _each(pending, lambda t: self._tokens(t, where, name))

        self.ctx.when_split(where.tokens, split)
        return pending

    def _batch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """This cfg rank's branches of a residual: cut from a whole batch, kept if it is this rank's already."""
        whole, mine = self.batch.rows
        if x.shape[0] == whole and whole != mine:
            return batch_piece(x, 0, self.batch.per_rank(), self.ctx.mesh.coord("cfg"), name)
        if x.shape[0] != mine:
            raise ValueError(f"{name} has batch {x.shape[0]}: neither the whole batch {whole} nor this rank's {mine}")
        return x

    def _tokens(self, x: torch.Tensor, where: SeqDim, name: str) -> torch.Tensor:
        """This sp rank's tokens of a residual: cut from all of them, kept if they are this rank's already."""
        sizes, me = self.ctx.sizes[where.tokens], self.ctx.mesh.coord("sp")
        dim = where.dim % x.ndim
        if x.shape[dim] == sum(sizes):
            return take_piece(x, dim, sizes, me)
        if x.shape[dim] != sizes[me]:
            raise ValueError(f"{name} has {x.shape[dim]} {where.tokens!r} tokens: neither all {sum(sizes)} nor "
                             f"this rank's {sizes[me]}")
        return x


def _each(x, fn):
    """`fn` of each tensor in `x` (a tensor, or a tuple / list of them)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_each(t, fn) for t in x)
    return fn(x) if isinstance(x, torch.Tensor) else x
