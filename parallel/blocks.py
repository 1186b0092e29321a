"""One attention call over one block of keys: grouped K/V heads repeated, padded keys left out.

Legend: B batch, Hq query heads, Hkv key/value heads (Hq = n_rep · Hkv), Sq queries, Sk keys of the
block, D head dim.

Padding is described by lengths, not a mask: `valid[b]` says that the first valid[b] keys of sample
b in this block are real and the rest is padding (the text padding of Lumina2 / Z-Image, and the
batch padding of their joint streams, are always a suffix). Padded keys are then never attended —
they are not in the kernel call at all — so every backend works (none needs a mask argument), no
score is ever -inf, and a block that is all padding for a sample contributes nothing: its
log-sum-exp is -inf and the merge (`merge_partial_masked`) keeps the other blocks' result. A sample
whose block is all padding gets zeros and lse -inf, never NaN.
"""

from __future__ import annotations

import torch


def valid_counts(key_lengths: list[int] | None, offset: int, size: int) -> list[int] | None:
    """Real keys of each sample in the block [offset, offset + size) of the whole sequence."""
    if key_lengths is None:
        return None
    return [min(max(n - offset, 0), size) for n in key_lengths]


def attend(kernel, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, *, scale: float | None,
           valid: list[int] | None, return_lse: bool):
    """(out, lse or None) of the queries over the block's real keys; None when no sample has one."""
    Hq, Hkv = q_BHSD.shape[1], k_BHSD.shape[1]
    if Hkv != Hq:
        # Grouped-query attention: query head j reads K/V head j // n_rep (diffusers' repeat order).
        n_rep = Hq // Hkv
        k_BHSD, v_BHSD = k_BHSD.repeat_interleave(n_rep, dim=1), v_BHSD.repeat_interleave(n_rep, dim=1)
    Sk = k_BHSD.shape[2]
    if valid is None or all(n == Sk for n in valid):
        return kernel(q_BHSD, k_BHSD, v_BHSD, scale=scale, return_lse=return_lse)
    if all(n == valid[0] for n in valid):
        n = valid[0]
        if n == 0:
            return None
        return kernel(q_BHSD, k_BHSD[:, :, :n], v_BHSD[:, :, :n], scale=scale, return_lse=return_lse)
    if not any(valid):
        return None
    # Samples with different amounts of padding: one call each (batches here are a few images).
    B, _, Sq, D = q_BHSD.shape
    outs, lses = [], []
    for b, n in enumerate(valid):
        if n == 0:
            outs.append(q_BHSD.new_zeros(1, Hq, Sq, D))
            lses.append(torch.full((1, Hq, Sq), float("-inf"), device=q_BHSD.device))
            continue
        out, lse = kernel(q_BHSD[b : b + 1], k_BHSD[b : b + 1, :, :n], v_BHSD[b : b + 1, :, :n], scale=scale,
                          return_lse=return_lse)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), (torch.cat(lses) if return_lse else None)


def merge_partial_masked(out_BHSD: torch.Tensor, lse_BHS: torch.Tensor, blk_out_BHSD: torch.Tensor,
                         blk_lse_BHS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ring.merge_partial for blocks that may hold no real key for some samples (lse -inf on either
    side): where both are -inf the result stays zeros / -inf instead of exp(-inf + inf) = NaN."""
    new_lse = torch.logaddexp(lse_BHS, blk_lse_BHS)
    ref = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    out = out_BHSD * torch.exp(lse_BHS - ref).unsqueeze(-1) + blk_out_BHSD.float() * torch.exp(
        blk_lse_BHS - ref
    ).unsqueeze(-1)
    return out, new_lse
