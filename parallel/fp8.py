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
column-split `nn.Linear` becomes an `Fp8Linear` in place (hooks and references kept), a
`RowParallelLinear` keeps its reduction and computes its partial product in FP8. The bf16 weight is
dropped (1 byte per parameter instead of 2).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from shardiff_kernels.fp8 import E4M3, kernel_shape_ok, quantize_rows, row_amax, scaled_linear, uses_kernel

from .tensor import RowParallelLinear


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
        # A row-split layer's emulated partial product stays in fp64 until its reduction (RowParallelLinear
        # rounds the sum once), so that N ranks round as one process does: an FP8 input is a step
        # function of the layer before, and a last-bit difference there can move a value by a whole
        # e4m3 step.
        out_dtype = torch.float64 if self.emulate and self.feature_group is not None else x.dtype
        y_MN = scaled_linear(q_MK, scale_M1, self.weight_q, self.weight_scale, bias, out_dtype, emulate=self.emulate)
        return y_MN.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.weight_q.shape[1]} → {self.weight_q.shape[0]}, e4m3, per-token × per-channel scales"
                + (", emulated" if self.emulate else "")
                + (", features split" if self.feature_group is not None else ""))


class Fp8Linear(torch.nn.Linear):
    """A replicated or column-split Linear computing in FP8, its bf16 weight dropped. Made from the Linear
    in place (`to_fp8`: its class changes, the object stays), so that the hooks the plan put on it (a
    gathered Colwise output, the sequence form's splits) and every reference to it stay valid."""

    matmul: Fp8Matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


def to_fp8(linear: torch.nn.Linear, matmul: Fp8Matmul) -> None:
    """`linear` becomes an Fp8Linear computing with `matmul` (a RowParallelLinear keeps its class and its
    reduction, and computes its partial product with `matmul`)."""
    if type(linear) is torch.nn.Linear:
        linear.__class__ = Fp8Linear
    linear.matmul = matmul
    linear.weight = None


def from_fp8(linear: torch.nn.Linear, weight: torch.nn.Parameter) -> None:
    """Undo `to_fp8` with the weight it dropped."""
    if type(linear) is Fp8Linear:
        linear.__class__ = torch.nn.Linear
        del linear.matmul
    else:
        linear.matmul = None
    linear.weight = weight


@dataclass
class QuantizedModel:
    """What `quantize_linears` changed: the layers put in FP8, and those left in the model's dtype with
    why. `originals` (only when asked to keep them: benchmarks that compare layouts on one model)
    holds what `restore` puts back; otherwise the bf16 weights are gone."""

    model: torch.nn.Module
    replaced: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    originals: dict[str, torch.nn.Parameter] | None = None

    def describe(self) -> str:
        return f"fp8 e4m3 in {len(self.replaced)} linears ({len(self.kept)} kept in the model's dtype)"

    def restore(self) -> None:
        """The bf16 layers back (only where the originals were kept)."""
        assert self.originals is not None, "quantized without keeping the originals: the bf16 weights are gone"
        for name, weight in self.originals.items():
            from_fp8(self.model.get_submodule(name), weight)
        self.originals.clear()
        self.replaced.clear()


def quantize_linears(model: torch.nn.Module, rule: Fp8Rule, *, tp_group=None, emulate: bool | None = None,
                     keep_originals: bool = False) -> QuantizedModel:
    """Quantize, in place, the linears of `model` that `rule` selects (after TP sharding: a
    `RowParallelLinear`'s features are split over `tp_group`). The bf16 weights go, unless
    `keep_originals` (then `restore()` undoes it)."""
    done = QuantizedModel(model, originals={} if keep_originals else None)
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
            matmul = Fp8Matmul(module.weight, feature_group=tp_group, emulate=emulate)
        elif type(module) is torch.nn.Linear:
            matmul = Fp8Matmul(module.weight, emulate=emulate)
        else:
            # A stand-in whose product is made elsewhere (the sequence form's fused column groups).
            done.kept[name] = f"{type(module).__name__} computes its product in a fused group"
            continue
        if keep_originals:
            done.originals[name] = module.weight
        to_fp8(module, matmul)
        done.replaced.append(name)
    return done


def quantized_weights(model: torch.nn.Module, rule: Fp8Rule, shards: Mapping | None = None) -> tuple[int, int]:
    """(weight elements `rule` puts in FP8, their output features) of `model` — a meta-device model
    too, on a TP rank whose `shards` (parallel/tensor.local_shards) say what it keeps: what the FP8
    model holds at 1 byte per weight plus a 4-byte scale per output feature."""
    numel = rows = 0
    for name, m in model.named_modules():
        if type(m) is not torch.nn.Linear or not rule.selects(name) or not kernel_shape_ok(m.out_features,
                                                                                           m.in_features):
            continue
        sl = (shards or {}).get(f"{name}.weight")
        shape = sl.local_shape(m.weight.shape) if sl is not None else tuple(m.weight.shape)
        numel += shape[0] * shape[1]
        rows += shape[0]
    return numel, rows
