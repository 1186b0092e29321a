"""`torchrun --nproc-per-node 4 -m engine.bench.tp_ops`: one TP collective + matmul, plain vs fused.

The per-op evidence behind `--tp-comm overlap` (parallel/collective_matmul.py): for each linear of a
Flux block at a given token count, the time of the matmul alone, the plain NCCL collective alone,
the two one after the other (the sequence form), and what the overlap form runs — the fused
symmetric-memory op, or the plain pair below `FUSE_MIN_ROWS` gathered rows (said under the table) —
with its relative L2 against the plain result. GPUs with NCCL only.

    torchrun --standalone --nproc-per-node 4 -m engine.bench.tp_ops --tokens 16896   # Flux 2048², TP-4

Protocol: 3 warm-up calls, then the median of `--iters` calls timed with CUDA events on rank 0.

Legend: M tokens over all TP ranks, K / N in / out features of this rank's matmul, T the TP degree.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import torch
import torch.distributed as dist

# Flux.1-dev at TP-4 (hidden 3072, MLP 12288, 24 heads): (what, K, N) of one rank's matmul.
ROW_SHAPES = (("single proj_out", 3840, 3072), ("double ff down", 3072, 3072), ("double attn out", 768, 3072))
COL_SHAPES = (("single q,k,v+mlp", 3072, 5376), ("double q,k,v", 3072, 2304), ("double ff up", 3072, 3072))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench.tp_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16896, help="M: tokens over all TP ranks (Flux 2048²: 16896)")
    p.add_argument("--iters", type=int, default=20)
    return p


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from shardiff_parallel.collective_matmul import (
        all_gather_matmul,
        gather_dim0,
        matmul_reduce_scatter,
        reduce_scatter_dim0,
        symmetric_memory_usable,
        worth_fusing,
    )

    from engine.bench.timing import median_ms
    from engine.runtime.distributed import UserError, init_distributed, pick_device

    device = pick_device(None)
    if device.type != "cuda":
        raise UserError("engine.bench.tp_ops times NCCL and symmetric-memory kernels: it needs CUDA GPUs")
    env = init_distributed(device, timedelta(seconds=300))
    if env.world_size < 2:
        raise UserError("engine.bench.tp_ops compares collectives: launch it with torchrun on 2 or more GPUs")
    T, group = env.world_size, dist.group.WORLD
    if args.tokens % T:
        raise UserError(f"--tokens {args.tokens} must be a multiple of the {T} ranks")
    if not symmetric_memory_usable(group, device):
        raise UserError("symmetric memory is not usable here (needs NCCL on CUDA)")
    M, bf16 = args.tokens, torch.bfloat16
    rows = []

    def ms(fn) -> float:
        return median_ms(fn, args.iters, device)

    for what, K, N in ROW_SHAPES:
        x_MK = torch.randn(M, K, device=device, dtype=bf16)
        w_NK = torch.randn(N, K, device=device, dtype=bf16) / K**0.5
        y_MN = x_MK @ w_NK.t()
        plain = reduce_scatter_dim0(x_MK @ w_NK.t(), T, group)
        fused = matmul_reduce_scatter(x_MK, w_NK, T, group, fused=True)
        rows.append((f"{what} (row, reduce-scatter)",
                     ms(lambda: x_MK @ w_NK.t()), ms(lambda: reduce_scatter_dim0(y_MN, T, group)),
                     ms(lambda: reduce_scatter_dim0(x_MK @ w_NK.t(), T, group)),
                     ms(lambda: matmul_reduce_scatter(x_MK, w_NK, T, group, fused=True)), _rel(fused, plain)))
    for what, K, N in COL_SHAPES:
        x0_LK = torch.randn(M // T, K, device=device, dtype=bf16)
        w_NK = torch.randn(N, K, device=device, dtype=bf16) / K**0.5
        full_MK = gather_dim0(x0_LK, T, group)
        plain = full_MK @ w_NK.t()
        _, fused = all_gather_matmul(x0_LK, w_NK, T, group, fused=True)
        rows.append((f"{what} (column, all-gather)",
                     ms(lambda: full_MK @ w_NK.t()), ms(lambda: gather_dim0(x0_LK, T, group)),
                     ms(lambda: gather_dim0(x0_LK, T, group) @ w_NK.t()),
                     ms(lambda: all_gather_matmul(x0_LK, w_NK, T, group, fused=True)), _rel(fused, plain)))
    if dist.get_rank() == 0:
        print(f"{M} tokens over {T} ranks, {torch.cuda.get_device_name(device)}; ms (median of {args.iters})")
        print(f"{'op':>36} {'matmul':>8} {'collective':>10} {'plain':>8} {'overlap':>8} {'rel L2':>9}")
        for name, mm, comm, plain_ms, fused_ms, rel in rows:
            print(f"{name:>36} {mm:>8.3f} {comm:>10.3f} {plain_ms:>8.3f} {fused_ms:>8.3f} {rel:>9.2e}")
        if not worth_fusing(M):
            print(f"({M} rows < FUSE_MIN_ROWS: the overlap form runs these unfused, as timed)")
    dist.destroy_process_group()


if __name__ == "__main__":
    from engine.runtime.distributed import run_main

    run_main(main)
