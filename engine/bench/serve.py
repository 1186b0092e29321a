"""`python -m engine.bench.serve`: what serving adds to a request — the Python client and HTTP against
`Engine.generate` on the same layout.

1. Baseline: a torchrun job of the same ranks builds the `Engine` (the SPMD API) and times
   `engine.generate(request)` on the first rank, wall clock, one request at a time; interleaved with
   the same call carrying the server's per-step stop agreement (engine/runtime/stop.py), whose cost
   is reported apart.
2. Then `serve.start` (this process is the controller, one worker per GPU) and, at each concurrency
   (threads that each send their share of --requests one after another): the latency of the
   in-process Python client (no HTTP, no PNG) and of HTTP (`POST /v1/images/generations`, PNG +
   base64 in a thread pool), p50 / p99, and the throughput.
3. What the controller adds per request: p50 of the client at concurrency 1 minus p50 of the
   baseline; and, from the server's own clocks, admission → answer minus the first rank's
   generate_batch (`total_s - generate_s`, no client threads) — for the in-process client's PIL
   images, and for HTTP's answers, whose PNG the first rank encodes and sends as base64 text
   (`total_s - generate_s - encode_s`; the rank's encoding is reported apart).
4. What streaming adds: HTTP at concurrency 1 with `"stream": true, "partial_images": 3` (time to
   the completed event) minus HTTP without.

Latency at concurrency c includes the wait behind the c - 1 requests ahead: one request runs at a
time per model group, by design. p99 of a few requests is their maximum.

Instead of the above, one of (engine/bench/serve_fleet.py): `--compare-replicas` (one group of every
rank against one group per rank, HTTP at each concurrency), `--ray` (the Ray Serve deployment's
overhead per request against engine.serve), `--lora-switch RANK` (Engine.set_loras between two random
adapters of that rank).

    python -m engine.bench.serve --model shapes --procs 2 --steps 4 --json serve-cpu.json          # CPU
    python -m engine.bench.serve --model flux-dev --gpus 1 --size 1024 --steps 28 --json serve-h200.json
    python -m engine.bench.serve --model shapes --procs 2 --steps 4 --compare-replicas --json replicas-cpu.json
    python -m engine.bench.serve --model flux-dev --gpus 1 --lora-switch 64 --json lora-switch-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "a red circle top left on a white background"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--gpus", type=int, default=None)
    n.add_argument("--procs", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated thread counts")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per concurrency level and client (default: max(2 × concurrency, 8))")
    p.add_argument("--baseline-requests", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--json", default=None, help="write the record here")
    p.add_argument("--compare-replicas", action="store_true",
                   help="only: HTTP against one group of every rank, then one group per rank (--replicas)")
    p.add_argument("--ray", action="store_true", help="only: the Ray Serve deployment's overhead per request")
    p.add_argument("--lora-switch", type=int, default=None, metavar="RANK",
                   help="only: Engine.set_loras between two random adapters of this rank")
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # the torchrun child
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 values is their maximum)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 100)) - 1))]


def summary(latencies: list[float], wall: float) -> dict:
    return {"n": len(latencies), "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 2), "mean_ms": round(statistics.mean(latencies) * 1e3, 2),
            "images_per_s": round(len(latencies) / wall, 3)}


def request(args, seed: int):
    from engine.config import GenerateRequest

    return GenerateRequest(prompt=args.prompt, height=args.size, width=args.size, steps=args.steps, seed=seed)


def engine_config(args):
    from engine.config import EngineConfig

    return EngineConfig(model=args.model, compile=args.compile, cuda_graphs=args.cuda_graphs)


# ------------------------------------------------------------------ 1. the SPMD baseline (torchrun child)


def baseline(args) -> None:
    import torch.distributed as dist

    from engine import Engine

    from engine.runtime.stop import AgreedStop

    engine = Engine(engine_config(args))
    if args.lora_switch is not None:
        from .serve_fleet import lora_switch

        record = lora_switch(args, engine)
        if record is not None:
            Path(args.out).write_text(json.dumps({**record, "layout": engine.parallel.describe()}))
        engine.close()
        return
    stop = AgreedStop(engine)
    engine.generate(request(args, 0))  # warm (compiles, captures)
    times: dict[str, list[float]] = {"plain": [], "stop": []}
    for i in range(args.baseline_requests):
        # Interleaved: the same request without and with the server's per-step stop agreement.
        for kind, on_step in (("plain", None), ("stop", stop)):
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            engine.generate(request(args, i), on_step=on_step)
            stop.settle()
            times[kind].append(time.perf_counter() - start)
    if engine.is_first:
        Path(args.out).write_text(json.dumps({"latencies": times["plain"], "with_stop": times["stop"],
                                              "layout": engine.parallel.describe()}))
    engine.close()


def run_baseline(args, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "engine.bench.serve", "--baseline", "--out", str(out), *_child_args(args)]
        env = dict(os.environ)
        if args.procs is not None:
            env["CUDA_VISIBLE_DEVICES"] = ""
        subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL)
        return json.loads(out.read_text())


def _child_args(args) -> list[str]:
    out = ["--model", args.model, "--steps", str(args.steps), "--prompt", args.prompt,
           "--baseline-requests", str(args.baseline_requests)]
    if args.size is not None:
        out += ["--size", str(args.size)]
    if args.lora_switch is not None:
        out += ["--lora-switch", str(args.lora_switch)]
    return out + (["--compile"] if args.compile else []) + (["--cuda-graphs"] if args.cuda_graphs else [])


# ------------------------------------------------------------------ 2. through the server


def streamed(url: str, args, seed: int, partials: int | None) -> None:
    """One HTTP request, read to its end: plain JSON (partials None) or a stream with `partials`."""
    import httpx

    body = {"prompt": args.prompt, "num_inference_steps": args.steps, "seed": seed}
    if args.size:
        body["size"] = f"{args.size}x{args.size}"
    if partials is not None:
        body.update(stream=True, partial_images=partials)
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=3600) as r:
        r.raise_for_status()
        for _ in r.iter_bytes():
            pass


def load(fn, concurrency: int, total: int) -> tuple[list[float], float]:
    """`total` calls of fn(i) spread over `concurrency` threads; (latencies, wall seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            fn(i)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.baseline:
        from engine.runtime.distributed import run_main

        run_main(lambda: baseline(args))
        return
    from engine import serve
    from engine.serve.encode import Encoding

    world, _, _ = serve.world_size(gpus=args.gpus, procs=args.procs)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.lora_switch is not None or args.compare_replicas or args.ray:
        fleet(args, world, levels)
        return
    print(f"baseline: Engine.generate on {world} rank(s) under torchrun ...", file=sys.stderr, flush=True)
    base = run_baseline(args, world)
    base_p50 = percentile(base["latencies"], 50)

    warm = ((args.size, args.size),) if args.size else None
    client = serve.start(engine_config(args), gpus=args.gpus, procs=args.procs, port=0,
                         max_queue=max(levels) + 1, warmup_sizes=warm if (args.compile or args.cuda_graphs) else None,
                         request_timeout_s=3600)
    http = serve.connect(client.url, timeout=3600)
    try:
        client.generate(request(args, 0))  # both warm: the first request of a server allocates, like the baseline's
        http.generate(request(args, 0))
        rows, overheads = [], []
        for c in levels:
            total = args.requests or max(2 * c, 8)
            lat, wall = load(lambda i: client.generate(request(args, i)), c, total)
            rows.append({"client": "python", "concurrency": c, **summary(lat, wall)})
            lat, wall = load(lambda i: http.generate(request(args, i)), c, total)
            rows.append({"client": "http", "concurrency": c, **summary(lat, wall)})
        # The controller's own clocks, one request at a time (no queueing): admission → answer − generate.
        encoded, encode_times = [], []
        for i in range(max(8, args.baseline_requests)):
            job = client.job([request(args, i)])
            overheads.append(job.total_s - job.generate_s)
            job = client.job([request(args, i)], encoding=Encoding())
            encoded.append(job.total_s - job.generate_s - job.encode_s)
            encode_times.append(job.encode_s)
        plain, with_partials = [], []
        for i in range(max(8, args.baseline_requests)):  # interleaved, as the baseline's with / without stop
            for partials, times in ((None, plain), (3, with_partials)):
                start = time.perf_counter()
                streamed(client.url, args, i, partials)
                times.append(time.perf_counter() - start)
    finally:
        http.close()
        client.close()

    python_c1 = next(r for r in rows if r["client"] == "python" and r["concurrency"] == 1)
    http_c1 = next(r for r in rows if r["client"] == "http" and r["concurrency"] == 1)
    record = {
        "model": args.model, "ranks": world, "layout": base["layout"], "size": args.size, "steps": args.steps,
        "compile": args.compile, "cuda_graphs": args.cuda_graphs,
        "baseline": {"client": "Engine.generate", **summary(base["latencies"], sum(base["latencies"]))},
        "rows": rows,
        "overhead_ms": {
            "python_client_p50_minus_engine_p50": round(python_c1["p50_ms"] - base_p50 * 1e3, 2),
            "http_p50_minus_engine_p50": round(http_c1["p50_ms"] - base_p50 * 1e3, 2),
            "controller_p50 (admission→answer − generate_batch), PIL images": round(
                percentile(overheads, 50) * 1e3, 3),
            "controller_p50 (admission→answer − generate_batch − encode), PNG from the rank": round(
                percentile(encoded, 50) * 1e3, 3),
            "png_base64_encode_on_the_first_rank_p50": round(percentile(encode_times, 50) * 1e3, 2),
            "http_stream_3_partials_p50_minus_http_p50": round(
                (percentile(with_partials, 50) - percentile(plain, 50)) * 1e3, 2),
            "per_step_stop_agreement (Engine.generate p50 with − without)": round(
                (percentile(base["with_stop"], 50) - base_p50) * 1e3, 2),
        },
    }
    print(f"\n{args.model} on {world} rank(s), layout {base['layout']}, {args.size or 'default'} px, "
          f"{args.steps} steps")
    print(f"{'client':<16}{'conc.':>6}{'n':>5}{'p50 ms':>11}{'p99 ms':>11}{'img/s':>9}")
    b = record["baseline"]
    print(f"{'Engine.generate':<16}{1:>6}{b['n']:>5}{b['p50_ms']:>11.1f}{b['p99_ms']:>11.1f}{b['images_per_s']:>9.2f}")
    for r in rows:
        print(f"{r['client']:<16}{r['concurrency']:>6}{r['n']:>5}{r['p50_ms']:>11.1f}{r['p99_ms']:>11.1f}"
              f"{r['images_per_s']:>9.2f}")
    for k, v in record["overhead_ms"].items():
        print(f"overhead: {k}: {v} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


def fleet(args, world: int, levels: list[int]) -> None:
    """--lora-switch, --compare-replicas or --ray (engine/bench/serve_fleet.py): printed, and the record."""
    from . import serve_fleet

    record = {"model": args.model, "ranks": world, "size": args.size, "steps": args.steps}
    if args.lora_switch is not None:
        record["lora_switch"] = run_baseline(args, world)
        print(f"LoRA switch on {args.model}, {world} rank(s): {record['lora_switch']}")
    if args.compare_replicas:
        record["rows"] = rows = serve_fleet.compare_replicas(args, world, levels)
        print(f"\n{args.model}, {world} rank(s), {args.size or 'default'} px, {args.steps} steps, HTTP")
        print(f"{'groups x ranks':<16}{'conc.':>6}{'n':>5}{'p50 ms':>11}{'p99 ms':>11}{'img/s':>9}")
        for r in rows:
            print(f"{r['server']:<16}{r['concurrency']:>6}{r['n']:>5}{r['p50_ms']:>11.1f}{r['p99_ms']:>11.1f}"
                  f"{r['images_per_s']:>9.2f}")
    if args.ray:
        record["ray"] = serve_fleet.ray_overhead(args, world, max(8, args.baseline_requests))
        print(f"Ray Serve against engine.serve, HTTP, concurrency 1: {record['ray']}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
