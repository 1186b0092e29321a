"""The grid part of a plan: token groups that form a 2-D grid, split over sp in whole rows.

Sana's image tokens are an image to its Mix-FFN, which reshapes them to rows × columns and convolves
them. Such a group is split in whole rows (the first ranks one row more when uneven); the modules
that reshape tokens into the grid get this rank's row count for their row argument (`RowsArg`), and
stand-ins take the place of modules that need the neighbouring rows: `grid_conv`, a halo convolution
(parallel/halo.py) that reads the neighbouring ranks' boundary rows through the part's row split.
Installed only where sp > 1.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..halo import RowContext, RowConv2d, RowSplit, conv_refusal
from ..sharding import split_sizes
from ..tensor import swap_module, undo_hooks_and_swaps
from .context import Installed, SeqContext


@dataclass(frozen=True)
class RowsArg:
    """The forward argument `arg` of a module is the row count of token grid `tokens` (the module
    reshapes its tokens to rows × columns); under a split it becomes this rank's row count."""

    arg: str
    tokens: str


GridShape = Callable[[torch.nn.Module, Mapping[str, object]], tuple[int, int]]
"""(model, its bound forward arguments) → (rows, columns) of a token grid in this call."""

StandIn = Callable[[torch.nn.Module, "GridState"], torch.nn.Module]
"""(the module it replaces, the installed grid part) → the module put in its place (the same Parameters)."""


@dataclass(kw_only=True, frozen=True)
class RowGrids:
    shapes: Mapping[str, GridShape]
    """Token group → the (rows, columns) of the row-major grid its tokens form, read from each call's
    inputs. Such a group is split over sp in whole rows."""
    row_args: Mapping[str, RowsArg] = field(default_factory=dict)
    """Module-name glob → which forward argument of the matching modules (those whose forward takes
    it: a glob's `*` also matches their submodules) is a grid's row count."""
    stand_ins: Mapping[str, StandIn] = field(default_factory=dict)
    """Module-name glob → factory of the module put in place of each match while the tokens are split,
    after any TP sharding (so it wraps the TP shard); `remove()` puts the originals back."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "GridState | None":
        if ctx.mesh.size("sp") == 1:
            return None
        return GridState(model, self, ctx)


class GridState(Installed):
    calls = True

    def __init__(self, model: torch.nn.Module, grids: RowGrids, ctx: SeqContext):
        super().__init__()
        self.model, self.grids, self.ctx = model, grids, ctx
        self.rows: dict[str, RowContext] = {g: RowContext() for g in grids.shapes}
        """Grid token group → its row split in the call in progress (`.split` None outside a call)."""
        self.swapped: dict[str, torch.nn.Module] = {}
        """Module name → the module a stand-in replaced."""
        matched = 0
        for name, module in list(model.named_modules()):
            for pattern, where in grids.row_args.items():
                sig = inspect.signature(module.forward)
                if fnmatch.fnmatchcase(name, pattern) and where.arg in sig.parameters:
                    assert where.tokens in grids.shapes, f"{where.tokens!r} is not a token grid of the plan"
                    hook = _rows_arg_hook(self, where, sig, name)
                    self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                    matched += 1
                    break
        assert matched or not grids.row_args, f"plan matched no row-count argument in {type(model).__name__}"
        matched = 0
        for name, module in list(model.named_modules()):
            for pattern, factory in grids.stand_ins.items():
                if fnmatch.fnmatchcase(name, pattern):
                    self.swapped[name] = swap_module(model, name, factory(module, self))
                    matched += 1
                    break
        assert matched or not grids.stand_ins, f"plan matched no stand-in module in {type(model).__name__}"

    def before(self, arguments: dict) -> bool:
        """Whole rows of each token grid per sp rank (uneven: the first ranks one row more)."""
        mesh = self.ctx.mesh
        P, me = mesh.size("sp"), mesh.coord("sp")
        for group, shape in self.grids.shapes.items():
            rows, cols = shape(self.model, arguments)
            if rows < P:
                raise ValueError(
                    f"{type(self.model).__name__}'s {rows} rows of {group!r} tokens cannot be split over {P} "
                    "sequence-parallel ranks (each needs a row at least): use a larger image or fewer "
                    "--ulysses / --ring ranks"
                )
            units = split_sizes(rows, P)
            self.ctx.set_sizes(group, [u * cols for u in units])
            self.rows[group].split = RowSplit(tuple(units), me, mesh.group("sp"))
        return False

    def after(self, output):
        for rows in self.rows.values():
            rows.split = None
        return output

    def remove(self) -> None:
        undo_hooks_and_swaps(self.model, self.handles, self.swapped)


def grid_conv(tokens: str) -> StandIn:
    """The stand-in for a convolution over token grid `tokens` (the tokens reshaped to rows ×
    columns): parallel/halo.py's RowConv2d, which reads its halo rows from the neighbouring sp ranks."""

    def make(conv: torch.nn.Module, grids: GridState) -> torch.nn.Module:
        assert isinstance(conv, torch.nn.Conv2d) and conv_refusal(conv) is None, (
            f"{type(conv).__name__} is no halo convolution"
        )
        return RowConv2d(conv, grids.rows[tokens])

    return make


def _rows_arg_hook(grids: GridState, where: RowsArg, sig: inspect.Signature, name: str):
    def hook(module, args, kwargs):
        split = grids.rows[where.tokens].split
        if split is None:
            return None
        bound = sig.bind_partial(*args, **kwargs)
        rows, total = bound.arguments.get(where.arg), sum(split.units)
        assert rows == total, f"{name}'s {where.arg!r} is {rows}, not the {total} rows of {where.tokens!r}"
        bound.arguments[where.arg] = split.units[split.index]
        return bound.args, bound.kwargs

    return hook
