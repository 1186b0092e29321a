"""`--tp auto` (the default): tensor parallelism only where it pays — when the weights do not fit a GPU.

Measured on 4×H200 (BENCHMARKS.md): on NVLinked GPUs TP is never faster than Ulysses for the
same GPUs (Flux 2048² compiled: TP-4 225 ms, Ulysses-4 206 ms per step), but it divides the
denoiser's weights by T. So the automatic rule is about memory: the smallest TP degree (1 first) that
splits the model evenly, divides the ranks left after dp × cfg, and makes the most loaded rank's
weights — every pipeline component, with the denoiser's split linears divided by T and the text
encoders where their placement puts them — fit in WEIGHT_SHARE of the GPU, the rest being left for
activations (Flux 2048² eager needs ~1 GiB of them, 4096² several). With `--text-encoders auto` the
text encoders are sharded (engine/text_encoders/placement.py) before TP is tried, since they run once
per request where TP costs every step.

`python -m engine.loading.auto_tp --model flux2-dev --world 1 2 4 --gpu-gib 139.8` prints, for each
text-encoder placement and TP degree, what one rank holds and what `--tp auto` picks.

Counted from configs and safetensors headers only (meta-device models; nothing is read or allocated),
from the GPU's total memory — the same on every rank of a homogeneous node, so every rank decides the
same; the engine's first collective then checks that they did.
"""

from __future__ import annotations

import torch

from shardiff_parallel.tensor import local_numel

from .model import denoiser_parts, resolve_model

WEIGHT_SHARE = 0.75
"""Weights may take this share of a GPU's memory; the rest is for activations and the allocator."""
H200_GIB = 139.8
"""An H200's total memory as torch.cuda reports it on the H200s measured here (nvidia-smi says 143771 MiB;
torch's total_memory leaves out the driver's reserve): the CLI's default without a GPU."""
TEXT_ENCODER_PLACEMENTS = ("replicated", "first", "sharded")


def weight_bytes_per_rank(model, family, tp: int, dtype: torch.dtype, text_bytes: int | None = None,
                          quantize: str = "off") -> int:
    """Bytes of weights one rank holds on `tp` TP ranks: the denoiser's shard plus every other component.
    `model`: a name or its description (engine/loading/model.py). `text_bytes`: what the text encoders
    take on that rank (None: replicated, all of them). `quantize` "fp8": the linears of the family's FP8
    rule at 1 byte per weight and a 4-byte scale per output feature (parallel/fp8.py)."""
    model = resolve_model(model)
    empty, others = denoiser_parts(model)
    if text_bytes is None:
        from engine.text_encoders.placement import plan_text_encoders

        text_bytes = plan_text_encoders(model, "replicated", ranks=1, dtype=dtype).bytes_per_rank
    # TP rank 0 holds the most: it keeps the row-split biases.
    styles = family.plan.tp_styles
    denoiser = local_numel(empty, styles, tp, 0)
    fp8 = 0
    if quantize == "fp8" and family.fp8 is not None:
        from shardiff_parallel.fp8 import quantized_weights
        from shardiff_parallel.tensor import local_shards

        numel, rows = quantized_weights(empty, family.fp8, local_shards(empty, styles, tp, 0) if tp > 1 else None)
        denoiser -= numel
        fp8 = numel + 4 * rows
    return (denoiser + others) * dtype.itemsize + fp8 + text_bytes


def _text_plan(model, placement: str, ranks: int, dtype: torch.dtype):
    from engine.text_encoders.placement import plan_text_encoders

    return plan_text_encoders(model, placement, ranks=ranks, dtype=dtype)


def weight_bytes_by_rank(model, family, tp: int, dtype: torch.dtype, *, text_encoders: str = "replicated",
                         world_size: int = 1, quantize: str = "off") -> list[int]:
    """Bytes of weights each of `world_size` ranks (one image's) holds: the denoiser's TP shard (TP rank
    0's, the largest), the other components, and the text encoders where `text_encoders` puts them."""
    if text_encoders not in TEXT_ENCODER_PLACEMENTS:
        raise ValueError(f"text-encoder placement must be one of {', '.join(TEXT_ENCODER_PLACEMENTS)}, "
                         f"got {text_encoders!r}")
    model = resolve_model(model)
    rest = weight_bytes_per_rank(model, family, tp, dtype, text_bytes=0, quantize=quantize)
    plan = _text_plan(model, text_encoders, world_size, dtype)
    return [rest + plan.rank_bytes(r) for r in range(world_size)]


