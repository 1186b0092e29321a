"""Model plans as data, and the one generic mechanism that applies them.

A plan says, for one model class, which forward inputs carry a token sequence (and along which dim),
which token group the output belongs to, and which attention modules get a sequence-parallel
processor. `apply_plan` turns that into a forward pre-hook (split the inputs into this rank's piece),
a forward hook (gather the output piece back into the whole sequence) and processors set through
diffusers' own `set_processor` API — no forked model code, and adding a model is writing its plan.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .attention import ParallelAttention
from .mesh import Mesh
from .sharding import gather_pieces, split_sizes, take_piece


@dataclass(frozen=True)
class SeqDim:
    """A tensor that holds tokens of group `tokens` along dimension `dim`."""

    tokens: str
    dim: int


@dataclass(kw_only=True, frozen=True)
class ModelPlan:
    split_inputs: Mapping[str, SeqDim]
    """forward kwarg → where its tokens are. Inputs of one token group are split identically."""
    gather_output: SeqDim
    """Where the tokens of the first output are (gathered back to the whole sequence)."""
    attention: Mapping[str, Callable[["SeqContext", ParallelAttention], object]]
    """Module-name glob → factory of the attention processor installed on matching modules."""


@dataclass
class SeqContext:
    """Split lengths of each token group in the current forward call, shared by hooks and processors.

    Owned by one parallelized model (not global): processors read it to know every rank's piece
    length, which they need for uneven all-to-alls and ring blocks.
    """

    mesh: Mesh
    sizes: dict[str, list[int]] = field(default_factory=dict)

    def joint_sizes(self, *groups: str) -> list[int] | None:
        """Per-rank lengths of a sequence made by concatenating the local pieces of `groups`."""
        if not self.sizes:
            return None
        return [sum(parts) for parts in zip(*(self.sizes[g] for g in groups))]


@dataclass
class AppliedPlan:
    model: torch.nn.Module
    context: SeqContext
    _handles: list = field(default_factory=list)
    _old_processors: dict = field(default_factory=dict)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, proc in self._old_processors.items():
            self.model.get_submodule(name).set_processor(proc)
        self._old_processors.clear()


def apply_plan(model: torch.nn.Module, plan: ModelPlan, mesh: Mesh, attention: ParallelAttention) -> AppliedPlan:
    ctx = SeqContext(mesh)
    applied = AppliedPlan(model, ctx)
    matched = 0
    for name, module in model.named_modules():
        for pattern, factory in plan.attention.items():
            if fnmatch.fnmatchcase(name, pattern):
                applied._old_processors[name] = module.processor
                module.set_processor(factory(ctx, attention))
                matched += 1
                break
    assert matched, f"plan matched no attention module in {type(model).__name__}"
    if mesh.size("sp") > 1:
        sig = inspect.signature(model.forward)
        applied._handles.append(
            model.register_forward_pre_hook(_split_hook(plan, ctx, sig), with_kwargs=True)
        )
        applied._handles.append(model.register_forward_hook(_gather_hook(plan, ctx)))
    return applied


def _split_hook(plan: ModelPlan, ctx: SeqContext, sig: inspect.Signature):
    mesh = ctx.mesh
    P, me = mesh.size("sp"), mesh.coord("sp")

    def hook(module, args, kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        ctx.sizes = {}
        for name, where in plan.split_inputs.items():
            x = bound.arguments.get(name)
            if x is None:
                continue
            dim = where.dim % x.ndim
            sizes = split_sizes(x.shape[dim], P)
            if ctx.sizes.setdefault(where.tokens, sizes) != sizes:
                raise ValueError(
                    f"inputs of token group {where.tokens!r} disagree in length ({x.shape[dim]} tokens in {name!r})"
                )
            bound.arguments[name] = take_piece(x, dim, sizes, me)
        return bound.args, bound.kwargs

    return hook


def _gather_hook(plan: ModelPlan, ctx: SeqContext):
    where = plan.gather_output

    def hook(module, args, output):
        sizes = ctx.sizes[where.tokens]
        group = ctx.mesh.group("sp")
        if isinstance(output, tuple):
            first = gather_pieces(output[0], where.dim % output[0].ndim, sizes, group)
            return (first, *output[1:])
        # diffusers' BaseOutput is an ordered dict whose first entry is the sample.
        key = next(iter(output.keys()))
        output[key] = gather_pieces(output[key], where.dim % output[key].ndim, sizes, group)
        return output

    return hook
