"""Tensor parallelism as data: which linears are column-, row-split or replicated, and the one
mechanism that shards them and adds the collectives.

A model's TP plan maps module-name globs to a style (`Colwise`, `Rowwise`, `SplitNorm`); unmatched
modules are replicated. Styles apply to nn.Linear and to nn.Conv2d, whose channels are its features:
`Colwise` splits a convolution's output channels (a depthwise one's groups with them: each rank
convolves its own channels), `Rowwise` a dense (groups 1) convolution's input channels, whose
partial sums are reduced as a linear's are (Sana's Mix-FFN is 1×1, depthwise 3×3, 1×1 convolutions).
`SplitNorm` marks an RMSNorm over column-split features (Q/K norms across all heads).

`local_shards` turns a plan into the slice of every parameter this TP rank keeps — pure shape
arithmetic that also runs on a meta-device model, so loaders can read only those slices.
`shard_model` then installs the shards (slicing full weights if they are still whole), a forward hook
that all-gathers after each `Colwise(gather=True)`, and puts a `RowParallelLinear` in place of each
`Rowwise` linear, whose forward also reduces the partial products: an all-reduce, or in the sequence
form of TP a reduce-scatter over tokens (parallel/tensor_seq.py), possibly fused with the matmul
(a `RowParallelConv2d`, `ChannelConv2d` or `SplitRMSNorm` in place of the other kinds).

Plain collectives rather than DTensor: a Flux step runs ~600 linears, and DTensor's per-op dispatch
(tens of µs each) would cost more than the communication itself. Inference only: hooks work in place.

Legend: F_out / F_in features of a linear (channels of a convolution), T the TP degree, t this rank's TP
coordinate.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .collective_matmul import gather_dim0
from .mesh import Mesh


PACKED = "packed"
"""`blocks` of a fused linear whose block sizes diffusers records on the Linear itself
(`_tp_packed_col_blocks` / `_tp_packed_row_blocks`: FLUX.2's single-stream [Q, K, V, gate, up] and
[attention, MLP]), so the split follows the model's own config (any MLP ratio)."""


@dataclass(frozen=True)
class Colwise:
    """Output features split over TP ranks (weight rows, bias). The output stays split — it feeds
    head-split attention or a `Rowwise` layer — unless `gather`: then it is all-gathered back to all
    features (small outputs consumed by replicated code, e.g. AdaLN modulation vectors).

    `blocks`: proportions of F_out that are split separately, for an output that the model splits
    into parts afterwards (a fused [gate, up] SwiGLU projection: (1, 1)); each rank keeps its share of
    every block, in block order, so the model's own split of the local output finds its parts.
    `PACKED`: the block sizes the Linear carries."""

    gather: bool = False
    blocks: tuple[int, ...] | str = (1,)

    def __post_init__(self):
        assert not (self.gather and self.blocks != (1,)), "a gathered Colwise output is one block"


@dataclass(frozen=True)
class Rowwise:
    """Input features split (the input arrives split from `Colwise` layers); partial products are
    reduced. `blocks`: proportions of F_in that are split separately, for an input concatenated
    from several split tensors (Flux single blocks: [attention (1), MLP (4)]; `PACKED`: the block
    sizes the Linear carries). The bias (F_out values) is replicated and joins the sum once
    (`RowParallelLinear`)."""

    blocks: tuple[int, ...] | str = (1,)


@dataclass(frozen=True)
class SplitNorm:
    """An RMSNorm over features that arrive split from a `Colwise` layer (a Q/K norm across all
    heads): each rank keeps its slice of the weight (and bias), and the sum of squares is all-reduced
    over tp so that every token is normalised by its whole-width mean square (`SplitRMSNorm`)."""


Style = Colwise | Rowwise | SplitNorm


@dataclass(frozen=True)
class Slice:
    """The part of a parameter one rank keeps: the concatenation along `dim` of `(start, length)` runs."""

    dim: int
    runs: tuple[tuple[int, int], ...]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return torch.cat([full.narrow(self.dim, s, n) for s, n in self.runs], dim=self.dim)

    def local_shape(self, full_shape) -> tuple[int, ...]:
        shape = list(full_shape)
        shape[self.dim] = sum(n for _, n in self.runs)
        return tuple(shape)


