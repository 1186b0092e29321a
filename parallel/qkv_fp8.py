"""Q, K and V rounded to FP8 e4m3 before attention (`--quantize-qkv fp8`): the Ulysses exchange and Ring's
K/V blocks then carry 1 byte per value (plus one float32 scale per token and head) instead of 2.

Legend: `*L` leading dims (batch, or (3, batch) for Q, K, V stacked), S tokens, H heads, D head dim,
P = D + 4 packed bytes per row.

The rounding is per row of D values (one token's one head), with the row's own scale (its maximum over
448, shardiff_kernels.fp8): every split of the mesh keeps whole rows on one rank — the sequence split
cuts tokens, TP and Ulysses cut heads, CFG cuts the batch — so a row is rounded where it is computed,
with no collective, exactly as one GPU rounds it. One GPU runs the same rounding (`round_trip`) and
gains nothing from it; on N ranks the image equals that one-GPU image, because `unpack(pack(x))` is
`round_trip(x)` bit for bit. (A Ring block after Ulysses' exchange is packed again from rounded values:
the same e4m3 values, its scale recomputed from the rounded maximum, within a rounding of the first.)

Why a packed byte tensor: the values and their scales travel in one all-to-all (two would pay the
exchange's latency twice), and a byte tensor is what every backend's all-to-all moves (gloo included).
"""

from __future__ import annotations

import torch

from shardiff_kernels.fp8 import E4M3, quantize_rows, row_amax

SCALE_BYTES = 4
"""One float32 scale per row, carried as 4 bytes after the row's D e4m3 bytes."""


def _quantize(x_LSHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values (*L, S, H, D), float32 scales (*L, S, H, 1))."""
    return quantize_rows(x_LSHD, row_amax(x_LSHD))


def _dequantize(q_LSHD: torch.Tensor, scale_LSH1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q_LSHD.float() * scale_LSH1).to(dtype)


def round_trip(x_LSHD: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 per row and back, in x's dtype: what attention sees on every layout."""
    return _dequantize(*_quantize(x_LSHD), x_LSHD.dtype)


def pack(x_LSHD: torch.Tensor) -> torch.Tensor:
    """(*L, S, H, D) → (*L, S, H, D + 4) bytes: each row's e4m3 values, then its float32 scale's bytes."""
    q_LSHD, scale_LSH1 = _quantize(x_LSHD)
    return torch.cat([q_LSHD.view(torch.uint8), scale_LSH1.view(torch.uint8)], dim=-1)


def unpack(packed_LSHP: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `pack`, dequantized to `dtype`: equal to `round_trip` of what was packed."""
    assert packed_LSHP.dtype == torch.uint8 and packed_LSHP.shape[-1] > SCALE_BYTES, packed_LSHP.shape
    D = packed_LSHP.shape[-1] - SCALE_BYTES
    q_LSHD = packed_LSHP[..., :D].contiguous().view(E4M3)
    # A copy first: the scale's 4 bytes sit at an offset that need not be float32-aligned.
    scale_LSH1 = packed_LSHP[..., D:].contiguous().view(torch.float32)
    return _dequantize(q_LSHD, scale_LSH1, dtype)


def wire_ratio(head_dim: int, dtype: torch.dtype) -> float:
    """Bytes sent per value against the model's dtype: (D + 4) / (D · itemsize), 0.52 for D = 128 in bf16."""
    return (head_dim + SCALE_BYTES) / (head_dim * torch.empty((), dtype=dtype).element_size())
