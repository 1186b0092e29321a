"""`sdpa`: torch.nn.functional.scaled_dot_product_attention; any device, no LSE.

Legend: B batch, H heads, S sequence, D head dim.
The public SDPA API never returns the log-sum-exp, so this kernel serves
only callers that do not merge partial results (e.g. Ulysses).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import FLOAT_DTYPES, AttentionKernel


def sdpa_attention(
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    assert not return_lse, "AttentionKernel.__call__ rejects return_lse for sdpa"
    out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, scale=scale)
    return out_BHSD, None


SDPA = AttentionKernel(
    name="sdpa",
    fn=sdpa_attention,
    devices=frozenset({"cpu", "cuda"}),
    provides_lse=False,
    priority=10,
    is_available=lambda: True,
    dtypes=FLOAT_DTYPES,
)
