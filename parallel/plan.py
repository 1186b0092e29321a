"""Model plans as data, and the one generic mechanism that applies them.

A plan says, for one model class, which forward inputs carry a token sequence (and along which dim),
which token group the output belongs to, and which attention modules get a sequence-parallel
processor. `apply_plan` turns that into a forward pre-hook (split the inputs into this rank's piece),
a forward hook (gather the output piece back into the whole sequence) and processors set through
diffusers' own `set_processor` API — no forked model code, and adding a model is writing its plan.

Models that build their token sequences inside forward, between stacks of blocks (Lumina2 and
Z-Image: a text stream and an image stream refined apart, then joined into one stream), are split
per stack instead (`LayerRun`): hooks on the blocks of one ModuleList split the stream where it
enters the first block, split every block's per-token inputs (rotary tables), read the key-padding
mask once, and gather the stream where it leaves the last block, so the model's own code between
the stacks sees whole sequences.

Token groups that form a 2-D grid (Sana's image tokens, which its Mix-FFN convolves as an image) can
be declared as grids: they are split in whole rows, the plan's `row_args` tell the modules that
reshape tokens into the grid how many rows this rank holds, and its `stand_ins` put modules in place
of others while the plan is applied (a halo convolution, parallel/halo.py, that reads the
neighbouring ranks' boundary rows through `SeqContext.rows`).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .attention import ParallelAttention
from .halo import RowContext, RowConv2d, RowSplit, conv_refusal
from .mesh import Mesh
from .perturbed import PerturbedPlan, perturbed_pair
from .sharding import gather_pieces, split_sizes, take_piece
from .tensor import Style, shard_model, swap_module, undo_hooks_and_swaps
from .tensor_seq import SequenceTP, SequenceTPPlan, segment_glob


@dataclass(frozen=True)
class SeqDim:
    """A tensor that holds tokens of group `tokens` along dimension `dim`."""

    tokens: str
    dim: int


@dataclass(frozen=True)
class JointSeqDim:
    """A tensor whose dimension `dim` is the concatenation of whole token groups, in this order (a
    rotary table over [text, image] built inside forward). Each group's segment is split by that
    group's split; at most one group may have no split yet in this call: it gets the remaining length."""

    groups: tuple[str, ...]
    dim: int


@dataclass(frozen=True)
class RowsArg:
    """The forward argument `arg` of a module is the row count of token grid `tokens` (the module
    reshapes its tokens to rows × columns); under a split it becomes this rank's row count."""

    arg: str
    tokens: str


GridShape = Callable[[torch.nn.Module, Mapping[str, object]], tuple[int, int]]
"""(model, its bound forward arguments) → (rows, columns) of a token grid in this call."""

StandIn = Callable[[torch.nn.Module, "SeqContext"], torch.nn.Module]
"""(the module it replaces, the plan's context) → the module put in its place (the same Parameters)."""


@dataclass(kw_only=True, frozen=True)
class LayerRun:
    """The blocks of one ModuleList, which the model calls in order over one token group.

    The pre-hook of the first block splits its `stream` input (this rank keeps its piece) and reads
    `key_mask`; every block's `per_token` inputs (one entry per token along the given dim: rotary
    tables, per-token modulation masks) arrive whole from the model's forward and are split the same
    way. The last block's output is gathered back (`gather`), unless the stream stays split past the
    run and a `gather_modules` entry gathers it later (after the final per-token layer, whose output
    is narrower)."""

    layers: str
    """Name of the ModuleList (`noise_refiner`, `layers`)."""
    tokens: str
    """Token group; processors of these blocks read its sizes from the SeqContext."""
    stream: str
    """Argument of each block (forward parameter name) carrying the token stream."""
    per_token: Mapping[str, int] = field(default_factory=dict)
    """Other arguments of each block with one entry per token → their token dim."""
    key_mask: str | None = None
    """Argument holding a (B, S) key-padding mask (True / 1: a real token, which must come first):
    read once per call into `SeqContext.key_lengths[tokens]` (one host sync, as the models' own
    length computations), then passed on unchanged; the processors attend real keys only."""
    gather: bool = True
    dim: int = 1
    """Token dim of the stream."""


