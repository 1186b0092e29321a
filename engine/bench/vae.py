"""`python -m engine.bench.vae`: the VAE decode, whole, tiled and split by rows — time and peak memory.

With the FLUX.1 VAE config and random weights, per image size and dtype (bf16; fp32 = the VAE
upcast as pipelines with `force_upcast` do):
- `diffusers`: diffusers' own `vae.decode`, the whole image on one device;
- `tiled`: the same after `vae.enable_tiling()` (diffusers' tiles and blends; relative L2 against
  the whole decode shows its seams);
- `share-N` (world size 1): one rank's share of an N-way row split, computed alone — the latent rows
  of piece N//2 (an inner piece: halos on both sides), with halo rows of zeros, GroupNorm statistics
  of its own rows and the other ranks' Ring blocks as zero blocks. Same kernels and buffers as a
  rank of the real split, no communication: the per-rank memory and compute, not the image;
- `split-N` (under torchrun, N processes): the real split over all ranks, every rank's time and
  peak, relative L2 against the whole decode.
Peak memory is `max_memory_allocated` during the call, reported whole and above what was allocated
before it (weights + latents): "act GiB". Time: median of `--repeats` calls after one warm-up.

    python -m engine.bench.vae --json vae-h200.json                       # one GPU: diffusers, tiled, share-2/4/8
    torchrun --nproc-per-node 4 -m engine.bench.vae --modes diffusers,split --json vae-4xh200.json
    python -m engine.bench.vae --vae tiny --sizes 64,96 --device cpu      # CPU proof, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SIZES = (1024, 2048, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench.vae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", choices=("flux", "tiny"), default="flux", help="FLUX.1's VAE config, or the tiny KL one (CPU)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="square image sides, pixels")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--modes", default=None,
                   help="diffusers,tiled,share,split (default: diffusers,tiled,share at one process; "
                        "diffusers,split under torchrun)")
    p.add_argument("--shares", default="2,4,8", help="N of the share-N rows")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", default=None, help="write every record to this file (first rank)")
    return p


def _vae(kind: str, device, dtype):
    from diffusers import AutoencoderKL

    from engine.presets.components import FLUX_VAE, TINY_KL

    torch.manual_seed(0)  # the same weights on every rank
    # The tiny one tiles from 32 px, so that CPU runs go through diffusers' tiled path too.
    config = FLUX_VAE if kind == "flux" else {**FLUX_VAE, **TINY_KL, "sample_size": 32}
    return AutoencoderKL(**config).eval().to(device=device, dtype=dtype)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn, device, repeats: int) -> dict:
    """Median ms over `repeats` after a warm-up; peak GiB during a call (CUDA), whole and above the start."""
    out = fn()
    _sync(device)
    times, peak, base = [], None, None
    for _ in range(repeats):
        del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    rec = dict(ms=round(statistics.median(times), 2), runs_ms=[round(t, 2) for t in times])
    if peak is not None:
        rec.update(peak_gib=round(peak / 2**30, 3), act_gib=round((peak - base) / 2**30, 3))
    return rec, out


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _one(mode: str, vae, z, device, repeats: int, whole, n: int = 1) -> dict:
    from engine.models.vae import vae_plan
    from shardiff_parallel.vae import apply_vae_plan

    applied = None
    if mode == "tiled":
        vae.enable_tiling()
    elif mode == "share":
        applied = apply_vae_plan(vae, vae_plan(type(vae).__name__), simulate=(n, n // 2))
    elif mode == "split":
        import torch.distributed as dist

        applied = apply_vae_plan(vae, vae_plan(type(vae).__name__), group=dist.group.WORLD)
    try:
        with torch.no_grad():
            rec, out = _measure(lambda: vae.decode(z).sample, device, repeats)
        if applied is not None:
            rec["split_over"] = applied.last.get("decode", 1)
        if whole is not None and out.shape == whole.shape and mode != "share":
            rec["rel_l2_vs_whole"] = _rel_l2(out, whole)
        rec["out_rows"] = out.shape[-2]
        del out
    except torch.OutOfMemoryError:
        rec = dict(oom=True)
    finally:
        if mode == "tiled":
            vae.disable_tiling()
        if applied is not None:
            applied.remove()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    modes = (args.modes or ("diffusers,split" if world > 1 else "diffusers,tiled,share")).split(",")
    bad = [m for m in modes if m not in ("diffusers", "tiled", "share", "split")]
    if bad or ("split" in modes and world == 1):
        raise ValueError(f"--modes: {bad or 'split'} (split needs torchrun with ≥ 2 processes)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank = 0
    if world > 1:
        import torch.distributed as dist
        from datetime import timedelta

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
        rank = dist.get_rank()
    records = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        vae = _vae(args.vae, device, dtype)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        for size in (int(s) for s in args.sizes.split(",")):
            g = torch.Generator().manual_seed(size)
            z = torch.randn(1, vae.config.latent_channels, size // factor, size // factor, generator=g).to(device, dtype)
            runs = []
            for mode in modes:
                if mode == "share":
                    runs += [("share", int(n)) for n in args.shares.split(",")]
                elif mode == "split":
                    runs.append(("split", world))
                else:
                    runs.append((mode, 1))
            whole = None
            if "diffusers" in modes:
                with torch.no_grad():
                    try:
                        whole = vae.decode(z).sample
                    except torch.OutOfMemoryError:
                        whole = None
            for mode, n in runs:
                rec = _one(mode, vae, z, device, args.repeats, whole, n)
                label = mode if n == 1 else f"{mode}-{n}"
                rec = dict(size=size, dtype=dname, mode=label, ranks=n, vae=args.vae, device=device.type, **rec)
                if world > 1:
                    import torch.distributed as dist

                    everyone = [None] * world
                    dist.all_gather_object(everyone, rec)
                    per_rank = [{k: r.get(k) for k in ("ms", "peak_gib", "act_gib")} for r in everyone]
                    rec = dict(everyone[0], per_rank=per_rank)
                    if not rec.get("oom"):
                        rec["ms"] = max(p["ms"] or 0.0 for p in per_rank)  # the call ends with its slowest rank
                records.append(rec)
                if rank == 0:
                    print(json.dumps(rec), flush=True)
            del whole, z
        del vae
    if rank == 0:
        _print_table(records)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _max_over(rec: dict, key: str):
    values = [p[key] for p in rec["per_rank"]] if "per_rank" in rec else [rec.get(key)]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _print_table(records: list[dict]) -> None:
    print(f"\n{'size':>6} {'dtype':>5} {'mode':>10} {'ms':>10} {'peak GiB':>9} {'act GiB':>8} {'rel L2':>9}  note")
    for r in records:
        if r.get("oom"):
            print(f"{r['size']:>6} {r['dtype']:>5} {r['mode']:>10} {'OOM':>10}")
            continue
        peak, act = (_max_over(r, k) for k in ("peak_gib", "act_gib"))
        rel = r.get("rel_l2_vs_whole")
        note = ("one rank's share alone (zero halos, local statistics)" if r["mode"].startswith("share")
                else "max over ranks" if "per_rank" in r else "")
        print(f"{r['size']:>6} {r['dtype']:>5} {r['mode']:>10} {r['ms']:>10.2f} "
              f"{'n/a' if peak is None else f'{peak:.2f}':>9} {'n/a' if act is None else f'{act:.2f}':>8} "
              f"{'' if rel is None else f'{rel:.2e}':>9}  {note}")
    sys.stdout.flush()


if __name__ == "__main__":
    from engine.runtime.distributed import run_main

    run_main(main)
