"""The sequence part of a plan: where a model's tokens are split over the sequence-parallel ranks
(ring × ulysses) and where they are gathered back.

Tokens are split where they enter (forward inputs, or the outputs of the submodules that make them
inside forward: a patch embedding, a rotary module) and gathered where they leave (the first output,
or the last per-token layer before the model's own unpatchify). Each token group is split identically
wherever it appears; uneven lengths are split unevenly (the first ranks one token more). Installed only
where sp > 1.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..sharding import gather_pieces, map_first, take_piece
from ..tensor_seq import segment_glob
from .context import Installed, JointSeqDim, SeqContext, SeqDim


@dataclass(kw_only=True, frozen=True)
class SequenceSplit:
    inputs: Mapping[str, SeqDim | JointSeqDim] = field(default_factory=dict)
    """forward kwarg → where its tokens are; split over the sp ranks. Inputs of one token group are
    split identically."""
    output: SeqDim | None = None
    """Where the tokens of the first output are (gathered back to the whole sequence)."""
    modules: Mapping[str, SeqDim | JointSeqDim | tuple[SeqDim | JointSeqDim | None, ...]] = field(default_factory=dict)
    """Submodule name → where the tokens of its output are; split over sp. For models that make their
    token sequence inside forward (SD3, PixArt patchify the latent image in `pos_embed`). A module
    returning a tuple gets one entry per element (None: left whole), e.g. Qwen-Image's rotary module,
    which returns (image table, text table)."""
    module_inputs: Mapping[str, Mapping[str, SeqDim]] = field(default_factory=dict)
    """Module-name glob → {forward argument → where its tokens are}: split over sp when the module is
    called (a forward pre-hook), passed by keyword or by position. For per-token inputs the model builds whole inside forward from
    whole-sequence lengths and passes to its blocks (Qwen-Image's text stream after its rotary tables
    are computed, its `modulate_index`); a module matching several globs gets all their entries."""
    gather_modules: Mapping[str, SeqDim] = field(default_factory=dict)
    """Submodule name → where the tokens of its output are; gathered back over sp (the last per-token
    layer before the model's own unpatchify). A name may be a glob over modules of its depth
    (`all_final_layer.*`: the one of a ModuleDict that the model's config uses)."""
    residual_output: SeqDim | None = None
    """The model's outputs are residuals for another model on the same mesh (a ControlNet's per-block
    samples, every tensor of its output) in this token group: they leave as this rank's piece of the
    tokens, never gathered; the model they feed takes them split (parallel/plan/residuals.py)."""

    def gathers(self) -> bool:
        """Whether the plan says where the split tokens leave the model (or that they leave split)."""
        return self.output is not None or bool(self.gather_modules) or self.residual_output is not None

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "SequenceState | None":
        if ctx.mesh.size("sp") == 1:
            return None
        return SequenceState(model, self, ctx)


class SequenceState(Installed):
    calls = True

    def __init__(self, model: torch.nn.Module, split: SequenceSplit, ctx: SeqContext):
        super().__init__()
        self.split, self.ctx = split, ctx
        for name, where in split.modules.items():
            hook = _module_split_hook(ctx, where, name)
            self.handles.append(model.get_submodule(name).register_forward_hook(hook))
        for name, inputs in _module_inputs(model, split.module_inputs).items():
            module = model.get_submodule(name)
            hook = _module_input_split_hook(ctx, inputs, name, module)
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for name, where in split.gather_modules.items():
            hook = _module_gather_hook(ctx, where)
            for module in _modules(model, name):
                self.handles.append(module.register_forward_hook(hook))

    def before(self, arguments: dict) -> bool:
        for name, where in self.split.inputs.items():
            x = arguments.get(name)
            if x is not None:
                arguments[name] = split_tokens(self.ctx, x, where, f"in {name!r}")
        return False

    def after(self, output):
        where = self.split.output
        if where is None:
            return output  # gathered inside forward, or left split (residuals)

        def gather(x):
            assert not isinstance(x, list), "per-sample list outputs are gathered over the batch only"
            return gather_pieces(x, where.dim % x.ndim, self.ctx.sizes[where.tokens], self.ctx.mesh.group("sp"))

        return map_first(output, gather)


def split_tokens(ctx: SeqContext, x: torch.Tensor, where: SeqDim | JointSeqDim, what: str) -> torch.Tensor:
    """This sp rank's piece of `x`, recording (or checking against) its token group's split."""
    if isinstance(where, JointSeqDim):
        return _split_joint(ctx, x, where, what)
    dim = where.dim % x.ndim
    sizes = ctx.group_sizes(where.tokens, x.shape[dim], what)
    return take_piece(x, dim, sizes, ctx.mesh.coord("sp"))


def _split_joint(ctx: SeqContext, x: torch.Tensor, where: JointSeqDim, what: str) -> torch.Tensor:
    dim = where.dim % x.ndim
    unknown = [g for g in where.groups if g not in ctx.sizes]
    if len(unknown) > 1:
        raise ValueError(f"{what}: the lengths of {unknown} are not known yet, so {where.groups} cannot be split")
    if unknown:
        rest = x.shape[dim] - sum(sum(ctx.sizes[g]) for g in where.groups if g != unknown[0])
        ctx.group_sizes(unknown[0], rest, what)
    lengths = [sum(ctx.sizes[g]) for g in where.groups]
    if sum(lengths) != x.shape[dim]:
        raise ValueError(f"{what}: {x.shape[dim]} entries, not the {sum(lengths)} of {where.groups}")
    me = ctx.mesh.coord("sp")
    parts = x.split(lengths, dim=dim)
    return torch.cat([take_piece(p, dim, ctx.sizes[g], me) for p, g in zip(parts, where.groups)], dim=dim)


def _modules(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The submodule `name`, or the modules matching the glob `name` at its depth."""
    if not any(c in name for c in "*?["):
        return [model.get_submodule(name)]
    depth = name.count(".")
    found = [m for n, m in model.named_modules() if n.count(".") == depth and fnmatch.fnmatchcase(n, name)]
    assert found, f"{name!r} matches no module of {type(model).__name__}"
    return found


def _module_split_hook(ctx: SeqContext, where, name: str):
    def hook(module, args, output):
        if isinstance(where, (SeqDim, JointSeqDim)):
            assert isinstance(output, torch.Tensor), f"{name} must return a tensor to be split"
            return split_tokens(ctx, output, where, f"from {name!r}")
        assert isinstance(output, tuple) and len(output) == len(where), f"{name} must return a {len(where)}-tuple"
        return tuple(x if w is None else split_tokens(ctx, x, w, f"from {name!r}") for x, w in zip(output, where))

    return hook


def _module_inputs(model: torch.nn.Module, globs: Mapping[str, Mapping[str, SeqDim]]) -> dict[str, dict[str, SeqDim]]:
    """Module name → the keyword inputs it splits (from every glob it matches, segment by segment:
    `blocks.*` names the blocks, not their submodules); every glob matches something."""
    out, used = {}, set()
    for name, _ in model.named_modules():
        for pattern, inputs in globs.items():
            if segment_glob(name, pattern):
                out.setdefault(name, {}).update(inputs)
                used.add(pattern)
    unused = [p for p in globs if p not in used]
    assert not unused, f"split module inputs {unused} matched no module of {type(model).__name__}"
    return out


def _module_input_split_hook(ctx: SeqContext, inputs: Mapping[str, SeqDim], name: str, module: torch.nn.Module):
    # An input the caller passes positionally (HunyuanImage's blocks get their text stream so) is found
    # by its place in the module's forward signature.
    params = list(inspect.signature(module.forward).parameters)
    positions = {key: params.index(key) for key in inputs if key in params}

    def hook(module, args, kwargs):
        args = list(args)
        for key, where in inputs.items():
            at = positions.get(key)
            positional = key not in kwargs and at is not None and at < len(args)
            x = args[at] if positional else kwargs.get(key)
            if isinstance(x, torch.Tensor):
                x = split_tokens(ctx, x, where, f"in {name}({key}=...)")
                if positional:
                    args[at] = x
                else:
                    kwargs[key] = x
            else:
                assert x is None, f"{name} must get {key} as a tensor to split it"
        return tuple(args), kwargs

    return hook


def _module_gather_hook(ctx: SeqContext, where: SeqDim):
    def hook(module, args, output):
        return gather_pieces(output, where.dim % output.ndim, ctx.sizes[where.tokens], ctx.mesh.group("sp"))

    return hook
