"""`sdpa-flash`: aten._scaled_dot_product_flash_attention; CUDA, fp16/bf16, LSE.

Legend: B batch, H heads, Sq query length, D head dim; lse_BHS is (B, H, Sq).
torch's bundled FlashAttention-2; head dim up to 256.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._cuda_common import aten_op_has, cuda_sm_at_least, prepare_BHSD, unpad_out
from .base import HALF_DTYPES, AttentionKernel, normalize_lse

_OP = "_scaled_dot_product_flash_attention"
_ARGS = ("dropout_p", "is_causal", "return_debug_mask", "scale")


def _available() -> bool:
    built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    return cuda_sm_at_least(8) and built and aten_op_has(_OP, _ARGS, lse_return_index=1)


def flash_attention(
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    B, H, Sq, D = q_BHSD.shape
    # The flash op always computes the LSE (it is cheap); we drop it if unasked.
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        prepare_BHSD(q_BHSD), prepare_BHSD(k_BHSD), prepare_BHSD(v_BHSD),
        dropout_p=0.0, is_causal=False, return_debug_mask=False, scale=scale,
    )
    out_BHSD = unpad_out(res[0], D)
    if not return_lse:
        return out_BHSD, None
    return out_BHSD, normalize_lse(res[1], B, H, Sq, backend="sdpa-flash")


SDPA_FLASH = AttentionKernel(
    name="sdpa-flash",
    fn=flash_attention,
    devices=frozenset({"cuda"}),
    provides_lse=True,
    priority=70,
    is_available=_available,
    dtypes=HALF_DTYPES,
)
