"""Collective matmuls (parallel/collective_matmul.py) against the plain collective followed by the matmul.

CPU (gloo, in CI): the fallback path that the overlap form of TP runs off CUDA — all-gather + matmul
and matmul + reduce-scatter on 2 and 4 ranks, with a batch dim behind the token dim — equals the
product computed from every rank's data in one process. GPU (`gpu`, ≥ 2 CUDA devices, NCCL): the
symmetric-memory fused kernels, eager and compiled, equal the plain NCCL collective + matmul within
bf16 rounding.

Legend: T ranks, L tokens per rank, R batch, K / N in / out features.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed

L, R, K, N = 12, 2, 16, 24
L_FUSED = 2048
"""Tokens per rank on GPUs: enough rows for the fused kernels to be chosen (`worth_fusing`)."""


def _data(T: int, L: int, device, dtype):
    """Every rank's input rows and partial products, identical on all ranks (seeded)."""
    g = torch.Generator().manual_seed(0)
    x_TLRK = torch.randn(T, L, R, K, generator=g)
    w_NK = torch.randn(N, K, generator=g) / K**0.5
    parts_TSRK = torch.randn(T, T * L, R, K, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x_TLRK, w_NK, parts_TSRK)]


def _check(fused: bool, compiled: bool = False) -> dict:
    from shardiff_parallel.collective_matmul import (
        all_gather_matmul,
        matmul_reduce_scatter,
        symmetric_memory_usable,
        worth_fusing,
    )

    T, t = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device()) if fused else torch.device("cpu")
    dtype = torch.bfloat16 if fused else torch.float32
    assert symmetric_memory_usable(group, device) == fused
    L_ = L_FUSED if fused else L
    assert worth_fusing(T * L_ * R) == fused  # the GPU case really runs the fused kernels
    x_TLRK, w_NK, parts_TSRK = _data(T, L_, device, dtype)

    def both(x0, parts):
        full, y = all_gather_matmul(x0, w_NK, T, group, fused=fused)
        return full, y, matmul_reduce_scatter(parts, w_NK, T, group, fused=fused)

    run = torch.compile(both, dynamic=False) if compiled else both
    full, y, scattered = run(x_TLRK[t].contiguous(), parts_TSRK[t].contiguous())
    ref_full = x_TLRK.flatten(0, 1)
    ref_y = ref_full.float() @ w_NK.float().t()
    # Rank t sums every rank's partial products of its rows t·L … (t+1)·L − 1.
    ref_s = sum(p[t * L_ : (t + 1) * L_].float() @ w_NK.float().t() for p in parts_TSRK)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    return dict(full=rel(full, ref_full), y=rel(y, ref_y), scattered=rel(scattered, ref_s),
                shapes=(tuple(full.shape), tuple(y.shape), tuple(scattered.shape)))


@pytest.mark.parametrize("world", [2, 4])
def test_fallback_equals_reference(world):
    for rank, r in enumerate(run_distributed(_check, world, False)):
        assert r["shapes"] == ((world * L, R, K), (world * L, R, N), (L, R, N)), r["shapes"]
        for key in ("full", "y", "scattered"):
            assert r[key] <= 1e-6, (rank, key, r[key])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the symmetric-memory kernels need 2+ CUDA GPUs (CPU CI has none)")
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_symmetric_memory_matches(compiled):
    world = 4 if torch.cuda.device_count() >= 4 else 2
    for rank, r in enumerate(run_distributed(_check, world, True, compiled, backend="nccl", timeout=300)):
        assert r["shapes"] == ((world * L_FUSED, R, K), (world * L_FUSED, R, N), (L_FUSED, R, N)), r["shapes"]
        assert r["full"] == 0.0, (rank, r)
        # bf16 products and sums of world partials, each rounded once.
        assert r["y"] <= 1e-2 and r["scattered"] <= 1e-2, (rank, r)
