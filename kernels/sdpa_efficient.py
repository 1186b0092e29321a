"""`sdpa-efficient`: aten._scaled_dot_product_efficient_attention; CUDA, LSE.

Legend: B batch, H heads, Sq query length, D head dim; lse_BHS is (B, H, Sq).
The only fused CUDA kernel here that takes fp32, so "auto" falls back to it
for fp32 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._cuda_common import aten_op_has, cuda_sm_at_least, prepare_BHSD, unpad_out
from .base import AttentionKernel, normalize_lse

_OP = "_scaled_dot_product_efficient_attention"
_ARGS = ("attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale")


def _available() -> bool:
    return cuda_sm_at_least(5) and aten_op_has(_OP, _ARGS, lse_return_index=1)


def efficient_attention(
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    B, H, Sq, D = q_BHSD.shape
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        prepare_BHSD(q_BHSD), prepare_BHSD(k_BHSD), prepare_BHSD(v_BHSD),
        attn_bias=None, compute_log_sumexp=return_lse, dropout_p=0.0,
        is_causal=False, scale=scale,
    )
    out_BHSD = unpad_out(res[0], D)
    if not return_lse:
        return out_BHSD, None
    # The kernel pads the LSE's sequence dim up to a multiple of 32.
    lse_BHS = normalize_lse(res[1], B, H, Sq, backend="sdpa-efficient", allow_seq_padding=True)
    return out_BHSD, lse_BHS


SDPA_EFFICIENT = AttentionKernel(
    name="sdpa-efficient",
    fn=efficient_attention,
    devices=frozenset({"cuda"}),
    provides_lse=True,
    priority=60,
    is_available=_available,
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
)