@dataclass(kw_only=True, frozen=True)
class ModelPlan:
    split_inputs: Mapping[str, SeqDim] = field(default_factory=dict)
    """forward kwarg → where its tokens are; split over the sequence-parallel ranks. Inputs of one
    token group are split identically."""
    gather_output: SeqDim | None = None
    """Where the tokens of the first output are (gathered back to the whole sequence)."""
    attention: Mapping[str, Callable[["SeqContext", ParallelAttention], object]] = field(default_factory=dict)
    """Module-name glob → factory of the attention processor installed on matching modules."""
    batch_inputs: Mapping[str, int] = field(default_factory=dict)
    """forward kwarg → batch dim, split over the cfg axis: pipelines that run [uncond, cond] as one
    batch of 2B give each cfg rank one branch. A dict-valued kwarg (SDXL's added_cond_kwargs) has
    every tensor in it split along that dim."""
    output_batch_dim: int = 0
    """Batch dim of the first output (gathered back over the cfg axis)."""
    split_modules: Mapping[str, SeqDim | tuple[SeqDim | None, ...]] = field(default_factory=dict)
    """Submodule name → where the tokens of its output are; split over sp. For models that make their
    token sequence inside forward (SD3, PixArt patchify the latent image in `pos_embed`). A module
    returning a tuple gets one entry per element (None: left whole), e.g. Qwen-Image's rotary module,
    which returns (image table, text table)."""
    split_module_inputs: Mapping[str, Mapping[str, SeqDim]] = field(default_factory=dict)
    """Module-name glob → {keyword argument → where its tokens are}: split over sp when the module is
    called (a forward pre-hook). For per-token inputs the model builds whole inside forward from
    whole-sequence lengths and passes to its blocks (Qwen-Image's text stream after its rotary tables
    are computed, its `modulate_index`); a module matching several globs gets all their entries."""
    gather_modules: Mapping[str, SeqDim] = field(default_factory=dict)
    """Submodule name → where the tokens of its output are; gathered back over sp (the last per-token
    layer before the model's own unpatchify). A name may be a glob over modules of its depth
    (`all_final_layer.*`: the one of a ModuleDict that the model's config uses)."""
    runs: tuple[LayerRun, ...] = ()
    """Stacks of blocks split where they start and gathered where they end (see LayerRun)."""
    cfg_pairs: bool = False
    """The pipeline runs the two guidance branches as two sequential calls (Flux true CFG: cond, then
    negative) instead of one batch: cfg rank i computes call i of each pair, and the results are
    exchanged when the second call returns (see parallel/cfg_pairs.py)."""
    tensor: Mapping[str, Style] = field(default_factory=dict)
    """Module-name glob → tensor-parallel style of that Linear (parallel/tensor.py); others replicated."""
    tensor_sequence: SequenceTPPlan | None = None
    """Where tokens are split, gathered and reduce-scattered over tp in the sequence forms of TP
    (`tp_comm="sequence"` / `"overlap"`, parallel/tensor_seq.py); None: only the all-reduce form."""
    token_grids: Mapping[str, GridShape] = field(default_factory=dict)
    """Token group → the (rows, columns) of the row-major grid its tokens form, read from each call's
    inputs. Such a group is split over sp in whole rows (the first ranks one row more when uneven),
    and `SeqContext.rows[group]` carries that row split for the stand-ins."""
    row_args: Mapping[str, RowsArg] = field(default_factory=dict)
    """Module-name glob → which forward argument of the matching modules (those whose forward takes
    it: a glob's `*` also matches their submodules) is a grid's row count."""
    stand_ins: Mapping[str, StandIn] = field(default_factory=dict)
    """Module-name glob → factory of the module put in place of each match while the tokens are split
    (sp > 1), after any TP sharding (so it wraps the TP shard); `remove()` puts the originals back."""
    perturbed: PerturbedPlan | None = None
    """How the layers that perturbed-attention guidance (PAG) perturbs run under the mesh
    (parallel/perturbed.py); None: the family has no PAG pipeline."""
    residual_outputs: SeqDim | None = None
    """The model's outputs are residuals for another model of the same mesh (a ControlNet's per-block
    samples, every tensor of its output) in this token group: they leave it as this rank's piece of the
    tokens (sp) and of the batch (cfg), never gathered; the model they feed lists them in its
    `residual_inputs`. A UNet ControlNet's residuals are split over the batch only."""
    residual_inputs: Mapping[str, SeqDim | None] = field(default_factory=dict)
    """forward kwarg (a tensor, or a tuple / list of tensors) → its token group: residuals added to the
    model's own pieces (a ControlNet's block samples). Each tensor arrives either as this rank's piece
    (the ControlNet ran under the same plan) or whole; only a whole one is split, any other length is an
    error. None: batch only (UNets). Split over cfg with the `batch_inputs`, along dim 0."""


