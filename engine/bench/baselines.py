"""The systems a user would otherwise pick, built for engine.bench on the same weights and inputs.

- `diffusers`: plain diffusers on one GPU (its default attention); with `:compile`, the same
  regional compile we use (diffusers' documented `compile_repeated_blocks`).
- `diffusers-cp`: diffusers' native context parallelism (`enable_parallelism(ContextParallelConfig)`)
  with its cuDNN attention backend, as the anchors were measured.
- `xfuser`: xDiT 0.7's USP and CFG parallel, eager or `use_torch_compile`: its wrapper of the same
  diffusers pipeline class (Flux, SD3/3.5, PixArt-Σ, Sana, SDXL — the families xDiT supports).
- `cache-dit`: cache-dit 1.5's context / tensor parallelism (`enable_cache(pipe,
  parallelism_config=ParallelismConfig(ulysses_size=…, ring_size=…, tp_size=…))`) with its caching off,
  so it does the same work as ours; `cache-dit-db` turns its DBCache on (approximate: it skips block
  computations on steps where residuals barely change — its fidelity says how far that goes).

Baselines that rewire the model (diffusers-cp, xfuser) get a fresh pipeline built from the same
deterministic random weights, so they never touch the model our layouts run on. xfuser and
diffusers-cp need their degrees to use every launched rank. They are an optional extra
(`pip install .[bench]`); a missing one is reported and skipped.
"""

from __future__ import annotations

import importlib.util

import torch

from shardiff_parallel.config import ParallelConfig

from .layouts import BASELINES


def missing(system: str) -> str | None:
    """Why a baseline cannot run here, or None."""
    if system not in BASELINES:
        return None
    if not torch.cuda.is_available():
        return "needs CUDA (diffusers' parallel modes, xfuser and cache-dit do not run on CPU)"
    if system == "xfuser" and importlib.util.find_spec("xfuser") is None:
        return "xfuser is not installed (pip install .[bench])"
    if system.startswith("cache-dit") and importlib.util.find_spec("cache_dit") is None:
        return "cache-dit is not installed (pip install .[bench])"
    if system == "diffusers-cp":
        try:
            from diffusers import ContextParallelConfig  # noqa: F401
        except ImportError:
            return "this diffusers has no ContextParallelConfig"
    return None


# diffusers pipeline class → xDiT 0.7's wrapper of it.
XFUSER_WRAPPERS = {
    "FluxPipeline": "xFuserFluxPipeline",
    "StableDiffusion3Pipeline": "xFuserStableDiffusion3Pipeline",
    "PixArtSigmaPipeline": "xFuserPixArtSigmaPipeline",
    "SanaPipeline": "xFuserSanaPipeline",
    "StableDiffusionXLPipeline": "xFuserStableDiffusionXLPipeline",
}


def build_baseline(system: str, make_pipe, config: ParallelConfig, *, compile: bool, dtype: torch.dtype):
    """A callable pipeline for `system` with the degrees of `config`."""
    pipe = make_pipe()
    if system == "diffusers-cp":
        from diffusers import ContextParallelConfig

        pipe.transformer.set_attention_backend("_native_cudnn")
        pipe.transformer.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=config.ulysses, ring_degree=config.ring)
        )
        if compile:
            pipe.transformer.compile_repeated_blocks(dynamic=False)
        return pipe
    if system == "xfuser":
        import xfuser
        from xfuser import xFuserArgs
        from xfuser.core.distributed import init_distributed_environment

        wrapper = XFUSER_WRAPPERS.get(type(pipe).__name__)
        if wrapper is None:
            raise ValueError(f"xfuser has no wrapper for {type(pipe).__name__} (it wraps {', '.join(XFUSER_WRAPPERS)})")
        # xfuser keeps its own world-group state; it adopts our already initialised process group.
        init_distributed_environment()
        args = xFuserArgs(
            model="(in memory)", ulysses_degree=config.ulysses, ring_degree=config.ring,
            use_cfg_parallel=config.cfg > 1, use_torch_compile=compile,
        )
        engine_config, _ = args.create_config()
        engine_config.runtime_config.dtype = dtype
        return getattr(xfuser, wrapper)(pipe, engine_config)
    if system.startswith("cache-dit"):
        import cache_dit
        from cache_dit import DBCacheConfig, ParallelismConfig

        # Its own context / tensor parallelism; caching only in the `-db` form (DBCache's defaults).
        sizes = {k: v for k, v in dict(ulysses_size=config.ulysses, ring_size=config.ring, tp_size=config.tp).items()
                 if v > 1}
        if config.cfg > 1 or config.dp > 1:
            raise ValueError("cache-dit has no CFG or data parallelism; use u/r/t degrees")
        cache_dit.enable_cache(
            pipe, cache_config=DBCacheConfig() if system == "cache-dit-db" else None,
            parallelism_config=ParallelismConfig(**sizes) if sizes else None,
        )
        if compile:
            pipe.transformer.compile_repeated_blocks(dynamic=False)
        return pipe
    raise ValueError(f"unknown baseline {system!r}")
