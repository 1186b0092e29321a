"""`torchrun --nproc-per-node 4 -m engine.bench.qkv_exchange`: Ulysses' Q/K/V exchange in bf16 and in FP8.

The per-op evidence behind `--quantize-qkv fp8` (parallel/qkv_fp8.py): for each token count, Flux.1-dev's
24 heads of 128, one image,
- what the rounding costs on one GPU: packing Q, K, V (quantize per token and head, values and scales
  in one byte tensor) and unpacking them, eager and compiled — a single GPU pays this and gains nothing;
- with several ranks: the all-to-all of the stacked bf16 Q/K/V (what the exact path sends) against the
  packed bytes' all-to-all, and the whole FP8 exchange (pack + all-to-all + unpack), with the bytes each
  rank sends.

    python -m engine.bench.qkv_exchange --tokens 4608,16896                              # one GPU: the cost
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 -m engine.bench.qkv_exchange --tokens 4608,16896,66048

Runs with gloo on the CPU too (a check that it runs, not figures). Protocol: 3 warm-up calls, then the
median of `--iters` calls (CUDA events on GPUs), rank 0's.

Legend: S tokens of the whole image, U ranks of the exchange, H heads, D head dim.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

import torch
import torch.distributed as dist


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench.qkv_exchange", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4608,16896", help="S of the whole image (Flux 1024²: 4608, 2048²: 16896)")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled pack / unpack")
    p.add_argument("--json", default=None, help="write the rows here (rank 0)")
    return p


def rows_for(S: int, H: int, D: int, U: int, group, device: torch.device, args) -> dict:
    from shardiff_parallel.qkv_fp8 import pack, unpack, wire_ratio
    from shardiff_parallel.sharding import split_sizes
    from shardiff_parallel.ulysses import seq_to_head

    from engine.bench.timing import median_ms

    sizes = split_sizes(S, U)
    me = dist.get_rank(group) if group is not None else 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    qkv_3BSHD = torch.randn(3, 1, sizes[me], H, D, device=device, dtype=dtype)
    packed = pack(qkv_3BSHD)
    row = dict(S=S, U=U, H=H, D=D, dtype=str(dtype).removeprefix("torch."),
               sent_mib_exact=qkv_3BSHD.numel() * qkv_3BSHD.element_size() / 2**20,
               sent_mib_fp8=packed.numel() / 2**20, wire_ratio=wire_ratio(D, dtype),
               pack_ms=median_ms(lambda: pack(qkv_3BSHD), args.iters, device),
               unpack_ms=median_ms(lambda: unpack(packed, dtype), args.iters, device))
    if not args.no_compile:
        pack_c = torch.compile(pack, dynamic=False)
        unpack_c = torch.compile(lambda p: unpack(p, dtype), dynamic=False)
        assert torch.equal(unpack_c(pack_c(qkv_3BSHD)), unpack(packed, dtype)), "compiled rounding differs from eager"
        row.update(pack_compiled_ms=median_ms(lambda: pack_c(qkv_3BSHD), args.iters, device),
                   unpack_compiled_ms=median_ms(lambda: unpack_c(packed), args.iters, device))
    if U > 1:
        row.update(
            exchange_exact_ms=median_ms(lambda: seq_to_head(qkv_3BSHD, group, sizes), args.iters, device),
            exchange_bytes_ms=median_ms(lambda: seq_to_head(packed, group, sizes), args.iters, device),
            exchange_fp8_ms=median_ms(lambda: unpack(seq_to_head(pack(qkv_3BSHD), group, sizes), dtype), args.iters,
                                  device),
        )
    return row


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from engine.runtime.distributed import init_distributed, pick_device

    device = pick_device(None)
    env = init_distributed(device, timedelta(seconds=300))
    U = env.world_size
    group = dist.group.WORLD if U > 1 else None
    if args.heads % U:
        raise ValueError(f"--heads {args.heads} must split over the {U} ranks")
    rows = [rows_for(int(S), args.heads, args.head_dim, U, group, device, args) for S in args.tokens.split(",") if S]
    if env.rank != 0:
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo: not figures)"
    print(f"# {U} × {name}, torch {torch.__version__}")
    for r in rows:
        print(json.dumps(r), flush=True)
    print("\n| S | U | sent per rank exact → FP8 MiB | pack / unpack ms (compiled) | exchange exact ms | "
          "bytes only ms | FP8 exchange (pack + send + unpack) ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        compiled = (f" ({r['pack_compiled_ms']:.3f} / {r['unpack_compiled_ms']:.3f})" if "pack_compiled_ms" in r
                    else "")
        print(f"| {r['S']} | {r['U']} | {r['sent_mib_exact']:.1f} → {r['sent_mib_fp8']:.1f} | "
              f"{r['pack_ms']:.3f} / {r['unpack_ms']:.3f}{compiled} | {r.get('exchange_exact_ms', float('nan')):.3f} | "
              f"{r.get('exchange_bytes_ms', float('nan')):.3f} | {r.get('exchange_fp8_ms', float('nan')):.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "ranks": U, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
