"""UNet families (Stable Diffusion 1.5: `sd`, SDXL: `sdxl`): CFG split and data parallelism, never sharding.

A UNet denoiser call is small (0.9B / 2.6B parameters, 4k–16k latent cells at its widest level): split
over GPUs by sequence or tensor, its convolutions and group norms would need halo exchanges and
all-reduces at every one of its ~25 resolution changes, which cost more than the work they share.
What does pay is splitting *independent* work:
- CFG split: the pipeline runs [uncond, cond] as one batch of 2; each of 2 ranks runs one half (the
  plan below is only `batch_inputs`), and the halves are gathered back before the pipeline's own
  guidance combine, so every rank steps the scheduler with the exact single-GPU noise prediction.
- Data parallel: several images spread over the ranks (engine/data_parallel.py).

`unet_layout` is the automatic choice between them (what `--parallel auto` does for UNets).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from parallel.config import ParallelConfig
from parallel.plan import ModelPlan

# The UNet's forward inputs that carry the [uncond, cond] batch. SDXL's added_cond_kwargs
# (text_embeds, time_ids) is a dict: the plan mechanism splits every tensor in it.
UNET_PLAN = ModelPlan(
    batch_inputs={
        "sample": 0, "timestep": 0, "encoder_hidden_states": 0, "class_labels": 0, "timestep_cond": 0,
        "attention_mask": 0, "encoder_attention_mask": 0, "added_cond_kwargs": 0,
    },
)

UNET_REFUSAL = (
    "a UNet is too small to shard: splitting one denoiser call (--ulysses/--ring/--tp) would exchange "
    "activations at every resolution level and cost more in communication than it saves. Use "
    "--parallel auto (the default): one image with guidance → CFG split over 2 processes (--cfg 2); "
    "several images (--num-images N or several --prompt) → data parallel over all processes (--dp N)"
)
REFUSALS = {"ulysses": UNET_REFUSAL, "ring": UNET_REFUSAL, "tp": UNET_REFUSAL}

CLIP_TOKENS = 77  # SD/SDXL text length is fixed by CLIP's position embeddings


def unet_call_kwargs(request) -> dict:
    """StableDiffusion(XL)Pipeline arguments beyond size, steps, generator and output type."""
    if request.true_cfg_scale != 1.0:
        raise ValueError("--true-cfg-scale is Flux's true CFG; Stable Diffusion uses --guidance (classic CFG)")
    if request.max_sequence_length not in (None, CLIP_TOKENS):
        raise ValueError(f"Stable Diffusion's CLIP text encoders take exactly {CLIP_TOKENS} tokens; "
                         "drop --max-sequence-length")
    return dict(prompt=request.prompt, negative_prompt=request.negative_prompt, guidance_scale=request.guidance)


def unet_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random CLIP embeddings of the real shapes (77 tokens whatever --text-tokens says), guidance 7."""
    import torch

    gen = torch.Generator("cpu").manual_seed(1234)
    emb = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    kwargs = dict(prompt_embeds=emb(1, CLIP_TOKENS, info.joint_attention_dim),
                  negative_prompt_embeds=emb(1, CLIP_TOKENS, info.joint_attention_dim), guidance_scale=7.0)
    if info.family == "sdxl":
        kwargs |= dict(pooled_prompt_embeds=emb(1, info.pooled_projection_dim),
                       negative_pooled_prompt_embeds=emb(1, info.pooled_projection_dim))
    return kwargs


# ---------------------------------------------------------------- automatic layout

def _fixed(world: int, cfg: int, dp: int) -> tuple[ParallelConfig, str]:
    """Degrees the user gave; the one left at 1 takes the remaining processes."""
    if cfg > 1 and dp == 1 and world % cfg == 0:
        dp = world // cfg
    elif dp > 1 and cfg == 1 and world % dp == 0 and world // dp <= 2:
        cfg = world // dp
    layout = ParallelConfig(cfg=cfg, dp=dp)
    if layout.world_size != world:
        if cfg == 2 and world % 2:
            raise ValueError(f"CFG split pairs the processes (one per guidance branch), but {world} were launched; "
                             f"launch an even number, or use data parallel (--parallel dp, --dp {world})")
        raise ValueError(
            f"--cfg {cfg} × --dp {dp} uses {layout.world_size} processes, but {world} were launched; for a UNet "
            f"use --dp {world}" + (f" or --cfg 2 --dp {world // 2}" if world % 2 == 0 else "")
        )
    return layout, f"as asked: {layout.describe()}"


