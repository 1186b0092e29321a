"""FP8 (e4m3) matrix products with per-token activation scales and per-output-channel weight scales.

`scaled_linear(x_q, x_scale, w_q, w_scale, bias)` is `(x_q @ w_qᵀ) · x_scale · w_scale + bias`:
- on a GPU with FP8 instructions (compute capability ≥ 8.9: Ada, Hopper, Blackwell) one
  `torch._scaled_mm` call with row-wise scales (cuBLASLt / CUTLASS; fp32 accumulation, the bf16
  output rounded once);
- anywhere else (the CPU, and the GPU check of the real kernel) an exact emulation: the e4m3 values
  widened to fp64 (exact), an fp64 product (each e4m3 × e4m3 product is exact, and so is a sum of up
  to millions of them in fp64's 53 bits: the order of the additions no longer matters), the same
  scaling, one rounding to the output dtype. The quantization itself (`quantize_rows`) is the same
  code on both paths, so both multiply identical FP8 numbers.

Why row-wise (per token × per output channel) and not per-tensor scales: a per-tensor activation scale
is the maximum over every token of the image, which under a sequence split lives on several ranks, so
each linear would need one all-reduce over the sequence group to quantize exactly as one GPU does
(~500 small collectives per step); a token's own maximum is on the rank that holds the token. Under
tensor parallelism a row-split layer's token maximum spans the TP ranks: its caller reduces the
per-token maxima over the TP group first (parallel/fp8.py), a B×S-number all-reduce.

Legend: M rows (tokens), K input features, N output features.
"""

from __future__ import annotations

import functools

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
AMAX_FLOOR = 1e-12
"""A row of zeros gets this maximum instead (its scale must not be 0: the quantization divides by it)."""
MIN_CAPABILITY = (8, 9)
"""FP8 tensor-core instructions: Ada (8.9) and Hopper (9.0) onwards."""


def row_amax(x_MK: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, float32 (M, 1)."""
    return x_MK.abs().amax(dim=-1, keepdim=True).float()


def quantize_rows(x_MK: torch.Tensor, amax_M1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales (M, 1)) with x ≈ values · scales: each row scaled so that its
    maximum `amax_M1` (which may be larger than the row's own, when the row is a piece of a wider
    row split over ranks) lands on the largest e4m3 value."""
    scale_M1 = amax_M1.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    q_MK = (x_MK.float() / scale_M1).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q_MK, scale_M1


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_refusal(device: torch.device) -> str | None:
    """Why this device cannot run the FP8 kernel (None: it can). The CPU runs the emulation instead."""
    if device.type != "cuda":
        return None
    cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"--quantize fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
                f"this {name} is {cap[0]}.{cap[1]}")
    return None


def uses_kernel(device: torch.device) -> bool:
    """Whether `scaled_linear` runs the FP8 kernel on `device` (else: the emulation)."""
    return device.type == "cuda" and fp8_refusal(device) is None


def scaled_linear(x_q_MK: torch.Tensor, x_scale_M1: torch.Tensor, w_q_NK: torch.Tensor, w_scale_N: torch.Tensor,
                  bias_N: torch.Tensor | None, out_dtype: torch.dtype, *, emulate: bool | None = None) -> torch.Tensor:
    """(x_q @ w_qᵀ) · x_scale · w_scale (+ bias) in `out_dtype`, (M, N). `emulate`: None picks the
    kernel where the device has one; True forces the emulation (the GPU check of the kernel)."""
    if emulate is None:
        emulate = not uses_kernel(x_q_MK.device)
    if not emulate:
        return torch._scaled_mm(
            x_q_MK, w_q_NK.t(), scale_a=x_scale_M1, scale_b=w_scale_N.view(1, -1),
            bias=None if bias_N is None else bias_N.to(out_dtype), out_dtype=out_dtype,
        )
    y_MN = (x_q_MK.double() @ w_q_NK.double().t()) * x_scale_M1.double() * w_scale_N.double().view(1, -1)
    if bias_N is not None:
        y_MN = y_MN + bias_N.double()
    return y_MN.to(out_dtype)


def kernel_shape_ok(out_features: int, in_features: int) -> bool:
    """`torch._scaled_mm` needs both matrix sides in multiples of 16."""
    return out_features % 16 == 0 and in_features % 16 == 0
