"""How the server runs (ServeOptions) and its command-line flags, declared once (engine/cli_flags.py).

Import-light: `python -m engine.serve --help` and docs/CLI.md are made from these without the server.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from engine.cli_flags import QUEUE, SERVER, Flag, positive_int
from engine.limits import DEFAULT_MAX_PROMPT_CHARS, DEFAULT_MAX_STEPS, Limits

API_KEY_ENV = "SHARDIFF_API_KEY"
"""Where the API key may come from instead of --api-key (which shows in the process list)."""


def sizes(text: str) -> tuple[tuple[int, int], ...]:
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


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {v}")
    return v


@dataclass(frozen=True)
class ServeOptions:
    world_size: int
    """Ranks of one model group (one per GPU): the server's ranks divided by `replicas`."""
    replicas: int = 1
    """Model groups behind the one queue, each of --gpus / --procs ÷ REPLICAS ranks with its own GPUs,
    rendezvous and supervisor; the layout flags apply to each group. A request runs on a free group."""
    adapters: tuple = ()
    """Named LoRA adapters that a request may choose (`"lora": {"NAME": SCALE}`), as LoraSpecs with their
    names; from `--lora NAME=PATH[:SCALE]` (a plain `--lora PATH[:SCALE]` is fused for every request)."""
    max_passes: int = 4
    """How many times a queued request may be passed over for a younger one whose LoRA adapters a free
    group already holds fused (0: strict arrival order, a switch whenever the next request needs one)."""
    threads: int = 1
    """torch threads per rank (CPU runs)."""
    max_queue: int = 16
    """Requests that may wait (not counting the running one); more are refused with 429."""
    request_timeout_s: float = 300.0
    """Deadline of every request from its admission, in seconds (a request may ask for less); past it: 504,
    and the request is stopped."""
    warmup_sizes: tuple[tuple[int, int], ...] | None = None
    """(width, height) to generate once at before /health turns 200 (WxH[,WxH…] on the command line);
    unset: the model's default size when compiling or CUDA-graphing, nothing otherwise; () / none: never."""
    max_restarts: int = 3
    """Restarts of the model group in a row without a completed request before the server gives up
    (exits non-zero)."""
    restart_backoff_s: float = 1.0
    """Seconds before the first restart; doubled at each further failure in a row (at most 60 s)."""
    stop_grace_s: float = 60.0
    """Seconds a cancelled request may take to stop before its group is restarted."""
    drain_timeout_s: float = 30.0
    """On shutdown (SIGTERM / SIGINT), seconds the running request may take to finish before it is stopped."""
    max_images: int = 8
    """Largest `n` of one request."""
    max_steps: int = DEFAULT_MAX_STEPS
    """Most denoising steps of one image; more: 400 (engine/limits.py)."""
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    """Longest prompt (and negative prompt), in characters; longer: 400."""
    max_body_mb: float = 64.0
    """Largest request body in MiB (input images travel in it); larger: 413, from Content-Length or while
    reading, never read whole."""
    max_input_pixels: int = 4096 * 4096
    """Largest input image (width × height); larger: 400 before its pixels are decoded."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on every route but /health (or set SHARDIFF_API_KEY: the flag
    shows in the process list, the variable does not)."""
    cors_origins: tuple[str, ...] = ()
    """Let browsers on ORIGIN (https://app.example.com, or *) call the API; repeatable. None: no CORS headers."""
    heartbeat_timeout_s: float = 20.0
    """Seconds a rank may send nothing (not even its heartbeat, every 1 s) while serving before it is
    declared hung and the group restarted."""

    def __post_init__(self):
        from engine.lora import parse_adapter

        adapters = []
        for value in self.adapters:
            adapter = parse_adapter(value)
            if adapter is None:
                raise ValueError(f"an adapter is NAME=PATH[:SCALE], got {value!r}")
            adapters.append(adapter)
        if len({a.name for a in adapters}) != len(adapters):
            raise ValueError("an adapter name is given twice")
        object.__setattr__(self, "adapters", tuple(adapters))
        if self.replicas < 1:
            raise ValueError(f"--replicas must be a positive integer, got {self.replicas}")

    @property
    def limits(self) -> Limits:
        """Bounds on one request's work (engine/limits.py)."""
        return Limits(max_steps=self.max_steps, max_prompt_chars=self.max_prompt_chars)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


SERVER_FLAGS = (
    Flag("gpus", SERVER, type=positive_int, default=None, mutex="ranks", shown="every visible GPU",
         help="ranks, one per GPU"),
    Flag("procs", SERVER, type=positive_int, default=None, mutex="ranks",
         help="ranks as CPU processes (gloo): on a machine without CUDA, or with fewer GPUs than ranks"),
    Flag("host", SERVER, default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    Flag("port", SERVER, type=int, default=8000, help="port (0: a free one, printed)"),
)
"""Flags of engine.serve alone: where its ranks run and where it listens."""
OPTION_FLAGS = (
    Flag("replicas", SERVER, type=positive_int),
    Flag("max_passes", QUEUE, type=count),
    Flag("max_queue", QUEUE, type=count),
    Flag("request_timeout_s", QUEUE, name="--request-timeout", type=positive_float),
    Flag("warmup_sizes", QUEUE, type=sizes, metavar="WxH[,WxH…]"),
    Flag("max_restarts", QUEUE, type=count),
    Flag("restart_backoff_s", QUEUE, name="--restart-backoff", type=positive_float),
    Flag("stop_grace_s", QUEUE, name="--stop-grace", type=positive_float),
    Flag("drain_timeout_s", QUEUE, name="--drain-timeout", type=positive_float),
    Flag("max_images", QUEUE, type=positive_int),
    Flag("max_steps", QUEUE, type=positive_int),
    Flag("max_prompt_chars", QUEUE, type=positive_int),
    Flag("max_body_mb", QUEUE, type=positive_float),
    Flag("max_input_pixels", QUEUE, type=positive_int),
    Flag("api_key", SERVER, metavar="KEY"),
    Flag("cors_origins", SERVER, name="--cors-origin", action="append", metavar="ORIGIN"),
    Flag("heartbeat_timeout_s", QUEUE, name="--heartbeat-timeout", type=positive_float),
)
"""ServeOptions' command-line flags: one line each."""
