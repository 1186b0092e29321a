"""The AttentionKernel record and the input/LSE checks every backend shares.

Shape legend (suffixes on names):
  B  batch            H  heads           D  head dim
  Sq query length     Sk key/value length (may differ from Sq)
  q_BHSD: (B, H, Sq, D)   k_BHSD, v_BHSD: (B, H, Sk, D)
  out_BHSD: (B, H, Sq, D) lse_BHS: (B, H, Sq), float32, natural log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# fn(q_BHSD, k_BHSD, v_BHSD, *, scale: float, return_lse: bool) -> (out_BHSD, lse_BHS | None)
KernelFn = Callable[..., "tuple[Tensor, Tensor | None]"]

FLOAT_DTYPES: frozenset[torch.dtype] = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64}
)
HALF_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16})


def default_scale(head_dim: int) -> float:
    """Softmax temperature used when the caller passes scale=None."""
    return 1.0 / math.sqrt(head_dim)


@dataclass(frozen=True)
class AttentionKernel:
    """One attention backend. Calling it validates inputs, then runs `fn`.

    `dtypes` is extra to the bare contract: flash/cuDNN only take fp16/bf16,
    so choose_kernel must know the dtype to avoid picking them for fp32.
    """

    name: str
    fn: KernelFn
    devices: frozenset[str]
    provides_lse: bool
    priority: int
    is_available: Callable[[], bool]
    dtypes: frozenset[torch.dtype] = FLOAT_DTYPES

    def supports(self, device_type: str, dtype: torch.dtype, need_lse: bool) -> bool:
        """Static capability check (does not import anything or touch a GPU)."""
        return (
            device_type in self.devices
            and dtype in self.dtypes
            and (self.provides_lse or not need_lse)
        )

    def __call__(
        self,
        q_BHSD: Tensor,
        k_BHSD: Tensor,
        v_BHSD: Tensor,
        *,
        scale: float | None = None,
        return_lse: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if return_lse and not self.provides_lse:
            raise ValueError(
                f"attention kernel {self.name!r} cannot return the log-sum-exp; "
                "pick an LSE-capable kernel (choose_kernel(..., need_lse=True))"
            )
        check_qkv(q_BHSD, k_BHSD, v_BHSD)
        if q_BHSD.device.type not in self.devices:
            raise ValueError(
                f"attention kernel {self.name!r} runs on {sorted(self.devices)}, "
                f"got tensors on {q_BHSD.device.type!r}"
            )
        if q_BHSD.dtype not in self.dtypes:
            raise ValueError(
                f"attention kernel {self.name!r} supports dtypes "
                f"{sorted(str(d) for d in self.dtypes)}, got {q_BHSD.dtype}"
            )
        B, H, Sq, D = q_BHSD.shape
        scale = default_scale(D) if scale is None else float(scale)

        out_BHSD, lse_BHS = self.fn(q_BHSD, k_BHSD, v_BHSD, scale=scale, return_lse=return_lse)

        assert out_BHSD.shape == (B, H, Sq, D), (self.name, tuple(out_BHSD.shape))
        assert out_BHSD.dtype == q_BHSD.dtype, (self.name, out_BHSD.dtype)
        if not return_lse:
            return out_BHSD, None
        assert lse_BHS is not None, self.name
        assert lse_BHS.shape == (B, H, Sq) and lse_BHS.dtype == torch.float32, (
            self.name, tuple(lse_BHS.shape), lse_BHS.dtype,
        )
        return out_BHSD, lse_BHS


def check_qkv(q_BHSD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor) -> None:
    """User-facing shape/dtype/device agreement checks (ValueError on mismatch)."""
    for name, t in (("q", q_BHSD), ("k", k_BHSD), ("v", v_BHSD)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, S, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    B, H, _, D = q_BHSD.shape
    if k_BHSD.shape != v_BHSD.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k_BHSD.shape)} vs {tuple(v_BHSD.shape)}")
    if (k_BHSD.shape[0], k_BHSD.shape[1], k_BHSD.shape[3]) != (B, H, D):
        raise ValueError(
            f"q {tuple(q_BHSD.shape)} and k/v {tuple(k_BHSD.shape)} must agree on B, H, D"
        )
    if not (q_BHSD.dtype == k_BHSD.dtype == v_BHSD.dtype):
        raise ValueError(f"q/k/v dtypes differ: {q_BHSD.dtype}, {k_BHSD.dtype}, {v_BHSD.dtype}")
    if not (q_BHSD.device == k_BHSD.device == v_BHSD.device):
        raise ValueError(
            f"q/k/v devices differ: {q_BHSD.device}, {k_BHSD.device}, {v_BHSD.device}"
        )


def normalize_lse(
    lse: Tensor, B: int, H: int, Sq: int, *, backend: str, allow_seq_padding: bool = False
) -> Tensor:
    """Bring a backend's LSE to the one convention: (B, H, Sq), float32, contiguous.

    Known layouts: (B, H, Sq); (B, H, Sq, 1) from cuDNN on some torch versions;
    (B, H, Sq rounded up to 32) from mem-efficient (allow_seq_padding). Anything
    else is refused loudly instead of guessed (e.g. (B, Sq, H) is ambiguous
    when H == Sq).
    """
    lse_BHS = lse
    if lse_BHS.dim() == 4 and lse_BHS.shape[-1] == 1:
        lse_BHS = lse_BHS.squeeze(-1)
    ok = lse_BHS.dim() == 3 and tuple(lse_BHS.shape[:2]) == (B, H)
    if ok and lse_BHS.shape[2] != Sq:
        ok = allow_seq_padding and lse_BHS.shape[2] > Sq
        lse_BHS = lse_BHS[:, :, :Sq]
    if not ok:
        raise RuntimeError(
            f"{backend}: unexpected log-sum-exp shape {tuple(lse.shape)} "
            f"(expected ({B}, {H}, {Sq}) or ({B}, {H}, {Sq}, 1)); this torch / library "
            "version is not supported by shardiff.kernels"
        )
    return lse_BHS.to(torch.float32).contiguous()
