"""Ring attention: every rank keeps its queries; K/V blocks travel around the ring.

Legend: B batch, H heads, S_q local queries, S_j the K/V block length of ring rank j, D head dim.

Step s attends the local queries to the block that originated on ring rank (r - s) mod R while the
next block is already in flight (batch_isend_irecv posted before the local attention starts), so the
transfer hides behind the compute. Partial results are merged with their log-sum-exps in float32,
which makes the result the exact softmax over the whole sequence up to rounding. Blocks may differ in
length (uneven splits): every rank knows all lengths, so receive buffers are sized exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
) -> torch.Tensor:
    R = len(block_sizes)
    r = dist.get_rank(group)
    assert k_BHSD.shape[2] == block_sizes[r]
    send_to = dist.get_global_rank(group, (r + 1) % R)
    recv_from = dist.get_global_rank(group, (r - 1) % R)
    B, H, _, D = k_BHSD.shape
    # K and V in one buffer: one send and one receive per step instead of two of each.
    kv = torch.stack([k_BHSD, v_BHSD]).contiguous()
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
