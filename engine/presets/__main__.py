"""`python -m engine.presets list` / `python -m engine.presets save NAME DIR`: the random-weight presets."""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from engine.models import PRESETS, get_preset

    parser = argparse.ArgumentParser(prog="python -m engine.presets",
                                     description="Real diffusers architectures with random weights.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list presets")
    save = sub.add_parser("save", help="write a preset as a diffusers directory")
    save.add_argument("preset")
    save.add_argument("dir")
    save.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    save.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for spec in PRESETS.values():
            print(f"{spec.name:18s} {spec.description}")
        return 0
    try:
        out = get_preset(args.preset).save(args.dir, dtype=getattr(torch, args.dtype), seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