@dataclass
class SeqContext:
    """Split lengths of each token group in the current forward call, shared by hooks and processors.

    Owned by one parallelized model (not global): processors read it to know every rank's piece
    length, which they need for uneven all-to-alls and ring blocks.
    """

    mesh: Mesh
    sizes: dict[str, list[int]] = field(default_factory=dict)
    key_lengths: dict[str, list[int] | None] = field(default_factory=dict)
    """Token group → real tokens per sample (padding after them), or None where nothing is padded;
    set by a LayerRun from its key mask on every call."""
    skip: bool = False
    """This call is computed by the other cfg rank (cfg_pairs): no split, no gather."""
    rows: dict[str, RowContext] = field(default_factory=dict)
    """Grid token group → its row split in the call in progress (`.split` None outside a split call)."""
    branches: int | None = None
    """Guidance branches the pipeline batches in the next calls, set by whoever calls the pipeline:
    [uncond, cond] = 2, PAG's [uncond, cond, perturbed] = 3 or [cond, perturbed] = 2, one = 1. The
    cfg ranks take whole branches, contiguous and in order (`split_sizes(branches, cfg)`: 3 over 2 →
    [2, 1]). None: as many branches as cfg ranks (equal parts of the batch)."""
    pending: list = field(default_factory=list)
    """Residual inputs waiting for their token group's split (models that make their tokens inside
    forward, SD3): (list the model reads, its token group, name); filled in when the split is known."""
    branch_range: tuple[int, int] | None = None
    """Branches [start, stop) of the current call that this rank computes (set by the batch split);
    None: all of them (no cfg split)."""

    def joint_sizes(self, *groups: str) -> list[int] | None:
        """Per-rank lengths of a sequence made by concatenating the local pieces of `groups`."""
        if not self.sizes:
            return None
        return [sum(parts) for parts in zip(*(self.sizes[g] for g in groups))]


@dataclass
class AppliedPlan:
    model: torch.nn.Module
    context: SeqContext
    perturbed: tuple | None = None
    """(with CFG, without CFG) processors for a PAG pipeline's `set_pag_applied_layers`
    (parallel/perturbed.py); None when the plan has no `perturbed` entry."""
    _handles: list = field(default_factory=list)
    _old_processors: dict = field(default_factory=dict)
    _swapped: dict = field(default_factory=dict)
    """Module name → the module a stand-in replaced."""

    def remove(self) -> None:
        # Stand-ins first: they sit on top of the TP shards, which their handles undo.
        undo_hooks_and_swaps(self.model, [], self._swapped)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, proc in self._old_processors.items():
            self.model.get_submodule(name).set_processor(proc)
        self._old_processors.clear()