def match_style(name: str, plan: Mapping[str, Style]) -> Style | None:
    """The style of module `name` in `plan` (the first glob that matches), or None: replicated."""
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def _even(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} is {total}, which --tp {parts} does not divide; choose a TP degree dividing it")
    return total // parts


def _runs(total: int, blocks: tuple[int, ...] | str, tp: int, t: int, what: str, module=None,
          packed_attr: str = "") -> tuple[tuple[int, int], ...]:
    """Rank t's (start, length) run in each block of `total` features split in proportions `blocks`
    (`PACKED`: the block sizes `module` carries in `packed_attr`)."""
    if blocks == PACKED:
        blocks = tuple(getattr(module, packed_attr, None) or ())
        assert blocks and sum(blocks) == total, f"{what}: the layer carries no {packed_attr} summing to {total}"
    unit = _even(total, sum(blocks), f"{what} (blocks {blocks})" if blocks != (1,) else what)
    runs, start = [], 0
    for b in blocks:
        n = _even(unit * b, tp, f"a block of {what}" if blocks != (1,) else what)
        runs.append((start + t * n, n))
        start += unit * b
    return tuple(runs)


def is_depthwise(conv: torch.nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def features(name: str, module: torch.nn.Module) -> tuple[int, int]:
    """(output, input) features of the Linear or Conv2d `name` (the whole layer's, also once sharded)."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    assert isinstance(module, torch.nn.Conv2d), (
        f"TP plan matched {name} ({type(module).__name__}), not a Linear or Conv2d"
    )
    return module.out_channels, module.in_channels


def full_shape(module: torch.nn.Module, pname: str) -> tuple[int, ...]:
    """The whole (unsharded) shape of parameter `pname` of a module a TP style applies to."""
    if isinstance(module, torch.nn.Linear):
        return (module.out_features, module.in_features) if pname == "weight" else (module.out_features,)
    if isinstance(module, torch.nn.Conv2d):
        if pname == "weight":
            return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        return (module.out_channels,)
    return tuple(module.dim)  # an RMSNorm's weight and bias


def module_shards(name: str, module: torch.nn.Module, style: Style, tp: int, t: int) -> dict[str, Slice]:
    """Parameter name (relative to `module`) → what TP rank `t` of `tp` keeps (unlisted: all of it)."""
    if isinstance(style, SplitNorm):
        assert hasattr(module, "eps") and len(getattr(module, "dim", ())) == 1, (
            f"SplitNorm matched {name} ({type(module).__name__}), not an RMSNorm over one feature dim"
        )
        runs = _runs(module.dim[0], (1,), tp, t, f"the width of {name}")
        return {p: Slice(0, runs) for p in ("weight", "bias") if getattr(module, p, None) is not None}
    out_f, in_f = features(name, module)
    if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
        assert is_depthwise(module) and isinstance(style, Colwise) and not style.gather, (
            f"{name}: a grouped convolution splits only as a depthwise Colwise (each rank its own channels)"
        )
    if isinstance(style, Colwise):
        runs = _runs(out_f, style.blocks, tp, t, f"the output width of {name}", module, "_tp_packed_col_blocks")
        out = {"weight": Slice(0, runs)}
        if module.bias is not None:
            out["bias"] = Slice(0, runs)
        return out
    assert isinstance(style, Rowwise)
    return {"weight": Slice(1, _runs(in_f, style.blocks, tp, t, f"the input width of {name}", module,
                                     "_tp_packed_row_blocks"))}


def local_shards(model: torch.nn.Module, plan: Mapping[str, Style], tp: int, t: int) -> dict[str, Slice]:
    """Full parameter name → its slice on TP rank `t`; unlisted parameters are replicated.

    Reads only module attributes (in/out features, channels, norm widths), so it works on meta-device
    models and on models whose parameters were loaded sharded (before `shard_model` puts its stand-ins in).
    """
    out = {}
    for name, module in model.named_modules():
        style = match_style(name, plan)
        if style is not None:
            for pname, sl in module_shards(name, module, style, tp, t).items():
                out[f"{name}.{pname}"] = sl
    return out


def local_numel(model: torch.nn.Module, plan: Mapping[str, Style], tp: int, t: int) -> int:
    """Parameters TP rank `t` of `tp` holds (also on a meta-device model: shape arithmetic only)."""
    shards = local_shards(model, plan, tp, t) if tp > 1 else {}
    total = 0
    for name, p in model.named_parameters():
        sl = shards.get(name)
        total += math.prod(p.shape if sl is None else sl.local_shape(p.shape))
    return total


def local_out_features(linear: torch.nn.Linear) -> int:
    """The output features this rank computes (a Colwise shard's share; `out_features` stays the whole
    layer's), also for a linear whose weight is held in FP8 (parallel/fp8.py)."""
    if linear.weight is not None:
        return linear.weight.shape[0]
    return linear.matmul.out_features


Reduce = Callable[[torch.Tensor, "RowParallelLinear"], torch.Tensor]
"""(input with split features, the layer) → the reduced output. The layer's `partial(x, bias)` is this
rank's partial product (bf16, or FP8: parallel/fp8.py); a fused form reads `layer.weight` itself."""


class LinearStandIn(torch.nn.Linear):
    """A Linear put in place of a model's Linear with the same Parameters (names, shards and state
    dict unchanged) and another forward — for what a forward hook cannot do: replace the matmul.
    `in_features` / `out_features` stay the whole layer's, like the sharded Linear's."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias


class RowParallelLinear(LinearStandIn):
    """A `Rowwise` linear that also reduces: `reduce(x, layer)` instead of `x @ weightᵀ + bias`
    (a fused matmul + reduce-scatter, parallel/collective_matmul.py, replaces the matmul itself).
    `matmul`: this rank's partial product when it is not `x @ weightᵀ` (FP8: parallel/fp8.py)."""

    def __init__(self, linear: torch.nn.Linear, reduce: Reduce):
        super().__init__(linear)
        self.reduce = reduce
        self.matmul: torch.nn.Module | None = None

    def partial(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.matmul is not None:
            return self.matmul(x, bias)
        return torch.nn.functional.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(x, self).to(x.dtype)  # a no-op unless the partial products were wider (parallel/fp8.py)


class RowParallelConv2d(torch.nn.Conv2d):
    """A `Rowwise` convolution (groups 1): this rank's input channels convolved with its weight
    columns, the bias added by TP rank 0, the partial outputs all-reduced. Attributes stay the whole
    layer's, like a sharded Linear's."""

    def __init__(self, conv: torch.nn.Conv2d, group, t: int):
        _copy_conv(self, conv)
        self.group, self.t = group, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias if self.t == 0 else None)
        dist.all_reduce(out, group=self.group)
        return out


class ChannelConv2d(torch.nn.Conv2d):
    """A depthwise convolution's `Colwise` shard: this rank's channels and groups (its attributes say
    the local counts, since the convolution's forward reads `groups`)."""

    def __init__(self, conv: torch.nn.Conv2d, channels: int):
        _copy_conv(self, conv)
        self.in_channels = self.out_channels = self.groups = channels


def _copy_conv(new: torch.nn.Conv2d, conv: torch.nn.Conv2d) -> None:
    """`new` takes `conv`'s configuration and Parameters (no copy)."""
    torch.nn.Module.__init__(new)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                 "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
        setattr(new, name, getattr(conv, name))
    new.weight, new.bias = conv.weight, conv.bias


class SplitRMSNorm(torch.nn.Module):
    """diffusers' RMSNorm (its forward, line by line) over features split across the tp ranks: the
    fp32 sum of squares is all-reduced and divided by the whole width."""

    def __init__(self, norm: torch.nn.Module, group):
        super().__init__()
        self.eps, self.dim, self.group = norm.eps, norm.dim, group
        self.weight, self.bias = norm.weight, getattr(norm, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        sum_sq = x.to(torch.float32).pow(2).sum(-1, keepdim=True)
        dist.all_reduce(sum_sq, group=self.group)
        x = x * torch.rsqrt(sum_sq / self.dim[0] + self.eps)
        if self.weight is None:
            return x.to(input_dtype)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        x = x * self.weight
        return x if self.bias is None else x + self.bias


def all_reduce_linear(group, t: int) -> Reduce:
    """The all-reduce form: the bias joins the sum once, added by TP rank 0 before the all-reduce."""

    def reduce(x, layer):
        out = layer.partial(x, layer.bias if t == 0 else None)
        dist.all_reduce(out, group=group)
        return out

    return reduce


def swap_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Put `new` at `name` in `model`; returns what was there."""
    owner_name, _, child = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, child)
    setattr(owner, child, new)
    return old


def undo_hooks_and_swaps(model: torch.nn.Module, handles: list, swapped: dict[str, torch.nn.Module]) -> None:
    """Remove `handles` and put the `swapped` modules (name → original) back; empties both."""
    for h in handles:
        h.remove()
    handles.clear()
    for name, module in swapped.items():
        swap_module(model, name, module)
    swapped.clear()


@dataclass
class ShardedModel:
    """Hooks, swapped modules and (when this call sliced full weights) the original parameters, so
    `remove` can undo it all."""

    model: torch.nn.Module
    handles: list = field(default_factory=list)
    swapped: dict[str, torch.nn.Module] = field(default_factory=dict)
    originals: dict[str, torch.nn.Parameter] = field(default_factory=dict)

    def remove(self) -> None:
        # Modules first: the original parameters go back onto the original Linears.
        undo_hooks_and_swaps(self.model, self.handles, self.swapped)
        for full_name, param in self.originals.items():
            owner, _, pname = full_name.rpartition(".")
            setattr(self.model.get_submodule(owner), pname, param)
        self.originals.clear()


def shard_model(
    model: torch.nn.Module,
    plan: Mapping[str, Style],
    mesh: Mesh,
    *,
    row_reduce: Callable[[str], Reduce | None] | None = None,
) -> ShardedModel:
    """Make `model` this rank's TP part: slice full parameters (a sharded load leaves them local
    already), then add the collectives. `remove()` restores whatever was changed here.

    `row_reduce(name)`: how Rowwise layer `name` reduces (the sequence form's reduce-scatter,
    parallel/tensor_seq.py), or None for the all-reduce."""
    T, t, group = mesh.size("tp"), mesh.coord("tp"), mesh.group("tp")
    assert T > 1 and group is not None
    shards = local_shards(model, plan, T, t)
    assert shards or not plan, f"TP plan matched no layer in {type(model).__name__}"
    sharded = ShardedModel(model)
    for full_name, sl in shards.items():
        owner_name, _, pname = full_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        param = getattr(owner, pname)
        whole = full_shape(owner, pname)
        if tuple(param.shape) == whole:
            sharded.originals[full_name] = param
            setattr(owner, pname, torch.nn.Parameter(sl.take(param.data).contiguous(), requires_grad=False))
        else:
            assert tuple(param.shape) == sl.local_shape(whole), (
                f"{full_name} has shape {tuple(param.shape)}: neither full {whole} nor this rank's shard"
            )
    for name, module in list(model.named_modules()):
        style = match_style(name, plan)
        new = None
        if isinstance(style, Rowwise) and isinstance(module, torch.nn.Conv2d):
            assert row_reduce is None or row_reduce(name) is None, f"{name}: convolutions reduce by all-reduce only"
            new = RowParallelConv2d(module, group, t)
        elif isinstance(style, Rowwise):
            reduce = (row_reduce(name) if row_reduce is not None else None) or all_reduce_linear(group, t)
            new = RowParallelLinear(module, reduce)
        elif isinstance(style, Colwise) and isinstance(module, torch.nn.Conv2d) and is_depthwise(module):
            new = ChannelConv2d(module, module.weight.shape[0])
        elif isinstance(style, SplitNorm):
            new = SplitRMSNorm(module, group)
        elif isinstance(style, Colwise) and style.gather:
            sharded.handles.append(module.register_forward_hook(_all_gather_hook(group, T)))
        if new is not None:
            sharded.swapped[name] = swap_module(model, name, new)
    return sharded


def _all_gather_hook(group, T: int):
    def hook(module, args, out):
        # [..., F_out/T] → stacked [T, ..., F_out/T] (one collective on dim 0) → [..., F_out].
        stacked = gather_dim0(out.contiguous(), T, group)
        return stacked.unflatten(0, (T, out.shape[0])).movedim(0, -2).flatten(-2)

    return hook
