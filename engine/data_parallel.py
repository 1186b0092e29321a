"""Several images per call: the layout chosen for the batch, images spread over the dp ranks, gathered in order.

Image i is the same image whatever the number of GPUs: its noise comes from its own request's seed
(the CLI gives image i the seed `seed + i`), never from the rank that draws it, and each image is its
own pipeline call with the same shapes on any layout. So 4 GPUs never repeat an image and never
differ from 1 GPU.

The dp ranks take contiguous runs of the requests (the first ones one longer when uneven, as
parallel.sharding.split_sizes), run them independently (each with its own cfg pair when the layout
has one), and the first rank gathers the results over the dp group at the end, in request order.

For families whose layout follows the batch (UNets: `Family.layout`), the engine switches to the
chosen layout first: meshes are built once per layout and cached; only the plan's hooks move.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import torch
import torch.distributed as dist

from shardiff_parallel.mesh import Mesh
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.config import AXES
from shardiff_parallel.plan import apply_plan
from shardiff_parallel.sharding import split_sizes

from engine.runtime.distributed import agree
from engine.runtime.stop import Stopped


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
    # is not one of the ranks, engine/validation.check_requests).
    return fam.layout(engine.parallel.world_size, engine.config, guided)


def use_layout(engine, parallel: ParallelConfig) -> None:
    """Move `engine`'s plan onto the mesh of `parallel` (same processes).

    Collective when that mesh is new (new_group), so every rank calls this with the same layout: the
    caller agreed on the requests first, and the layout is a pure function of them.
    """
    if parallel == engine.parallel:
        return
    engine.plan.remove()
    for plan in engine.controlnet_plans:
        plan.remove()
    mesh = engine.meshes.get(parallel)
    if mesh is None:
        mesh = Mesh.build(parallel, engine.device, timeout=timedelta(seconds=engine.config.timeout_s))
        engine.meshes[parallel] = mesh
    engine.parallel, engine.mesh = parallel, mesh
    engine.attention = ParallelAttention(mesh, engine.config.attention_backend)
    engine.plan = apply_plan(engine.denoiser, engine.family.pipeline_plan, mesh, engine.attention)
    engine.controlnet_plans = engine.apply_controlnet_plans(mesh)
    engine.capture_graphs()
    engine.install_vae_split()
    engine.pipe.set_progress_bar_config(disable=not mesh.is_first, leave=False)


def generate_batch(engine, requests: list, *, output_type: str = "pil", on_step=None) -> list | None:
    """Results of `requests` in order on the first rank (None on the others); see the module doc.

    `on_step`: called after every denoising step (engine/runtime/stop.py); when it stops one dp slice,
    every slice stops before the gather (each slice agrees on its own steps; the slices then agree here).
    """
    requests = list(requests)
    error, layout, records = None, engine.parallel, [None] * len(requests)
    try:
        layout, why = choose_layout(engine, requests)
        records = [engine.check_request(r, layout).records for r in requests]
    except ValueError as e:
        error = str(e)
    # One collective for the whole batch: every rank's verdict, and the same requests (and input
    # images, by their pixel hashes) everywhere.
    agree("requests", [{**r.to_dict(), "inputs": rec} for r, rec in zip(requests, records)], error)
    use_layout(engine, layout)
    mesh = engine.mesh
    sizes = split_sizes(len(requests), mesh.size("dp"))
    start = sum(sizes[: mesh.coord("dp")])
    local, stopped = [], None
    try:
        for i in range(start, start + sizes[mesh.coord("dp")]):
            result = engine.generate(requests[i], output_type=output_type, agreed=True, on_step=on_step)
            result.params.update(index=i, layout_reason=why)
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
