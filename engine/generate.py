"""`python -m engine.generate` / `torchrun --nproc-per-node N -m engine.generate`: one image, N processes.

Degrees: --ulysses × --ring must equal the number of processes. When neither is given, Ulysses takes
the largest share of the ranks that divides the model's heads and Ring the rest (all ranks used).
"""

from __future__ import annotations

import argparse
import sys

from . import batch_cli
from .cli_flags import Flag, add_flags, complete, values
from .config import ENGINE_FLAGS, EngineConfig
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
        epilog="Every flag, with its default: docs/CLI.md (python -m engine.cli_doc).",
    )
    add_flags(p, flags())
    return p


def flags() -> tuple[Flag, ...]:
    """Every flag of engine.generate, in --help order: what to draw, then how the engine runs."""
    return (*batch_cli.flags(), *engine_flags())


def engine_flags() -> tuple[Flag, ...]:
    """EngineConfig's flags, completed from its fields (shared with `python -m engine.serve`)."""
    return complete(EngineConfig, ENGINE_FLAGS)


def engine_config(args) -> EngineConfig:
    """The EngineConfig of parsed arguments (ValueError on a bad value)."""
    return EngineConfig(**values(args, engine_flags()))


def main(argv: list[str] | None = None) -> None:
    # Imports after parsing so that --help is instant.
    args = build_parser().parse_args(argv)
    from .driver import Engine
    from .image_io import resolve_output_path, save_png

    try:
        config = engine_config(args)
        # One request per image, image i seeded with --seed + i (engine/batch_cli.py).
        requests = batch_cli.requests_from_args(args, config.model)
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
              f"{engine.device.type}; {engine.describe_vae(batch)}{engine.describe_fast_path()}", file=sys.stderr, flush=True)
        for note in [*engine.lora_notes, engine.processor_note]:
            if note:
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
