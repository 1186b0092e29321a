"""`torchrun --nproc-per-node N -m engine.bench.batch`: throughput of a batch of images through the Engine.

The figure engine.bench cannot give: N images spread over the data-parallel ranks (or one image
CFG-split), end to end through `Engine.generate_batch` — text encoders, UNet, scheduler, gather to
rank 0 — on a preset's real architecture with random weights. One launch per GPU count; the 1-GPU
run saves its latents, the N-GPU run compares against them (relative L2 per image, the max reported):

    torchrun --nproc-per-node 1 -m engine.bench.batch --model sdxl --size 1024 --images 8 --save-latents /tmp/sdxl-1.pt
    torchrun --nproc-per-node 4 -m engine.bench.batch --model sdxl --size 1024 --images 8 --reference /tmp/sdxl-1.pt

Protocol: a warm-up batch (same image count and layout, 2 steps), then `--repeats` timed batches, the
median reported. Latent output (no VAE decode) unless --decode. `step_ms` is wall time / (images per
dp rank) / steps: the time one denoising step costs on each rank, to set against the 1-GPU figure
divided by the number of GPUs (data parallel) or by 2 (CFG split) — the floor.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench.batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdxl", help="preset name or diffusers directory")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--parallel", default="auto", choices=("auto", "cfg", "dp"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--decode", action="store_true", help="include the VAE decode (PIL output)")
    p.add_argument("--save-latents", default=None, help="rank 0 saves every image's latents here")
    p.add_argument("--reference", default=None, help="latents saved by another run: report rel L2 against them")
    p.add_argument("--json", default=None, help="also append the record to this file (rank 0)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from engine import Engine, EngineConfig, GenerateRequest

    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, parallel=args.parallel))
    requests = [GenerateRequest(prompt=f"a photo of object number {i}", height=args.size, width=args.size,
                                steps=args.steps, guidance=args.guidance, seed=i) for i in range(args.images)]
    output_type = "pil" if args.decode else "latent"
    layout, why = engine.choose_layout(requests)
    warm = [GenerateRequest(**{**r.to_dict(), "steps": 2}) for r in requests]
    engine.generate_batch(warm, output_type=output_type)
    engine.pipe.set_progress_bar_config(disable=True)  # after the warm-up's layout switch, which resets it
    times, results = [], None
    for _ in range(args.repeats):
        _barrier(engine)
        start = time.perf_counter()
        results = engine.generate_batch(requests, output_type=output_type)
        _barrier(engine)
        times.append(time.perf_counter() - start)
    if not engine.is_first:
        engine.close()
        return
    wall = statistics.median(times)
    per_rank = math.ceil(args.images / layout.dp)
    record = {
        "model": args.model, "size": args.size, "steps": args.steps, "guidance": args.guidance,
        "images": args.images, "ranks": layout.world_size, "layout": layout.describe(), "why": why,
        "dtype": str(engine.dtype).removeprefix("torch."), "decode": args.decode,
        "wall_s": round(wall, 3), "runs_s": [round(t, 3) for t in times],
        "images_per_s": round(args.images / wall, 3), "step_ms": round(wall / per_rank / args.steps * 1e3, 2),
        "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
    }
    if not args.decode:
        latents = [r.latents.float() for r in results]
        if args.save_latents:
            torch.save(latents, args.save_latents)
        if args.reference:
            ref = torch.load(args.reference)
            rel = [((a - b).norm() / b.norm()).item() for a, b in zip(latents, ref, strict=True)]
            record["rel_l2_vs_reference_max"] = max(rel)
    print(json.dumps(record, ensure_ascii=False), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    engine.close()


def _barrier(engine) -> None:
    import torch.distributed as dist

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    from engine.runtime.distributed import run_main

    run_main(lambda: main())
