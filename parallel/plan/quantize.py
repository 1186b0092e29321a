"""The FP8 part of a plan: the linears a family's rule selects computed in FP8 (parallel/fp8.py).

Installed after the TP part: a row-split layer is a `RowParallelLinear` by then, whose weight-row and
token maxima the FP8 product reduces over the TP group, so every rank quantizes as one GPU does. Not a
family's declaration but the engine's option (`--quantize fp8`), over the rule the family declares
(`Family.fp8`). The bf16 weights are dropped (removing the plan leaves the model in FP8), unless the
part keeps them (benchmarks that run several layouts on one model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fp8 import Fp8Rule, QuantizedModel, quantize_linears
from .context import Installed, SeqContext


@dataclass(frozen=True)
class Quantize:
    rule: Fp8Rule
    keep_originals: bool = False
    """Keep the bf16 layers so that `remove` restores them (twice the weights in memory meanwhile)."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "Quantized":
        return Quantized(quantize_linears(model, self.rule, tp_group=ctx.mesh.group("tp"),
                                          keep_originals=self.keep_originals))


class Quantized(Installed):
    def __init__(self, done: QuantizedModel):
        super().__init__()
        self.done = done

    def remove(self) -> None:
        if self.done.originals is not None:
            self.done.restore()
