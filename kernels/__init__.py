"""Attention-backend registry: one AttentionKernel per backend, chosen by name or "auto".

Every kernel maps q/k/v (B, H, S, D) -> out (B, H, Sq, D) in the input dtype
and, when asked and able, lse (B, H, Sq) float32 natural-log log-sum-exp of
the scaled scores (what Ring attention needs to merge partial results).
"""

from .base import AttentionKernel
from .registry import (
    KERNEL_NAMES,
    available_kernels,
    choose_kernel,
    get_kernel,
    register_kernel,
)

__all__ = [
    "AttentionKernel",
    "register_kernel",
    "get_kernel",
    "choose_kernel",
    "available_kernels",
    "KERNEL_NAMES",
]
