"""The Q/K/V projection shared by the attention processors of SD3 and PixArt (diffusers `Attention`).

Legend: B batch, S tokens, H heads (those this rank holds under TP), D head dim.
"""

from __future__ import annotations

import torch


def project_qkv(x_BSF: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k, head_dim: int) -> tuple[torch.Tensor, ...]:
    """(q, k, v) as [B, S, H, D], Q and K normalised if the model has norms. -1 for the heads keeps this
    independent of how many heads a rank holds; diffusers normalises [B, H, S, D], and an RMS/LayerNorm
    over the last dim is the same on [B, S, H, D]."""
    shape = (*x_BSF.shape[:2], -1, head_dim)
    q_BSHD, k_BSHD, v_BSHD = (lin(x_BSF).view(shape) for lin in (to_q, to_k, to_v))
    if norm_q is not None:
        q_BSHD = norm_q(q_BSHD)
    if norm_k is not None:
        k_BSHD = norm_k(k_BSHD)
    return q_BSHD, k_BSHD, v_BSHD
