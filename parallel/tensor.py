"""Tensor parallelism as data: which linears are column-, row-split or replicated, and the one
mechanism that shards them and adds the collectives.

A model's TP plan maps module-name globs to a style (`Colwise`, `Rowwise`); unmatched modules are
replicated. `local_shards` turns a plan into the slice of every parameter this TP rank keeps — pure
shape arithmetic that also runs on a meta-device model, so loaders can read only those slices.
`shard_model` then installs the shards (slicing full weights if they are still whole) and forward
hooks: an all-gather after `Colwise(gather=True)`, an all-reduce after `Rowwise` (or, in the sequence
form of TP, a reduce-scatter over tokens: parallel/tensor_seq.py).

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

from .mesh import Mesh

_all_gather_dim0 = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Colwise:
    """Output features split over TP ranks (weight rows, bias). The output stays split — it feeds
    head-split attention or a `Rowwise` layer — unless `gather`: then it is all-gathered back to all
    features (small outputs consumed by replicated code, e.g. AdaLN modulation vectors)."""

    gather: bool = False


@dataclass(frozen=True)
class Rowwise:
    """Input features split (the input arrives split from `Colwise` layers); partial products are
    all-reduced. `blocks`: proportions of F_in that are split separately, for an input concatenated
    from several split tensors (Flux single blocks: [attention (1), MLP (4)]). The bias is added once,
    by TP rank 0 only (the others drop it), so the sum is exact."""

    blocks: tuple[int, ...] = (1,)


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


DROP = None
"""In a shard map: the parameter is absent on this rank (a row-parallel bias off TP rank 0)."""


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


def module_shards(name: str, module: torch.nn.Module, style: Style, tp: int, t: int) -> dict[str, Slice | None]:
    """Parameter name (relative to `module`) → what TP rank `t` of `tp` keeps."""
    assert isinstance(module, torch.nn.Linear), f"TP plan matched {name} ({type(module).__name__}), not a Linear"
    if isinstance(style, Colwise):
        n = _even(module.out_features, tp, f"the output width of {name}")
        out = {"weight": Slice(0, ((t * n, n),))}
        if module.bias is not None:
            out["bias"] = Slice(0, ((t * n, n),))
        return out
    assert isinstance(style, Rowwise)
    unit = _even(module.in_features, sum(style.blocks), f"the input width of {name} (blocks {style.blocks})")
    runs, start = [], 0
    for b in style.blocks:
        n = _even(unit * b, tp, f"an input block of {name}")
        runs.append((start + t * n, n))
        start += unit * b
    out = {"weight": Slice(1, tuple(runs))}
    if module.bias is not None and t != 0:
        out["bias"] = DROP
    return out


def local_shards(model: torch.nn.Module, plan: Mapping[str, Style], tp: int, t: int) -> dict[str, Slice | None]:
    """Full parameter name → its slice on TP rank `t` (DROP: absent); unlisted parameters are replicated.

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
        if name in shards and sl is DROP:
            continue
        total += math.prod(p.shape if sl is None else sl.local_shape(p.shape))
    return total


@dataclass
class ShardedModel:
    """Hooks and (when this call sliced full weights) the originals, so `remove` can undo it all."""

    model: torch.nn.Module
    handles: list = field(default_factory=list)
    originals: dict[str, torch.nn.Parameter | None] = field(default_factory=dict)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for full_name, param in self.originals.items():
            owner, _, pname = full_name.rpartition(".")
            setattr(self.model.get_submodule(owner), pname, param)
        self.originals.clear()


def shard_model(
    model: torch.nn.Module,
    plan: Mapping[str, Style],
    mesh: Mesh,
    *,
    row_output: Callable[[str], Callable | None] | None = None,
) -> ShardedModel:
    """Make `model` this rank's TP part: slice full parameters (a sharded load leaves them local
    already), then hook the collectives. `remove()` restores whatever was sliced here.

    `row_output(name)`: the forward hook that replaces the all-reduce after Rowwise layer `name`, or
    None to keep it (the sequence form's reduce-scatter, parallel/tensor_seq.py)."""
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
        if sl is DROP:
            if param is not None:
                sharded.originals[full_name] = param
                setattr(owner, pname, None)
            continue
        if tuple(param.shape) == full_shape:
            sharded.originals[full_name] = param
            setattr(owner, pname, torch.nn.Parameter(sl.take(param.data).contiguous(), requires_grad=False))
        else:
            assert tuple(param.shape) == sl.local_shape(full_shape), (
                f"{full_name} has shape {tuple(param.shape)}: neither full {full_shape} nor this rank's shard"
            )
    for name, module in model.named_modules():
        style = match_style(name, plan)
        if isinstance(style, Rowwise):
            hook = row_output(name) if row_output is not None else None
            sharded.handles.append(module.register_forward_hook(hook or _all_reduce_hook(group)))
        elif isinstance(style, Colwise) and style.gather:
            sharded.handles.append(module.register_forward_hook(_all_gather_hook(group, T)))
    return sharded


def _all_reduce_hook(group):
    def hook(module, args, out):
        dist.all_reduce(out, group=group)
        return out

    return hook


def _all_gather_hook(group, T: int):
    def hook(module, args, out):
        # [..., F_out/T] → stacked [T, ..., F_out/T] (one collective on dim 0) → [..., F_out].
        stacked = out.new_empty((T * out.shape[0], *out.shape[1:]))
        _all_gather_dim0(stacked, out.contiguous(), group=group)
        return stacked.unflatten(0, (T, out.shape[0])).movedim(0, -2).flatten(-2)

    return hook
