"""`python -m engine.generate` / `torchrun --nproc-per-node N -m engine.generate`: one image, N processes.

Degrees: --ulysses × --ring must equal the number of processes. When neither is given, Ulysses takes
the largest share of the ranks that divides the model's heads and Ring the rest (all ranks used).
"""

from __future__ import annotations

import argparse
import sys

from shardiff_parallel.config import TP_COMMS

from . import batch_cli
from .batch_cli import DEFAULT_PROMPT, auto_or_positive_int, positive_int
from .config import DEFAULT_MODEL, VAE_PARALLEL, EngineConfig
from engine.text_encoders.names import PLACEMENTS
from engine.runtime.distributed import UserError, agree


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes become a UserError: run_main prints it once (rank 0), not once per rank.

    torchrun gives every rank the same arguments, so every rank finds the same mistake.
    """

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="engine.generate",
        description="Generate one image, split over all launched processes (torchrun) or one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt; give it several times for several images (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance scale (Flux-dev)")
    p.add_argument("--true-cfg-scale", type=float, default=1.0, help="true CFG with --negative-prompt (two passes per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (default: the pipeline's)")
    p.add_argument("--output", default="out/image.png", help="PNG path; missing folders are created")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    add_engine_arguments(p)
    batch_cli.add_arguments(p)
    return p


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """How the model runs (EngineConfig): shared with `python -m engine.serve`."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset name (see `python -m engine.presets list`) or local diffusers directory")
    p.add_argument("--ulysses", type=positive_int, default=None, help="Ulysses degree (default: all ranks sensibly, see --help text)")
    p.add_argument("--ring", type=positive_int, default=None, help="Ring degree")
    p.add_argument("--tp", type=auto_or_positive_int, default=None,
                   help="tensor-parallel degree, or auto (default): 1 unless the weights do not fit one GPU")
    p.add_argument("--tp-comm", choices=TP_COMMS, default="allreduce",
                   help="TP communication: all-reduce; sequence (reduce-scatter / all-gather: each TP rank "
                        "keeps 1/tp of the tokens between TP regions; Flux only); or overlap (sequence, with the "
                        "collectives fused with their matmuls, hidden behind them on CUDA GPUs)")
    p.add_argument("--cfg", type=positive_int, default=1, help="CFG-parallel degree (2: cond/uncond branches on different ranks)")
    p.add_argument("--dp", type=positive_int, default=1, help="data-parallel degree (independent images)")
    p.add_argument("--text-encoders", choices=PLACEMENTS, default="auto",
                   help="where the text encoders live: replicated (every rank), first (one rank per image encodes "
                        "and broadcasts the embeddings; the others never load them), sharded (split over the ranks "
                        "of the image, 1/N of the weights each), auto (replicated where it fits, else sharded)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU; on GPU bf16, fp16 for the SD1.5/SDXL UNets), bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--attention-backend", default="auto", help="auto or a kernel name (sdpa-cudnn, sdpa-flash, sdpa-cpu-flash, math, flash-attn, ...)")
    p.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks (slower first call, faster steps)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each denoiser call as one CUDA graph (CUDA only; use with --compile for the fastest steps)")
    p.add_argument("--vae-parallel", choices=VAE_PARALLEL, default="auto",
                   help="split the VAE decode by rows over the ranks sharing the image (exact): on, off, or auto "
                        "(on for large images)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a stuck collective ends the job")
    p.add_argument("--parallel", default="auto", choices=("auto", "cfg", "dp"),
                   help="UNet models (SD1.5, SDXL): auto = CFG split for one image with guidance, data "
                        "parallel for several; cfg / dp force one")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA (.safetensors, any format diffusers reads) fused into the weights; repeat for several")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="ControlNet directory (config.json + safetensors), split like the model; repeat for several "
                        "(their residuals summed); requests then need --control-image")


def engine_config(args) -> EngineConfig:
    """The EngineConfig of parsed arguments (ValueError on a bad value)."""
    return EngineConfig(
        model=args.model, ulysses=args.ulysses, ring=args.ring, tp=args.tp, cfg=args.cfg, dp=args.dp,
        tp_comm=args.tp_comm, dtype=args.dtype, device=args.device, compile=args.compile,
        cuda_graphs=args.cuda_graphs, vae_parallel=args.vae_parallel, text_encoders=args.text_encoders,
        attention_backend=args.attention_backend, timeout_s=args.timeout, parallel=args.parallel,
        loras=tuple(args.lora), controlnets=tuple(args.controlnet),
    )


def main(argv: list[str] | None = None) -> None:
    # Imports after parsing so that --help is instant.
    args = build_parser().parse_args(argv)
    from .driver import Engine
    from .image_io import resolve_output_path, save_png

    try:
        config = engine_config(args)
        # One request per image, image i seeded with --seed + i (engine/batch_cli.py).
        requests = batch_cli.requests_from_args(args)
    except ValueError as e:
        # Found from the arguments alone, before any collective: the same on every rank (see _Parser).
        raise UserError(str(e)) from None
    engine = Engine(config)
    outputs = batch = error = None
    try:
        if engine.is_first:
            # Only rank 0 writes, so only it checks the output paths: before the denoising loop, so that a
            # refused path costs nothing.
            outputs = [resolve_output_path(o, overwrite=args.overwrite)
                       for o in batch_cli.output_names(args.output, len(requests))]
        # Each request's one check on this rank: the layout chosen for them, their pipelines, input images read.
        batch = engine.check_batch(requests)
    except ValueError as e:
        error = str(e)
    # Every rank's verdict, so that every rank stops with one message (the others would otherwise wait in
    # the next collective and die with "connection reset" tracebacks).
    agree("requests and output", None, error)
    if engine.is_first:
        layout = batch.layout
        pipelines = sorted({c.spec.cls for c in batch.requests})
        print(f"shardiff: {config.model} on {layout.world_size} process(es), layout {layout.describe()} ({batch.why}), "
              f"{engine.text_encoders.plan.describe()}, {', '.join(pipelines)}, {len(requests)} image(s), {engine.dtype}, "
              f"{engine.device.type}; {engine.describe_vae(batch)}", file=sys.stderr, flush=True)
        for note in engine.lora_notes:
            print(f"shardiff: {note}", file=sys.stderr, flush=True)
    results = engine.generate_batch(batch)  # checked above: not again
    if engine.is_first:
        for output, result in zip(outputs, results, strict=True):
            save_png(result.image, output, result.params)
            print(f"shardiff: saved {output} ({result.params['width']}x{result.params['height']}, "
                  f"{result.seconds:.2f} s)", file=sys.stderr, flush=True)
    engine.close()

if __name__ == "__main__":
    from engine.runtime.distributed import run_main

    run_main(lambda: main())
