"""`python -m engine.bench.pipelines` / `torchrun … -m engine.bench.pipelines`: per-step latency of the
editing pipelines and of a LoRA'd model, against plain diffusers in the same launch.

Cases (each on the same random weights of a preset's real architecture, random prompt embeddings of the
real length, latent output):
- `t2i`: the preset's own pipeline (FluxPipeline);
- `img2img`: its img2img form (FluxImg2ImgPipeline, `--strength`) from a random input image;
- `kontext`: FluxKontextPipeline (the flux-dev transformer is Kontext-dev's shape) editing a random
  image of the output size, resized by the pipeline as usual: the reference image's tokens double the
  image sequence (1024²: 4096 + 4096 image tokens);
- `lora`: t2i with a random rank-`--lora-rank` LoRA on every linear of the transformer's blocks. Our
  layouts fuse it (engine/lora.py): the same weights' shapes, so no slower than `t2i`; `diffusers` runs it
  as diffusers does after `load_lora_weights` (PEFT layers, unfused);
- `controlnet`: FluxControlNetPipeline with a random ControlNet of InstantX's FLUX.1-dev Union shape
  (5 dual-stream + 10 single-stream blocks, 10 control modes; `--controlnet-layers D,S`), a random
  control image, mode 0, scale 0.7. Our layouts apply the ControlNet's own plan too (engine/controlnet.py).
Qwen-Image's cases (a qwen-image preset: `qwen-image` for t2i / img2img / inpaint, `qwen-image-edit` for
edit / edit-inpaint, `qwen-image-edit-plus` for edit-plus; true CFG at 4 with random embeddings of both
branches, two transformer calls per step):
- `img2img`, `inpaint`: QwenImageImg2ImgPipeline / QwenImageInpaintPipeline (a random mask of the size);
- `edit`: QwenImageEditPipeline, a random reference image of the output size (the pipeline encodes it at
  ~1024² pixels: 4096 reference tokens beside the output's 4096 at 1024²);
- `edit-inpaint`: QwenImageEditInpaintPipeline (it draws at its reference's ~1024² whatever `--size`);
- `edit-plus`: QwenImageEditPlusPipeline with `--references` random reference images (each ~1024²).
FLUX.2's cases (`flux2-dev`, `flux2-klein-4b` / `-9b`, `flux2-klein-9b-kv`; one transformer call per step — the
released klein models are step-distilled, so guidance 1):
- `edit`: the preset's own pipeline with `--references` random reference images of the output size (at 1024²:
  4096 tokens each beside the output's 4096);
- `inpaint` (klein): Flux2KleinInpaintPipeline, a random image and mask of the size;
- `edit` on klein-KV: Flux2KleinKVPipeline, whose steps after the first attend the references' cached K/V
  (every timed interval is such a cached step), against `edit-uncached`: Flux2KleinPipeline on the same
  transformer, which recomputes the references at every step.
Qwen-Image 2.1's cases (`qwen-image-2.1`; no guidance, as the model is meant to run): `t2i` with the prompt's
K/V cached after the first step (the pipeline's default) against `t2i-uncached` (`use_kv_cache=False`), and
`edit` / `edit-uncached` with `--references` random condition images (each ~1024², its tokens part of the cached
prefix). The condition images are read by the text encoder too, so these two cases build the preset's random
Qwen3-VL and give a prompt instead of embeddings (text encoding stays out of the per-step figure).
Systems: `diffusers` (the pipeline as is, its default attention) and our layouts (engine.bench names:
`1`, `u2`, `u4:compile`, …; a layout of n ranks uses ranks 0..n-1).

Per-step latency is the median interval between the ends of consecutive denoising steps (a
`callback_on_step_end` that synchronises the GPU), so the VAE encoding of the input image and the text
work stay out of it; the median runs over every interval of every timed repeat after `--warmup` runs.
Relative L2 of the latents is against the case's first system.

    python -m engine.bench.pipelines --model flux-dev --size 1024 --steps 8 --cases t2i,img2img,kontext,lora \\
        --systems diffusers,1,1:compile --json pipelines.json
    python -m engine.bench.pipelines --model qwen-image-edit-plus --size 1024 --steps 8 --cases edit-plus \\
        --systems diffusers,1 --json qwen-edit-plus.json
    python -m engine.bench.pipelines --model flux2-klein-9b-kv --size 1024 --steps 8 --references 2 \\
        --cases t2i,edit,edit-uncached --systems diffusers,1 --json klein-kv.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from engine.models import family, get_preset
from engine.runtime.distributed import UserError, init_distributed, pick_device
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.mesh import Mesh
from shardiff_parallel.plan import apply_plan

from .layouts import parse_layout

PIPELINE_OF_CASE = {
    "flux": {"t2i": None, "img2img": "FluxImg2ImgPipeline", "kontext": "FluxKontextPipeline", "lora": None,
             "controlnet": "FluxControlNetPipeline"},
    "qwen-image": {"t2i": "QwenImagePipeline", "img2img": "QwenImageImg2ImgPipeline", "inpaint": "QwenImageInpaintPipeline",
                   "edit": "QwenImageEditPipeline", "edit-inpaint": "QwenImageEditInpaintPipeline",
                   "edit-plus": "QwenImageEditPlusPipeline"},
    "flux2": {"t2i": None, "edit": None},
    "flux2-klein": {"t2i": None, "edit": None, "inpaint": "Flux2KleinInpaintPipeline"},
    "flux2-klein-kv": {"t2i": None, "edit": None, "edit-uncached": "Flux2KleinPipeline"},
    "qwen-image-2.1": {"t2i": None, "t2i-uncached": None, "edit": None, "edit-uncached": None},
}
"""Family → case → the pipeline class it runs (None: the preset's own), made from the preset's with from_pipe."""
CASE_EXTRA = {
    # One transformer call per step, as klein-KV's own pipeline (a step-distilled model).
    ("flux2-klein-kv", "edit-uncached"): dict(guidance_scale=1.0),
    ("qwen-image-2.1", "t2i-uncached"): dict(use_kv_cache=False),
    ("qwen-image-2.1", "edit-uncached"): dict(use_kv_cache=False),
}
"""(family, case) → further call arguments."""
TEXT_CASES = {("qwen-image-2.1", "edit"), ("qwen-image-2.1", "edit-uncached")}
"""Cases whose text encoder reads the input images: run from a prompt, with the preset's (random) text encoder."""
SEVERAL_REFERENCES = ("flux2", "flux2-klein", "flux2-klein-kv", "qwen-image-2.1")
"""Families whose `edit` cases take `--references` images."""
BENCH_PROMPT = "a photograph of the first picture in the style of the second, bright evening light"
CASES = tuple(dict.fromkeys(c for cases in PIPELINE_OF_CASE.values() for c in cases))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench.pipelines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-dev",
                   help="a Flux, FLUX.2, Qwen-Image or Qwen-Image 2.1 preset (random weights, real config)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--systems", default="diffusers,1", help="diffusers and/or our layouts (engine.bench names)")
    p.add_argument("--controlnet-layers", default="5,10",
                   help="dual-stream,single-stream blocks of the `controlnet` case (InstantX's Union: 5,10)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="img2img strength (1.0: every step runs, so the per-step figure is comparable)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--references", type=int, default=2,
                   help="edit-plus, and FLUX.2's and Qwen-Image 2.1's edit cases: reference images")
    p.add_argument("--keep-image-size", action="store_true",
                   help="kontext: keep the input image's size (default: diffusers' resize to a trained resolution)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    return p


def random_lora(model: torch.nn.Module, rank: int, seed: int = 0) -> dict:
    """A LoRA in diffusers' keys on every Linear of the transformer's blocks (what style LoRAs train)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name:
            out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
            out[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    return out


def _image(size: int, seed: int = 0, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    if mode == "L":  # a mask: white = repaint
        return Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def case_kwargs(case: str, args, family: str = "flux") -> dict:
    """The inputs a case adds to the prompt embeddings and the size."""
    size = args.size
    if case == "edit-plus" or case in ("edit", "edit-uncached") and family in SEVERAL_REFERENCES:
        return dict(image=[_image(size, i) for i in range(args.references)])
    if case == "img2img":
        return dict(image=_image(size), strength=args.strength)
    if case == "kontext":
        return dict(image=_image(size), max_area=size * size, _auto_resize=not args.keep_image_size)
    if case == "controlnet":
        return dict(control_image=_image(size), control_mode=0, controlnet_conditioning_scale=0.7)
    if case in ("inpaint", "edit-inpaint"):
        return dict(image=_image(size), mask_image=_image(size, 1, "L"), strength=args.strength)
    if case == "edit":
        return dict(image=_image(size))
    return {}


class _StepClock:
    """callback_on_step_end: the time at the end of each denoising step."""

    def __init__(self, device):
        self.device, self.ends = device, []

    def __call__(self, pipe, step, timestep, callback_kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())
        return callback_kwargs


def _run(pipe, kwargs, args, device, group) -> tuple[dict, torch.Tensor]:
    intervals, first = [], None
    for i in range(args.warmup + args.repeats):
        clock = _StepClock(device)
        if group is not None:
            dist.barrier(group=group)
        start = time.perf_counter()
        out = pipe(**kwargs, num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(0),
                   output_type="latent", callback_on_step_end=clock)
        if i == 0:
            first = time.perf_counter() - start
        if i >= args.warmup:
            intervals += [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    if not intervals:
        raise ValueError("fewer than two denoising steps ran: raise --steps (or --strength)")
    return {"per_step_ms": round(statistics.median(intervals) * 1e3, 2), "first_call_s": round(first, 2),
            "steps_timed": len(intervals)}, out.images


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from engine.config import EngineConfig
    from engine.lora import LoraState, parse_lora

    device = pick_device(None)
    env = init_distributed(device, timedelta(minutes=10))
    try:
        spec = get_preset(args.model)
        fam = family(spec.family)
        if fam.name not in PIPELINE_OF_CASE:
            raise ValueError(f"--model {args.model}: this benchmark runs the Flux, FLUX.2, Qwen-Image and Qwen-Image "
                             f"2.1 pipelines")
        cases, known = args.cases.split(","), PIPELINE_OF_CASE[fam.name]
        bad = [c for c in cases if c not in known]
        if bad:
            raise ValueError(f"case(s) {', '.join(bad)} are not {fam.name}'s; its cases: {', '.join(known)}")
        for case in cases:
            _check_components(known[case], spec, case)
        systems = args.systems.split(",")
        layouts = {s: parse_layout(s) for s in systems if s != "diffusers"}
        for name, lay in layouts.items():
            if lay.system != "shardiff":
                raise ValueError(f"system {name!r}: diffusers or our layouts")
            if lay.config.world_size > env.world_size:
                raise ValueError(f"layout {name} needs {lay.config.world_size} ranks, {env.world_size} launched")
    except ValueError as e:
        raise UserError(str(e)) from None
    dtype = EngineConfig(dtype=args.dtype).torch_dtype(device, fam.gpu_dtype)
    with_text = any((fam.name, c) in TEXT_CASES for c in cases)
    base = spec.build_pipeline(dtype=dtype, device=device, with_text_encoders=with_text)
    base.set_progress_bar_config(disable=True)
    embeds = fam.bench_kwargs(spec_info(args.model), text_tokens=args.text_tokens, device=device, dtype=dtype)
    meshes = {n: Mesh.build(l.config, device, ranks=list(range(l.config.world_size))) for n, l in layouts.items()}
    tmp = tempfile.mkdtemp(prefix="shardiff-bench-lora-")
    lora_path = os.path.join(tmp, f"rank{env.rank}.safetensors")
    if "lora" in cases:
        from safetensors.torch import save_file

        save_file({k: v.to(dtype) for k, v in random_lora(base.transformer, args.lora_rank).items()}, lora_path)
    results, reference = [], {}
    for case in cases:
        pipe, controlnet = base, None
        if case == "controlnet":
            from engine.controlnet import random_controlnet

            double, single = (int(v) for v in args.controlnet_layers.split(","))
            controlnet = random_controlnet(fam, dict(base.transformer.config), double, single_layers=single,
                                           num_mode=10, device=device, dtype=dtype)
        if PIPELINE_OF_CASE[fam.name][case] not in (None, type(base).__name__):
            from engine.pipelines import from_pipe

            extra = {"controlnet": controlnet} if controlnet is not None else {}
            pipe = from_pipe(PIPELINE_OF_CASE[fam.name][case], base, dtype, **extra)
            pipe.set_progress_bar_config(disable=True)
        prompt = dict(prompt=BENCH_PROMPT) if (fam.name, case) in TEXT_CASES else embeds
        kwargs = dict(prompt, height=args.size, width=args.size, **case_kwargs(case, args, fam.name),
                      **CASE_EXTRA.get((fam.name, case), {}))
        for system in systems:
            lay = layouts.get(system)
            member = lay is None and env.rank == 0 or lay is not None and env.rank < lay.config.world_size
            record = {"model": args.model, "case": case, "pipeline": type(pipe).__name__, "system": system,
                      "size": args.size, "steps": args.steps, "ranks": 1 if lay is None else lay.config.world_size}
            latents = None
            if member:
                undo = []
                try:
                    if lay is None and case == "lora":  # diffusers' own way: PEFT layers, unfused
                        base.load_lora_weights(lora_path, adapter_name="bench")
                        undo.append(base.unload_lora_weights)
                    if lay is not None:
                        if case == "lora":
                            state = LoraState(base, fam)
                            state.set([parse_lora(lora_path)])
                            undo.append(lambda s=state: s.set([]))
                        mesh = meshes[system]
                        applied = apply_plan(base.transformer, fam.pipeline_plan, mesh, ParallelAttention(mesh))
                        undo.insert(0, applied.remove)
                        if controlnet is not None:
                            from engine.controlnet import apply_controlnet_plans

                            for plan in apply_controlnet_plans(controlnet, fam, mesh, ParallelAttention(mesh)):
                                undo.insert(0, plan.remove)
                        if lay.compile:
                            from engine.runtime.compile import compile_denoiser, uncompile

                            blocks = compile_denoiser(base.transformer)
                            undo.insert(0, lambda b=blocks: uncompile(b))
                    group = None if lay is None else next(
                        (meshes[system].group(a) for a in ("sp", "cfg", "tp") if meshes[system].size(a) > 1), None)
                    timing, latents = _run(pipe, kwargs, args, device, group)
                    record.update(timing)
                    if device.type == "cuda":
                        record["device"] = torch.cuda.get_device_name(device)
                except Exception as e:  # one failed system must not cost the rest of the launch
                    record["error"] = f"{type(e).__name__}: {e}"[:500]
                finally:
                    for fn in undo:
                        fn()
            if env.rank == 0:
                if latents is not None:
                    ref = reference.setdefault(case, latents.float().cpu())
                    record["rel_l2_vs_first"] = ((latents.float().cpu() - ref).norm() / ref.norm()).item()
                results.append(record)
                print(json.dumps(record), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=1)
            if dist.is_initialized():
                dist.barrier()
    if env.rank == 0:
        _table(results)


def _check_components(cls_name: str | None, spec, case: str) -> None:
    """ValueError when the preset lacks a component the case's pipeline needs (an edit pipeline's processor)."""
    if cls_name is None:
        return
    import inspect

    import diffusers

    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    have = {*spec.components, *spec.tokenizers, *spec.processors, "scheduler"}
    missing = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty and n not in have
               and n != "controlnet"]
    if missing:
        raise ValueError(f"case {case} ({cls_name}) needs {', '.join(missing)}, which {spec.name} has not: give "
                         f"a preset of that model")


def spec_info(model: str):
    from engine.loading import inspect_model

    return inspect_model(model)


def _table(results: list[dict]) -> None:
    print(f"\n{'case':>8} {'pipeline':>22} {'system':>14} {'ranks':>5} {'ms/step':>9} {'first s':>8} {'rel L2':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:>8} {r['pipeline']:>22} {r['system']:>14} {r['ranks']:>5}  error: {r['error']}")
            continue
        print(f"{r['case']:>8} {r['pipeline']:>22} {r['system']:>14} {r['ranks']:>5} {r['per_step_ms']:>9.2f} "
              f"{r['first_call_s']:>8.2f} {r.get('rel_l2_vs_first', float('nan')):>9.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    from engine.runtime.distributed import run_main

    run_main(lambda: main())
