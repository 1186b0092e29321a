"""Attention backends by name: one AttentionKernel per backend (one file each), chosen by name or "auto".

Every kernel maps q/k/v (B, H, S, D) -> out (B, H, Sq, D) in the input dtype and, when asked and
able, lse (B, H, Sq) float32 natural-log log-sum-exp of the scaled scores (what Ring attention needs
to merge partial results).

The folder `kernels/` installs as `shardiff_kernels`, a namespace package (no `__init__.py`):
Hugging Face's hub-kernels distribution owns the top-level name `kernels`, and without an
`__init__.py` here its regular package wins the import even when this repository's root is on
`sys.path` (PEP 420: a regular package anywhere on the path beats a namespace portion).

The registry dict is the package's only mutable global; built-in kernels are
registered when this module is imported (none of them imports optional
packages or touches a GPU to do so).
"""

from __future__ import annotations

import torch

from .base import AttentionKernel
from .flash_attn import FLASH_ATTN
from .flash_attn4 import FLASH_ATTN_4
from .math_ref import MATH
from .sdpa import SDPA
from .sdpa_cpu_flash import SDPA_CPU_FLASH
from .sdpa_cudnn import SDPA_CUDNN
from .sdpa_efficient import SDPA_EFFICIENT
from .sdpa_flash import SDPA_FLASH

_REGISTRY: dict[str, AttentionKernel] = {}

_BUILTINS = (
    MATH, SDPA, SDPA_CPU_FLASH, SDPA_CUDNN, SDPA_FLASH, SDPA_EFFICIENT, FLASH_ATTN, FLASH_ATTN_4,
)
# Built-in names, whether or not usable on this machine (for CLI choices).
KERNEL_NAMES: tuple[str, ...] = tuple(k.name for k in _BUILTINS)


def register_kernel(kernel: AttentionKernel, *, replace: bool = False) -> AttentionKernel:
    """Add a kernel; re-registering a name needs replace=True (catches typos/dupes)."""
    if kernel.name == "auto":
        raise ValueError('"auto" is reserved for choose_kernel')
    if kernel.name in _REGISTRY and not replace:
        raise ValueError(f"attention kernel {kernel.name!r} is already registered")
    _REGISTRY[kernel.name] = kernel
    return kernel


def get_kernel(name: str) -> AttentionKernel:
    """Look up by name, without any device/availability check."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown attention kernel {name!r}; registered: {sorted(_REGISTRY)}"
        ) from None


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def _usable(k: AttentionKernel, device_type: str, dtype: torch.dtype | None, need_lse: bool) -> bool:
    # Static checks first: is_available() may import a package or query the GPU.
    if device_type not in k.devices or (need_lse and not k.provides_lse):
        return False
    if dtype is not None and dtype not in k.dtypes:
        return False
    return k.is_available()


def available_kernels(
    device: torch.device | str, *, dtype: torch.dtype | None = None, need_lse: bool = False
) -> list[str]:
    """Names usable on `device` (optionally for `dtype` / with LSE), fastest first."""
    dev = _device_type(device)
    usable = [k for k in _REGISTRY.values() if _usable(k, dev, dtype, need_lse)]
    return [k.name for k in sorted(usable, key=lambda k: -k.priority)]


def choose_kernel(
    name: str, device: torch.device | str, dtype: torch.dtype, need_lse: bool
) -> AttentionKernel:
    """Resolve "auto" or an explicit kernel name for this device/dtype/LSE need.

    "auto" = highest priority usable kernel. An explicit name that cannot run
    here is a ValueError (we never silently substitute another kernel).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"attention needs a floating dtype, got {dtype!r}")
    dev = _device_type(device)
    valid = available_kernels(dev, dtype=dtype, need_lse=need_lse)
    where = f"device={dev!r}, dtype={dtype}, need_lse={need_lse}"
    if name == "auto":
        if not valid:
            raise ValueError(f"no attention kernel is usable for {where}")
        return _REGISTRY[valid[0]]
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown attention kernel {name!r}; valid for {where}: {['auto', *valid]}"
        )
    if name in valid:
        return _REGISTRY[name]
    k = _REGISTRY[name]
    if dev not in k.devices:
        why = f"it runs on {sorted(k.devices)}"
    elif need_lse and not k.provides_lse:
        why = "it cannot return the log-sum-exp"
    elif dtype not in k.dtypes:
        why = f"it supports only {sorted(str(d) for d in k.dtypes)}"
    else:
        why = "it is not available here (package not installed or GPU too old)"
    raise ValueError(
        f"attention kernel {name!r} cannot be used for {where}: {why}; "
        f"valid: {['auto', *valid]}"
    )


for _k in _BUILTINS:
    register_kernel(_k)
del _k
