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

`fp8` (`--quantize-qkv fp8`, whose K/V arrive already rounded to e4m3): the blocks travel packed as e4m3
rows with their scales (parallel/qkv_fp8.py), D + 4 bytes a row instead of 2D, packed once by their own
rank, forwarded as they are, and unpacked by each rank that attends them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .blocks import attend, merge_partial_masked, valid_counts
from .qkv_fp8 import pack, unpack


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
    fp8: bool = False,
) -> torch.Tensor:
    """Attention of the local queries over every ring rank's K/V block. `key_lengths[b]`: sample b's
    real keys are the first key_lengths[b] of the whole sequence (blocks in ring order).
    `block_attend(q, k, v, j)` → (out, lse) or None: the partial over ring rank j's block, where a
    mask decides which of its keys each query sees (parallel/block_causal.py). `fp8`: the blocks travel
    as packed e4m3 rows (K and V already rounded so)."""
    R = len(block_sizes)
    r = dist.get_rank(group)
    assert k_BHSD.shape[2] == block_sizes[r]
    send_to = dist.get_global_rank(group, (r + 1) % R)
    recv_from = dist.get_global_rank(group, (r - 1) % R)
    # K and V in one buffer: one send and one receive per step instead of two of each.
    kv = torch.stack([k_BHSD, v_BHSD]).contiguous()
    travel = _Travel(kv, fp8)
    if key_lengths is not None or k_BHSD.shape[1] != q_BHSD.shape[1] or block_attend is not None:
        return _ring_general(q_BHSD, travel, group, block_sizes, kernel, scale, key_lengths, send_to, recv_from,
                             block_attend)
    out = lse = None
    for step in range(R):
        reqs = []
        if step < R - 1:
            src = (r - step - 1) % R  # whose block arrives next
            reqs = travel.pass_on(block_sizes[src], send_to, recv_from, group)
        k, v = travel.block()
        blk_out, blk_lse = kernel(q_BHSD, k, v, scale=scale, return_lse=True)
        if out is None:
            out, lse = blk_out.float(), blk_lse
        else:
            out, lse = merge_partial(out, lse, blk_out, blk_lse)
        travel.arrived(reqs)
    return out.to(q_BHSD.dtype)


class _Travel:
    """The K/V block a ring step attends, and the one in flight to the next rank: (2, B, H, S_j, D) in the
    model's dtype, or packed e4m3 rows (2, B, H, S_j, D + 4) — this rank's own block is attended as it is,
    the others unpacked once each."""

    def __init__(self, kv: torch.Tensor, fp8: bool):
        self.dtype, self.fp8 = kv.dtype, fp8
        self.here = kv
        """What is sent on (the packed bytes under fp8)."""
        self.own = kv
        """This rank's block as the caller gave it: attended at the first step without a round trip."""
        if fp8:
            self.here = pack(kv)
        self.next = None

    def pass_on(self, rows: int, send_to: int, recv_from: int, group) -> list:
        _, B, H, _, P = self.here.shape
        self.next = self.here.new_empty((2, B, H, rows, P))
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, self.here, send_to, group),
                                       dist.P2POp(dist.irecv, self.next, recv_from, group)])

    def block(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.own if self.own is not None else unpack(self.here, self.dtype) if self.fp8 else self.here
        return kv[0], kv[1]

    def arrived(self, reqs: list) -> None:
        for req in reqs:
            req.wait()
        if reqs:
            self.here, self.next, self.own = self.next, None, None


def _ring_general(q_BHSD, travel: _Travel, group, block_sizes, kernel, scale, key_lengths, send_to, recv_from,
                  block_attend=None) -> torch.Tensor:
    """The ring with padded keys, grouped K/V heads or a mask: same exchange, blocks through `attend`
    (or `block_attend`)."""
    R, r = len(block_sizes), dist.get_rank(group)
    offsets = [sum(block_sizes[:j]) for j in range(R)]
    Bq, Hq, Sq, D = q_BHSD.shape
    out = torch.zeros(Bq, Hq, Sq, D, dtype=torch.float32, device=q_BHSD.device)
    lse = torch.full((Bq, Hq, Sq), float("-inf"), device=q_BHSD.device)
    for step in range(R):
        reqs = []
        src_now = (r - step) % R  # whose block is in `travel` now
        if step < R - 1:
            reqs = travel.pass_on(block_sizes[(r - step - 1) % R], send_to, recv_from, group)
        k, v = travel.block()
        if block_attend is not None:
            blk = block_attend(q_BHSD, k, v, src_now)
        else:
            valid = valid_counts(key_lengths, offsets[src_now], block_sizes[src_now])
            blk = attend(kernel, q_BHSD, k, v, scale=scale, valid=valid, return_lse=True)
        if blk is not None:
            out, lse = merge_partial_masked(out, lse, *blk)
        travel.arrived(reqs)
    return out.to(q_BHSD.dtype)
