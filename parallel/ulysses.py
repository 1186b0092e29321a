"""Ulysses: trade a sequence shard for a head shard with one all-to-all, and back.

Legend: S_r local sequence length of this rank, S_g = Σ S_i over the Ulysses group, H heads, U group
size, D head dim; `*L` any leading dims (batch, or (3, batch) for Q, K, V packed into one exchange
so that one all-to-all moves all three instead of three).

all_to_all_single exchanges along dim 0 only, so the dim being scattered is moved to the front first.
Uneven sequence pieces use split sizes: no padding, nothing to mask. Under torch.compile the
functional collective is used, which traces without a graph break; eager mode calls
dist.all_to_all_single directly, as in our fastest eager runs (BENCHMARKS.md: eager Ulysses-4 at
1024² measured 62.7 ms per step this way, 81–87 ms in runs that used the functional call).

Each exchange comes in two halves, `*_start` (pack and launch) and `*_finish` (wait and unpack), so a
caller can keep several in flight and compute meanwhile (ParallelAttention's head chunks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


class Pending(NamedTuple):
    """An all-to-all in flight: `finish` waits for it and unpacks the result."""

    out: torch.Tensor
    work: object | None
    """The eager collective's Work handle (None once it is done); unused under torch.compile."""
    traced: bool
    """Launched under torch.compile: finished by funcol.wait_tensor."""
    L: tuple[int, ...]
    """The leading dims of the tensor that was sent."""


def _all_to_all_start(x: torch.Tensor, out_rows: int, out_splits, in_splits, group, overlap: bool) -> tuple:
    """(output, Work or None, traced). `overlap`: return before the exchange is done (eager). A lone
    exchange stays a blocking call: eager Ulysses-4 at 1024² measured 67.5 ms per step with every
    exchange async, 64.9 ms blocking (same session, 4×H200)."""
    if torch.compiler.is_compiling():
        return funcol.all_to_all_single(x, out_splits, in_splits, group), None, True
    out = x.new_empty((out_rows, *x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group,
                                  async_op=overlap)
    return out, work, False


def _wait(p: Pending) -> torch.Tensor:
    if p.traced:
        return funcol.wait_tensor(p.out)
    if p.work is not None:
        # Makes the current stream wait for the collective's stream; the host does not block.
        p.work.wait()
    return p.out


def seq_to_head(x_LSHD: torch.Tensor, group: dist.ProcessGroup, seq_sizes: list[int]) -> torch.Tensor:
    """(*L, S_r, H, D) sequence shard → (*L, S_g, H/U, D) head shard; piece i came from group rank i."""
    return seq_to_head_finish(seq_to_head_start(x_LSHD, group, seq_sizes, overlap=False))


def seq_to_head_start(x_LSHD: torch.Tensor, group: dist.ProcessGroup, seq_sizes: list[int], *, overlap: bool = True) -> Pending:
    """Launch `seq_to_head`'s all-to-all without waiting for it (overlap it with other work)."""
    U = len(seq_sizes)
    *L, S_r, H, D = x_LSHD.shape
    assert H % U == 0, f"{H} heads do not split over {U} Ulysses ranks"
    assert S_r == seq_sizes[dist.get_rank(group)]
    nL = len(L)
    # (*L, S_r, U, H/U, D) → (U, S_r, *L, H/U, D): destination rank first.
    x = x_LSHD.reshape(*L, S_r, U, H // U, D)
    x = x.permute(nL + 1, nL, *range(nL), nL + 2, nL + 3).contiguous()
    x = x.reshape(U * S_r, *L, H // U, D)
    even = all(s == S_r for s in seq_sizes)
    out, work, traced = _all_to_all_start(
        x, sum(seq_sizes), None if even else list(seq_sizes), None if even else [S_r] * U, group, overlap
    )
    return Pending(out, work, traced, tuple(L))


def seq_to_head_finish(p: Pending) -> torch.Tensor:
    nL = len(p.L)
    # (S_g, *L, H/U, D) → (*L, S_g, H/U, D)
    return _wait(p).permute(*range(1, nL + 1), 0, nL + 1, nL + 2)


def head_to_seq(x_LSHD: torch.Tensor, group: dist.ProcessGroup, seq_sizes: list[int]) -> torch.Tensor:
    """(*L, S_g, H/U, D) head shard → (*L, S_r, H, D) sequence shard: the inverse of seq_to_head."""
    return head_to_seq_finish(head_to_seq_start(x_LSHD, group, seq_sizes, overlap=False), group, seq_sizes)


def head_to_seq_start(x_LSHD: torch.Tensor, group: dist.ProcessGroup, seq_sizes: list[int], *, overlap: bool = True) -> Pending:
    U = len(seq_sizes)
    *L, S_g, Hu, D = x_LSHD.shape
    assert S_g == sum(seq_sizes)
    nL = len(L)
    S_r = seq_sizes[dist.get_rank(group)]
    x = x_LSHD.permute(nL, *range(nL), nL + 1, nL + 2).contiguous()  # (S_g, *L, H/U, D)
    even = all(s == S_r for s in seq_sizes)
    out, work, traced = _all_to_all_start(
        x, U * S_r, None if even else [S_r] * U, None if even else list(seq_sizes), group, overlap
    )
    return Pending(out, work, traced, tuple(L))


def head_to_seq_finish(p: Pending, group: dist.ProcessGroup, seq_sizes: list[int]) -> torch.Tensor:
    U, nL = len(seq_sizes), len(p.L)
    S_r = seq_sizes[dist.get_rank(group)]
    out = _wait(p)
    Hu, D = out.shape[-2:]
    # (U, S_r, *L, H/U, D) → (*L, S_r, U, H/U, D) → (*L, S_r, H, D)
    out = out.reshape(U, S_r, *p.L, Hu, D).permute(*range(2, nL + 2), 1, 0, nL + 2, nL + 3)
    return out.reshape(*p.L, S_r, U * Hu, D)