def apply_plan(model: torch.nn.Module, plan: ModelPlan, mesh: Mesh, attention: ParallelAttention) -> AppliedPlan:
    if mesh.config.tp_sequence and plan.tensor_sequence is None:
        # Before touching the model. Engines refuse this earlier, with the families that have a plan.
        raise ValueError(f"{type(model).__name__} has no sequence-form tensor-parallel plan: use --tp-comm allreduce")
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
    assert matched or not plan.attention, f"plan matched no attention module in {type(model).__name__}"
    if plan.perturbed is not None:
        applied.perturbed = perturbed_pair(plan.perturbed, ctx, attention)
    seq_tp = None
    if mesh.size("tp") > 1:
        assert plan.tensor, f"no tensor-parallel plan for {type(model).__name__}"
        if mesh.config.tp_sequence:
            seq_tp = SequenceTP(model, plan.tensor_sequence, plan.tensor, mesh, ctx)
            applied._handles.append(seq_tp)
        row_reduce = seq_tp.row_reduce if seq_tp is not None else None
        applied._handles.append(shard_model(model, plan.tensor, mesh, row_reduce=row_reduce))
        if seq_tp is not None:
            seq_tp.install()
    split_seq = mesh.size("sp") > 1
    split_batch = mesh.size("cfg") > 1
    assert (not split_seq or plan.gather_output is not None or plan.gather_modules or plan.runs
            or plan.residual_outputs is not None), "a sequence-parallel plan must say what to gather"
    pairs = None
    if split_batch and plan.cfg_pairs:
        from .cfg_pairs import CfgPairs

        # Registered first: its pre-hook decides whether this rank computes the call at all.
        pairs = CfgPairs(model, ctx)
        applied._handles.append(pairs)
    if split_seq or split_batch:
        sig = inspect.signature(model.forward)
        pre = _split_hook(plan, ctx, sig, split_seq=split_seq, split_batch=split_batch)
        applied._handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    if seq_tp is not None:
        # Hooks run in registration order: the tp split refines this rank's sp piece, and the tp gather
        # restores it before the sp / cfg gathers.
        applied._handles.append(model.register_forward_pre_hook(seq_tp.pre_hook, with_kwargs=True))
        applied._handles.append(model.register_forward_hook(seq_tp.post_hook))
    if split_seq or split_batch:
        post = _gather_hook(plan, ctx, split_seq=split_seq, split_batch=split_batch)
        applied._handles.append(model.register_forward_hook(post))
    if pairs is not None:
        applied._handles.append(model.register_forward_hook(pairs.post_hook))
    # Runs are hooked on one process too: their key mask becomes key lengths for the processors.
    for run in plan.runs:
        applied._handles.extend(_install_run(model, run, ctx, split=split_seq))
    if split_seq:
        for name, where in plan.split_modules.items():
            hook = _module_split_hook(ctx, where, name)
            applied._handles.append(model.get_submodule(name).register_forward_hook(hook))
        for name, inputs in _module_inputs(model, plan.split_module_inputs).items():
            hook = _module_input_split_hook(ctx, inputs, name)
            applied._handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        for name, where in plan.gather_modules.items():
            hook = _module_gather_hook(ctx, where)
            for module in _modules(model, name):
                applied._handles.append(module.register_forward_hook(hook))
        _install_grid_modules(model, plan, ctx, applied)
    return applied


def _install_grid_modules(model: torch.nn.Module, plan: ModelPlan, ctx: SeqContext, applied: AppliedPlan) -> None:
    """The row-count hooks and the stand-ins of a grid-split plan."""
    ctx.rows.update({g: RowContext() for g in plan.token_grids})
    matched = 0
    for name, module in list(model.named_modules()):
        for pattern, where in plan.row_args.items():
            sig = inspect.signature(module.forward)
            if fnmatch.fnmatchcase(name, pattern) and where.arg in sig.parameters:
                assert where.tokens in plan.token_grids, f"{where.tokens!r} is not a token grid of the plan"
                hook = _rows_arg_hook(ctx, where, sig, name)
                applied._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                matched += 1
                break
    assert matched or not plan.row_args, f"plan matched no row-count argument in {type(model).__name__}"
    matched = 0
    for name, module in list(model.named_modules()):
        for pattern, factory in plan.stand_ins.items():
            if fnmatch.fnmatchcase(name, pattern):
                applied._swapped[name] = swap_module(model, name, factory(module, ctx))
                matched += 1
                break
    assert matched or not plan.stand_ins, f"plan matched no stand-in module in {type(model).__name__}"


def grid_conv(tokens: str) -> StandIn:
    """The stand-in for a convolution over token grid `tokens` (the tokens reshaped to rows ×
    columns): parallel/halo.py's RowConv2d, which reads its halo rows from the neighbouring sp ranks."""

    def make(conv: torch.nn.Module, ctx: SeqContext) -> torch.nn.Module:
        assert isinstance(conv, torch.nn.Conv2d) and conv_refusal(conv) is None, (
            f"{type(conv).__name__} is no halo convolution"
        )
        return RowConv2d(conv, ctx.rows[tokens])

    return make


