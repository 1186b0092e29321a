"""`flash-attn-4`: FlashAttention-4 (CuTe DSL, `flash_attn.cute`); Hopper/Blackwell.

Legend: B batch, H heads, S sequence, D head dim; see flash_attn.py for the
BSHD <-> BHSD handling and how the LSE is requested.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import Tensor

from ._cuda_common import cuda_sm_at_least
from .base import HALF_DTYPES, AttentionKernel
from .flash_attn import call_flash_bshd


@functools.cache
def _fa4_func() -> Callable | None:
    if not cuda_sm_at_least(9):
        return None
    try:
        from flash_attn.cute import flash_attn_func

        return flash_attn_func
    except Exception:  # not installed, or a broken build: treat as absent
        return None


def flash_attn4_attention(
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    func = _fa4_func()
    assert func is not None, "flash-attn-4 kernel called although is_available() is False"
    return call_flash_bshd(
        func, "flash-attn-4", q_BHSD, k_BHSD, v_BHSD, scale=scale, return_lse=return_lse
    )


FLASH_ATTN_4 = AttentionKernel(
    name="flash-attn-4",
    fn=flash_attn4_attention,
    devices=frozenset({"cuda"}),
    provides_lse=True,
    priority=90,
    is_available=lambda: _fa4_func() is not None,
    dtypes=HALF_DTYPES,
)
