"""The runs of a plan: stacks of blocks split where they start and gathered where they end.

Models that build their token sequences inside forward, between stacks of blocks (Lumina2 and
Z-Image: a text stream and an image stream refined apart, then joined into one stream), are split
per stack instead of at their inputs (`LayerRun`): hooks on the blocks of one ModuleList split the
stream where it enters the first block, split every block's per-token inputs (rotary tables), read
the key-padding mask once, and gather the stream where it leaves the last block, so the model's own
code between the stacks sees whole sequences. The run also sets its blocks' attention processors,
which read the run's token group and key lengths from its per-call state (`RunState`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..attention import ParallelAttention
from ..sharding import gather_pieces, split_sizes, take_piece
from .context import Installed, SeqContext
from .processors import SetProcessors


@dataclass(kw_only=True, frozen=True)
class LayerRun:
    """The blocks of one ModuleList, which the model calls in order over one token group.

    The pre-hook of the first block splits its `stream` input (this rank keeps its piece) and reads
    `key_mask`; every block's `per_token` inputs (one entry per token along the given dim: rotary
    tables, per-token modulation masks) arrive whole from the model's forward and are split the same
    way. The last block's output is gathered back (`gather`), unless the stream stays split past the
    run and the sequence part gathers it later (`SequenceSplit.gather_modules`: after the final
    per-token layer, whose output is narrower)."""

    layers: str
    """Name of the ModuleList (`noise_refiner`, `layers`)."""
    tokens: str
    """Token group of the stream."""
    stream: str
    """Argument of each block (forward parameter name) carrying the token stream."""
    per_token: Mapping[str, int] = field(default_factory=dict)
    """Other arguments of each block with one entry per token → their token dim."""
    key_mask: str | None = None
    """Argument holding a (B, S) key-padding mask (True / 1: a real token, which must come first):
    read once per call into `RunState.key_lengths` (one host sync, as the models' own length
    computations), then passed on unchanged; the processors attend real keys only."""
    gather: bool = True
    dim: int = 1
    """Token dim of the stream."""
    attention: Mapping[str, Callable[["RunState", ParallelAttention], object]] = field(default_factory=dict)
    """Module-name glob inside each block (`attn`) → factory of the attention processor set on the
    matching modules, given the run's per-call state and the mesh's parallel attention."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention: ParallelAttention, parts) -> "RunState":
        # On one process too: the key mask becomes key lengths for the processors.
        return RunState(model, self, ctx, attention)


class RunState(Installed):
    """One installed run: its hooks and processors, and what its processors read in each call."""

    def __init__(self, model: torch.nn.Module, run: LayerRun, ctx: SeqContext, attention: ParallelAttention):
        super().__init__()
        self.run, self.ctx = run, ctx
        self.key_lengths: list[int] | None = None
        """Real tokens per sample (padding after them) in this call, or None where nothing is padded."""
        self.mask_read = False
        """Whether the run has read its key mask (in any call so far)."""
        globs = {f"{run.layers}.*.{g}": factory for g, factory in run.attention.items()}
        self.processors = SetProcessors(model, model.named_modules(), globs, lambda factory: factory(self, attention))
        self.handles.extend(_install_hooks(model, self, split=ctx.mesh.size("sp") > 1))

    @property
    def tokens(self) -> str:
        return self.run.tokens

    @property
    def sizes(self) -> list[int] | None:
        """Every sp rank's length of the run's stream in this call; None without a sequence split."""
        return self.ctx.sizes.get(self.run.tokens)

    def remove(self) -> None:
        super().remove()
        self.processors.remove()


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


def _install_hooks(model: torch.nn.Module, state: RunState, *, split: bool) -> list:
    run, ctx = state.run, state.ctx
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
        state.key_lengths = None if m is None else prefix_lengths(m)
        state.mask_read = True

    def split_inputs(first: bool):
        def hook(module, args, kwargs):
            if first and mask is not None:
                read_mask(module, args, kwargs)
            x = stream.get(args, kwargs)
            dim = run.dim % x.ndim
            if first:
                ctx.set_sizes(run.tokens, split_sizes(x.shape[dim], P))
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