def _rows_arg_hook(ctx: SeqContext, where: RowsArg, sig: inspect.Signature, name: str):
    def hook(module, args, kwargs):
        split = ctx.rows[where.tokens].split
        if split is None:
            return None
        bound = sig.bind_partial(*args, **kwargs)
        rows, total = bound.arguments.get(where.arg), sum(split.units)
        assert rows == total, f"{name}'s {where.arg!r} is {rows}, not the {total} rows of {where.tokens!r}"
        bound.arguments[where.arg] = split.units[split.index]
        return bound.args, bound.kwargs

    return hook


def _group_sizes(ctx: SeqContext, tokens: str, n: int, what: str) -> list[int]:
    """Every sp rank's length of token group `tokens` (n tokens in all): set by the first input or
    grid of the group in this call, checked against the others."""
    sizes = ctx.sizes.get(tokens)
    if sizes is None:
        sizes = ctx.sizes[tokens] = split_sizes(n, ctx.mesh.size("sp"))
        _resolve_pending(ctx, tokens)
    elif sum(sizes) != n:
        raise ValueError(
            f"inputs of token group {tokens!r} disagree in length ({n} tokens {what}, {sum(sizes)} elsewhere)"
        )
    return sizes


def _split_grids(plan: ModelPlan, ctx: SeqContext, module: torch.nn.Module, arguments: Mapping[str, object]) -> None:
    """Whole rows of each token grid per sp rank (uneven: the first ranks one row more)."""
    P, me = ctx.mesh.size("sp"), ctx.mesh.coord("sp")
    for group, shape in plan.token_grids.items():
        rows, cols = shape(module, arguments)
        if rows < P:
            raise ValueError(
                f"{type(module).__name__}'s {rows} rows of {group!r} tokens cannot be split over {P} sequence-parallel "
                "ranks (each needs a row at least): use a larger image or fewer --ulysses / --ring ranks"
            )
        units = split_sizes(rows, P)
        ctx.sizes[group] = [u * cols for u in units]
        ctx.rows[group].split = RowSplit(tuple(units), me, ctx.mesh.group("sp"))


def _split_tokens(ctx: SeqContext, x: torch.Tensor, where: SeqDim | JointSeqDim, what: str) -> torch.Tensor:
    """This sp rank's piece of `x`, recording (or checking against) its token group's split."""
    if isinstance(where, JointSeqDim):
        return _split_joint(ctx, x, where, what)
    dim = where.dim % x.ndim
    sizes = _group_sizes(ctx, where.tokens, x.shape[dim], what)
    return take_piece(x, dim, sizes, ctx.mesh.coord("sp"))


def _split_joint(ctx: SeqContext, x: torch.Tensor, where: JointSeqDim, what: str) -> torch.Tensor:
    dim = where.dim % x.ndim
    unknown = [g for g in where.groups if g not in ctx.sizes]
    if len(unknown) > 1:
        raise ValueError(f"{what}: the lengths of {unknown} are not known yet, so {where.groups} cannot be split")
    if unknown:
        rest = x.shape[dim] - sum(sum(ctx.sizes[g]) for g in where.groups if g != unknown[0])
        _group_sizes(ctx, unknown[0], rest, what)
    lengths = [sum(ctx.sizes[g]) for g in where.groups]
    if sum(lengths) != x.shape[dim]:
        raise ValueError(f"{what}: {x.shape[dim]} entries, not the {sum(lengths)} of {where.groups}")
    me = ctx.mesh.coord("sp")
    parts = x.split(lengths, dim=dim)
    return torch.cat([take_piece(p, dim, ctx.sizes[g], me) for p, g in zip(parts, where.groups)], dim=dim)


def _resolve_pending(ctx: SeqContext, tokens: str) -> None:
    """Split, in place, the residual lists that waited for group `tokens` (the model has not read them
    yet: it makes its tokens first)."""
    for entry in [e for e in ctx.pending if e[1].tokens == tokens]:
        ctx.pending.remove(entry)
        residuals, where, name = entry
        residuals[:] = _each(residuals, lambda t: _residual_tokens(ctx, t, where, name))


