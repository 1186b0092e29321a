"""`python -m engine.bench.fp8_layers --model MODEL`: which linears of a denoiser FP8 costs most.

The evidence behind each family's FP8 rule (`Family.fp8`: the linears that stay in the model's
dtype): the denoiser's linears are grouped by name (block indices folded into `*`), and each group
alone is put in FP8 (shardiff_parallel.fp8: e4m3, per-token × per-channel scales) for one denoiser
call on real inputs — the ones the pipeline makes at a middle denoising step (random prompt
embeddings of the real shapes where the model has no text encoders: the family's bench inputs) —
and its relative L2 against the call in the model's dtype is printed; then the family's rule and
"every linear". On the CPU the FP8 product is the exact emulation, on a GPU with FP8 the kernel. Last,
attention's Q, K and V rounded to FP8 (`--quantize-qkv fp8`), against the same call with the family's
plan applied on one rank without the rounding.

    python -m engine.bench.fp8_layers --model shapes                      # the trained toy model, CPU
    python -m engine.bench.fp8_layers --model flux-dev --size 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import re

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench.fp8_layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--size", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=8, help="the call measured is the one at step steps // 2")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPUs, fp32 on the CPU")
    p.add_argument("--prompt", default="a large green triangle in the center on a black background")
    p.add_argument("--json", default=None)
    return p


def linear_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Linear names grouped by their pattern (digits of block indices → `*`), in model order."""
    groups: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear:
            groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), []).append(name)
    return groups


def _swap_in(model: torch.nn.Module, names: list[str]) -> dict:
    """The linears `names` in FP8 (where their shape allows); name → the weight each dropped."""
    from shardiff_kernels.fp8 import kernel_shape_ok
    from shardiff_parallel.fp8 import Fp8Matmul, to_fp8

    swapped = {}
    for name in names:
        m = model.get_submodule(name)
        if not kernel_shape_ok(m.out_features, m.in_features):
            continue
        swapped[name] = m.weight
        to_fp8(m, Fp8Matmul(m.weight))
    return swapped


def _swap_back(model: torch.nn.Module, swapped: dict) -> None:
    from shardiff_parallel.fp8 import from_fp8

    for name, weight in swapped.items():
        from_fp8(model.get_submodule(name), weight)


def qkv_error(denoiser: torch.nn.Module, fam, device: torch.device, run) -> float:
    """Relative L2 of one call with attention's Q, K, V rounded to FP8 against the same call without (the
    family's plan on one rank, so that attention goes through the mesh's, as in the engine)."""
    from shardiff_parallel.attention import ParallelAttention
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.plan import apply_plan

    mesh = Mesh.build(ParallelConfig(), device)
    outs = []
    for qkv in ("off", "fp8"):
        applied = apply_plan(denoiser, fam.pipeline_plan, mesh, ParallelAttention(mesh, qkv=qkv))
        try:
            outs.append(run())
        finally:
            applied.remove()
    return ((outs[1] - outs[0]).norm() / outs[0].norm()).item()


def captured_call(pipe, fam, info, args, device, dtype) -> dict:
    """The denoiser's arguments at step `steps // 2` of a real pipeline call."""
    denoiser = getattr(pipe, fam.denoiser)
    calls: list = []

    def grab(module, a, kw):
        calls.append((a, dict(kw)))
        if len(calls) > args.steps // 2:
            raise _Captured

    size = args.size or info.default_size
    if pipe.text_encoder is not None if hasattr(pipe, "text_encoder") else False:
        kwargs = dict(prompt=args.prompt)
    else:
        kwargs = fam.bench_kwargs(info, text_tokens=64, device=device, dtype=dtype)
    handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(**kwargs, height=size, width=size, num_inference_steps=args.steps, output_type="latent",
             generator=torch.Generator("cpu").manual_seed(0))
    except _Captured:
        pass
    finally:
        handle.remove()
    a, kw = calls[-1]
    assert not a, "the denoiser is called with keyword arguments"
    return kw


class _Captured(Exception):
    pass


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from engine.config import DTYPES
    from engine.loading import inspect_model, load_pipeline
    from engine.models import family

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = inspect_model(args.model)
    fam = family(info.family)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (fam.gpu_dtype if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, fam.denoiser)
    kw = captured_call(pipe, fam, info, args, device, dtype)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = denoiser(**kw)
        out = out[0] if isinstance(out, tuple) else out.sample if hasattr(out, "sample") else out
        return (torch.stack(out) if isinstance(out, list) else out).double()

    ref = run()
    rows = []

    def measure(what: str, names: list[str]) -> None:
        swapped = _swap_in(denoiser, names)
        err = ((run() - ref).norm() / ref.norm()).item() if swapped else 0.0
        _swap_back(denoiser, swapped)
        params = sum(w.numel() for w in swapped.values())
        rows.append(dict(group=what, linears=len(swapped), params=params, rel_l2=err))
        print(f"{what:60s} {len(swapped):4d} linears {params / 1e6:9.1f} M params   rel L2 {err:.5f}", flush=True)

    groups = linear_groups(denoiser)
    for pattern, names in groups.items():
        measure(pattern, names)
    every = [n for names in groups.values() for n in names]
    rule = getattr(fam, "fp8", None)
    if rule is not None:
        measure("the family's rule", [n for n in every if rule.selects(n)])
    measure("every linear", every)
    if "quantize_qkv" not in fam.refusals:
        err = qkv_error(denoiser, fam, device, run)
        rows.append(dict(group="attention's Q, K, V (--quantize-qkv fp8)", linears=0, params=0, rel_l2=err))
        print(f"{rows[-1]['group']:60s} {'':37s}rel L2 {err:.5f}", flush=True)
    print(f"# {args.model} ({fam.name}), {args.size or info.default_size}², {str(dtype).removeprefix('torch.')} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
          f"({'FP8 kernel' if device.type == 'cuda' else 'exact FP8 emulation'}), call {args.steps // 2} of {args.steps}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": str(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
