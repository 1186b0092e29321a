"""Run a function on N gloo processes (CPU) — or N NCCL processes, one per GPU — and collect what each
rank returns.

Functions must be importable (module level) since workers are spawned. Every run has a deadline:
a hung collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, backend: str, fn, args, kwargs):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        result = fn(*args, **kwargs)
        torch.save({"ok": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # report the failure to the parent instead of dying silently
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 120.0, backend: str = "gloo", **kwargs) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(
            _worker, args=(world, init_file, tmp, backend, fn, args, kwargs), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world} processes did not finish in {timeout:.0f} s")
        except mp.ProcessRaisedException as e:
            errors = []
            for r in range(world):
                p = os.path.join(tmp, f"{r}.pt")
                if os.path.exists(p):
                    res = torch.load(p, weights_only=False)
                    if "error" in res:
                        errors.append(f"rank {r}:\n{res['error']}")
            raise AssertionError("\n".join(errors) or str(e)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False)["ok"] for r in range(world)]


def rel_l2(a, b) -> float:
    """Relative L2 distance of `a` from the reference `b`, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