def _residual_input(ctx: SeqContext, x, where: SeqDim | None, batch, name: str, *, split_seq: bool):
    """A residual input of a forward call: its batch piece now; its token piece now, or — when its group's
    split is not known yet (made inside forward) — as a list filled in once it is."""
    if batch is not None:
        x = _each(x, lambda t: _residual_batch(ctx, t, batch, name))
    if not split_seq or where is None:
        return x
    if where.tokens in ctx.sizes:
        return _each(x, lambda t: _residual_tokens(ctx, t, where, name))
    assert isinstance(x, (tuple, list)), f"{name}: a lone residual tensor cannot wait for its group's split"
    pending = list(x)
    ctx.pending.append((pending, where, name))
    return pending


def _each(x, fn):
    """`fn` of each tensor in `x` (a tensor, or a tuple / list of them)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_each(t, fn) for t in x)
    return fn(x) if isinstance(x, torch.Tensor) else x


def _residual_batch(ctx: SeqContext, x: torch.Tensor, batch: tuple[int, int], name: str) -> torch.Tensor:
    """This cfg rank's branches of a residual: cut from a whole batch, kept if it is this rank's already."""
    whole, mine = batch
    if x.shape[0] == whole and whole != mine:
        return _batch_piece(x, 0, _branches_per_rank(ctx), ctx.mesh.coord("cfg"), name)
    if x.shape[0] != mine:
        raise ValueError(f"{name} has batch {x.shape[0]}: neither the whole batch {whole} nor this rank's {mine}")
    return x


def _residual_tokens(ctx: SeqContext, x: torch.Tensor, where: SeqDim, name: str) -> torch.Tensor:
    """This sp rank's tokens of a residual: cut from all of them, kept if they are this rank's already."""
    sizes, me = ctx.sizes[where.tokens], ctx.mesh.coord("sp")
    dim = where.dim % x.ndim
    if x.shape[dim] == sum(sizes):
        return take_piece(x, dim, sizes, me)
    if x.shape[dim] != sizes[me]:
        raise ValueError(f"{name} has {x.shape[dim]} {where.tokens!r} tokens: neither all {sum(sizes)} nor "
                         f"this rank's {sizes[me]}")
    return x


def _modules(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The submodule `name`, or the modules matching the glob `name` at its depth."""
    if not any(c in name for c in "*?["):
        return [model.get_submodule(name)]
    depth = name.count(".")
    found = [m for n, m in model.named_modules() if n.count(".") == depth and fnmatch.fnmatchcase(n, name)]
    assert found, f"{name!r} matches no module of {type(model).__name__}"
    return found


def prefix_lengths(mask: torch.Tensor) -> list[int]:
    """Real tokens per sample of a (B, S) key-padding mask whose real tokens come first."""
    real_BS = mask.bool()
    lengths = real_BS.sum(dim=1)
    prefix_BS = torch.arange(real_BS.shape[1], device=real_BS.device)[None, :] < lengths[:, None]
    if not torch.equal(real_BS, prefix_BS):
        raise ValueError("a key-padding mask must have each sample's real tokens first and its padding after them")
    return lengths.tolist()


class _Arg:
    """One forward argument of a block, found by name in (args, kwargs) without binding the whole
    signature at every call (the hooks run inside each compiled block: plain tuple/dict access traces)."""

    def __init__(self, sig: inspect.Signature, name: str):
        assert name in sig.parameters, f"the blocks take no argument {name!r}"
        self.name = name
        self.index = list(sig.parameters).index(name)

    def get(self, args, kwargs):
        if self.name in kwargs:
            return kwargs[self.name]
        return args[self.index] if self.index < len(args) else None

    def set(self, args, kwargs, value):
        if self.name in kwargs or self.index >= len(args):
            return args, {**kwargs, self.name: value}
        return (*args[: self.index], value, *args[self.index + 1 :]), kwargs


