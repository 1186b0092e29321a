"""Serving one split model to a backend: a controller process, its workers, HTTP, Python clients.

    python -m engine.serve --model flux-dev --gpus 4 --ulysses 4 --compile --port 8000

    from engine import EngineConfig, GenerateRequest, serve
    with serve.start(EngineConfig(model="flux-dev", compile=True), gpus=4) as client:
        result = client.generate(GenerateRequest(prompt="a red fox", seed=7))   # thread-safe; agenerate too

The package, one job per file: `supervisor.py` (the worker processes: spawn, watch, heartbeats,
restart), `worker.py` (one rank's loop over the engine's SPMD API), `protocol.py` (their messages),
`encode.py` (image files made on the first rank), `preview.py` (partial images at agreed steps),
`controller.py` (checks, limits, queue, deadlines, cancels, warm-up, failures), `admission.py` (the
bounded FIFO), `metrics.py` (Prometheus), `api.py` (the HTTP bodies), `forms.py` (edits' multipart
forms), `guard.py` (Host, API key, body type and size), `stream.py` (server-sent events), `errors.py`
(what an error body may say), `app.py` (the routes), `client.py` (Python clients), `runner.py` (event
loop, signals, shutdown), `cli.py` (`python -m engine.serve`). docs/SERVING.md.
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
    "connect", "on_device", "start", "world_size",
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


def start(config=None, *, gpus: int | None = None, procs: int | None = None, port: int | None = None,
          host: str = "127.0.0.1", ready_timeout: float | None = None, **options):
    """Start a server in this process (the controller on a background thread, one worker process per
    GPU) and return its thread-safe Client once the model is ready; closing the client (or leaving
    its `with` block) shuts the server down. `port`: also serve HTTP there (0: a free port,
    `client.url`). `options`: ServeOptions fields (max_queue, request_timeout_s, warmup_sizes, …)."""
    from engine.config import EngineConfig

    from .client import Client
    from .controller import Controller
    from .runner import Background

    world, threads, note = world_size(gpus=gpus, procs=procs)
    options.setdefault("threads", threads)
    controller = Controller(on_device(config or EngineConfig(), note), ServeOptions(world_size=world, **options))
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
