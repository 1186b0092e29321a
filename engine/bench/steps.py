"""`torchrun --nproc-per-node N -m engine.bench`: per-step latency, peak memory and fidelity per layout.

Protocol (the anchors' in ../shared/ANCHORS.md): the model's real architecture with random weights,
random prompt embeddings of the real length (no text encoders), latent output (no VAE), N steps;
per-step latency = pipeline time / steps, median over repeats after warm-up. Several layouts and
systems run in ONE launch, side by side on the same weights, latents and embeddings: a layout of n
ranks uses ranks 0..n-1 while the others wait, and each layout's latents are compared with the first
layout's (normally the 1-GPU run) by relative L2.

    torchrun --nproc-per-node 4 -m engine.bench --model flux-dev --sizes 1024,2048 --steps 8 \
        --layouts diffusers,1,u2,u4,r4,u2r2,u4:compile,diffusers-cp-u4,xfuser-u4

Layout names:
- ours: `1` (one rank), or axis letters with degrees: `u4`, `r2`, `u2r2`, `c2u2`, `t2u2`
  (c=cfg, u=ulysses, r=ring, t=tp, d=dp); an `s` right after the tp degree selects the sequence form
  of TP (reduce-scatter / all-gather, `--tp-comm sequence`): `t4s`, `t2su2`, `t4s:compile`; an `o`
  its overlapped form (collectives fused with their matmuls, `--tp-comm overlap`): `t4o:compile`;
- baselines: `diffusers` (plain, one GPU), `diffusers-cp-<degrees>` (diffusers' context
  parallelism, cuDNN attention), `xfuser-<degrees>` (xDiT USP), `cache-dit-<degrees>` (cache-dit's
  context / tensor parallelism with its caching off: exact work), `cache-dit-db-<degrees>` (the same
  with its DBCache on: approximate, marked so in the output);
- `h<n>` after our degrees pipelines the Ulysses all-to-alls over n head chunks (`u4h2`);
- a `:compile` suffix compiles the repeated blocks (regional torch.compile) for that layout;
  `:graphs` also replays each denoiser call as one CUDA graph;
- the fast path (docs/FAST_PATH.md), suffixes combinable with the others: `:fp8` (ours: `--quantize
  fp8`; on `diffusers`: torchao's float8 dynamic row-wise quantization of the same linears), `:qkv8`
  (ours: `--quantize-qkv fp8`, Q/K/V in FP8 through the Ulysses exchange), `:fb` /
  `:fb0.12` (`--cache first-block[:THRESHOLD]`), `:ts` / `:ts5` (`--cache taylorseer[:INTERVAL]`);
  their rows say how many steps they reused and are marked approximate (their rel L2 is the trade).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.models import check_tp_comm_plan, family, get_preset
from engine.runtime.distributed import UserError, init_distributed, pick_device
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.mesh import Mesh
from shardiff_parallel.plan import apply_plan

from shardiff_parallel.cache_config import parse_cache

from engine.placement import fast_plan

from .layouts import BASELINES, Layout, parse_layout
from .sharded import cap_memory, install_sharded_denoiser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-dev", help="preset name (random weights, real config)")
    p.add_argument("--sizes", default="1024", help="comma-separated square sizes, or HxW entries")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layouts", default=None, help="comma-separated layouts to run side by side (see above)")
    p.add_argument("--ulysses", type=int, default=None, help="one layout: Ulysses degree")
    p.add_argument("--ring", type=int, default=None, help="one layout: Ring degree")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--sharded", action="store_true",
                   help="each layout builds only its TP shard of the denoiser (true per-rank memory; see engine/bench/sharded.py)")
    p.add_argument("--memory-cap-gib", type=float, default=None, help="cap each GPU's usable memory (memory-fit demos)")
    p.add_argument("--json", default=None, help="write all results to this file (rank 0), updated after each one")
    p.add_argument("--plot", default=None, help="write a PNG: latency vs GPU count per system, floor dashed (rank 0)")
    p.add_argument("--profile", default=None, help="append a torch.profiler kernel table of one extra run to this file (rank 0)")
    p.add_argument("--profile-layouts", default="", help="comma-separated layouts to profile (default: none)")
    return p


def _sizes(spec: str) -> list[tuple[int, int]]:
    out = []
    for s in spec.split(","):
        h, _, w = s.partition("x")
        out.append((int(h), int(w or h)))
    return out


def _check_layouts(layouts: list[Layout], info, fam, world_size: int, speaks: bool, missing) -> list[Layout]:
    """The layouts this launch can run: ValueError for a mistake; a baseline not installed is skipped.
    Ulysses degrees that do not divide the heads run with uneven heads (`u4` on 38 or 30 heads)."""
    runnable = []
    for lay in layouts:
        if lay.config.world_size > world_size:
            raise ValueError(f"layout {lay.name} needs {lay.config.world_size} ranks, {world_size} launched")
        if lay.system == "shardiff":
            fam.check_tp(info, lay.config.tp)  # the family's own reason (key/value heads, MLP width)
        if fam.heads_split or lay.system != "shardiff":  # baselines (xfuser USP) split heads in any family
            lay.config.check_heads(info.num_heads)
        if lay.system in BASELINES and lay.config.world_size != world_size:
            raise ValueError(f"baseline {lay.name} must use all {world_size} launched ranks")
        why = missing(lay.system)
        if lay.system == "diffusers" and lay.quantize == "fp8":
            import importlib.util

            why = None if importlib.util.find_spec("torchao") else "torchao is not installed (pip install torchao)"
        if why:
            if speaks:
                print(f"skipping {lay.name}: {why}", flush=True)
            continue
        runnable.append(lay)
    return runnable


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from engine.config import EngineConfig
    from engine.loading import inspect_model

    from .baselines import missing

    names = args.layouts.split(",") if args.layouts else [f"u{args.ulysses or 1}r{args.ring or 1}"]
    device = pick_device(None)
    env = init_distributed(device, timedelta(minutes=10))
    try:
        # Every rank checks the same arguments the same way: the mistake is reported once.
        layouts = [parse_layout(n) for n in names]
        info = inspect_model(args.model)
        fam = family(info.family)
        runnable = _check_layouts(layouts, info, fam, env.world_size, env.rank == 0, missing)
    except ValueError as e:
        raise UserError(str(e)) from None
    dtype = EngineConfig(dtype=args.dtype).torch_dtype(device, fam.gpu_dtype)
    cap_memory(args.memory_cap_gib, device)

    spec = get_preset(args.model)

    def make_pipe():
        pipe = spec.build_pipeline(dtype=dtype, device=device, with_text_encoders=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --sharded: the shared pipeline gets no denoiser; each layout installs its own TP shard.
    shared = make_pipe() if not args.sharded else spec.build_pipeline(
        dtype=dtype, device=device, with_text_encoders=False, components={fam.denoiser: None}
    )
    shared.set_progress_bar_config(disable=True)
    inputs = fam.bench_kwargs(info, text_tokens=args.text_tokens, device=device, dtype=dtype)
    # Every rank builds every mesh (new_group is collective over the world), in the same order.
    meshes = {
        lay.name: Mesh.build(lay.config, device, ranks=list(range(lay.config.world_size)))
        for lay in runnable if lay.system == "shardiff"
    }
    reference: dict = {}
    results = []
    for lay in runnable:
        member = env.rank < lay.config.world_size
        runner, prep_error = None, None
        if member:
            try:
                if lay.system == "shardiff":  # the family's refusal (Sana sp, CFG off), not a wrong number
                    fam.check_axes(lay.config.degrees())
                    check_tp_comm_plan(fam, lay.config)
                    fam.check_cfg(lay.config.degrees(), inputs, info)
                runner = _prepare(lay, shared, make_pipe, meshes.get(lay.name), fam, args, dtype, device)
            except Exception as e:  # a baseline that cannot be built is reported, the run goes on
                prep_error = f"{type(e).__name__}: {e}"[:500]
        for height, width in _sizes(args.sizes):
            record = None
            if member:
                try:
                    if prep_error:
                        raise RuntimeError(prep_error)
                    record = runner.run(height, width, inputs)
                except Exception as e:  # one failed system must not cost the rest of a side-by-side run
                    record = {"layout": lay.name, "height": height, "width": width, "error": f"{type(e).__name__}: {e}"[:500],
                              "peak_gib": None, "latents": None}
            everyone = [None] * env.world_size
            mine = None if record is None else (record["peak_gib"], record.pop("latents"))
            if dist.is_initialized():
                dist.all_gather_object(everyone, mine)
            else:
                everyone = [mine]
            if env.rank == 0 and "error" in record:
                print(json.dumps(record), flush=True)
                continue
            if env.rank == 0:
                got = [e for e in everyone if e is not None]
                latents = next((lat for _, lat in got if lat is not None), None)
                ref = reference.setdefault((height, width), latents)
                rel = float("nan") if latents is None or ref is None else (
                    (latents.float() - ref.float()).norm() / ref.float().norm()
                ).item()
                record.update(peak_gib_per_rank=[p for p, _ in got if p is not None], rel_l2_vs_first=rel)
                del record["peak_gib"]
                results.append(record)
                print(json.dumps(record), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=1)
        if runner is not None:
            runner.close()
    if env.rank == 0:
        _print_table(results)
        if args.plot:
            try:
                from .plot import plot

                plot(results, args.plot)
            except ImportError as e:
                print(f"no plot: {e} (pip install .[bench])", flush=True)


class _Runner:
    """One layout, ready to run at any size; `close` undoes what it did to the shared pipeline."""

    def __init__(self, lay, pipe, args, device, kernel, group, undo, cache=None):
        self.lay, self.pipe, self.args, self.device, self.kernel, self.group, self.undo = (
            lay, pipe, args, device, kernel, group, undo
        )
        self.cache = cache
        """The step cache the layout installed (parallel/plan/cache.py), or None."""

    def run(self, height: int, width: int, inputs: dict) -> dict:
        args, device = self.args, self.device

        def once():
            if self.cache is not None:
                self.cache.reset()  # every request starts from an empty cache, as in the engine
            with self.cache.context() if self.cache is not None else contextlib.nullcontext():
                return self.pipe(
                    **inputs, height=height, width=width, num_inference_steps=args.steps,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
                )

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        first_s = None
        for i in range(args.warmup + args.repeats):
            _barrier(self.group, device)
            start = time.perf_counter()
            out = once()
            _barrier(self.group, device)
            elapsed = time.perf_counter() - start
            if i == 0:
                first_s = elapsed
            if i >= args.warmup:
                times.append(elapsed)
        if args.profile and self.lay.name in args.profile_layouts.split(","):
            self._profile(once, height, width)
        latents = None
        if out is not None:  # xfuser returns the result on its last rank only
            latents = out.images if hasattr(out, "images") else out[0]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        per_step = statistics.median(times) / args.steps
        return {
            "model": args.model, "height": height, "width": width, "layout": self.lay.name,
            "system": self.lay.system, "approximate": self.lay.approximate, "compile": self.lay.compile, "cuda_graphs": self.lay.graphs, "head_chunks": self.lay.head_chunks, "ranks": self.lay.config.world_size,
            "quantize": self.lay.quantize, "quantize_qkv": self.lay.quantize_qkv, "cache": self.lay.cache,
            "reused_steps": None if self.cache is None else self.cache.log.reused,
            "tp_comm": self.lay.config.tp_comm if self.lay.config.tp > 1 else None,
            "steps": args.steps, "per_step_ms": round(per_step * 1e3, 2),
            "runs_ms": [round(t / args.steps * 1e3, 2) for t in times], "first_call_s": round(first_s, 2),
            "kernel": self.kernel, "dtype": str(next(self.pipe_params()).dtype).removeprefix("torch."),
            "peak_gib": round(peak, 2),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "latents": None if latents is None else latents.detach().cpu(),
        }

    def _profile(self, once, height: int, width: int) -> None:
        """Where one call's time goes, by kernel: the evidence for what stands between us and the floor."""
        from torch.profiler import ProfilerActivity, profile

        _barrier(self.group, self.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            once()
            _barrier(self.group, self.device)
        if not dist.is_initialized() or dist.get_rank() == 0:
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
            with open(self.args.profile, "a") as f:
                f.write(f"\n=== {self.lay.name} {height}x{width}, {self.args.steps} steps, rank 0 ===\n{table}\n")

    def pipe_params(self):
        pipe = getattr(self.pipe, "module", self.pipe)  # xfuser wraps the diffusers pipeline
        # The denoiser: a transformer, or the UNet of SD1.5/SDXL.
        return (pipe.transformer if hasattr(pipe, "transformer") else pipe.unet).parameters()

    def close(self) -> None:
        for fn in self.undo:
            fn()


def _prepare(lay: Layout, shared, make_pipe, mesh, fam, args, dtype, device) -> _Runner:
    from engine.runtime.compile import compile_denoiser, uncompile

    undo = []
    if lay.system == "diffusers" and lay.quantize == "fp8":
        # What a diffusers user tries first: torchao's float8 on a fresh copy of the pipeline (it cannot be
        # undone), on the linears our rule puts in FP8 (the same work in FP8 on both sides).
        pipe = make_pipe()
        torchao_fp8(getattr(pipe, fam.denoiser), fam.fp8)
        if lay.compile:
            compile_denoiser(getattr(pipe, fam.denoiser))
        undo.append(lambda: torch.cuda.empty_cache() if device.type == "cuda" else None)
        return _Runner(lay, pipe, args, device, "diffusers-default", None, undo)
    if lay.system in BASELINES:
        from .baselines import build_baseline

        pipe = build_baseline(lay.system, make_pipe, lay.config, compile=lay.compile, dtype=dtype)
        undo.append(lambda: torch.cuda.empty_cache() if device.type == "cuda" else None)
        return _Runner(lay, pipe, args, device, lay.system, None, undo)
    if args.sharded:
        undo.append(install_sharded_denoiser(
            shared, fam, args.model, lay.name, lay.config.tp, mesh.coord("tp") if mesh else 0, dtype=dtype,
            device=device, cap_gib=args.memory_cap_gib,
        ))
    denoiser = getattr(shared, fam.denoiser)
    kernel, group, cache = "diffusers-default", None, None
    if lay.system == "shardiff":
        attention = ParallelAttention(mesh, args.attention_backend, head_chunks=lay.head_chunks, qkv=lay.quantize_qkv)
        # The family's pipeline plan (Flux's true CFG as sequential pairs, parallel/plan/cfg_pairs.py), with the
        # fast path's parts asked for; the FP8 part keeps the bf16 weights so that the next layout gets them back.
        if lay.cache != "off" and fam.cache_setup is not None:
            fam.cache_setup()
        applied = apply_plan(denoiser, fast_plan(fam, lay.quantize, parse_cache(lay.cache), keep_originals=True),
                             mesh, attention)
        cache = applied.parts.get("cache")
        undo.append(applied.remove)
        kernel = attention.kernel_for(device, dtype).name
        group = next((mesh.group(a) for a in ("sp", "cfg", "tp") if mesh.size(a) > 1), None)
    if lay.compile:
        blocks = compile_denoiser(denoiser)
        undo.insert(0, lambda: uncompile(blocks))
    if lay.graphs:
        from engine.runtime.cuda_graphs import GraphedForward

        undo.insert(0, GraphedForward(denoiser).install().remove)
    return _Runner(lay, shared, args, device, kernel, group, undo, cache)


def torchao_fp8(model: torch.nn.Module, rule) -> None:
    """torchao's float8 dynamic quantization (row-wise activation and weight scales) of the linears `rule`
    selects, in place."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and rule.selects(name))


def _barrier(group, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if group is not None:
        dist.barrier(group=group)


def _print_table(results: list[dict]) -> None:
    print(f"\n{'size':>10} {'layout':>24} {'ranks':>5} {'ms/step':>9} {'first s':>8} {'rel L2':>9} {'peak GiB':>9}  kernel")
    for r in results:
        peak = max(r["peak_gib_per_rank"]) if r["peak_gib_per_rank"] else float("nan")
        reused = f", {r['reused_steps']} of {r['steps']} steps reused" if r.get("reused_steps") is not None else ""
        note = f"  (approximate{reused})" if r.get("approximate") else ""
        print(f"{r['height']}x{r['width']:<5} {r['layout']:>24} {r['ranks']:>5} {r['per_step_ms']:>9.2f} "
              f"{r['first_call_s']:>8.2f} {r['rel_l2_vs_first']:>9.2e} {peak:>9.2f}  {r['kernel']}{note}")
    sys.stdout.flush()

