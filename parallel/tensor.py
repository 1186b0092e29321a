"""Tensor parallelism as data: which linears are column-, row-split or replicated, and the one
mechanism that shards them and adds the collectives.

A model's TP plan maps module-name globs to a style (`Colwise`, `Rowwise`); unmatched modules are
replicated. `local_shards` turns a plan into the slice of every parameter this TP rank keeps — pure
shape arithmetic that also runs on a meta-device model, so loaders can read only those slices.
`shard_model` then installs the shards (slicing full weights if they are still whole), a forward hook
that all-gathers after each `Colwise(gather=True)`, and puts a `RowParallelLinear` in place of each
`Rowwise` linear, whose forward also reduces the partial products: an all-reduce, or in the sequence
form of TP a reduce-scatter over tokens (parallel/tensor_seq.py), possibly fused with the matmul.

Plain collectives rather than DTensor: a Flux step runs ~600 linears, and DTensor's per-op dispatch
(tens of µs each) would cost more than the communication itself. Inference only: hooks work in place.

Legend: F_out / F_in features of a linear, T the TP degree, t this rank's TP coordinate.
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


@dataclass(frozen=True)
class Rowwise:
    """Input features split (the input arrives split from `Colwise` layers); partial products are
    reduced. `blocks`: proportions of F_in that are split separately, for an input concatenated
    from several split tensors (Flux single blocks: [attention (1), MLP (4)]; `PACKED`: the block
    sizes the Linear carries). The bias (F_out values) is replicated and joins the sum once
    (`RowParallelLinear`)."""

    blocks: tuple[int, ...] | str = (1,)


Style = Colwise | Rowwise


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


def module_shards(name: str, module: torch.nn.Module, style: Style, tp: int, t: int) -> dict[str, Slice]:
    """Parameter name (relative to `module`) → what TP rank `t` of `tp` keeps (unlisted: all of it)."""
    assert isinstance(module, torch.nn.Linear), f"TP plan matched {name} ({type(module).__name__}), not a Linear"
    if isinstance(style, Colwise):
        runs = _block_runs(name, module, style.blocks, module.out_features, tp, t, "_tp_packed_col_blocks", "output")
        out = {"weight": Slice(0, runs)}
        if module.bias is not None:
            out["bias"] = Slice(0, runs)
        return out
    assert isinstance(style, Rowwise)
    return {"weight": Slice(1, _block_runs(name, module, style.blocks, module.in_features, tp, t,
                                           "_tp_packed_row_blocks", "input"))}


def _block_runs(name: str, module, blocks, width: int, tp: int, t: int, packed_attr: str, what: str):
    """(start, length) of rank t's share of each block of a `width`-wide dimension."""
    if blocks == PACKED:
        blocks = tuple(getattr(module, packed_attr, None) or ())
        assert blocks and sum(blocks) == width, f"{name} carries no {packed_attr} summing to its {what} width {width}"
    unit = _even(width, sum(blocks), f"the {what} width of {name} (blocks {blocks})")
    runs, start = [], 0
    for b in blocks:
        n = _even(unit * b, tp, f"the {what} width of {name}" if len(blocks) == 1 else f"an {what} block of {name}")
        runs.append((start + t * n, n))
        start += unit * b
    return tuple(runs)


def local_shards(model: torch.nn.Module, plan: Mapping[str, Style], tp: int, t: int) -> dict[str, Slice]:
    """Full parameter name → its slice on TP rank `t`; unlisted parameters are replicated.

    Reads only module attributes (in/out features), so it works on meta-device and already-sharded models.
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


Reduce = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(input with split features, this rank's weight columns, the whole bias or None) → the reduced output."""


class LinearStandIn(torch.nn.Linear):
    """A Linear put in place of a model's Linear with the same Parameters (names, shards and state
    dict unchanged) and another forward — for what a forward hook cannot do: replace the matmul.
    `in_features` / `out_features` stay the whole layer's, like the sharded Linear's."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias


class RowParallelLinear(LinearStandIn):
    """A `Rowwise` linear that also reduces: `reduce(x, weight, bias)` instead of `x @ weightᵀ + bias`
    (a fused matmul + reduce-scatter, parallel/collective_matmul.py, replaces the matmul itself)."""

    def __init__(self, linear: torch.nn.Linear, reduce: Reduce):
        super().__init__(linear)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(x, self.weight, self.bias)


def all_reduce_linear(group, t: int) -> Reduce:
    """The all-reduce form: the bias joins the sum once, added by TP rank 0 before the all-reduce."""

    def reduce(x, weight, bias):
        out = torch.nn.functional.linear(x, weight, bias if t == 0 else None)
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
    assert shards or not plan, f"TP plan matched no linear in {type(model).__name__}"
    sharded = ShardedModel(model)
    for full_name, sl in shards.items():
        owner_name, _, pname = full_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        param = getattr(owner, pname)
        full_shape = (owner.out_features, owner.in_features) if pname == "weight" else (owner.out_features,)
        if tuple(param.shape) == full_shape:
            sharded.originals[full_name] = param
            setattr(owner, pname, torch.nn.Parameter(sl.take(param.data).contiguous(), requires_grad=False))
        else:
            assert tuple(param.shape) == sl.local_shape(full_shape), (
                f"{full_name} has shape {tuple(param.shape)}: neither full {full_shape} nor this rank's shard"
            )
    for name, module in list(model.named_modules()):
        style = match_style(name, plan)
        if isinstance(style, Rowwise):
            reduce = (row_reduce(name) if row_reduce is not None else None) or all_reduce_linear(group, t)
            sharded.swapped[name] = swap_module(model, name, RowParallelLinear(module, reduce))
        elif isinstance(style, Colwise) and style.gather:
            sharded.handles.append(module.register_forward_hook(_all_gather_hook(group, T)))
    return sharded


def _all_gather_hook(group, T: int):
    def hook(module, args, out):
        # [..., F_out/T] → stacked [T, ..., F_out/T] (one collective on dim 0) → [..., F_out].
        stacked = gather_dim0(out.contiguous(), T, group)
        return stacked.unflatten(0, (T, out.shape[0])).movedim(0, -2).flatten(-2)

    return hook
