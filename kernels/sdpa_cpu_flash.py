"""`sdpa-cpu-flash`: the CPU flash-attention aten op, which also returns the LSE.

Legend: B batch, H heads, Sq query length, D head dim; lse_BHS is (B, H, Sq).
The fastest LSE-capable path on CPU; what Ring attention uses in CPU tests.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .base import AttentionKernel, normalize_lse

_OP_NAME = "_scaled_dot_product_flash_attention_for_cpu"


@functools.cache
def _available() -> bool:
    return hasattr(torch.ops.aten, _OP_NAME)


def cpu_flash_attention(
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    # The op accepts strided inputs, so no .contiguous() here.
    out_BHSD, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_BHSD, k_BHSD, v_BHSD, 0.0, False, scale=scale
    )
    if not return_lse:
        return out_BHSD, None
    B, H, Sq, _ = q_BHSD.shape
    return out_BHSD, normalize_lse(lse, B, H, Sq, backend="sdpa-cpu-flash")


SDPA_CPU_FLASH = AttentionKernel(
    name="sdpa-cpu-flash",
    fn=cpu_flash_attention,
    devices=frozenset({"cpu"}),
    provides_lse=True,
    priority=20,  # above sdpa/math: highest on CPU
    is_available=_available,
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
)
