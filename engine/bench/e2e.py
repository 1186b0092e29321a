"""`torchrun --nproc-per-node N -m engine.bench.e2e --layout u4:compile`: end-to-end seconds per image.

What a user of the Python API sees: the engine is built once (load + parallelize + compile set up),
then each request runs text encoding, the denoising loop and the VAE decode to a PIL image. Reported
separately: the build, the first (cold) request — which compiles — and the median of the warm ones, each
split into its phases (engine/bench/phases.py), and per rank the weights each component holds and each
phase's peak memory.
One layout per launch (the engine holds one layout's processes); layout names as in engine.bench.

    torchrun --nproc-per-node 4 -m engine.bench.e2e --model flux-dev --size 1024 --steps 28 --layout u4:compile

`--text-encoders replicated|first|sharded|auto` places the text encoders (engine/text_encoders); each
rank's line then shows what it holds of them, beside the layout's own choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.config import EngineConfig, GenerateRequest
from engine.runtime.distributed import run_main

from engine.text_encoders.names import PLACEMENTS

from .layouts import parse_layout
from .phases import PHASES, PhaseTimer, weight_gib


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.bench.e2e", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev", help="preset name or diffusers directory")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--layout", default="1", help="one of our layouts (engine.bench names), e.g. u4:compile")
    p.add_argument("--text-encoders", default="auto", choices=PLACEMENTS,
                   help="where the text encoders live (engine/text_encoders/placement.py)")
    p.add_argument("--repeats", type=int, default=3, help="warm requests after the cold one")
    p.add_argument("--prompt", default="a red fox in the snow, photograph")
    p.add_argument("--vae-parallel", choices=("auto", "on", "off"), default="auto",
                   help="split the VAE decode by rows over the ranks of the image (engine/vae_parallel.py)")
    p.add_argument("--json", default=None, help="append the record to this file (first rank)")
    return p.parse_args(argv)


def _gather(mine: dict) -> list[dict]:
    """Every rank's record, in rank order (on every rank)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def main(argv=None) -> None:
    args = parse_args(argv)
    layout = parse_layout(args.layout)
    if layout.system != "shardiff":
        raise ValueError(f"--layout {args.layout!r}: end-to-end timing runs our layouts (':compile', ':graphs', ':fp8', "
                         "':qkv8', ':fb', ':ts' allowed)")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    from engine import Engine

    start = time.perf_counter()
    engine = Engine(EngineConfig(model=args.model, compile=layout.compile, cuda_graphs=layout.graphs,
                                 vae_parallel=args.vae_parallel, text_encoders=args.text_encoders,
                                 quantize=layout.quantize, quantize_qkv=layout.quantize_qkv, cache=layout.cache),
                    parallel=layout.config)
    build_s = time.perf_counter() - start
    request = GenerateRequest(prompt=args.prompt, height=args.size, width=args.size, steps=args.steps, seed=0)
    timer = PhaseTimer(engine.pipe, engine.device)
    results, phases = [], []
    for _ in range(1 + args.repeats):
        timer.start()
        results.append(engine.generate(request))
        phases.append(timer.finish())
    timer.remove()
    warm = phases[1:]
    weights = weight_gib(engine.pipe)
    text_gib = round(sum(v for k, v in weights.items() if k in engine.text_encoders.plan.classes), 3)
    per_rank = _gather({"weights_gib": weights, "text_encoders_gib": text_gib, "phase_peak_gib": warm[-1]["peak_gib"],
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if engine.device.type == "cuda" else 0.0})
    runs = [r.seconds for r in results]
    record = dict(
        model=args.model, size=args.size, steps=args.steps, layout=args.layout,
        text_encoders=engine.text_encoders.plan.placement, text_encoders_asked=args.text_encoders,
        text_encoders_layout=engine.text_encoders.plan.describe(),
        ranks=layout.config.world_size, device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
        build_s=round(build_s, 2), first_s=round(runs[0], 3), warm_s=round(statistics.median(runs[1:]), 3),
        warm_runs_s=[round(r, 3) for r in runs[1:]],
        # Median over the warm requests of each phase's seconds.
        warm_phase_s={p: round(statistics.median(ph["seconds"][p] for ph in warm), 3) for p in PHASES},
        first_phase_s=phases[0]["seconds"], per_rank=per_rank,
        vae_parallel=args.vae_parallel, vae_split=results[-1].params.get("vae_split"),
        quantize=results[-1].params["quantize"], quantize_qkv=results[-1].params["quantize_qkv"],
        cache=results[-1].params["cache"],
    )
    if engine.is_first:
        print(json.dumps(record), flush=True)
        ph = record["warm_phase_s"]
        print(f"{args.model} {args.size}² {args.steps} steps, layout {args.layout}: build {build_s:.1f} s, "
              f"first request {runs[0]:.2f} s, warm {record['warm_s']:.2f} s = text {ph['text']:.3f} + denoise "
              f"{ph['denoise']:.3f} + VAE {ph['vae']:.3f}")
        print(f"  {record['text_encoders_layout']}")
        if record["cache"] is not None:
            print(f"  cache {record['cache']}")
        for rank, r in enumerate(per_rank):
            print(f"  rank {rank}: text encoders {r['text_encoders_gib']} GiB, weights {r['weights_gib']} GiB, phase peaks {r['phase_peak_gib']}, peak {r['peak_gib']} GiB")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
    engine.close()


if __name__ == "__main__":
    run_main(main)