def _install_run(model: torch.nn.Module, run: LayerRun, ctx: SeqContext, *, split: bool) -> list:
    blocks = list(model.get_submodule(run.layers))
    assert blocks, f"{run.layers} of {type(model).__name__} is empty"
    P, me = ctx.mesh.size("sp"), ctx.mesh.coord("sp")
    sig = inspect.signature(blocks[0].forward)
    stream = _Arg(sig, run.stream)
    mask = _Arg(sig, run.key_mask) if run.key_mask else None
    per_token = [(_Arg(sig, name), d) for name, d in run.per_token.items()]
    handles = []

    def read_mask(module, args, kwargs):
        m = mask.get(args, kwargs)
        ctx.key_lengths[run.tokens] = None if m is None else prefix_lengths(m)

    def split_inputs(first: bool):
        def hook(module, args, kwargs):
            if first and mask is not None:
                read_mask(module, args, kwargs)
            x = stream.get(args, kwargs)
            dim = run.dim % x.ndim
            if first:
                ctx.sizes[run.tokens] = split_sizes(x.shape[dim], P)
                args, kwargs = stream.set(args, kwargs, take_piece(x, dim, ctx.sizes[run.tokens], me))
            sizes = ctx.sizes[run.tokens]
            assert stream.get(args, kwargs).shape[dim] == sizes[me], f"{run.layers}: the stream arrived whole"
            for arg, d in per_token:
                t = arg.get(args, kwargs)
                if t is not None:
                    assert t.shape[d % t.ndim] == sum(sizes), f"{run.layers}: {arg.name} is not per token"
                    args, kwargs = arg.set(args, kwargs, take_piece(t, d % t.ndim, sizes, me))
            return args, kwargs

        return hook

    if split:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(split_inputs(i == 0), with_kwargs=True))
    elif mask is not None:
        # One process: only the key lengths, read where the stack starts.
        handles.append(blocks[0].register_forward_pre_hook(read_mask, with_kwargs=True))
    if split and run.gather:
        def post(module, args, output):
            assert isinstance(output, torch.Tensor), f"{run.layers} blocks must return the stream"
            return gather_pieces(output, run.dim % output.ndim, ctx.sizes[run.tokens], ctx.mesh.group("sp"))

        handles.append(blocks[-1].register_forward_hook(post))
    return handles


def _module_split_hook(ctx: SeqContext, where, name: str):
    def hook(module, args, output):
        if isinstance(where, SeqDim):
            assert isinstance(output, torch.Tensor), f"{name} must return a tensor to be split"
            return _split_tokens(ctx, output, where, f"from {name!r}")
        assert isinstance(output, tuple) and len(output) == len(where), f"{name} must return a {len(where)}-tuple"
        return tuple(x if w is None else _split_tokens(ctx, x, w, f"from {name!r}") for x, w in zip(output, where))

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
    assert not unused, f"split_module_inputs {unused} matched no module of {type(model).__name__}"
    return out


def _module_input_split_hook(ctx: SeqContext, inputs: Mapping[str, SeqDim], name: str):
    def hook(module, args, kwargs):
        for key, where in inputs.items():
            x = kwargs.get(key)
            if isinstance(x, torch.Tensor):
                kwargs[key] = _split_tokens(ctx, x, where, f"in {name}({key}=...)")
            else:
                assert x is None, f"{name} must get {key} as a keyword tensor to split it"
        return args, kwargs

    return hook


def _module_gather_hook(ctx: SeqContext, where: SeqDim):
    def hook(module, args, output):
        return gather_pieces(output, where.dim % output.ndim, ctx.sizes[where.tokens], ctx.mesh.group("sp"))

    return hook


def _batch_piece(x, dim: int, per_rank: list[int], index: int, name: str):
    """This cfg rank's branches of a batched input: `per_rank[i]` branches on rank i, in batch order."""
    if isinstance(x, dict):
        return {k: _batch_piece(v, dim, per_rank, index, f"{name}.{k}") for k, v in x.items()}
    if isinstance(x, list):
        # A list of per-sample tensors (Z-Image takes its latents and captions so): the list is the batch.
        branches = sum(per_rank)
        if len(x) % branches:
            raise ValueError(f"{name} holds {len(x)} samples, which its {branches} guidance branches do not divide: "
                             "CFG parallelism needs guidance on (the pipeline must batch both branches)")
        rows = len(x) // branches
        start = sum(per_rank[:index]) * rows
        return x[start : start + per_rank[index] * rows]
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        return x  # a scalar timestep or flag: the same for every branch
    branches = sum(per_rank)
    if x.shape[dim] % branches:
        raise ValueError(
            f"{name} has batch {x.shape[dim]}, which its {branches} guidance branches do not divide: CFG "
            "parallelism needs guidance on (the pipeline must batch the unconditional and conditional branches)"
        )
    rows = x.shape[dim] // branches
    return take_piece(x, dim % x.ndim, [n * rows for n in per_rank], index)


