"""Ring attention: every rank keeps its queries; K/V blocks travel around the ring.

Legend: B batch, H heads, S_q local queries, S_j the K/V block length of ring rank j, D head dim.

Step s attends the local queries to the block that originated on ring rank (r - s) mod R while the
next block is already in flight (batch_isend_irecv posted before the local attention starts), so the
transfer hides behind the compute. Partial results are merged with their log-sum-exps in float32,
which makes the result the exact softmax over the whole sequence up to rounding. Blocks may differ in
length (uneven splits): every rank knows all lengths, so receive buffers are sized exactly.

K/V may have fewer heads than Q (grouped-query attention): the blocks travel with their K/V heads
only and are repeated for the kernel (parallel/blocks.py). `key_lengths` marks padded keys (a suffix
of each sample's whole sequence): each block is attended over its real keys only, a block that is
all padding is skipped, and the merge keeps -inf log-sum-exps from turning into NaN.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .blocks import attend, merge_partial_masked, valid_counts


def merge_partial(
    out_BHSD: torch.Tensor, lse_BHS: torch.Tensor, blk_out_BHSD: torch.Tensor, blk_lse_BHS: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-attention results over disjoint key sets (float32 in, float32 out)."""
    new_lse = torch.logaddexp(lse_BHS, blk_lse_BHS)
    out = out_BHSD * torch.exp(lse_BHS - new_lse).unsqueeze(-1) + blk_out_BHSD.float() * torch.exp(
        blk_lse_BHS - new_lse
    ).unsqueeze(-1)
    return out, new_lse


def ring_attention(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    block_sizes: list[int],
    kernel,
    scale: float | None = None,
    key_lengths: list[int] | None = None,
    block_attend=None,
) -> torch.Tensor:
    """Attention of the local queries over every ring rank's K/V block. `key_lengths[b]`: sample b's
    real keys are the first key_lengths[b] of the whole sequence (blocks in ring order).
    `block_attend(q, k, v, j)` → (out, lse) or None: the partial over ring rank j's block, where a
    mask decides which of its keys each query sees (parallel/block_causal.py)."""
    R = len(block_sizes)
    r = dist.get_rank(group)
    assert k_BHSD.shape[2] == block_sizes[r]
    send_to = dist.get_global_rank(group, (r + 1) % R)
    recv_from = dist.get_global_rank(group, (r - 1) % R)
    B, H, _, D = k_BHSD.shape
    # K and V in one buffer: one send and one receive per step instead of two of each.
    kv = torch.stack([k_BHSD, v_BHSD]).contiguous()
    if key_lengths is not None or H != q_BHSD.shape[1] or block_attend is not None:
        return _ring_general(q_BHSD, kv, group, block_sizes, kernel, scale, key_lengths, send_to, recv_from,
                             block_attend)
    out = lse = None
    for step in range(R):
        reqs = []
        if step < R - 1:
            src = (r - step - 1) % R  # whose block arrives next
            nxt = kv.new_empty((2, B, H, block_sizes[src], D))
            reqs = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, kv, send_to, group), dist.P2POp(dist.irecv, nxt, recv_from, group)]
            )
        blk_out, blk_lse = kernel(q_BHSD, kv[0], kv[1], scale=scale, return_lse=True)
        if out is None:
            out, lse = blk_out.float(), blk_lse
        else:
            out, lse = merge_partial(out, lse, blk_out, blk_lse)
        for req in reqs:
            req.wait()
        if reqs:
            kv = nxt
    return out.to(q_BHSD.dtype)


def _ring_general(q_BHSD, kv, group, block_sizes, kernel, scale, key_lengths, send_to, recv_from,
                  block_attend=None) -> torch.Tensor:
    """The ring with padded keys, grouped K/V heads or a mask: same exchange, blocks through `attend`
    (or `block_attend`)."""
    R, r = len(block_sizes), dist.get_rank(group)
    _, B, H, _, D = kv.shape
    offsets = [sum(block_sizes[:j]) for j in range(R)]
    Bq, Hq, Sq, _ = q_BHSD.shape
    out = torch.zeros(Bq, Hq, Sq, D, dtype=torch.float32, device=q_BHSD.device)
    lse = torch.full((Bq, Hq, Sq), float("-inf"), device=q_BHSD.device)
    for step in range(R):
        reqs = []
        src_now = (r - step) % R  # whose block is in `kv` now
        if step < R - 1:
            src = (r - step - 1) % R
            nxt = kv.new_empty((2, B, H, block_sizes[src], D))
            reqs = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, kv, send_to, group), dist.P2POp(dist.irecv, nxt, recv_from, group)]
            )
        if block_attend is not None:
            blk = block_attend(q_BHSD, kv[0], kv[1], src_now)
        else:
            valid = valid_counts(key_lengths, offsets[src_now], block_sizes[src_now])
            blk = attend(kernel, q_BHSD, kv[0], kv[1], scale=scale, valid=valid, return_lse=True)
        if blk is not None:
            out, lse = merge_partial_masked(out, lse, *blk)
        for req in reqs:
            req.wait()
        if reqs:
            kv = nxt
    return out.to(q_BHSD.dtype)
