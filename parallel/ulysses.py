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

`seq_to_heads` / `heads_to_seq` are the general form: per-rank head counts that may differ (heads the
degree does not divide) and several tensors with different head counts in one exchange (grouped-query
attention: Q with its query heads, K and V with their key/value heads). Rows of different sizes do not
fit all_to_all_single's dim-0 splits, so these exchange flat buffers with element counts as split
sizes; each rank's block is laid out (tokens, batch, heads, D) so that what arrives is already the
(S_g, B, h, D) head shard, split along heads without a copy.
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
    exchange async, 64.9 ms blocking (same launch series, 4×H200)."""
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


def seq_to_heads(xs_BSHD: list[torch.Tensor], heads: list[tuple[int, ...]], group: dist.ProcessGroup,
                 seq_sizes: list[int]) -> list[torch.Tensor]:
    """Each (B, S_r, H_i, D) sequence shard in `xs_BSHD` → its (B, S_g, heads[i][me], D) head shard, all in
    one all-to-all: Ulysses rank u receives heads [Σ heads[i][:u], Σ heads[i][:u+1]) of tensor i from
    every rank, tokens in rank order."""
    U, me = len(seq_sizes), dist.get_rank(group)
    B, S_r, _, D = xs_BSHD[0].shape
    assert S_r == seq_sizes[me] and all(x.shape[0] == B and x.shape[1] == S_r for x in xs_BSHD)
    assert all(len(h) == U and sum(h) == x.shape[2] for h, x in zip(heads, xs_BSHD))
    xs_SBHD = [x.transpose(0, 1) for x in xs_BSHD]
    per_rank = [sum(h[u] for h in heads) for u in range(U)]
    # One buffer, rank u's block (S_r, B, Σ_i heads[i][u], D) after rank u-1's: one pass of copies.
    send = xs_BSHD[0].new_empty(S_r * B * sum(per_rank) * D)
    offset, starts = 0, [0] * len(xs_BSHD)
    for u in range(U):
        block = send[offset : offset + S_r * B * per_rank[u] * D].view(S_r, B, per_rank[u], D)
        col = 0
        for i, (x, h) in enumerate(zip(xs_SBHD, heads)):
            block[:, :, col : col + h[u]].copy_(x[:, :, starts[i] : starts[i] + h[u]])
            col += h[u]
            starts[i] += h[u]
        offset += block.numel()
    mine = per_rank[me]
    out_splits = [s * B * mine * D for s in seq_sizes]
    in_splits = [S_r * B * h * D for h in per_rank]
    out, work, traced = _all_to_all_start(send, sum(out_splits), out_splits, in_splits, group, overlap=False)
    got_SBHD = _wait(Pending(out, work, traced, ())).view(sum(seq_sizes), B, mine, D)
    pieces = got_SBHD.split([h[me] for h in heads], dim=2)
    return [p.transpose(0, 1) for p in pieces]


def heads_to_seq(x_BSHD: torch.Tensor, heads: tuple[int, ...], group: dist.ProcessGroup,
                 seq_sizes: list[int]) -> torch.Tensor:
    """(B, S_g, heads[me], D) head shard → (B, S_r, Σ heads, D) sequence shard: the inverse of
    `seq_to_heads` for one tensor (the attention output, which has the query heads)."""
    U, me = len(seq_sizes), dist.get_rank(group)
    B, S_g, h_me, D = x_BSHD.shape
    assert S_g == sum(seq_sizes) and h_me == heads[me] and len(heads) == U
    S_r = seq_sizes[me]
    # (S_g, B, h, D): rank s's tokens are one contiguous run of the flat buffer.
    send = x_BSHD.transpose(0, 1).contiguous().view(-1)
    in_splits = [s * B * h_me * D for s in seq_sizes]
    out_splits = [S_r * B * h * D for h in heads]
    out, work, traced = _all_to_all_start(send, sum(out_splits), out_splits, in_splits, group, overlap=False)
    got = _wait(Pending(out, work, traced, ()))
    blocks = [b.view(S_r, B, h, D) for b, h in zip(got.split(out_splits), heads)]
    # Rank u's block holds heads [Σ heads[:u], Σ heads[:u+1]): concatenating restores the head order.
    return torch.cat(blocks, dim=2).transpose(0, 1)
