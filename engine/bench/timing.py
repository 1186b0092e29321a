"""The per-op timer of the collective benchmarks (engine.bench.tp_ops, engine.bench.qkv_exchange)."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


def median_ms(fn, iters: int, device: torch.device) -> float:
    """Median milliseconds of `fn` over `iters` calls, after 3 warm-up calls and a barrier (every rank
    starts together): CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(3):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
