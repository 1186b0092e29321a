"""The counted part of a plan: a token group whose length is a forward argument, not a tensor's.

FLUX.2-klein-KV's first step puts its reference images' tokens at the head of the image stream and says how
many there are in `num_ref_tokens`; the model reads that count to give those tokens their own modulation,
to tell its attention processors where they are, and to drop them before its output. Split over the sp
ranks, every rank's piece of the stream holds its own share of them, and the model must read that share.

So before the sequence split this part gives the group its split (`split_sizes` of the count: the first
ranks one token more) — the tensors holding it beside another group are split by it (`JointSeqDim`, e.g.
("reference", "image")), and the processors read every rank's share from the `SeqContext` — and puts this
rank's share in the argument. In a call where the count is not read (`when` does not hold: later steps, which
carry no reference tokens) the group has no tokens. Installed only where sp > 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..sharding import split_sizes
from .context import Installed, SeqContext


@dataclass(kw_only=True, frozen=True)
class CountedTokens:
    tokens: str
    """The token group ("reference")."""
    count: str
    """The forward argument holding its length in the whole sequence ("num_ref_tokens")."""
    when: Mapping[str, object] = field(default_factory=dict)
    """Forward argument → value in the calls whose `count` holds the group (kv_cache_mode: "extract"); in
    other calls the group is empty."""
    each_rank: bool = False
    """Every rank's share must hold one token at least (FLUX.2 takes a count of 0 for "none": that rank
    would skip its reference path, and its cache, while the others take it)."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "CountedState | None":
        if ctx.mesh.size("sp") == 1:
            return None
        return CountedState(self, ctx)


class CountedState(Installed):
    calls = True

    def __init__(self, counted: CountedTokens, ctx: SeqContext):
        super().__init__()
        self.counted, self.ctx = counted, ctx

    def before(self, arguments: dict) -> bool:
        c, mesh = self.counted, self.ctx.mesh
        holds = all(arguments.get(name) == value for name, value in c.when.items())
        n = int(arguments.get(c.count) or 0) if holds else 0
        P = mesh.size("sp")
        if c.each_rank and 0 < n < P:
            raise ValueError(f"{n} {c.tokens} tokens cannot give each of the {P} sequence-parallel ranks one; "
                             f"use fewer --ulysses/--ring ranks")
        sizes = split_sizes(n, P)
        self.ctx.set_sizes(c.tokens, sizes)
        if n:
            arguments[c.count] = sizes[mesh.coord("sp")]
        return False
