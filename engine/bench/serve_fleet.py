"""`python -m engine.bench.serve`'s fleet measurements: one group against replicas, the Ray Serve path,
and the LoRA switch.

- `--compare-replicas`: HTTP at each concurrency against `python -m engine.serve` with one group of all
  the ranks (`--replicas 1`), then with one group per rank (`--replicas N`): p50 / p99 and images/s.
  A group of N splits each image (its latency is the layout's); N groups run N images at once.
- `--ray`: the Ray Serve deployment (engine/serve/ray.py: one replica of the same ranks, a local Ray
  instance) against engine.serve, HTTP at concurrency 1, requests interleaved one by one between the
  two (each idle while the other works). Ray's proxy and routing per request: the p50 of (client wall
  time − the server's admission → answer) on Ray minus the same on engine.serve — free of the noise
  of the generation itself.
- `--lora-switch RANK`: on the engine itself (torchrun child, every rank), two random adapters of that
  rank on every attention projection of the denoiser (q, k, v, out; the model's full shapes, each rank
  fuses its TP slice), `Engine.set_loras` timed: the first fuse (keeps the host copies), a switch
  between the two (restore + fuse), and back to none.
"""

from __future__ import annotations

import re
import socket
import sys
import tempfile
import time
from pathlib import Path

ATTENTION = re.compile(r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
"""The denoiser's attention projections a LoRA is usually trained on (Flux: the image and text streams)."""


def compare_replicas(args, world: int, levels: list[int]) -> list[dict]:
    from engine import serve

    from .serve import engine_config, load, request, summary

    rows = []
    for replicas in sorted({1, world}):
        print(f"engine.serve --replicas {replicas}: {replicas} group(s) of {world // replicas} rank(s) ...",
              file=sys.stderr, flush=True)
        client = serve.start(engine_config(args), gpus=args.gpus, procs=args.procs, port=0, replicas=replicas,
                             max_queue=max(levels) + 1, request_timeout_s=3600)
        http = serve.connect(client.url, timeout=3600)
        try:
            for _ in range(2):  # every group warm
                load(lambda i: http.generate(request(args, i)), replicas, replicas)
            for c in levels:
                total = args.requests or max(2 * c, 8)
                lat, wall = load(lambda i: http.generate(request(args, i)), c, total)
                rows.append({"server": f"{replicas} x {world // replicas}", "replicas": replicas,
                             "ranks_per_group": world // replicas, "concurrency": c, **summary(lat, wall)})
        finally:
            http.close()
            client.close()
    return rows


def ray_overhead(args, world: int, n: int) -> dict:
    """p50 of HTTP at concurrency 1: engine.serve, Ray Serve, and the difference."""
    import ray
    from ray import serve as ray_serve

    from engine import serve
    from engine.serve.ray import APP_NAME, deployment, replica_setup

    from .serve import engine_config, percentile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpus = args.gpus
    _, threads, _ = serve.world_size(gpus=args.gpus, procs=args.procs)  # the same torch threads per rank in both
    ray.init(num_cpus=max(world, 2), num_gpus=gpus or 0, include_dashboard=False, log_to_driver=False)
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    config, options = replica_setup(engine_config(args), gpus_per_replica=gpus,
                                    procs_per_replica=None if gpus else world, request_timeout_s=3600,
                                    threads=threads)
    ray_serve.run(deployment(config, options, replicas=1, gpus=gpus, cpus=None if gpus else world),
                  name=APP_NAME, route_prefix="/")
    client = serve.start(engine_config(args), gpus=args.gpus, procs=args.procs, port=0, request_timeout_s=3600,
                         threads=threads)
    times: dict[str, list[float]] = {"engine.serve": [], "ray": []}
    outside: dict[str, list[float]] = {"engine.serve": [], "ray": []}
    try:
        import httpx

        urls = {"engine.serve": client.url, "ray": f"http://127.0.0.1:{port}"}
        body = {"prompt": args.prompt, "num_inference_steps": args.steps}
        if args.size:
            body["size"] = f"{args.size}x{args.size}"
        with httpx.Client(timeout=3600) as http:
            for i in range(n + 1):
                for kind, url in urls.items():  # interleaved: the machine's state is the same for both
                    start = time.perf_counter()
                    r = http.post(f"{url}/v1/images/generations", json={**body, "seed": i})
                    wall = time.perf_counter() - start
                    r.raise_for_status()
                    if i:  # the first of each: warm-up
                        times[kind].append(wall)
                        # What the server's own clocks do not see: HTTP, and for Ray its proxy and routing.
                        outside[kind].append(wall - r.json()["timings"]["total_s"])
    finally:
        client.close()
        ray_serve.shutdown()
        ray.shutdown()
    p50 = {k: percentile(v, 50) * 1e3 for k, v in times.items()}
    out = {k: percentile(v, 50) * 1e3 for k, v in outside.items()}
    return {"n": n, "engine.serve_p50_ms": round(p50["engine.serve"], 2), "ray_p50_ms": round(p50["ray"], 2),
            "engine.serve_outside_server_clocks_p50_ms": round(out["engine.serve"], 2),
            "ray_outside_server_clocks_p50_ms": round(out["ray"], 2),
            "ray_overhead_per_request_ms": round(out["ray"] - out["engine.serve"], 2)}


# ------------------------------------------------------------------ the LoRA switch (torchrun child)


def random_adapter(model: str, rank: int, path: Path, seed: int) -> int:
    """A rank-`rank` LoRA on every attention projection of `model`'s denoiser (its full shapes, from the
    config on the meta device), saved as diffusers' keys; the number of layers it touches."""
    import torch
    from safetensors.torch import save_file

    from engine.loading import resolve_model
    from engine.lora import empty_component

    resolved = resolve_model(model)
    name = resolved.family.denoiser
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer, module in empty_component(resolved, name).named_modules():
        if isinstance(module, torch.nn.Linear) and ATTENTION.search(layer):
            state[f"{name}.{layer}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features
            state[f"{name}.{layer}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    assert state, f"no attention projection found in {model}'s {name}"
    save_file(state, str(path))
    return len(state) // 2


def lora_switch(args, engine) -> dict | None:
    """Every rank: time Engine.set_loras on two random adapters; the record on the first rank."""
    import torch
    import torch.distributed as dist

    from .serve import percentile

    def timed(specs) -> float:
        if dist.is_initialized():
            dist.barrier()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        start = time.perf_counter()
        engine.set_loras(specs)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"r{args.lora_switch}-{i}.safetensors" for i in range(2)]
        if engine.is_first:
            layers = [random_adapter(args.model, args.lora_switch, p, i) for i, p in enumerate(paths)][0]
        if dist.is_initialized():  # the files exist on this host for every rank
            dist.barrier()
        a, b = (str(p) for p in paths)
        first = timed([a])
        switches, to_none = [], []
        for _ in range(args.baseline_requests):
            switches.append(timed([b]))
            switches.append(timed([a]))
            to_none.append(timed([]))
            timed([a])
    if not engine.is_first:
        return None
    return {"rank": args.lora_switch, "layers": layers, "first_fuse_ms": round(first * 1e3, 1),
            "switch_p50_ms": round(percentile(switches, 50) * 1e3, 1),
            "switch_p99_ms": round(percentile(switches, 99) * 1e3, 1),
            "to_none_p50_ms": round(percentile(to_none, 50) * 1e3, 1), "n": len(switches)}
