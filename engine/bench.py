"""`torchrun --nproc-per-node N -m engine.bench`: per-step latency, peak memory and fidelity per layout.

Protocol (the anchors' in ../shared/ANCHORS.md): the model's real architecture with random weights,
random prompt embeddings of the real length (no text encoders), latent output (no VAE), N steps;
per-step latency = pipeline time / steps, median over repeats after warm-up. Several layouts run in
ONE launch, side by side on the same weights, latents and embeddings: a layout of n ranks uses ranks
0..n-1 while the others wait, and rank 0 compares each layout's latents with the first layout's
(normally the 1-GPU run) by relative L2.

    torchrun --nproc-per-node 4 -m engine.bench --model flux-dev --sizes 1024,2048 --steps 8 \
        --layouts 1,u2,u4,r4,u2r2
    torchrun --nproc-per-node 4 -m engine.bench --model flux-dev --ulysses 2 --ring 2

Layout names: `1` (our engine, one rank), `uU`, `rR`, `uUrR`, and `diffusers` (plain diffusers on one
rank, its default attention) as a baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel import Mesh, ParallelAttention, ParallelConfig
from parallel.plan import apply_plan

from .distributed import init_distributed, pick_device, run_main
from .models import family


def parse_layout(name: str) -> ParallelConfig | None:
    """'u2r2' → ulysses 2 × ring 2; '1' → one rank; 'diffusers' → None (baseline)."""
    if name == "diffusers":
        return None
    if name == "1":
        return ParallelConfig()
    m = re.fullmatch(r"(?:u(\d+))?(?:r(\d+))?", name)
    if not m or not any(m.groups()):
        raise ValueError(f"unknown layout {name!r}: use 1, diffusers, uU, rR or uUrR (e.g. u2r2)")
    return ParallelConfig(ulysses=int(m.group(1) or 1), ring=int(m.group(2) or 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-dev", help="preset name (random weights, real config)")
    p.add_argument("--sizes", default="1024", help="comma-separated square sizes, or HxW entries")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layouts", default=None, help="comma-separated layouts to run side by side (see above)")
    p.add_argument("--ulysses", type=int, default=None)
    p.add_argument("--ring", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--json", default=None, help="also write all results to this file (rank 0)")
    return p


def _sizes(spec: str) -> list[tuple[int, int]]:
    out = []
    for s in spec.split(","):
        h, _, w = s.partition("x")
        out.append((int(h), int(w or h)))
    return out


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from .config import EngineConfig
    from .model_info import inspect_model
    from .presets import build_pipeline

    if args.layouts:
        layouts = args.layouts.split(",")
    else:
        layouts = [f"u{args.ulysses or 1}r{args.ring or 1}"]
    configs = {name: parse_layout(name) for name in layouts}
    device = pick_device(None)
    env = init_distributed(device, timedelta(minutes=10))
    info = inspect_model(args.model)
    fam = family(info.family)
    for name, cfg in configs.items():
        if cfg is not None:
            if cfg.world_size > env.world_size:
                raise ValueError(f"layout {name} needs {cfg.world_size} ranks, {env.world_size} launched")
            cfg.check_heads(info.num_heads)
    dtype = EngineConfig(dtype=args.dtype).torch_dtype(device)
    pipe = build_pipeline(args.model, dtype=dtype, device=device, with_text_encoders=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(1234)
    prompt_embeds = torch.randn(1, args.text_tokens, info.joint_attention_dim, generator=gen).to(device, dtype)
    pooled = torch.randn(1, info.pooled_projection_dim, generator=gen).to(device, dtype)

    # Every rank builds every mesh (new_group is collective over the world), in the same order.
    meshes = {
        name: Mesh.build(cfg, device, ranks=list(range(cfg.world_size))) if cfg is not None else None
        for name, cfg in configs.items()
    }
    reference: dict = {}
    results = []
    for height, width in _sizes(args.sizes):
        for name, cfg in configs.items():
            world = 1 if cfg is None else cfg.world_size
            member = env.rank < world
            record = None
            if member:
                record = _run_layout(
                    pipe, name, cfg, meshes[name], args, height, width, prompt_embeds, pooled, device, fam.plan
                )
            peaks = [None] * env.world_size
            if dist.is_initialized():
                dist.all_gather_object(peaks, record["peak_gib"] if record else None)
            else:
                peaks = [record["peak_gib"]]
            if env.rank == 0:
                latents = record.pop("latents")
                ref = reference.setdefault((height, width), latents)
                rel = ((latents.float() - ref.float()).norm() / ref.float().norm()).item()
                record.update(peak_gib_per_rank=[p for p in peaks if p is not None], rel_l2_vs_first=rel)
                del record["peak_gib"]
                results.append(record)
                print(json.dumps(record), flush=True)
    if env.rank == 0:
        _print_table(results, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


def _run_layout(pipe, name, cfg, mesh, args, height, width, prompt_embeds, pooled, device, plan) -> dict:
    applied = None
    kernel = "diffusers-default"
    if cfg is not None:
        attention = ParallelAttention(mesh, args.attention_backend)
        applied = apply_plan(pipe.transformer, plan, mesh, attention)
        kernel = attention.kernel_for(device, prompt_embeds.dtype).name
    group = None if mesh is None else mesh.group("sp")

    def once():
        return pipe(
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=height, width=width,
            num_inference_steps=args.steps, guidance_scale=3.5, max_sequence_length=args.text_tokens,
            generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
        ).images

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.repeats):
        _barrier(group, device)
        start = time.perf_counter()
        latents = once()
        _barrier(group, device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if applied is not None:
        applied.remove()
    per_step = statistics.median(times) / args.steps
    return {
        "model": args.model, "height": height, "width": width, "layout": name,
        "ranks": 1 if cfg is None else cfg.world_size, "steps": args.steps,
        "per_step_ms": round(per_step * 1e3, 2), "runs_ms": [round(t / args.steps * 1e3, 2) for t in times],
        "kernel": kernel, "dtype": str(prompt_embeds.dtype).removeprefix("torch."), "peak_gib": round(peak, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "latents": latents.detach().cpu(),
    }


def _barrier(group, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if group is not None:
        dist.barrier(group=group)


def _print_table(results: list[dict], device) -> None:
    print(f"\n{'size':>10} {'layout':>10} {'ranks':>5} {'ms/step':>9} {'rel L2':>9} {'peak GiB (max rank)':>20}  kernel")
    for r in results:
        print(f"{r['height']}x{r['width']:<5} {r['layout']:>10} {r['ranks']:>5} {r['per_step_ms']:>9.2f} "
              f"{r['rel_l2_vs_first']:>9.2e} {max(r['peak_gib_per_rank']):>20.2f}  {r['kernel']}")
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(lambda: main())
