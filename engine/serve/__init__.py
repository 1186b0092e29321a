"""Serving one split model to a backend: a controller process, its workers, HTTP, Python clients.

    python -m engine.serve --model flux-dev --gpus 4 --ulysses 4 --compile --port 8000

    from engine import EngineConfig, GenerateRequest, serve
    with serve.start(EngineConfig(model="flux-dev", compile=True), gpus=4) as client:
        result = client.generate(GenerateRequest(prompt="a red fox", seed=7))   # thread-safe; agenerate too

The package, one job per file: `supervisor.py` (the worker processes: spawn, watch, heartbeats,
restart), `worker.py` (one rank's loop over the engine's SPMD API), `protocol.py` (their messages),
`encode.py` (image files made on the first rank), `preview.py` (partial images at agreed steps),
`controller.py` (checks, limits, queue, deadlines, cancels, warm-up, failures), `group.py` (one model
group of --replicas), `dispatch.py` (which request runs next, where), `admission.py` (the bounded FIFO), `metrics.py` (Prometheus), `api.py` (the HTTP bodies), `forms.py` (edits' multipart
forms), `guard.py` (Host, API key, body type and size), `stream.py` (server-sent events), `errors.py`
(what an error body may say), `app.py` (the routes), `client.py` (Python clients), `runner.py` (event
loop, signals, shutdown), `cli.py` (`python -m engine.serve`), `ray.py` (a Ray Serve deployment of
groups over several nodes). docs/SERVING.md.
"""

from __future__ import annotations

from .controller import (
    BadRequest, Cancelled, Conflict, DeadlineExceeded, Forbidden, NotFound, PayloadTooLarge, ServeError,
    TooManyRequests, Unauthorized, Unavailable, UnsupportedMediaType, WorkerFailure,
)
from .options import ServeOptions

__all__ = [
    "BadRequest", "Cancelled", "Conflict", "DeadlineExceeded", "Forbidden", "NotFound", "PayloadTooLarge", "ServeError",
    "ServeOptions", "TooManyRequests", "Unauthorized", "Unavailable", "UnsupportedMediaType", "WorkerFailure",
    "connect", "on_device", "setup", "start", "world_size",
]


def world_size(*, gpus: int | None = None, procs: int | None = None) -> tuple[int, int, str]:
    """(ranks, torch threads per rank, note): `gpus` / `procs` checked against the machine as the launcher
    does (default: every visible GPU; on a machine without CUDA, --procs is needed). `note`: one line when
    --procs asks for more ranks than there are GPUs, which then run as CPU processes (see `on_device`)."""
    from launch import topology
    from launch.cli import resolve_procs

    if gpus is not None and procs is not None:
        raise ValueError("give gpus or procs, not both")
    visible = topology.visible_gpus()
    if gpus is not None and not visible:
        raise ValueError(f"--gpus {gpus}: no CUDA GPU is visible; use --procs {gpus} for CPU processes (gloo)")
    ranks = resolve_procs(gpus, procs, visible)
    return ranks.n, max(1, topology.usable_cpus() // ranks.n), ranks.note


def on_device(config, note: str):
    """`config` for ranks that run as CPU processes on a machine with GPUs (`note` from world_size: the
    engine then takes the CPU, not the fewer GPUs); as it is otherwise."""
    import dataclasses
    import sys

    if not note:
        return config
    if config.device not in (None, "cpu"):
        raise ValueError(f"{note}, but --device {config.device} asks for the GPU")
    print(f"shardiff serve: {note}", file=sys.stderr, flush=True)
    return dataclasses.replace(config, device="cpu")


def setup(config, *, gpus: int | None = None, procs: int | None = None, **options):
    """(EngineConfig, ServeOptions) of a server: the ranks checked against the machine and split into
    `replicas` groups; `--lora NAME=PATH[:SCALE]` values taken out of config.loras as named adapters
    (the plain ones stay, fused for every request); ValueError, one line."""
    import dataclasses

    from engine.lora import split_adapters

    world, threads, note = world_size(gpus=gpus, procs=procs)
    replicas = options.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"--replicas must be a positive integer, got {replicas!r}")
    if world % replicas:
        raise ValueError(f"--replicas {replicas} does not divide the {world} ranks: each group has as many "
                         f"(--gpus / --procs a multiple of {replicas})")
    plain, named = split_adapters(config.loras)
    config = dataclasses.replace(on_device(config, note), loras=plain)
    options.setdefault("threads", threads)
    options["adapters"] = (*named, *options.get("adapters", ()))
    return config, ServeOptions(world_size=world // replicas, **options)


def start(config=None, *, gpus: int | None = None, procs: int | None = None, port: int | None = None,
          host: str = "127.0.0.1", ready_timeout: float | None = None, **options):
    """Start a server in this process (the controller on a background thread, one worker process per
    GPU) and return its thread-safe Client once the model is ready (every group: `replicas=R` splits the
    ranks into R groups); closing the client (or leaving its `with` block) shuts the server down. `port`:
    also serve HTTP there (0: a free port, `client.url`). `options`: ServeOptions fields (replicas,
    max_queue, request_timeout_s, warmup_sizes, adapters, …)."""
    from engine.config import EngineConfig

    from .client import Client
    from .controller import Controller
    from .runner import Background

    controller = Controller(*setup(config or EngineConfig(), gpus=gpus, procs=procs, **options))
    client = Client(Background(controller, host, port))
    try:
        client.wait_ready(ready_timeout)
    except BaseException:
        client.close()
        raise
    return client


def connect(url: str, *, timeout: float = 900.0, api_key: str | None = None):
    """A client of a server running elsewhere (`python -m engine.serve`), over HTTP (`api_key`: the
    server's --api-key, sent as `Authorization: Bearer`)."""
    from .client import HTTPClient

    return HTTPClient(url, timeout=timeout, api_key=api_key)
