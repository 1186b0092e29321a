"""The sequence form of tensor parallelism (Megatron-SP): between TP regions each TP rank keeps 1/T of the tokens.

The all-reduce form (parallel/tensor.py) leaves every TP rank with the whole token sequence after each
row-split linear, so the norms, AdaLN modulation, gating and residual adds between the TP regions run
T times over the same tokens. Here the partial sums of a row-split linear are REDUCE-SCATTERED over
tokens instead (rank t keeps the sum of its 1/T of the tokens), and the tokens are ALL-GATHERED once
before the next column-split region (the output of the norm that feeds Q/K/V and the MLP, or the
input of an MLP module). A reduce-scatter plus an all-gather move the same bytes as one all-reduce
(a ring all-reduce is exactly those two), but the work and activation memory between regions shrink by T.

A model's sequence plan is data (`SequenceTPPlan`, next to its TP plan) and `SequenceTP` applies it:
forward hooks on the named modules, a pre-hook that splits the model's token inputs over tp after the
sequence-parallel split, and a post-hook that gathers the output back before the sp gather. Attention
sees the tp-gathered sequence of its sp rank, so positions (rotary ids) stay as split by sp.

Token groups: a model may keep several groups (Flux: "text", "image"), each split evenly over tp on
its own, so a tensor holding [text, image] on rank r holds [t_r, i_r]. Gathering such a tensor yields
[t_0 i_0 t_1 i_1 …]; it is reordered group-major [t_0 t_1 … i_0 i_1 …] (the order of the positions),
and the inverse order is applied before reduce-scattering, so each rank gets back exactly [t_r, i_r].

reduce_scatter / all_gather want equal parts: every sp piece of every group must split evenly over tp
(`check_token_split`), else a ValueError suggests the all-reduce form, which takes any length.

Legend: T the TP degree, t this rank's TP coordinate, n_g tokens of group g on one TP rank, L = Σ n_g.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .sharding import split_sizes
from .tensor import Rowwise, Style, match_style

# torch ≥ 2.13 renamed the dim-0 collectives (all_gather_into_tensor, reduce_scatter_tensor) to *_single.
_dist_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_dist_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Tokens:
    """A tensor whose dimension `dim` holds the tokens of `groups`, concatenated in that order."""

    groups: tuple[str, ...]
    dim: int = 1


@dataclass(frozen=True)
class SplitInput:
    """A forward input holding the tokens of group `tokens` along `dim`, split evenly over tp.

    `after`: split the output of that submodule instead of the input itself — for an input first read
    by a layer that needs every token on every TP rank (a column-split linear whose features are
    all-gathered, such as Flux's `context_embedder`). The input still fixes the group's length, so the
    check runs before any collective of the call."""

    tokens: str
    dim: int = 1
    after: str | None = None


@dataclass(kw_only=True, frozen=True)
class SequenceTPPlan:
    """Module-name globs here match segment by segment (`*` never crosses a dot; see `_glob`)."""

    split_inputs: Mapping[str, SplitInput]
    """forward kwarg → its tokens, split over tp (after the sp split). Inputs not listed (position ids)
    stay whole over tp: attention sees the tp-gathered sequence."""
    gather_outputs: Mapping[str, Tokens] = field(default_factory=dict)
    """Module-name glob → where the tokens of its output (the first element of a tuple) are: all-gathered
    over tp (a norm whose output feeds column-split layers)."""
    gather_inputs: Mapping[str, Tokens] = field(default_factory=dict)
    """Module-name glob → where the tokens of its first positional input are: all-gathered over tp
    (an MLP module whose first linear is column-split)."""
    reduce_scatter: Mapping[str, Tokens] = field(default_factory=dict)
    """Glob of `Rowwise` linears → where the tokens of their output are: reduce-scattered over tp
    instead of all-reduced. Rowwise layers not listed (on per-sample vectors) keep the all-reduce."""
    gather_output: Tokens
    """Where the tokens of the model's first output are (all-gathered over tp before the sp gather)."""


def check_token_split(counts: Mapping[str, int], *, sp: int, tp: int) -> None:
    """ValueError unless each sequence-parallel piece of every token group splits evenly over `tp`.

    `counts`: tokens of each group in the whole sequence. Every rank sees the same counts, so every rank
    raises the same error, before any collective."""
    bad = {g: split_sizes(n, sp) for g, n in counts.items() if any(p % tp for p in split_sizes(n, sp))}
    if not bad:
        return
    what = "; ".join(
        f"{n} {g} tokens" + (f" (pieces of {pieces} over --ulysses × --ring = {sp})" if sp > 1 else "")
        for g, pieces in bad.items()
        for n in [counts[g]]
    )
    raise ValueError(
        f"--tp-comm sequence reduce-scatters the tokens of each sequence-parallel piece evenly over --tp {tp}, "
        f"which does not divide {what}; use --tp-comm allreduce (any length), or sizes whose token counts are "
        f"multiples of {sp * tp}"
    )


def _gather_dim0(x0: torch.Tensor, T: int, group) -> torch.Tensor:
    """[n, *R] on each rank → [T·n, *R], rank-major. Functional under torch.compile: no graph break."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_gather_tensor(x0, 0, group))
    out = x0.new_empty((T * x0.shape[0], *x0.shape[1:]))
    _dist_all_gather(out, x0, group=group)
    return out


def _reduce_scatter_dim0(x0: torch.Tensor, T: int, group) -> torch.Tensor:
    """[T·n, *R] partial sums → [n, *R]: rank r gets the sum of rows r·n … (r+1)·n − 1."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.reduce_scatter_tensor(x0, "sum", 0, group))
    out = x0.new_empty((x0.shape[0] // T, *x0.shape[1:]))
    _dist_reduce_scatter(out, x0, group=group)
    return out


def _group_major(x_SR: torch.Tensor, sizes: list[int], T: int) -> torch.Tensor:
    """Rows [r][g][j] (as gathered) → [g][r][j] (each group whole, in position order); one copy."""
    src_TLR = x_SR.unflatten(0, (T, sum(sizes)))
    out_SR = torch.empty_like(x_SR)
    off = goff = 0
    for n in sizes:
        out_SR.narrow(0, goff, T * n).unflatten(0, (T, n)).copy_(src_TLR.narrow(1, off, n))
        off, goff = off + n, goff + T * n
    return out_SR


def _rank_major(x_SR: torch.Tensor, sizes: list[int], T: int) -> torch.Tensor:
    """Rows [g][r][j] → [r][g][j], contiguous (the inverse of `_group_major`); one copy.

    `x_SR` may be a strided view (the token dim moved to the front): the copy makes it contiguous too."""
    out_TLR = x_SR.new_empty((T, sum(sizes), *x_SR.shape[1:]))
    off = goff = 0
    for n in sizes:
        out_TLR.narrow(1, off, n).copy_(x_SR.narrow(0, goff, T * n).unflatten(0, (T, n)))
        off, goff = off + n, goff + T * n
    return out_TLR.flatten(0, 1)


def _first(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    """`output` with `fn` applied to its first tensor (a tensor, a tuple, or diffusers' BaseOutput)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    key = next(iter(output.keys()))  # BaseOutput: an ordered dict whose first entry is the sample
    output[key] = fn(output[key])
    return output


def _glob(name: str, pattern: str) -> bool:
    """Module-name glob matched segment by segment: `*` never crosses a dot, so `blocks.*.norm` names
    each block's norm and not the LayerNorm inside it (`blocks.0.norm.norm`), which a gather would
    otherwise hit twice."""
    parts, pparts = name.split("."), pattern.split(".")
    return len(parts) == len(pparts) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pparts))


def _matches(model: torch.nn.Module, globs: Mapping[str, object], what: str) -> dict[str, object]:
    """Module name → the spec of the first glob it matches; every glob must match something."""
    out, used = {}, set()
    for name, _ in model.named_modules():
        for pattern, spec in globs.items():
            if _glob(name, pattern):
                out[name] = spec
                used.add(pattern)
                break
    unused = [p for p in globs if p not in used]
    assert not unused, f"sequence TP plan: {what} {unused} matched no module of {type(model).__name__}"
    return out


class SequenceTP:
    """One model's sequence-form TP: the hooks of its `SequenceTPPlan` on a mesh.

    `apply_plan` passes `row_output` to `shard_model`, which then reduce-scatters the listed Rowwise
    layers, calls `install` for the module hooks, and registers `pre_hook` after the sp split and
    `post_hook` before the sp gather; `remove` undoes the module hooks installed here."""

    def __init__(self, model: torch.nn.Module, plan: SequenceTPPlan, tensor_plan: Mapping[str, Style], mesh, ctx):
        self.model, self.plan, self.mesh, self.ctx = model, plan, mesh, ctx
        self.T, self.t, self.group = mesh.size("tp"), mesh.coord("tp"), mesh.group("tp")
        assert self.T > 1 and self.group is not None
        self.sig = inspect.signature(model.forward)
        self.local: dict[str, int] = {}
        """Tokens of each group on every TP rank in the current call (set by `pre_hook`)."""
        self.scatter = _matches(model, plan.reduce_scatter, "reduce_scatter")
        bad = [n for n in self.scatter if not isinstance(match_style(n, tensor_plan), Rowwise)]
        assert not bad, f"sequence TP plan reduce-scatters {bad}, which the TP plan does not make Rowwise"
        self.handles: list = []

    def install(self) -> None:
        """The module hooks; after `shard_model`'s, so that a split after a `Colwise(gather=True)` layer
        (`SplitInput.after`) sees its all-gathered features."""
        model, plan = self.model, self.plan
        for name, where in _matches(model, plan.gather_outputs, "gather_outputs").items():
            self.handles.append(model.get_submodule(name).register_forward_hook(self._gather_output_hook(where)))
        for name, where in _matches(model, plan.gather_inputs, "gather_inputs").items():
            hook = self._gather_input_hook(name, where)
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        for spec in plan.split_inputs.values():
            if spec.after is not None:
                hook = self._split_output_hook(spec)
                self.handles.append(model.get_submodule(spec.after).register_forward_hook(hook))

    # -- the collectives over tokens ---------------------------------------------------------------

    def gather(self, x: torch.Tensor, where: Tokens) -> torch.Tensor:
        """This rank's [n_g …] of each group → every rank's, group-major (positions in order)."""
        dim = where.dim % x.ndim
        sizes = [self.local[g] for g in where.groups]
        assert x.shape[dim] == sum(sizes), (x.shape, where, self.local)
        # Dim 0 for the collective: free when the batch is 1 (a size-1 dim does not break contiguity).
        full = _gather_dim0(x.movedim(dim, 0).contiguous(), self.T, self.group)
        if len(sizes) > 1:
            full = _group_major(full, sizes, self.T)
        return full.movedim(0, dim)

    def reduce_scatter(self, x: torch.Tensor, where: Tokens) -> torch.Tensor:
        """Partial sums over all T·n_g tokens of each group (group-major) → this rank's summed [n_g …]."""
        dim = where.dim % x.ndim
        sizes = [self.local[g] for g in where.groups]
        assert x.shape[dim] == self.T * sum(sizes), (x.shape, where, self.local)
        x0 = x.movedim(dim, 0)
        x0 = _rank_major(x0, sizes, self.T) if len(sizes) > 1 else x0.contiguous()
        return _reduce_scatter_dim0(x0, self.T, self.group).movedim(0, dim)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim] // self.T
        return x.narrow(dim, self.t * n, n)

    # -- hooks ---------------------------------------------------------------------------------------

    def row_output(self, name: str):
        """For `shard_model`: the hook that replaces the all-reduce after Rowwise layer `name`, or None."""
        where = self.scatter.get(name)
        if where is None:
            return None

        def hook(module, args, out):
            return self.reduce_scatter(out, where)

        return hook

    def _gather_output_hook(self, where: Tokens):
        def hook(module, args, output):
            return _first(output, lambda x: self.gather(x, where))

        return hook

    def _gather_input_hook(self, name: str, where: Tokens):
        def hook(module, args):
            assert args and isinstance(args[0], torch.Tensor), f"{name} must take its tokens as first positional argument"
            return (self.gather(args[0], where), *args[1:])

        return hook

    def _split_output_hook(self, spec: SplitInput):
        def hook(module, args, output):
            if self.ctx.skip:
                return output
            return _first(output, lambda x: self._split_checked(x, spec))

        return hook

    def _split_checked(self, x: torch.Tensor, spec: SplitInput) -> torch.Tensor:
        dim = spec.dim % x.ndim
        assert x.shape[dim] == self.T * self.local[spec.tokens], (x.shape, spec, self.local)
        # A fresh tensor, not a view: this goes straight into the first block, and a compiled block
        # guards on strides (those of the whole, even on a batch of 1) — a view would cost a recompile.
        return self.split(x, dim).clone(memory_format=torch.contiguous_format)

    def pre_hook(self, module, args, kwargs):
        """Model forward pre-hook, after the sp split: check every group's length, split the inputs."""
        if self.ctx.skip:
            return None
        bound = self.sig.bind_partial(*args, **kwargs)
        here: dict[str, int] = {}
        for name, spec in self.plan.split_inputs.items():
            x = bound.arguments.get(name)
            if x is None:
                continue
            n = x.shape[spec.dim % x.ndim]
            if here.setdefault(spec.tokens, n) != n:
                raise ValueError(f"inputs of token group {spec.tokens!r} disagree in length ({n} tokens in {name!r})")
        # The whole sequence's counts (every sp piece): every rank then decides alike.
        sp, me = self.mesh.size("sp"), self.mesh.coord("sp")
        whole = {}
        for g, n in here.items():
            pieces = self.ctx.sizes.get(g) if sp > 1 else [n]
            assert pieces is not None and pieces[me] == n, (g, pieces, n)
            whole[g] = sum(pieces)
        check_token_split(whole, sp=sp, tp=self.T)
        self.local = {g: n // self.T for g, n in here.items()}
        for name, spec in self.plan.split_inputs.items():
            x = bound.arguments.get(name)
            if x is not None and spec.after is None:
                bound.arguments[name] = self.split(x, spec.dim % x.ndim)
        return bound.args, bound.kwargs

    def post_hook(self, module, args, output):
        """Model forward hook, before the sp gather: the output's tokens back from every TP rank."""
        if self.ctx.skip:
            return output
        return _first(output, lambda x: self.gather(x, self.plan.gather_output))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
