"""FP8 linears that quantize exactly as one GPU does, on any layout of the mesh.

A quantized linear keeps its weight as e4m3 values with one float32 scale per output feature (the
row's maximum over 448) and quantizes each input token with its own scale (the token's maximum over
448) at every call (shardiff_kernels.fp8). Where the layout splits a row, the scale is still the
whole row's:
- Column-split (TP `Colwise`) and replicated layers hold whole weight rows and read whole tokens:
  their scales are the 1-GPU scales as they are.
- Row-split layers (TP `Rowwise`, a `RowParallelLinear`) hold a piece of every weight row and read a
  piece of every token's features: the weight rows' maxima are max-reduced over the TP group once,
  when the layer is quantized, and the tokens' maxima at every call (B×S numbers), so every rank
  quantizes its piece with the scales one GPU would use; the partial products are then reduced as in
  bf16 (parallel/tensor.py).
- Sequence and CFG splits cut tokens and batch rows, never a token's features: nothing to reduce.
So the FP8 model on N ranks is the 1-GPU FP8 model, up to the order of fp32 sums.

`Fp8Matmul` is the product of one layer (its e4m3 weight, scales, and the group its inputs' features
are split over); `quantize_linears` puts one in every selected linear of a model: a plain or
column-split `nn.Linear` becomes an `Fp8Linear`, a `RowParallelLinear` keeps its reduction and
computes its partial product in FP8. The bf16 weight is dropped (1 byte per parameter instead of 2).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from shardiff_kernels.fp8 import E4M3, kernel_shape_ok, quantize_rows, row_amax, scaled_linear, uses_kernel

from .tensor import LinearStandIn, RowParallelLinear


@dataclass(frozen=True)
class Fp8Rule:
    """Which linears of a model run in FP8: every `nn.Linear` whose name matches `include` and none of
    `keep` (those stay in the model's dtype). A family declares its rule (engine/models/), from the
    error each group of layers adds when quantized alone (`python -m engine.bench.fp8_layers`)."""

    include: tuple[str, ...] = ("*",)
    keep: tuple[str, ...] = ()

    def selects(self, name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.keep))


def _max_over(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise maximum over the ranks of `group`; functional under torch.compile."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_reduce(x, "max", group))
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


class Fp8Matmul(torch.nn.Module):
    """`x @ Wᵀ (+ bias)` with W in e4m3 (per-output-feature scales) and x quantized per token.

    `feature_group`: the ranks over which the input features (and so the weight rows) are split
    (a row-split TP layer), whose maxima are combined; None: whole rows here."""

    def __init__(self, weight_NK: torch.Tensor, *, feature_group=None, emulate: bool | None = None):
        super().__init__()
        amax_N1 = row_amax(weight_NK.detach())
        if feature_group is not None:
            amax_N1 = _max_over(amax_N1, feature_group)
        q_NK, scale_N1 = quantize_rows(weight_NK.detach(), amax_N1)
        self.register_buffer("weight_q", q_NK.contiguous(), persistent=False)
        self.register_buffer("weight_scale", scale_N1.view(-1).contiguous(), persistent=False)
        self.feature_group = feature_group
        self.emulate = emulate if emulate is not None else not uses_kernel(weight_NK.device)

    @property
    def out_features(self) -> int:
        return self.weight_q.shape[0]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        if not x_MK.is_contiguous():
            x_MK = x_MK.contiguous()
        amax_M1 = row_amax(x_MK)
        if self.feature_group is not None:
            amax_M1 = _max_over(amax_M1, self.feature_group)
        q_MK, scale_M1 = quantize_rows(x_MK, amax_M1)
        y_MN = scaled_linear(q_MK, scale_M1, self.weight_q, self.weight_scale, bias, x.dtype, emulate=self.emulate)
        return y_MN.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.weight_q.shape[1]} → {self.weight_q.shape[0]}, e4m3, per-token × per-channel scales"
                + (", emulated" if self.emulate else "")
                + (", features split" if self.feature_group is not None else ""))


class Fp8Linear(LinearStandIn):
    """A replicated or column-split Linear computing in FP8 (its bf16 weight dropped)."""

    def __init__(self, linear: torch.nn.Linear, matmul: Fp8Matmul):
        super().__init__(linear)
        self.weight = None
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


@dataclass
class QuantizedModel:
    """What `quantize_linears` changed: layer name → the Linear it replaced (for the layout line and
    the weight counts), and the layers left in the model's dtype with why."""

    replaced: dict[str, torch.nn.Module] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"fp8 e4m3 in {len(self.replaced)} linears ({len(self.kept)} kept in the model's dtype)"


def quantize_linears(model: torch.nn.Module, rule: Fp8Rule, *, tp_group=None,
                     emulate: bool | None = None) -> QuantizedModel:
    """Quantize, in place, the linears of `model` that `rule` selects (after TP sharding: a
    `RowParallelLinear`'s features are split over `tp_group`). Irreversible: the bf16 weights go."""
    done = QuantizedModel()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or isinstance(module, Fp8Linear):
            continue
        if not rule.selects(name):
            done.kept[name] = "the family keeps it"
            continue
        if module.weight is None or module.weight.dtype == E4M3:
            continue
        out_f, in_f = module.weight.shape
        if not kernel_shape_ok(out_f, in_f):
            done.kept[name] = f"{in_f} → {out_f} features are not multiples of 16"
            continue
        if isinstance(module, RowParallelLinear):
            assert tp_group is not None, f"{name} is row-split but no TP group was given"
            module.matmul = Fp8Matmul(module.weight, feature_group=tp_group, emulate=emulate)
            module.weight = None
            done.replaced[name] = module
        elif type(module) is torch.nn.Linear:
            new = Fp8Linear(module, Fp8Matmul(module.weight, emulate=emulate))
            _swap(model, name, new)
            done.replaced[name] = module
        else:
            # A stand-in whose product is made elsewhere (the sequence form's fused column groups).
            done.kept[name] = f"{type(module).__name__} computes its product in a fused group"
    return done


def _swap(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    owner_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, child, new)


def linear_names(model: torch.nn.Module, rule: Fp8Rule) -> Sequence[str]:
    """The linears `rule` selects (for counting weights before anything loads)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rule.selects(n)]
