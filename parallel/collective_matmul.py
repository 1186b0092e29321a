"""Collective matmuls: an all-gather fused with the matmul that reads its result, and a matmul fused
with the reduce-scatter of its output (`tp_comm="overlap"`, parallel/tensor_seq.py).

In the sequence form of TP every column-split region starts with an all-gather of the tokens and every
row-split one ends with a reduce-scatter; run one after the other, the GPU idles through each
collective (Flux TP-4 at 2048²: 152 of them per step, ~0.3 ms each). On CUDA with NCCL, torch's
symmetric-memory ops (`torch.ops.symm_mem.fused_all_gather_matmul` / `fused_matmul_reduce_scatter`)
split the matmul by source / destination rank and move each piece with the copy engines while the
tensor cores work on the next, so the transfer hides behind the GEMM without taking SMs from it
(measured on 4×H200, BENCHMARKS.md: Flux single-block Q/K/V+MLP all-gather+matmul 1.045 → 0.887 ms,
proj_out matmul+reduce-scatter 0.811 → 0.668 ms).

Elsewhere (gloo on CPU in the tests, or symmetric memory unavailable), and for short sequences, the
same functions run the plain collective and then the matmul: the same arithmetic and the same call
structure, so everything around them is tested on CPU.

Legend: T the TP degree, L tokens on one rank, R the other dims (batch), K / N in / out features.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# torch ≥ 2.13 renamed the dim-0 collectives (all_gather_into_tensor, reduce_scatter_tensor) to *_single.
_dist_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_dist_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_dim0(x0: torch.Tensor, T: int, group) -> torch.Tensor:
    """[n, *R] on each rank → [T·n, *R], rank-major. Functional under torch.compile: no graph break."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_gather_tensor(x0, 0, group))
    out = x0.new_empty((T * x0.shape[0], *x0.shape[1:]))
    _dist_all_gather(out, x0, group=group)
    return out


def reduce_scatter_dim0(x0: torch.Tensor, T: int, group) -> torch.Tensor:
    """[T·n, *R] partial sums → [n, *R]: rank r gets the sum of rows r·n … (r+1)·n − 1."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.reduce_scatter_tensor(x0, "sum", 0, group))
    out = x0.new_empty((x0.shape[0] // T, *x0.shape[1:]))
    _dist_reduce_scatter(out, x0, group=group)
    return out


FUSE_MIN_ROWS = 8192
"""Fewer gathered rows (tokens × batch over all TP ranks) than this run unfused. Each fused op costs
~0.2 ms of host work (pipeline set-up in Python, per-step barriers), which a short GEMM cannot cover:
Flux TP-4 compiled on 4×H200, ms per step fused / unfused (--tp-comm sequence): 4608 tokens (1024²)
104.1 / 55.3, 9728 (1536²) 112.0 / 115.3, 16896 (2048²) 209.1 / 223.3 (BENCHMARKS.md). The shape is
static per compiled graph, so the choice costs nothing at run time."""


def worth_fusing(rows: int) -> bool:
    """Whether a collective matmul over `rows` gathered rows runs fused (where it can)."""
    return rows >= FUSE_MIN_ROWS


def symmetric_memory_usable(group, device: torch.device) -> bool:
    """Whether the fused symmetric-memory ops can run on `group`: CUDA tensors over NCCL with the ops
    registered (torch ≥ 2.5). Decided once, when the plan is applied, identically on every rank."""
    # The engine's groups carry two backends ("cpu:gloo,cuda:nccl"): NCCL must be the CUDA one.
    if device.type != "cuda" or group is None or "nccl" not in str(dist.get_backend(group)):
        return False
    try:
        import torch.distributed._symmetric_memory as symm
    except ImportError:
        return False
    if not hasattr(torch.ops.symm_mem, "fused_all_gather_matmul"):
        return False
    # Needed before torch 2.11; later versions enable every group and warn that the call is obsolete.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        symm.enable_symm_mem_for_group(group.group_name)
    return True


def all_gather_matmul(
    x0_LRK: torch.Tensor, weight_NK: torch.Tensor, T: int, group, *, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(all_gather(x) over dim 0, all_gather(x) @ weightᵀ), both [T·L, *R, ·], rank-major.

    `x0_LRK` must be contiguous (the token dim leading). One weight: callers concatenate the weights
    of every linear that reads the gathered tensor, since each extra matrix costs its own pipeline."""
    if fused and worth_fusing(T * x0_LRK.numel() // x0_LRK.shape[-1]):
        full, (y,) = torch.ops.symm_mem.fused_all_gather_matmul(x0_LRK, [weight_NK.t()], 0, group.group_name)
        return full, y
    full = gather_dim0(x0_LRK, T, group)
    return full, full @ weight_NK.t()


def matmul_reduce_scatter(x0_SRK: torch.Tensor, weight_NK: torch.Tensor, T: int, group, *, fused: bool) -> torch.Tensor:
    """reduce_scatter(x @ weightᵀ) over dim 0: [T·L, *R, K] partial inputs → this rank's [L, *R, N] sums."""
    if fused and worth_fusing(x0_SRK.numel() // x0_SRK.shape[-1]):
        return torch.ops.symm_mem.fused_matmul_reduce_scatter(x0_SRK, weight_NK.t(), "sum", 0, group.group_name)
    return reduce_scatter_dim0(x0_SRK @ weight_NK.t(), T, group)
