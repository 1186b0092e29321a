"""Several images per call: the layout chosen for the batch, images spread over the dp ranks, gathered in order.

Image i is the same image whatever the number of GPUs: its noise comes from its own request's seed
(the CLI gives image i the seed `seed + i`), never from the rank that draws it, and each image is its
own pipeline call with the same shapes on any layout. So 4 GPUs never repeat an image and never
differ from 1 GPU.

The dp ranks take contiguous runs of the requests (the first ones one longer when uneven, as
parallel.sharding.split_sizes), run them independently (each with its own cfg pair when the layout
has one), and the first rank gathers the results over the dp group at the end, in request order.

For families whose layout follows the batch (UNets: `Family.layout`), the engine switches to the
chosen layout first (`Engine.use_layout`): meshes are built once per layout and kept; only the plans'
hooks move (engine/placement.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from shardiff_parallel.config import AXES, ParallelConfig
from shardiff_parallel.mesh import Mesh
from shardiff_parallel.sharding import split_sizes

from engine.runtime.distributed import agree
from engine.runtime.stop import Stopped

from .request_check import CheckedBatch


def choose_layout(engine, requests) -> tuple[ParallelConfig, str]:
    """The layout `engine` will use for `requests`, and why; no collective (ValueError on bad input)."""
    fam = engine.family
    if not requests:
        raise ValueError("no requests: give at least one prompt")
    if engine.explicit_layout:
        return engine.parallel, f"as given: {engine.parallel.describe()}"
    if fam.layout is None:
        if engine.config.parallel != "auto":
            raise ValueError(f"--parallel {engine.config.parallel} is for UNet models; {fam.name} models take "
                             f"explicit degrees (--cfg, --ulysses, --ring, --tp)")
        why = f"{engine.parallel.describe()}, every image split over all processes"
        notes = [engine.tp_note, engine.parallel.heads_note(engine.info.num_heads, engine.info.num_kv_heads)]
        return engine.parallel, "; ".join([why, *filter(None, notes)])
    guided = [fam.uses_cfg(fam.call_kwargs(r)) and not engine.info.uses_guidance_embeds for r in requests]
    # The planned layout spans every launched process: its size is the world (also for a caller that
    # is not one of the ranks, engine/request_check.check_requests).
    return fam.layout(engine.parallel.world_size, engine.config, guided)


def generate_batch(engine, requests, *, output_type: str = "pil", on_step=None) -> list | None:
    """Results of `requests` in order on the first rank (None on the others); see the module doc.

    `requests`: GenerateRequests (checked here, once), or the engine's `check_batch` of them (checked
    already: used as they are). `on_step`: called after every denoising step (engine/runtime/stop.py);
    when it stops one dp slice, every slice stops before the gather (each slice agrees on its own steps;
    the slices then agree here).
    """
    batch, error = None, None
    if isinstance(requests, CheckedBatch):
        batch = requests
    else:
        try:
            batch = engine.check_batch(list(requests))
        except ValueError as e:
            error = str(e)
    # One collective for the whole batch: every rank's verdict, and the same requests (and input
    # images, by their pixel hashes) everywhere.
    agree("requests", [c.agreed_form() for c in batch.requests] if batch is not None else None, error)
    engine.use_layout(batch.layout)
    mesh = engine.mesh
    sizes = split_sizes(len(batch.requests), mesh.size("dp"))
    start = sum(sizes[: mesh.coord("dp")])
    local, stopped = [], None
    try:
        for i in range(start, start + sizes[mesh.coord("dp")]):
            result = engine.run(batch.requests[i], output_type=output_type, on_step=on_step)
            result.params.update(index=i, layout_reason=batch.why)
            if result.latents is not None:
                result = dataclasses.replace(result, latents=result.latents.cpu())  # picklable anywhere
            local.append(result)
    except Stopped as e:
        stopped = e
    if on_step is not None and mesh.size("dp") > 1:
        anyone = torch.tensor([int(stopped is not None)])
        dist.all_reduce(anyone, op=dist.ReduceOp.MAX, group=mesh.group("dp"))
        if anyone.item() and stopped is None:
            stopped = Stopped("stopped on another data-parallel slice")
    if stopped is not None:
        raise stopped
    return gather_in_order(mesh, local)


def gather_in_order(mesh: Mesh, local: list) -> list | None:
    """Every dp rank's results, concatenated in dp order, on the first rank; None elsewhere.

    Only the dp line through the first rank takes part: the other members of a cfg pair hold
    copies of the same images.
    """
    if any(mesh.coord(a) for a in AXES if a != "dp"):
        return None
    if mesh.size("dp") == 1:
        return local if mesh.is_first else None
    everyone = [None] * mesh.size("dp") if mesh.is_first else None
    dist.gather_object(local, everyone, dst=mesh.ranks[0], group=mesh.group("dp"))
    if not mesh.is_first:
        return None
    return [r for part in everyone for r in part]
