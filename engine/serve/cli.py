"""`python -m engine.serve`: one model split over N GPUs (or N CPU processes), behind HTTP.

    python -m engine.serve --model flux-dev --gpus 4 --ulysses 4 --compile --port 8000
    python -m engine.serve --model shapes --procs 2 --port 8000

The model and layout flags are the CLI's (engine/generate.py add_engine_arguments); the rest are the
server's. Run it as a plain process, not under torchrun: it starts its own workers.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.batch_cli import positive_int
from engine.generate import add_engine_arguments, engine_config
from engine.limits import DEFAULT_MAX_PROMPT_CHARS, DEFAULT_MAX_STEPS, Limits

API_KEY_ENV = "SHARDIFF_API_KEY"


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"1024x1024,768x1344" → ((1024, 1024), (768, 1344)); "none" → ()."""
    if text.strip().lower() in ("none", ""):
        return ()
    out = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise argparse.ArgumentTypeError(f"sizes are WIDTHxHEIGHT separated by commas, got {part!r}")
        out.append((int(w), int(h)))
    return tuple(out)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.serve",
        description="Serve one model split over several GPUs (or CPU processes): OpenAI-style HTTP API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    n = p.add_mutually_exclusive_group()
    n.add_argument("--gpus", type=positive_int, default=None, help="ranks, one per GPU (default: every visible GPU)")
    n.add_argument("--procs", type=positive_int, default=None, help="ranks on a machine without CUDA (gloo)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed)")
    p.add_argument("--max-queue", type=_count, default=16, help="requests that may wait; more get 429")
    p.add_argument("--request-timeout", type=_positive_float, default=300.0,
                   help="seconds from admission after which a request gets 504 and is stopped")
    p.add_argument("--warmup-sizes", type=_sizes, default=None,
                   help="WxH[,WxH…] to generate once before /health turns 200, or none "
                        "(default: the model's default size with --compile / --cuda-graphs, else none)")
    p.add_argument("--max-restarts", type=_count, default=3,
                   help="restarts of the model group in a row without a completed request before the server exits")
    p.add_argument("--restart-backoff", type=_positive_float, default=1.0,
                   help="seconds before the first restart; doubled at each further failure in a row")
    p.add_argument("--stop-grace", type=_positive_float, default=60.0,
                   help="seconds a cancelled request may take to stop before its group is restarted")
    p.add_argument("--drain-timeout", type=_positive_float, default=30.0,
                   help="on SIGTERM / SIGINT, seconds the running request may take to finish before it is stopped")
    p.add_argument("--max-images", type=positive_int, default=8, help="largest n of one request")
    p.add_argument("--max-steps", type=positive_int, default=DEFAULT_MAX_STEPS,
                   help="most denoising steps of one image; more: 400")
    p.add_argument("--max-prompt-chars", type=positive_int, default=DEFAULT_MAX_PROMPT_CHARS,
                   help="longest prompt (and negative prompt), in characters; longer: 400")
    p.add_argument("--max-body-mb", type=_positive_float, default=64.0,
                   help="largest request body in MiB (input images travel in it); larger: 413, unread")
    p.add_argument("--max-input-pixels", type=positive_int, default=4096 * 4096,
                   help="largest input image (width × height); larger: 400 before its pixels are decoded")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every route but /health (or set {API_KEY_ENV}; "
                        "the flag shows in the process list, the variable does not)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let browsers on ORIGIN (https://app.example.com, or *) call the API; repeatable "
                        "(default: none)")
    p.add_argument("--heartbeat-timeout", type=_positive_float, default=20.0,
                   help="seconds a rank may send nothing (not even its heartbeat, every 1 s) while serving before "
                        "it is declared hung and the group restarted")
    add_engine_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        print("shardiff serve: error: run `python -m engine.serve` as one plain process, not under torchrun: "
              "it starts one worker per GPU itself", file=sys.stderr)
        return 2
    from . import ServeOptions, world_size
    from .controller import Controller
    from .runner import bind, run_foreground

    try:
        config = engine_config(args)
        world, threads = world_size(gpus=args.gpus, procs=args.procs)
        options = ServeOptions(
            world_size=world, threads=threads, max_queue=args.max_queue, request_timeout_s=args.request_timeout,
            warmup_sizes=args.warmup_sizes, max_restarts=args.max_restarts, restart_backoff_s=args.restart_backoff,
            stop_grace_s=args.stop_grace, drain_timeout_s=args.drain_timeout, max_images=args.max_images,
            limits=Limits(max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars),
            max_body_bytes=int(args.max_body_mb * 2**20), max_input_pixels=args.max_input_pixels,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, cors_origins=tuple(args.cors_origin),
            heartbeat_timeout_s=args.heartbeat_timeout,
        )
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
