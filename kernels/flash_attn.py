"""`flash-attn`: the external FlashAttention package (FA3 if present, else FA2).

Legend: B batch, H heads, S sequence, D head dim. FlashAttention takes
(B, S, H, D) tensors; we pass transposed views in and transpose the output
back, so no copies are made here (flash_attn itself only needs stride(-1)==1).
Nothing is imported until is_available()/the kernel is first used, so
importing `kernels` never fails when flash_attn is not installed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from torch import Tensor

from ._cuda_common import cuda_sm_at_least
from .base import HALF_DTYPES, AttentionKernel, normalize_lse


@functools.cache
def _fa_func() -> Callable | None:
    """flash_attn_func of FA3 (Hopper only) or FA2 (sm80+); None if neither works here."""
    if cuda_sm_at_least(9) and not cuda_sm_at_least(10):
        try:
            from flash_attn_interface import flash_attn_func  # FA3 ("hopper" build)

            return flash_attn_func
        except Exception:  # not installed, or a broken build: treat as absent
            pass
    if cuda_sm_at_least(8):
        try:
            from flash_attn import flash_attn_func  # FA2

            return flash_attn_func
        except Exception:
            pass
    return None


@functools.cache
def _param_names(func: Callable) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return frozenset()


def call_flash_bshd(
    func: Callable, backend: str,
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """Run a FlashAttention-style flash_attn_func on BHSD tensors.

    The versions disagree on how the LSE is requested and returned:
      FA2:               return_attn_probs=True -> (out, lse, S_dmask)
      FA3 (older):       always (out, lse)
      FA3 (newer):       return_attn_probs=True -> (out, lse), else out
      FA4 (flash_attn.cute): return_lse=True -> (out, lse)
    so we ask via whichever keyword the signature has and read item 1.
    """
    B, H, Sq, D = q_BHSD.shape
    params = _param_names(func)
    kwargs: dict = {"softmax_scale": scale, "causal": False}
    if "return_attn_probs" in params:
        kwargs["return_attn_probs"] = return_lse
    if "return_lse" in params:
        kwargs["return_lse"] = return_lse
    res = func(q_BHSD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2), **kwargs)
    if isinstance(res, (tuple, list)):
        out_BSHD, lse = res[0], (res[1] if len(res) > 1 else None)
    else:
        out_BSHD, lse = res, None
    out_BHSD = out_BSHD.transpose(1, 2)
    if not return_lse:
        return out_BHSD, None
    if lse is None:
        raise RuntimeError(f"{backend}: this flash_attn version did not return the LSE")
    return out_BHSD, normalize_lse(lse, B, H, Sq, backend=backend)


def flash_attn_attention(
    q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *, scale: float, return_lse: bool
) -> tuple[Tensor, Tensor | None]:
    func = _fa_func()
    assert func is not None, "flash-attn kernel called although is_available() is False"
    return call_flash_bshd(
        func, "flash-attn", q_BHSD, k_BHSD, v_BHSD, scale=scale, return_lse=return_lse
    )


FLASH_ATTN = AttentionKernel(
    name="flash-attn",
    fn=flash_attn_attention,
    devices=frozenset({"cuda"}),
    provides_lse=True,
    priority=80,
    is_available=lambda: _fa_func() is not None,
    dtypes=HALF_DTYPES,
)
