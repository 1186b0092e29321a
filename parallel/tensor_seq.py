"""The sequence form of tensor parallelism (Megatron-SP): between TP regions each TP rank keeps 1/T of the tokens.

The all-reduce form (parallel/tensor.py) leaves every TP rank with the whole token sequence after each
row-split linear, so the norms, AdaLN modulation, gating and residual adds between the TP regions run
T times over the same tokens. Here the partial sums of a row-split linear are REDUCE-SCATTERED over
tokens instead (rank t keeps the sum of its 1/T of the tokens), and the tokens are ALL-GATHERED once
before the next column-split region (the output of the norm that feeds Q/K/V and the MLP, or the
input of an MLP module). A reduce-scatter plus an all-gather move the same bytes as one all-reduce
(a ring all-reduce is exactly those two), but the work and activation memory between regions shrink by T.

A model's sequence plan is data (`SequenceTPPlan`, next to its TP plan) and `SequenceTP` applies it:
forward hooks on the named modules, a step before each call that splits the model's token inputs over
tp after the sequence-parallel split, and one after it that gathers the output back before the sp
gather. Attention sees the tp-gathered sequence of its sp rank, so positions (rotary ids) stay as
split by sp.

Token groups: a model may keep several groups (Flux: "text", "image"), each split evenly over tp on
its own, so a tensor holding [text, image] on rank r holds [t_r, i_r]. Gathering such a tensor yields
[t_0 i_0 t_1 i_1 …]; it is reordered group-major [t_0 t_1 … i_0 i_1 …] (the order of the positions),
and the inverse order is applied before reduce-scattering, so each rank gets back exactly [t_r, i_r].

Rank-major modules: where a multi-group tensor is only read by work that does not care about token
order (Flux's single-stream blocks: per-token layers and attention without a mask), the gathered order
[t_0 i_0 t_1 i_1 …] is kept (`Tokens.rank_major`), so neither reorder copy runs; the position inputs of
those modules (rotary tables) are permuted to the same order instead (`rank_major_inputs`).

The overlap form (`tp_comm="overlap"`): entries marked `Fused` run their collective fused with the
matmul next to it (parallel/collective_matmul.py; symmetric-memory copy-engine pipelines on CUDA). A
fused gather computes the products of every column-split linear that reads the gathered tensor (one
matmul on their concatenated weights) and hands each its piece (`GatheredLinear`); a fused
reduce-scatter replaces the row-split linear's matmul.

reduce_scatter / all_gather want equal parts: every sp piece of every group must split evenly over tp
(`check_token_split`), else a ValueError suggests the all-reduce form, which takes any length.

Legend: T the TP degree, t this rank's TP coordinate, n_g tokens of group g on one TP rank, L = Σ n_g.
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .collective_matmul import (
    all_gather_matmul,
    gather_dim0,
    matmul_reduce_scatter,
    reduce_scatter_dim0,
    symmetric_memory_usable,
)
from .sharding import map_first, split_sizes
from .tensor import LinearStandIn, Reduce, Rowwise, Style, match_style, swap_module, undo_hooks_and_swaps


@dataclass(frozen=True)
class Tokens:
    """A tensor whose dimension `dim` holds the tokens of `groups`, concatenated in that order.

    `rank_major`: gathered, the tensor keeps the gathered order [t_0 i_0 t_1 i_1 …] (and is
    reduce-scattered from it) instead of each group whole in position order; only for tensors read by
    order-free work, whose position inputs `SequenceTPPlan.rank_major_inputs` permutes to match."""

    groups: tuple[str, ...]
    dim: int = 1
    rank_major: bool = False


@dataclass(frozen=True)
class Fused(Tokens):
    """A gather or reduce-scatter that the overlap form fuses with its matmul (worth it on long token
    groups: image tokens, not Flux's 512 text tokens). For a gather, `into` names the column-split
    linears (relative to the gathered module's parent) that read the gathered tensor; nothing else
    may read it but the modules that pass it on to them."""

    into: tuple[str, ...] = ()


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
    rank_major_inputs: Mapping[str, Mapping[str, Tokens]] = field(default_factory=dict)
    """Module-name glob → {forward argument: where its tokens are}: position inputs (a tensor or a
    tuple of them) of modules that work on `rank_major` tensors, permuted to that order."""


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


def segment_glob(name: str, pattern: str) -> bool:
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
            if segment_glob(name, pattern):
                out[name] = spec
                used.add(pattern)
                break
    unused = [p for p in globs if p not in used]
    assert not unused, f"sequence TP plan: {what} {unused} matched no module of {type(model).__name__}"
    return out


class GatheredLinear(LinearStandIn):
    """A column-split linear whose product a fused gather already computed (`ColumnGroup`): its
    forward hands out its piece."""

    def __init__(self, linear: torch.nn.Linear, group: ColumnGroup, index: int):
        super().__init__(linear)
        self.group, self.index = group, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.take(self.index, x)


class ColumnGroup:
    """The column-split linears that read one gathered tensor, as one matmul: their weights
    concatenated — each Linear's weight becomes a view into the concatenation, so nothing is held
    twice — and the products of the last call, until each linear has taken its piece."""

    def __init__(self, linears: list[torch.nn.Linear], names: list[str]):
        assert len({lin.in_features for lin in linears}) == 1, f"{names} read one tensor: in_features differ"
        has_bias = {lin.bias is not None for lin in linears}
        assert len(has_bias) == 1, f"{names}: all or none must have a bias"
        self.widths = [lin.weight.shape[0] for lin in linears]
        self.weight = torch.cat([lin.weight.data for lin in linears])
        off = 0
        for lin, n in zip(linears, self.widths):
            lin.weight = torch.nn.Parameter(self.weight[off : off + n], requires_grad=False)
            off += n
        # Added per piece when taken (`take`), where the compiler fuses it into what reads the piece;
        # added to the whole product it was one more pass over it.
        self.biases = [lin.bias for lin in linears] if has_bias.pop() else None
        self.names = names
        self.outs: tuple[torch.Tensor, ...] | None = None
        self.left = 0

    def hand_out(self, y: torch.Tensor) -> None:
        # Replaces whatever a call that raised half-way left behind: a served engine outlives it.
        self.outs, self.left = tuple(y.split(self.widths, dim=-1)), len(self.widths)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        assert self.outs is not None, f"{self.names[index]} ran before the gather that computes it"
        out = self.outs[index]
        assert out.shape[:-1] == x.shape[:-1], (self.names[index], out.shape, x.shape)
        self.left -= 1
        if self.left == 0:
            self.outs = None  # hold no activation past the call
        return out if self.biases is None else out + self.biases[index]


class SequenceTP:
    """One model's sequence-form TP: the hooks of its `SequenceTPPlan` on a mesh.

    The plan's TP part (parallel/plan/tensor.py) passes `row_reduce` to `shard_model`, which then
    reduce-scatters the listed Rowwise layers, calls `install` for the module hooks, and runs `before`
    after the sp split of each call and `after` before its sp gather; `remove` undoes what `install` did."""

    def __init__(self, model: torch.nn.Module, plan: SequenceTPPlan, tensor_plan: Mapping[str, Style], mesh, ctx):
        self.model, self.plan, self.mesh, self.ctx = model, plan, mesh, ctx
        self.T, self.t, self.group = mesh.size("tp"), mesh.coord("tp"), mesh.group("tp")
        assert self.T > 1 and self.group is not None
        self.overlap = mesh.config.tp_comm == "overlap"
        device = next(model.parameters()).device
        # Off CUDA / NCCL the overlap form runs the same fused structure with plain collectives.
        self.fused = self.overlap and symmetric_memory_usable(self.group, device)
        if self.overlap and device.type == "cuda" and not self.fused:
            warnings.warn("--tp-comm overlap: symmetric memory is not usable on this TP group (needs NCCL); "
                          "the collectives run unfused, as in --tp-comm sequence", stacklevel=2)
        self.local: dict[str, int] = {}
        """Tokens of each group on every TP rank in the current call (set by `before`)."""
        self.scatter = _matches(model, plan.reduce_scatter, "reduce_scatter")
        bad = [n for n in self.scatter if not isinstance(match_style(n, tensor_plan), Rowwise)]
        assert not bad, f"sequence TP plan reduce-scatters {bad}, which the TP plan does not make Rowwise"
        self.handles: list = []
        self.swapped: dict[str, torch.nn.Module] = {}

    def install(self) -> None:
        """The module hooks; after `shard_model`'s, so that a split after a `Colwise(gather=True)` layer
        (`SplitInput.after`) sees its all-gathered features."""
        model, plan = self.model, self.plan
        for name, where in _matches(model, plan.gather_outputs, "gather_outputs").items():
            cols = self._column_group(name, where)
            self.handles.append(model.get_submodule(name).register_forward_hook(self._gather_output_hook(where, cols)))
        for name, where in _matches(model, plan.gather_inputs, "gather_inputs").items():
            hook = self._gather_input_hook(name, where, self._column_group(name, where))
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        for spec in plan.split_inputs.values():
            if spec.after is not None:
                hook = self._split_output_hook(spec)
                self.handles.append(model.get_submodule(spec.after).register_forward_hook(hook))
        for name, inputs in _matches(model, plan.rank_major_inputs, "rank_major_inputs").items():
            module = model.get_submodule(name)
            hook = self._rank_major_hook(module, inputs)
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _column_group(self, name: str, where: Tokens) -> ColumnGroup | None:
        """In the overlap form, the fused gather's linears (put in place as `GatheredLinear`s)."""
        if not (self.overlap and isinstance(where, Fused) and where.into):
            return None
        parent = name.rpartition(".")[0]
        names = [f"{parent}.{c}" if parent else c for c in where.into]
        linears = [self.model.get_submodule(n) for n in names]
        bad = [n for n, lin in zip(names, linears) if type(lin) is not torch.nn.Linear]
        assert not bad, f"fused gather of {name}: {bad} are not (column-split) Linears"
        cols = ColumnGroup(linears, names)
        for i, (n, lin) in enumerate(zip(names, linears)):
            self.swapped[n] = swap_module(self.model, n, GatheredLinear(lin, cols, i))
        return cols

    # -- the collectives over tokens ---------------------------------------------------------------

    def _sizes(self, where: Tokens) -> list[int]:
        return [self.local[g] for g in where.groups]

    def gather(self, x: torch.Tensor, where: Tokens, cols: ColumnGroup | None = None) -> torch.Tensor:
        """This rank's [n_g …] of each group → every rank's: group-major (positions in order), or as
        gathered for a `rank_major` tensor. With `cols`, the products of its linears are computed in
        the same (fused) op and handed out to them."""
        dim = where.dim % x.ndim
        sizes = self._sizes(where)
        assert x.shape[dim] == sum(sizes), (x.shape, where, self.local)
        # Dim 0 for the collective: free when the batch is 1 (a size-1 dim does not break contiguity).
        x0 = x.movedim(dim, 0).contiguous()
        if cols is None:
            full, y = gather_dim0(x0, self.T, self.group), None
        else:
            full, y = all_gather_matmul(x0, cols.weight, self.T, self.group, fused=self.fused)
        if len(sizes) > 1 and not where.rank_major:
            full = _group_major(full, sizes, self.T)
            y = None if y is None else _group_major(y, sizes, self.T)
        if cols is not None:
            cols.hand_out(y.movedim(0, dim))
        return full.movedim(0, dim)

    def _rank_major_rows(self, x: torch.Tensor, where: Tokens) -> torch.Tensor:
        """Tokens along `where.dim` → dim 0, contiguous, in rank-major order (what a reduce-scatter takes)."""
        dim = where.dim % x.ndim
        sizes = self._sizes(where)
        assert x.shape[dim] == self.T * sum(sizes), (x.shape, where, self.local)
        x0 = x.movedim(dim, 0)
        return _rank_major(x0, sizes, self.T) if len(sizes) > 1 and not where.rank_major else x0.contiguous()

    def reduce_scatter(self, x: torch.Tensor, where: Tokens) -> torch.Tensor:
        """Partial sums over all T·n_g tokens of each group → this rank's summed [n_g …]."""
        return reduce_scatter_dim0(self._rank_major_rows(x, where), self.T, self.group).movedim(0, where.dim % x.ndim)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim] // self.T
        return x.narrow(dim, self.t * n, n)

    def row_reduce(self, name: str) -> Reduce | None:
        """For `shard_model`: how Rowwise layer `name` reduces, or None (the all-reduce)."""
        where = self.scatter.get(name)
        if where is None:
            return None
        if self.overlap and isinstance(where, Fused):

            def fused(x, layer):
                assert layer.matmul is None, f"{name}: the fused reduce-scatter multiplies by the bf16 weight"
                dim = where.dim % x.ndim
                out = matmul_reduce_scatter(self._rank_major_rows(x, where), layer.weight, self.T, self.group,
                                            fused=self.fused)
                # Every rank adds the whole bias to its own tokens, after the sum.
                return (out if layer.bias is None else out + layer.bias).movedim(0, dim)

            return fused

        def plain(x, layer):
            # The bias joins the sum once: TP rank 0 adds it before the reduce-scatter.
            return self.reduce_scatter(layer.partial(x, layer.bias if self.t == 0 else None), where)

        return plain

    # -- hooks ---------------------------------------------------------------------------------------

    def _gather_output_hook(self, where: Tokens, cols: ColumnGroup | None):
        def hook(module, args, output):
            return map_first(output, lambda x: self.gather(x, where, cols))

        return hook

    def _gather_input_hook(self, name: str, where: Tokens, cols: ColumnGroup | None):
        def hook(module, args):
            assert args and isinstance(args[0], torch.Tensor), f"{name} must take its tokens as first positional argument"
            return (self.gather(args[0], where, cols), *args[1:])

        return hook

    def _rank_major_hook(self, module: torch.nn.Module, inputs: Mapping[str, Tokens]):
        # Positions of the arguments when passed positionally (no signature binding inside a compiled
        # block: dynamo would break the graph on it).
        params = list(inspect.signature(module.forward).parameters)
        missing = [n for n in inputs if n not in params]
        assert not missing, f"rank_major_inputs: {type(module).__name__}.forward takes no {missing}"
        where_at = {params.index(n): (n, w) for n, w in inputs.items()}

        def permute(x, where: Tokens):
            if x is None:
                return None
            if isinstance(x, tuple):
                return tuple(permute(v, where) for v in x)
            dim = where.dim % x.ndim
            return _rank_major(x.movedim(dim, 0), self._sizes(where), self.T).movedim(0, dim)

        def hook(module, args, kwargs):
            args = list(args)
            for pos, (n, where) in where_at.items():
                if n in kwargs:
                    kwargs[n] = permute(kwargs[n], where)
                elif pos < len(args):
                    args[pos] = permute(args[pos], where)
            return tuple(args), kwargs

        return hook

    def _split_output_hook(self, spec: SplitInput):
        def hook(module, args, output):
            return map_first(output, lambda x: self._split_checked(x, spec))

        return hook

    def _split_checked(self, x: torch.Tensor, spec: SplitInput) -> torch.Tensor:
        dim = spec.dim % x.ndim
        assert x.shape[dim] == self.T * self.local[spec.tokens], (x.shape, spec, self.local)
        # A fresh tensor, not a view: this goes straight into the first block, and a compiled block
        # guards on strides (those of the whole, even on a batch of 1) — a view would cost a recompile.
        return self.split(x, dim).clone(memory_format=torch.contiguous_format)

    def before(self, arguments: dict) -> None:
        """Before each forward call, after the sp split: check every group's length, split the inputs
        (the model's bound arguments, changed in place)."""
        here: dict[str, int] = {}
        for name, spec in self.plan.split_inputs.items():
            x = arguments.get(name)
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
            x = arguments.get(name)
            if x is not None and spec.after is None:
                arguments[name] = self.split(x, spec.dim % x.ndim)

    def after(self, output):
        """After each forward call, before the sp gather: the output's tokens back from every TP rank."""
        return map_first(output, lambda x: self.gather(x, self.plan.gather_output))

    def remove(self) -> None:
        # The linears go back; their Parameters stay views into the concatenated weights (same values).
        undo_hooks_and_swaps(self.model, self.handles, self.swapped)