def _branches_per_rank(ctx: SeqContext) -> list[int]:
    parts = ctx.mesh.size("cfg")
    branches = ctx.branches or parts
    if branches < parts:
        raise ValueError(
            f"--cfg {parts} needs at least {parts} guidance branches, but this call runs {branches}: the "
            "unconditional branch needs guidance on, the perturbed one --pag-scale"
        )
    return split_sizes(branches, parts)


def _split_hook(plan: ModelPlan, ctx: SeqContext, sig: inspect.Signature, *, split_seq: bool, split_batch: bool):
    mesh = ctx.mesh

    def hook(module, args, kwargs):
        if ctx.skip:
            return None
        bound = sig.bind_partial(*args, **kwargs)
        batch = None
        if split_batch and not plan.cfg_pairs:
            # Each cfg rank runs whole branches: contiguous runs of the batch, in the pipeline's order.
            per_rank, me_cfg = _branches_per_rank(ctx), mesh.coord("cfg")
            start = sum(per_rank[:me_cfg])
            ctx.branch_range = (start, start + per_rank[me_cfg])
            for name, dim in plan.batch_inputs.items():
                if bound.arguments.get(name) is not None:
                    x = bound.arguments[name]
                    bound.arguments[name] = _batch_piece(x, dim, per_rank, me_cfg, name)
                    if batch is None and isinstance(x, torch.Tensor) and x.ndim and dim == 0:
                        batch = (x.shape[0], bound.arguments[name].shape[0])
        if split_seq:
            ctx.sizes, ctx.pending = {}, []
            _split_grids(plan, ctx, module, bound.arguments)
            for name, where in plan.split_inputs.items():
                x = bound.arguments.get(name)
                if x is not None:
                    bound.arguments[name] = _split_tokens(ctx, x, where, f"in {name!r}")
        for name, where in plan.residual_inputs.items():
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = _residual_input(ctx, bound.arguments[name], where, batch, name,
                                                        split_seq=split_seq)
        return bound.args, bound.kwargs

    return hook


def _gather_hook(plan: ModelPlan, ctx: SeqContext, *, split_seq: bool, split_batch: bool):
    mesh = ctx.mesh

    def gather(x):
        if isinstance(x, list):
            # Per-sample outputs (Z-Image): the list is the batch; gathered over cfg as one stacked tensor.
            assert plan.gather_output is None, "per-sample list outputs are gathered over the batch only"
            if not split_batch or plan.cfg_pairs:
                return x
            return list(gather(torch.stack(x)).unbind(0))
        if split_seq and plan.gather_output is not None:
            where = plan.gather_output
            x = gather_pieces(x, where.dim % x.ndim, ctx.sizes[where.tokens], mesh.group("sp"))
        if split_batch and not plan.cfg_pairs:
            dim = plan.output_batch_dim % x.ndim
            per_rank = _branches_per_rank(ctx)
            rows = x.shape[dim] // per_rank[mesh.coord("cfg")]
            x = gather_pieces(x, dim, [n * rows for n in per_rank], mesh.group("cfg"))
        return x

    def hook(module, args, output):
        if ctx.skip:
            return output
        for rows in ctx.rows.values():
            rows.split = None
        assert not ctx.pending, f"residual inputs {[e[2] for e in ctx.pending]} were never split: their tokens never came"
        if plan.residual_outputs is not None:
            return output  # this rank's pieces, for the model they feed (its residual_inputs)
        if isinstance(output, tuple):
            return (gather(output[0]), *output[1:])
        if isinstance(output, torch.Tensor):
            return gather(output)
        # diffusers' BaseOutput is an ordered dict whose first entry is the sample.
        key = next(iter(output.keys()))
        output[key] = gather(output[key])
        return output

    return hook
