"""engine.bench's `--sharded` and `--memory-cap-gib`: measure what a TP rank really holds.

Without `--sharded` every bench layout shares one full pipeline, and a TP layout slices copies of the
full weights, so its peak memory still counts the whole model. With it, the shared pipeline has no
denoiser; each layout builds one holding only its TP shard (engine/loading/sharded.py) and drops it
afterwards — the memory a TP job really needs. A cap (torch.cuda.set_per_process_memory_fraction)
turns "does not fit" into a clear error instead of a CUDA traceback.
"""

from __future__ import annotations


import torch

from engine.loading.sharded import empty_model, load_sharded_denoiser
from shardiff_parallel.tensor import local_numel


def cap_memory(cap_gib: float | None, device: torch.device) -> None:
    if cap_gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gib * 2**30 >= total:
        raise ValueError(f"--memory-cap-gib {cap_gib} is not below the GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)


def shard_gib(model: str, family, tp: int, tp_rank: int, dtype: torch.dtype) -> float:
    """GiB of denoiser weights one TP rank holds (from the meta model: no memory)."""
    empty = empty_model(model, family.denoiser)
    numel = local_numel(empty, family.plan.tp_styles, tp, tp_rank)
    return numel * dtype.itemsize / 2**30


def install_sharded_denoiser(pipe, family, model: str, layout_name: str, tp: int, tp_rank: int, *, dtype, device,
                             cap_gib: float | None):
    """Put this rank's TP shard of the denoiser into `pipe`; returns the undo (drop it, free memory)."""
    try:
        denoiser = load_sharded_denoiser(model, family, tp=tp, tp_rank=tp_rank, dtype=dtype, device=device)
    except torch.OutOfMemoryError:
        need = shard_gib(model, family, tp, tp_rank, dtype)
        cap = f"the {cap_gib} GiB per-GPU cap" if cap_gib else "this GPU's memory"
        raise ValueError(
            f"layout {layout_name}: out of GPU memory loading the denoiser — {need:.1f} GiB of weights per rank "
            f"do not fit {cap}; use a larger --tp (each rank then holds 1/tp of the split weights)"
        ) from None
    setattr(pipe, family.denoiser, denoiser)

    def undo():
        setattr(pipe, family.denoiser, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return undo