def choose_tp(model, info, family, *, world_size: int, dp: int, cfg: int, dtype: torch.dtype,
              gpu_bytes: int | None, text_bytes=None, text_encoders: str | None = None,
              quantize: str = "off") -> tuple[int, str]:
    """(TP degree, why) for `--tp auto`. `gpu_bytes`: one GPU's total memory; None (CPU): no TP.

    `text_bytes(room)`: the text encoders' bytes per rank when `room` bytes are left for them beside the
    rest (engine/text_encoders: `--text-encoders auto` shards them where replicated ones do not fit, which
    costs once per request where TP costs every step); None: replicated. `text_encoders`: a fixed
    placement instead (`TEXT_ENCODER_PLACEMENTS`), counted on its most loaded rank."""
    assert text_bytes is None or text_encoders is None, "give the text encoders' bytes or their placement"
    if gpu_bytes is None or not family.plan.tp_styles or world_size % (dp * cfg):
        return 1, ""
    model = resolve_model(model)
    if text_encoders is not None:
        fixed = max(weight_bytes_by_rank(model, family, 1, dtype, text_encoders=text_encoders,
                                         world_size=world_size // dp, quantize=quantize)) - weight_bytes_per_rank(
            model, family, 1, dtype, text_bytes=0, quantize=quantize)
        text_bytes = lambda room: fixed  # noqa: E731
    budget = WEIGHT_SHARE * gpu_bytes

    def bytes_at(tp: int) -> int:
        if text_bytes is None:
            return weight_bytes_per_rank(model, family, tp, dtype, quantize=quantize)
        rest = weight_bytes_per_rank(model, family, tp, dtype, text_bytes=0, quantize=quantize)
        return rest + text_bytes(budget - rest)

    need_1 = bytes_at(1)
    if need_1 <= budget:
        return 1, ""
    ranks = world_size // (dp * cfg)
    tried = []
    for tp in range(2, ranks + 1):
        if ranks % tp:
            continue
        try:
            family.check_tp(info, tp)
        except ValueError:
            continue
        need = bytes_at(tp)
        tried.append(f"tp{tp}: {need / 2**30:.1f} GiB")
        if need <= budget:
            return tp, (f"tp{tp} chosen: {need_1 / 2**30:.1f} GiB of weights do not fit {WEIGHT_SHARE:.0%} of one "
                        f"GPU's {gpu_bytes / 2**30:.1f} GiB; with --tp {tp} each rank holds {need / 2**30:.1f} GiB")
    raise ValueError(
        f"the model's weights ({need_1 / 2**30:.1f} GiB per rank without TP"
        + (f"; {', '.join(tried)}" if tried else "")
        + f") do not fit {WEIGHT_SHARE:.0%} of one GPU's {gpu_bytes / 2**30:.1f} GiB with any TP degree over the "
        f"{ranks} rank(s) left after --dp {dp} × --cfg {cfg} (a TP degree must divide those ranks, the heads and "
        f"the MLP width); launch more GPUs, use --dtype bf16/fp16, or give --tp 1 to load them with less headroom"
    )


def placement_table(model, *, world_size: int, gpu_gib: float, dtype: torch.dtype = torch.bfloat16,
                    dp: int = 1, cfg: int = 1, quantize: str = "off") -> list[dict]:
    """For each text-encoder placement and each TP degree that splits the model and divides the ranks
    left after dp × cfg: GiB of weights on the most and least loaded rank, whether that fits
    WEIGHT_SHARE of a `gpu_gib` GPU, and what `--tp auto` would choose (counted from configs alone)."""
    model = resolve_model(model)
    info, fam = model.info, model.family
    ranks = world_size // (dp * cfg)
    degrees = [1]
    for tp in range(2, ranks + 1):
        try:
            fam.check_tp(info, tp)
        except ValueError:
            continue
        if ranks % tp == 0 and fam.plan.tp_styles:
            degrees.append(tp)
    rows = []
    for placement in TEXT_ENCODER_PLACEMENTS:
        try:
            auto, _ = choose_tp(model, info, fam, world_size=world_size, dp=dp, cfg=cfg, dtype=dtype,
                                gpu_bytes=int(gpu_gib * 2**30), text_encoders=placement, quantize=quantize)
        except ValueError:
            auto = None
        for tp in degrees:
            by_rank = weight_bytes_by_rank(model, fam, tp, dtype, text_encoders=placement, world_size=world_size,
                                           quantize=quantize)
            rows.append(dict(model=str(model), quantize=quantize, text_encoders=placement, tp=tp, world_size=world_size,
                             max_gib=round(max(by_rank) / 2**30, 2), min_gib=round(min(by_rank) / 2**30, 2),
                             fits=max(by_rank) <= WEIGHT_SHARE * gpu_gib * 2**30, tp_auto=auto))
    return rows


def component_gib(model, family, dtype: torch.dtype = torch.bfloat16, quantize: str = "off") -> dict[str, float]:
    """GiB of each component (the denoiser whole), from configs / headers."""
    model = resolve_model(model)
    out = {family.denoiser: weight_bytes_per_rank(model, family, 1, dtype, text_bytes=0, quantize=quantize)
           - _others_bytes(model, dtype)}
    out |= _text_plan(model, "replicated", 1, dtype).full_bytes
    return {n: round(v / 2**30, 2) for n, v in out.items()}


def _others_bytes(model, dtype: torch.dtype) -> int:
    """The components besides the denoiser and the text encoders (the VAE, …)."""
    _, others = denoiser_parts(model)
    return others * dtype.itemsize


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.loading.auto_tp --model flux2-dev --world 4 --gpu-gib 141`: what fits per
    text-encoder placement and TP degree, and what --tp auto picks."""
    import argparse
    import sys

    from engine.config import DTYPES

    p = argparse.ArgumentParser(prog="python -m engine.loading.auto_tp", description=main.__doc__)
    p.add_argument("--model", action="append", required=True, help="preset or diffusers directory (repeatable)")
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of GPUs")
    p.add_argument("--gpu-gib", type=float, default=None,
                   help=f"one GPU's memory; default: this machine's GPU 0, else an H200's {H200_GIB:.1f} GiB")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--cfg", type=int, default=1)
    p.add_argument("--quantize", default="off", choices=("off", "fp8"), help="count the FP8 rule's linears at 1 byte")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.gpu_gib is None:
        cuda = torch.cuda.is_available()
        args.gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else H200_GIB
    dtype = DTYPES[args.dtype]
    rows = []
    for model in args.model:
        sizes = component_gib(model, resolve_model(model).family, dtype, quantize=args.quantize)
        print(f"\n{model}: " + ", ".join(f"{n} {g:.1f} GiB" for n, g in sizes.items())
              + f"  ({args.dtype}{', denoiser linears in fp8' if args.quantize == 'fp8' else ''}; weights may take {WEIGHT_SHARE:.0%} of {args.gpu_gib:.1f} GiB = "
              f"{WEIGHT_SHARE * args.gpu_gib:.1f} GiB)")
        print(f"{'GPUs':>4} {'text encoders':>13} {'tp':>3} {'max GiB/rank':>12} {'min GiB/rank':>12} {'fits':>5} "
              f"{'--tp auto':>9}")
        for world in args.world:
            if world % args.cfg:
                continue
            for r in placement_table(model, world_size=world, gpu_gib=args.gpu_gib, dtype=dtype, cfg=args.cfg,
                                     quantize=args.quantize):
                rows.append(r)
                print(f"{world:>4} {r['text_encoders']:>13} {r['tp']:>3} {r['max_gib']:>12.1f} {r['min_gib']:>12.1f} "
                      f"{'yes' if r['fits'] else 'no':>5} {('tp' + str(r['tp_auto'])) if r['tp_auto'] else 'none':>9}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
