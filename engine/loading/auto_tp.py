"""`--tp auto` (the default): tensor parallelism only where it pays — when the weights do not fit a GPU.

Measured on 4×H200 (BENCHMARKS.md): on NVLinked GPUs TP is never faster than Ulysses for the
same GPUs (Flux 2048² compiled: TP-4 225 ms, Ulysses-4 206 ms per step), but it divides the
denoiser's weights by T. So the automatic rule is about memory: the smallest TP degree (1 first) that
splits the model evenly, divides the ranks left after dp × cfg, and makes one rank's weights — every
pipeline component, with the denoiser's split linears divided by T — fit in WEIGHT_SHARE of the GPU,
the rest being left for activations (Flux 2048² eager needs ~1 GiB of them, 4096² several). The text
encoders count as their placement holds them (engine/text_encoders/placement.py): with
`--text-encoders auto` they are sharded before TP is tried, since they run once per request.

Counted from configs and safetensors headers only (meta-device models; nothing is read or allocated),
from the GPU's total memory — the same on every rank of a homogeneous node, so every rank decides the
same; the engine's first collective then checks that they did.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from engine.models import get_preset
from shardiff_parallel.tensor import local_numel

from .inspect import is_preset
from .safety import model_dir
from .sharded import empty_model
from .slices import stored_numel

WEIGHT_SHARE = 0.75
"""Weights may take this share of a GPU's memory; the rest is for activations and the allocator."""


def _directory_numel(folder: Path) -> int:
    """Parameters stored in a component folder's safetensors files (headers only)."""
    return sum(stored_numel(f) for f in sorted(folder.glob("*.safetensors")))


def _components(model: str) -> tuple[list[str], object]:
    """(names of the pipeline's weighted components, preset spec or model directory)."""
    if is_preset(model):
        spec = get_preset(model)
        return list(spec.model_components), spec
    folder = model_dir(model)
    index = json.loads((folder / "model_index.json").read_text())
    names = [n for n, v in index.items() if not n.startswith("_") and isinstance(v, list) and (folder / n).is_dir()]
    return names, folder


@functools.lru_cache(maxsize=8)
def _parts(model: str, denoiser: str) -> tuple[torch.nn.Module, int]:
    """(the denoiser on the meta device, parameters of every other component but the text encoders,
    which engine/text_encoders counts per placement). Cached: choose_tp asks for several TP degrees."""
    from engine.text_encoders.components import text_encoder_classes

    names, source = _components(model)
    assert denoiser in names, f"{model} has no {denoiser}"
    from_dir = isinstance(source, Path)
    empty = empty_model(model, denoiser)
    text = text_encoder_classes(model)
    others = sum(
        _directory_numel(source / n) if from_dir else sum(p.numel() for p in source.empty_model(n).parameters())
        for n in names
        if n != denoiser and n not in text
    )
    return empty, others


def weight_bytes_per_rank(model: str, family, tp: int, dtype: torch.dtype, text_bytes: int | None = None) -> int:
    """Bytes of weights one rank holds on `tp` TP ranks: the denoiser's shard plus every other component.
    `text_bytes`: what the text encoders take on that rank (None: replicated, all of them)."""
    empty, others = _parts(model, family.denoiser)
    if text_bytes is None:
        from engine.text_encoders.placement import plan_text_encoders

        text_bytes = plan_text_encoders(model, "replicated", ranks=1, dtype=dtype).bytes_per_rank
    # TP rank 0 holds the most: it keeps the row-split biases.
    return (local_numel(empty, family.plan.tensor, tp, 0) + others) * dtype.itemsize + text_bytes


def choose_tp(model: str, info, family, *, world_size: int, dp: int, cfg: int, dtype: torch.dtype,
              gpu_bytes: int | None, text_bytes=None) -> tuple[int, str]:
    """(TP degree, why) for `--tp auto`. `gpu_bytes`: one GPU's total memory; None (CPU): no TP.

    `text_bytes(room)`: the text encoders' bytes per rank when `room` bytes are left for them beside the
    rest (engine/text_encoders: `--text-encoders auto` shards them where replicated ones do not fit, which
    costs once per request where TP costs every step); None: replicated."""
    if gpu_bytes is None or not family.plan.tensor or world_size % (dp * cfg):
        return 1, ""
    budget = WEIGHT_SHARE * gpu_bytes

    def bytes_at(tp: int) -> int:
        if text_bytes is None:
            return weight_bytes_per_rank(model, family, tp, dtype)
        rest = weight_bytes_per_rank(model, family, tp, dtype, text_bytes=0)
        return rest + text_bytes(budget - rest)

    need_1 = bytes_at(1)
    if need_1 <= budget:
        return 1, ""
    ranks = world_size // (dp * cfg)
    tried = []
    for tp in range(2, ranks + 1):
        if ranks % tp:
            continue
        try:
            family.check_tp(info, tp)
        except ValueError:
            continue
        need = bytes_at(tp)
        tried.append(f"tp{tp}: {need / 2**30:.1f} GiB")
        if need <= budget:
            return tp, (f"tp{tp} chosen: {need_1 / 2**30:.1f} GiB of weights do not fit {WEIGHT_SHARE:.0%} of one "
                        f"GPU's {gpu_bytes / 2**30:.1f} GiB; with --tp {tp} each rank holds {need / 2**30:.1f} GiB")
    raise ValueError(
        f"the model's weights ({need_1 / 2**30:.1f} GiB per rank without TP"
        + (f"; {', '.join(tried)}" if tried else "")
        + f") do not fit {WEIGHT_SHARE:.0%} of one GPU's {gpu_bytes / 2**30:.1f} GiB with any TP degree over the "
        f"{ranks} rank(s) left after --dp {dp} × --cfg {cfg} (a TP degree must divide those ranks, the heads and "
        f"the MLP width); launch more GPUs or use --dtype bf16/fp16"
    )
