"""The tensor-parallel part of a plan: which Linears are split how (parallel/tensor.py), and where the
sequence forms of TP split, gather and reduce-scatter tokens (parallel/tensor_seq.py).

Installed on a mesh with tp > 1: the model becomes this rank's shard (`shard_model`); in the sequence
forms (`tp_comm` "sequence" / "overlap") the Rowwise layers the sequence plan lists reduce-scatter
instead of all-reducing, its module hooks go on after the shards' (so a split after a gathered
layer sees all its features), and its step splits the model's tokens over tp after the sp split and
gathers them back before the sp gather.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..tensor import Style, shard_model
from ..tensor_seq import SequenceTP, SequenceTPPlan
from .context import Installed, SeqContext


@dataclass(frozen=True)
class TensorPlan:
    styles: Mapping[str, Style]
    """Module-name glob → tensor-parallel style of that Linear (parallel/tensor.py); others replicated."""
    sequence: SequenceTPPlan | None = None
    """Where tokens are split, gathered and reduce-scattered over tp in the sequence forms of TP
    (`tp_comm="sequence"` / `"overlap"`, parallel/tensor_seq.py); None: only the all-reduce form."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "TensorState | None":
        if ctx.mesh.size("tp") == 1:
            return None
        return TensorState(model, self, ctx)


class TensorState(Installed):
    def __init__(self, model: torch.nn.Module, plan: TensorPlan, ctx: SeqContext):
        super().__init__()
        mesh = ctx.mesh
        assert plan.styles, f"no tensor-parallel plan for {type(model).__name__}"
        self.seq = SequenceTP(model, plan.sequence, plan.styles, mesh, ctx) if mesh.config.tp_sequence else None
        self.calls = self.seq is not None
        self.sharded = shard_model(model, plan.styles, mesh, row_reduce=self.seq.row_reduce if self.seq else None)
        if self.seq is not None:
            self.seq.install()

    def before(self, arguments: dict) -> bool:
        self.seq.before(arguments)
        return False

    def after(self, output):
        return self.seq.after(output)

    def remove(self) -> None:
        # The sequence form's stand-ins first: the shards' originals go back under them.
        if self.seq is not None:
            self.seq.remove()
        self.sharded.remove()


def sequence_refusal(plan: TensorPlan | None, model: torch.nn.Module, mesh) -> None:
    """ValueError where the mesh asks for a sequence form of TP that `plan` has no plan for (before the
    plan touches the model; engines refuse it earlier, from the family's plan)."""
    if mesh.config.tp_sequence and (plan is None or plan.sequence is None):
        raise ValueError(f"{type(model).__name__} has no sequence-form tensor-parallel plan: use --tp-comm allreduce")
