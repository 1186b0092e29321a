"""`math`: reference attention in plain torch ops; any device, any float dtype.

Legend: B batch, H heads, Sq/Sk query/key length, D head dim.
Slow and memory-hungry ((B, H, Sq, Sk) scores), but the ground truth the
other kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FLOAT_DTYPES, AttentionKernel


def math_attention(
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    # Accumulate in fp32 (fp64 when given fp64) so the reference is not
    # limited by bf16/fp16 rounding of the scores.
    acc = torch.float64 if q_BHSD.dtype == torch.float64 else torch.float32
    q, k, v = q_BHSD.to(acc), k_BHSD.to(acc), v_BHSD.to(acc)
    scores_BHSS = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs_BHSS = torch.softmax(scores_BHSS, dim=-1)
    out_BHSD = torch.matmul(probs_BHSS, v).to(q_BHSD.dtype)
    lse_BHS = torch.logsumexp(scores_BHSS, dim=-1).to(torch.float32) if return_lse else None
    return out_BHSD, lse_BHS


MATH = AttentionKernel(
    name="math",
    fn=math_attention,
    devices=frozenset({"cpu", "cuda"}),
    provides_lse=True,
    priority=0,  # always works, always slowest: the last resort for "auto"
    is_available=lambda: True,
    dtypes=FLOAT_DTYPES,
)
