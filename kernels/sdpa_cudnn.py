"""`sdpa-cudnn`: aten._scaled_dot_product_cudnn_attention; CUDA, fp16/bf16, LSE.

Legend: B batch, H heads, Sq query length, D head dim; lse_BHS is (B, H, Sq).
Highest priority on CUDA: on Hopper cuDNN runs ~1.75x the flash SDPA backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._cuda_common import aten_op_has, cuda_sm_at_least, prepare_BHSD, unpad_out
from .base import HALF_DTYPES, AttentionKernel, normalize_lse

_OP = "_scaled_dot_product_cudnn_attention"
_ARGS = ("attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "return_debug_mask", "scale")


def _available() -> bool:
    return (
        cuda_sm_at_least(8)
        and torch.backends.cudnn.is_available()
        and aten_op_has(_OP, _ARGS, lse_return_index=1)
    )


def cudnn_attention(
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    B, H, Sq, D = q_BHSD.shape
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        prepare_BHSD(q_BHSD), prepare_BHSD(k_BHSD), prepare_BHSD(v_BHSD),
        attn_bias=None, compute_log_sumexp=return_lse, dropout_p=0.0,
        is_causal=False, return_debug_mask=False, scale=scale,
    )
    out_BHSD = unpad_out(res[0], D)
    if not return_lse:
        return out_BHSD, None
    # (B, H, Sq, 1) on some torch versions, (B, H, Sq) on others.
    return out_BHSD, normalize_lse(res[1], B, H, Sq, backend="sdpa-cudnn")


SDPA_CUDNN = AttentionKernel(
    name="sdpa-cudnn",
    fn=cudnn_attention,
    devices=frozenset({"cuda"}),
    provides_lse=True,
    priority=100,
    is_available=_available,
    dtypes=HALF_DTYPES,
)
