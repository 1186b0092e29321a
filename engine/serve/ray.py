"""A Ray Serve deployment of the server: one Ray Serve replica = one model group on one node.

    ray start --head                                                        # or an existing cluster
    python -m engine.serve.ray --model flux-dev --gpus-per-replica 4 --ulysses 4 --replicas 2 --port 8000

Each replica is what `python -m engine.serve` runs with one group: a Controller (engine/serve/controller.py)
on the replica's event loop, its supervisor and its ranks (spawned processes on the replica's node, on
the GPUs Ray reserved for it: `ray_actor_options={"num_gpus": N}`, or `num_cpus` for CPU ranks). The
HTTP API is ours — the same routes and answers (engine/serve/app.py), through Ray Serve's FastAPI
ingress. Ray places the replicas across the nodes, routes each request to one (the one with the
shortest queue of two it samples), health-checks them through `check_health` and replaces one that
dies. Inside a replica our supervisor still restarts the group when a rank dies; a replica whose
controller dies (its process) is replaced by Ray, its ranks dying with it (their parent-death signal).

`check_health` fails only when the controller gave up (the group past its restarts, a configuration
mistake) or stops: a group being restarted by its supervisor is left to it. A request's id is Ray's
(its X-Request-Id) unless the request names its own `request_id`. Every route is per replica:
`/health` and `/metrics` answer for the replica that gets them, a cancel by id (DELETE) reaches one
replica (a client that closes its connection cancels its request wherever it runs). docs/SERVING.md.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli_flags import SERVER, Flag, add_flags, complete, positive_int, values
from engine.generate import engine_config, engine_flags

from .options import OPTION_FLAGS, ServeOptions

APP_NAME = "shardiff"
ROUTE_ROOM = 8
"""Requests a replica takes besides its queue and the running one: /health, /metrics, cancels."""

RAY_FLAGS = (
    Flag("gpus_per_replica", SERVER, type=positive_int, default=None, mutex="ranks",
         help="ranks of each replica's group, one GPU each (reserved through Ray: num_gpus)"),
    Flag("procs_per_replica", SERVER, type=positive_int, default=None, mutex="ranks",
         help="ranks of each replica's group as CPU processes (gloo; reserved through Ray: num_cpus)"),
    Flag("replicas", SERVER, type=positive_int, default=1, help="Ray Serve replicas, one model group each"),
    Flag("address", SERVER, default=None, shown="a new local Ray instance",
         help="the Ray cluster to join (ray start --head prints it; auto: the one this node belongs to)"),
    Flag("host", SERVER, default="127.0.0.1", help="address Ray Serve's HTTP proxy listens on (0.0.0.0: every interface)"),
    Flag("port", SERVER, type=int, default=8000, help="port of Ray Serve's HTTP proxy"),
)
"""Flags of engine.serve.ray alone: the replicas' size and count, the cluster, the HTTP proxy."""


def option_flags() -> tuple[Flag, ...]:
    """ServeOptions' flags but --replicas (here: Ray's replicas, one group each)."""
    return complete(ServeOptions, tuple(f for f in OPTION_FLAGS if f.dest != "replicas"))


def flags() -> tuple[Flag, ...]:
    return (*RAY_FLAGS, *option_flags(), *engine_flags())


class Replica:
    """One Ray Serve replica: a controller and its one model group (ingress: engine/serve/app.py)."""

    async def __init__(self, config, options: ServeOptions, host: str = "127.0.0.1"):
        from .controller import Controller

        self.host = host
        self.controller = Controller(config, options)
        await self.controller.start()
        # Ray routes to a replica once its constructor returns: only when the model is loaded and warm.
        await self.controller.wait_ready()

    def __serve_build_asgi_app__(self):
        from .app import build_app

        return build_app(self.controller, host=self.host, proxy_ids=True)

    async def check_health(self) -> None:
        """Ray's health check: fails when the controller gave up or stops (Ray then replaces the replica)."""
        controller = self.controller
        if controller.state != "serving":
            raise RuntimeError(f"shardiff: the server {controller.state}: {controller.failure or 'shutting down'}")

    async def __del__(self):
        await self.controller.close()


def deployment(config, options: ServeOptions, *, replicas: int, gpus: int | None = None, cpus: int | None = None,
               host: str = "127.0.0.1"):
    """The bound Ray Serve application: `replicas` replicas, each one group of options.world_size ranks
    on `gpus` GPUs (or, CPU ranks, `cpus` CPUs) of one node. `serve.run(...)` it."""
    from ray import serve

    actor = {"num_gpus": gpus, "num_cpus": 1} if gpus else {"num_cpus": cpus or options.world_size}
    ingress = serve.ingress()(Replica)
    return serve.deployment(
        ingress, name=APP_NAME, num_replicas=replicas, ray_actor_options=actor,
        max_ongoing_requests=options.max_queue + 1 + ROUTE_ROOM,
        health_check_period_s=5.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=options.drain_timeout_s + 15.0,
    ).bind(config, options, host)


def replica_setup(config, *, gpus_per_replica: int | None, procs_per_replica: int | None, **options):
    """(EngineConfig, ServeOptions) of one replica's group: named adapters split from config.loras as
    `serve.setup` does; ValueError."""
    import dataclasses

    from engine.lora import split_adapters

    if (gpus_per_replica is None) == (procs_per_replica is None):
        raise ValueError("give --gpus-per-replica N (GPU ranks) or --procs-per-replica N (CPU ranks)")
    ranks = gpus_per_replica or procs_per_replica
    plain, named = split_adapters(config.loras)
    config = dataclasses.replace(config, loras=plain, device="cpu" if procs_per_replica else config.device)
    options.setdefault("threads", 1)
    options["adapters"] = (*named, *options.get("adapters", ()))
    return config, ServeOptions(world_size=ranks, **options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.serve.ray", allow_abbrev=False,
                                description="Serve one model on a Ray cluster: Ray Serve replicas, one model group each.",
                                epilog="Every flag, with its default: docs/CLI.md (python -m engine.cli_doc).")
    add_flags(p, flags())
    args = p.parse_args(argv)
    try:
        config, options = replica_setup(engine_config(args), gpus_per_replica=args.gpus_per_replica,
                                        procs_per_replica=args.procs_per_replica, **values(args, option_flags()))
        from .controller import Controller

        Controller(config, options)  # the same checks as engine.serve, before Ray starts anything
    except ValueError as e:
        print(f"shardiff serve.ray: error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    ray.init(address=args.address, log_to_driver=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployment(config, options, replicas=args.replicas, gpus=args.gpus_per_replica,
                         cpus=args.procs_per_replica, host=args.host), name=APP_NAME, route_prefix="/")
    print(f"shardiff serve.ray: {args.replicas} replica(s) ready on http://{args.host}:{args.port} "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timed wait: Python runs its signal handlers between two
        pass
    print("shardiff serve.ray: shutting down (each replica drains its running request)", file=sys.stderr, flush=True)
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
