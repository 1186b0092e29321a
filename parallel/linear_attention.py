"""Linear (kernelised) attention over tokens split across ranks: exact with one all-reduce of a
small per-head state, no all-to-all and no ring.

Legend: B batch, H heads (this rank's under TP), D head dim, S this rank's tokens; "kv state"
(B, H, D+1, D) = Σ over tokens of [v; 1] kᵀ — the D×D key-value product and, in its last row, the
key sum that normalises.

With feature maps already applied to q and k (ReLU in Sana's transformer and DC-AE), attention is
out_s = (Σ_t v_t k_tᵀ) q_s / (Σ_t k_tᵀ q_s + eps). Both sums run over every token of the image, and
each is the sum of the ranks' partial sums: every rank computes its state from its own tokens, the
states are all-reduced in fp32 (D+1 by D per head, whatever the image size), and each rank applies
the image's state to its own queries. This is diffusers' SanaLinearAttnProcessor2_0 /
SanaMultiscaleAttnProcessor2_0 arithmetic (the same products, in the same fp32), summed over ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def kv_state(k_BHDS: torch.Tensor, v_BHDS: torch.Tensor) -> torch.Tensor:
    """(B, H, D+1, D) fp32: [v; 1] kᵀ summed over this rank's tokens (the padded row of ones gives
    the key sum)."""
    v1 = F.pad(v_BHDS.float(), (0, 0, 0, 1), mode="constant", value=1.0)
    return torch.matmul(v1, k_BHDS.float().transpose(-1, -2))


def apply_kv_state(state: torch.Tensor, q_BHDS: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, H, D, S) fp32: the attention output of this rank's queries under the image's state."""
    out = torch.matmul(state, q_BHDS.float())
    return out[:, :, :-1] / (out[:, :, -1:] + eps)


def linear_attention(q_BHDS: torch.Tensor, k_BHDS: torch.Tensor, v_BHDS: torch.Tensor, *, eps: float,
                     group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, H, D, S) fp32 output for this rank's tokens of linear attention over the tokens of every
    rank of `group` (None: this rank's alone). q and k carry their feature map already."""
    state = kv_state(k_BHDS, v_BHDS)
    if group is not None:
        dist.all_reduce(state, group=group)
    return apply_kv_state(state, q_BHDS, eps)
