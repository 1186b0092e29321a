"""What the launcher needs to know about the machine: GPU count and P2P links."""
from __future__ import annotations

import os


def visible_gpus() -> int:
    """Number of CUDA GPUs this process may use (respects CUDA_VISIBLE_DEVICES)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def usable_cpus() -> int:
    # sched_getaffinity honours taskset/cgroup cpusets; os.cpu_count() would
    # count cores we may not run on and oversubscribe them.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def pairs_without_p2p(n: int) -> list[tuple[int, int]]:
    """Ordered GPU pairs (i, j), i != j, among the first n where i cannot read j directly.

    Without peer access NCCL stages every transfer through host memory, which on
    PCIe machines can make an N-GPU run slower than a single GPU.
    """
    import torch

    return [
        (i, j)
        for i in range(n)
        for j in range(n)
        if i != j and not torch.cuda.can_device_access_peer(i, j)
    ]


def p2p_warning(n: int) -> str | None:
    """One warning line if some pair of the n GPUs lacks P2P, else None."""
    if n < 2:
        return None
    try:
        missing = pairs_without_p2p(n)
    except Exception as exc:  # a broken driver query must not block the launch
        return f"could not check GPU peer access ({exc}); parallel speedup unknown"
    if not missing:
        return None
    shown = ", ".join(f"{i}->{j}" for i, j in missing[:4])
    more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
    return (
        f"GPUs without peer-to-peer access: {shown}{more}. Collectives will go "
        "through host memory and parallel speedups will be small (possibly "
        "slower than 1 GPU). Check `nvidia-smi topo -m`."
    )