def unet_layout(world: int, config, guided: list[bool] | None) -> tuple[ParallelConfig, str]:
    """The layout for a batch of images, and a sentence saying why.

    `guided[i]` says whether image i runs two guidance branches; None: not known yet (the engine is
    starting), planned as one guided image, the common case. Explicit --cfg/--dp are kept as given.
    Otherwise, with W processes and n images: CFG split (cfg 2 × dp W/2) when every image is guided,
    W is even and it takes no more rounds than plain data parallel (ceil(n / (W/2)) == ceil(n / W):
    each round is then up to 2× faster); data parallel over all W processes otherwise.
    """
    for axis in REFUSALS:
        if (getattr(config, axis) or 1) > 1:
            raise ValueError(f"{config.model} is a UNet model and cannot use --{axis}: {REFUSALS[axis]}")
    if config.cfg > 1 or config.dp > 1:
        return _fixed(world, config.cfg, config.dp)
    if config.parallel == "cfg":
        return _fixed(world, 2, 1)
    if config.parallel == "dp":
        return _fixed(world, 1, world)
    if world == 1:
        return ParallelConfig(), "one process"
    n = 1 if guided is None else len(guided)
    all_guided = guided is None or (n > 0 and all(guided))
    half = world // 2
    if all_guided and world % 2 == 0 and math.ceil(n / half) <= math.ceil(n / world):
        what = "1 image" if n == 1 else f"{n} images"
        idle = f"; {half - n} CFG pair(s) idle" if n < half else ""
        return ParallelConfig(cfg=2, dp=half), (
            f"{what} with guidance on: CFG split (conditional and unconditional branch on 2 processes)"
            + (f" × data parallel over {half} pairs" if half > 1 else "") + idle
        )
    per = math.ceil(n / world)
    why = ("guidance is off" if n == 1 else "guidance is off for some images") if not all_guided else (
        "an odd number of processes cannot pair the CFG branches" if world % 2 else f"{n} images")
    idle = f"; {world - n} process(es) idle" if n < world else ""
    return ParallelConfig(dp=world), f"{why}: data parallel over {world} processes (≤ {per} image(s) each){idle}"


# ---------------------------------------------------------------- ModelInfo

def unet_info(*, source: str, family: str, pipeline_class: str, unet: dict[str, Any], vae: dict[str, Any]):
    """ModelInfo of a UNet pipeline from its unet and vae configs (the Flux-named fields get their UNet
    meaning: joint_attention_dim = cross-attention width, pooled_projection_dim = SDXL pooled text width)."""
    from engine.model_info import ModelInfo

    vae_scale_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    blocks = unet.get("down_block_types", [])
    heads_cfg = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    heads = heads_cfg if isinstance(heads_cfg, list) else [heads_cfg] * len(blocks)
    channels = unet.get("block_out_channels", [320])
    first = next((i for i, b in enumerate(blocks) if "CrossAttn" in b), 0)
    pooled = 0
    if unet.get("addition_embed_type") == "text_time":
        pooled = int(unet["projection_class_embeddings_input_dim"]) - 6 * int(unet["addition_time_embed_dim"])
    return ModelInfo(
        source=source, family=family, pipeline_class=pipeline_class,
        num_heads=int(heads[first]), head_dim=int(channels[first]) // int(heads[first]),
        num_layers=len(blocks), num_single_layers=0,
        in_channels=int(unet.get("in_channels", 4)),
        joint_attention_dim=int(unet.get("cross_attention_dim", 768)),
        pooled_projection_dim=pooled,
        vae_scale_factor=vae_scale_factor,
        spatial_multiple=vae_scale_factor,  # the UNet itself copes with odd latent sizes
        default_size=int(unet.get("sample_size", 64)) * vae_scale_factor,
        # LCM-style distilled UNets embed the guidance scale instead of running two branches.
        uses_guidance_embeds=unet.get("time_cond_proj_dim") is not None,
    )


def unet_preset_info(spec):
    return unet_info(source="preset", family=spec.family, pipeline_class=spec.pipeline_class,
                     unet=spec.unet, vae=spec.vae)


def unet_dir_info(path: Path, family: str, pipeline_class: str, read_json):
    return unet_info(source="directory", family=family, pipeline_class=pipeline_class,
                     unet=read_json(path / "unet" / "config.json", f"model directory {path}"),
                     vae=read_json(path / "vae" / "config.json", f"model directory {path}"))


# Pipeline class → family, for diffusers directories.
UNET_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
