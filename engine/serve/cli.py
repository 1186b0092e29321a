"""`python -m engine.serve`: one model split over N GPUs (or N CPU processes), behind HTTP.

    python -m engine.serve --model flux-dev --gpus 4 --ulysses 4 --compile --port 8000
    python -m engine.serve --model shapes --procs 2 --port 8000

The model and layout flags are the CLI's (EngineConfig's, engine/config.py); the rest are the server's
(ServeOptions', engine/serve/options.py), all declared once (engine/cli_flags.py; docs/CLI.md). Run it as a plain process, not under torchrun: it starts its own workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from engine.cli_flags import Flag, add_flags, complete, values
from engine.generate import engine_config, engine_flags

from .options import API_KEY_ENV, OPTION_FLAGS, SERVER_FLAGS, ServeOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.serve",
        description="Serve one model split over several GPUs (or CPU processes): OpenAI-style HTTP API.",
        epilog="Every flag, with its default: docs/CLI.md (python -m engine.cli_doc).",
        allow_abbrev=False,
    )
    add_flags(p, flags())
    return p


def flags() -> tuple[Flag, ...]:
    """Every flag of engine.serve, in --help order: the server's, then the engine's (engine.generate's)."""
    return (*SERVER_FLAGS, *option_flags(), *engine_flags())


def option_flags() -> tuple[Flag, ...]:
    return complete(ServeOptions, OPTION_FLAGS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        print("shardiff serve: error: run `python -m engine.serve` as one plain process, not under torchrun: "
              "it starts one worker per GPU itself", file=sys.stderr)
        return 2
    from . import setup
    from .controller import Controller
    from .runner import bind, run_foreground

    try:
        config, options = setup(engine_config(args), gpus=args.gpus, procs=args.procs,
                                **values(args, option_flags()))
        if options.api_key is None and os.environ.get(API_KEY_ENV):
            options = dataclasses.replace(options, api_key=os.environ[API_KEY_ENV])
        controller = Controller(config, options)
    except ValueError as e:
        print(f"shardiff serve: error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as e:  # the port is taken, the address is not ours
        print(f"shardiff serve: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return run_foreground(controller, sock)
