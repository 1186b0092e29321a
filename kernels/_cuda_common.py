"""Helpers shared by the CUDA aten-op kernels (sdpa-cudnn/-flash/-efficient).

Legend: B batch, H heads, S sequence, D head dim.
We call the private aten ops directly because they return the log-sum-exp,
which the public SDPA API hides. That skips SDPA's input preprocessing, so
we redo the two parts that matter here: last-dim stride 1, head dim padded to
a multiple of 8.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

_HEAD_DIM_ALIGN = 8


@functools.cache
def cuda_sm_at_least(major: int) -> bool:
    """True when CUDA (not ROCm) is usable and device 0 is at least sm_<major>x."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(0)[0] >= major


@functools.cache
def aten_op_has(op_name: str, arg_names: tuple[str, ...], lse_return_index: int) -> bool:
    """Does aten.<op_name> exist with these argument names and an LSE output there?

    The torch 2.11 (device image) and 2.13 (dev) schemas agree, but these are
    private ops: if a future torch renames arguments we want "unavailable",
    not a TypeError in the middle of a denoising step.
    """
    packet = getattr(torch.ops.aten, op_name, None)
    if packet is None:
        return False
    schema = packet.default._schema
    names = {a.name for a in schema.arguments}
    returns = [r.name for r in schema.returns]
    return (
        set(arg_names) <= names
        and len(returns) > lse_return_index
        and "sumexp" in (returns[lse_return_index] or "")
    )


def prepare_BHSD(x_BHSD: Tensor) -> Tensor:
    """Last-dim-contiguous, head dim zero-padded to a multiple of 8.

    Zero padding is exact: padded q/k columns add 0 to q.k, padded v columns
    produce output columns we slice off (the scale is passed explicitly, so it
    still uses the true D).
    """
    if x_BHSD.stride(-1) != 1:
        x_BHSD = x_BHSD.contiguous()
    pad = (-x_BHSD.shape[-1]) % _HEAD_DIM_ALIGN
    if pad:
        x_BHSD = F.pad(x_BHSD, (0, pad))
    return x_BHSD


def unpad_out(out_BHSD: Tensor, head_dim: int) -> Tensor:
    return out_BHSD if out_BHSD.shape[-1] == head_dim else out_BHSD[..., :head_dim]
