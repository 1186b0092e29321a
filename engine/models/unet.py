"""UNet families (Stable Diffusion 1.5: `sd`, SDXL: `sdxl`): CFG split and data parallelism, never sharding.

A UNet denoiser call is small (0.9B / 2.6B parameters, 4k–16k latent cells at its widest level): split
over GPUs by sequence or tensor, its convolutions and group norms would need halo exchanges and
all-reduces at every one of its ~25 resolution changes, which cost more than the work they share.
What does pay is splitting *independent* work:
- CFG split: the pipeline runs [uncond, cond] as one batch of 2; each of 2 ranks runs one half (the
  plan below is only a `BatchSplit`), and the halves are gathered back before the pipeline's own
  guidance combine, so every rank steps the scheduler with the exact single-GPU noise prediction.
- Data parallel: several images spread over the ranks (engine/data_parallel.py).

Presets: SD1.5 and SDXL with their real configs, Stable Diffusion's safety checker / feature
extractor left out (nothing to download them from, and a random safety checker would black out random
images).

`unet_layout` is the automatic choice between them (what `--parallel auto` does for UNets).
"""

from __future__ import annotations

import functools
import math

import torch

from engine.presets.components import CLIP_G, CLIP_L, SD_VAE, SDXL_VAE, TINY_CLIP_L, TINY_KL, clip_text, kl_vae
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.plan import BatchSplit, ModelPlan, Residuals

from .family import ControlNetSpec, Family, ModelInfo, PipelineSpec, pipeline_specs, vae_scale
from .pag import VALUE_IDENTITY

# The UNet's forward inputs that carry the [uncond, cond] batch. SDXL's added_cond_kwargs
# (text_embeds, time_ids) is a dict: the plan mechanism splits every tensor in it.
UNET_PLAN = ModelPlan(
    batch=BatchSplit({
        "sample": 0, "timestep": 0, "encoder_hidden_states": 0, "class_labels": 0, "timestep_cond": 0,
        "attention_mask": 0, "encoder_attention_mask": 0, "added_cond_kwargs": 0,
    }),
    # The PAG pipelines perturb the self-attention (attn1) of the blocks they name ("mid" by default).
    perturbed=VALUE_IDENTITY,
    # A ControlNet's residuals, batched like `sample` (split over cfg only: UNets split no tokens).
    residuals=Residuals({"down_block_additional_residuals": None, "mid_block_additional_residual": None}),
)

# ControlNetModel: the UNet's encoder again. The pipeline batches [uncond, cond] for it too (the control
# image twice), so each cfg rank runs its branch and keeps its residuals for its UNet half: no gather.
UNET_CONTROLNET_PLAN = ModelPlan(
    batch=BatchSplit({"sample": 0, "timestep": 0, "encoder_hidden_states": 0, "controlnet_cond": 0,
                      "class_labels": 0, "timestep_cond": 0, "attention_mask": 0, "added_cond_kwargs": 0},
                     output_dim=None),
)
# A UNet ControlNet mirrors the whole encoder: nothing to set per layer count (`derive`'s default).
UNET_CONTROLNET = ControlNetSpec(
    classes=("ControlNetModel",), plan=UNET_CONTROLNET_PLAN, denoiser_class="UNet2DConditionModel",
    match=("in_channels", "block_out_channels", "cross_attention_dim", "down_block_types", "layers_per_block",
           "attention_head_dim", "transformer_layers_per_block", "addition_embed_type",
           "projection_class_embeddings_input_dim"),
    multi="MultiControlNetModel",
)


def unet_pipelines(prefix: str) -> tuple[PipelineSpec, ...]:
    """Text-to-image, img2img, inpainting and their PAG forms. img2img takes no height / width (the
    output has the input image's size), so the engine hands it the image at the requested size."""
    t2i, i2i, inp = f"{prefix}Pipeline", f"{prefix}Img2ImgPipeline", f"{prefix}InpaintPipeline"
    pag_t2i, pag_i2i, pag_inp = f"{prefix}PAGPipeline", f"{prefix}PAGImg2ImgPipeline", f"{prefix}PAGInpaintPipeline"
    image, both = ("image",), ("image", "mask_image")
    cn_t2i, cn_i2i, control = f"{prefix}ControlNetPipeline", f"{prefix}ControlNetImg2ImgPipeline", ("control_image",)
    return pipeline_specs(
        PipelineSpec(cls=t2i, variants={"image": i2i, "pag": pag_t2i, "controlnet": cn_t2i}),
        PipelineSpec(cls=i2i, inputs=image, required=image, strength=True, sized=False,
                     variants={"mask_image": inp, "pag": pag_i2i, "controlnet": cn_i2i}),
        # ControlNets (`--controlnet`); the text-to-image one takes the control image as `image`.
        PipelineSpec(cls=cn_t2i, inputs=control, required=control, controlnet=True,
                     arg_names={"control_image": "image"}, variants={"image": cn_i2i}),
        PipelineSpec(cls=cn_i2i, inputs=("image", "control_image"), required=("image", "control_image"),
                     strength=True, controlnet=True),
        PipelineSpec(cls=inp, inputs=both, required=both, strength=True, variants={"pag": pag_inp}),
        PipelineSpec(cls=pag_t2i, pag=True, variants={"image": pag_i2i}),
        PipelineSpec(cls=pag_i2i, inputs=image, required=image, strength=True, sized=False, pag=True,
                     variants={"mask_image": pag_inp}),
        PipelineSpec(cls=pag_inp, inputs=both, required=both, strength=True, pag=True),
    )

UNET_REFUSAL = (
    "a UNet is too small to shard: splitting one denoiser call (--ulysses/--ring/--tp) would exchange "
    "activations at every resolution level and cost more in communication than it saves. Use "
    "--parallel auto (the default): one image with guidance → CFG split over 2 processes (--cfg 2); "
    "several images (--num-images N or several --prompt) → data parallel over all processes (--dp N)"
)
REFUSALS = {"ulysses": UNET_REFUSAL, "ring": UNET_REFUSAL, "tp": UNET_REFUSAL}
FAST_PATH_REFUSALS = {
    "quantize": "the SD1.5 / SDXL UNets' time goes to convolutions, which FP8 linears do not speed up",
    "cache": "the SD1.5 / SDXL UNets have no stack of identical blocks for a first-block cache",
    "quantize_qkv": "the SD1.5 / SDXL UNets' attention is not split (CFG split and data parallel exchange no Q, K "
                    "or V)",
}

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

def read_unet_info(configs, *, family: str, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    """ModelInfo of a UNet pipeline from its unet and vae configs (joint_attention_dim is the
    cross-attention width, pooled_projection_dim SDXL's pooled text width)."""
    unet, vae = configs["unet"], configs["vae"]
    scale = vae_scale(vae)
    blocks = unet.get("down_block_types", [])
    heads_cfg = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    heads = heads_cfg if isinstance(heads_cfg, list) else [heads_cfg] * len(blocks)
    channels = unet.get("block_out_channels", [320])
    first = next((i for i, b in enumerate(blocks) if "CrossAttn" in b), 0)
    pooled = 0
    if unet.get("addition_embed_type") == "text_time":
        pooled = int(unet["projection_class_embeddings_input_dim"]) - 6 * int(unet["addition_time_embed_dim"])
    return ModelInfo(
        source=source, family=family,
        pipeline_class=pipeline_class,
        num_heads=int(heads[first]), head_dim=int(channels[first]) // int(heads[first]),
        num_layers=len(blocks), num_single_layers=0,
        in_channels=int(unet.get("in_channels", 4)),
        joint_attention_dim=int(unet.get("cross_attention_dim", 768)),
        pooled_projection_dim=pooled,
        vae_scale_factor=scale,
        spatial_multiple=scale,  # the UNet itself copes with odd latent sizes
        default_size=int(default_size or int(unet.get("sample_size", 64)) * scale),
        # LCM-style distilled UNets embed the guidance scale instead of running two branches.
        uses_guidance_embeds=unet.get("time_cond_proj_dim") is not None,
    )


# ---------------------------------------------------------------- presets

# runwayml/stable-diffusion-v1-5 unet/config.json ("attention_head_dim": 8 is really the head count).
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (non-default entries).
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
)
# The real scheduler configs: SD1.5 ships PNDM, SDXL Euler.
SD15_SCHEDULER = ("PNDMScheduler", dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
))
SDXL_SCHEDULER = ("EulerDiscreteScheduler", dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    interpolation_type="linear", prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    use_karras_sigmas=False,
))
# Pipeline arguments that are not weights: no safety checker / feature extractor / image encoder
# (nothing to download them from), no invisible watermark (it changes pixels and needs a package).
SD_EXTRA = dict(safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
SDXL_EXTRA = dict(feature_extractor=None, image_encoder=None, add_watermarker=False)
TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, sample_size=8)
TINY_VAE = {**TINY_KL, "sample_size": 64}


def sd_preset(name, description, default_size, unet, vae, clip) -> PresetSpec:
    return PresetSpec(
        name=name, family="sd", pipeline_class="StableDiffusionPipeline", description=description,
        default_size=default_size, scheduler=SD15_SCHEDULER, extra=dict(SD_EXTRA), tokenizers={"tokenizer": "clip"},
        components={"unet": Component("diffusers", "UNet2DConditionModel", unet), "vae": kl_vae(vae),
                    "text_encoder": clip_text(clip)},
    )


def sdxl_preset(name, description, default_size, unet, vae, clip_l, clip_g) -> PresetSpec:
    return PresetSpec(
        name=name, family="sdxl", pipeline_class="StableDiffusionXLPipeline", description=description,
        default_size=default_size, scheduler=SDXL_SCHEDULER, extra=dict(SDXL_EXTRA),
        tokenizers={"tokenizer": "clip", "tokenizer_2": "clip"},
        components={"unet": Component("diffusers", "UNet2DConditionModel", unet), "vae": kl_vae(vae),
                    "text_encoder": clip_text(clip_l), "text_encoder_2": clip_text(clip_g, projection=True)},
    )


SD_PRESETS = (
    sd_preset("sd1.5", "Stable Diffusion 1.5 shapes (0.86B UNet, CLIP-L, PNDM), random weights", 512,
              SD15_UNET, SD_VAE, CLIP_L),
    sd_preset("sd1.5-tiny", "tiny SD1.5 for CPU tests: 2-level UNet (32, 64), 4-level VAE (scale 8)", 64,
              {**SD15_UNET, **TINY_UNET, "cross_attention_dim": 32, "attention_head_dim": 4,
               "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
              {**SD_VAE, **TINY_VAE}, TINY_CLIP_L),
)
SDXL_PRESETS = (
    sdxl_preset("sdxl", "SDXL base 1.0 shapes (2.6B UNet, CLIP-L + bigG, Euler), random weights", 1024,
                SDXL_UNET, SDXL_VAE, CLIP_L, CLIP_G),
    # cross_attention_dim = 32 + 32 (both towers' hidden states concatenated); the add embedding takes the
    # pooled text (32) and 6 time ids × 8.
    sdxl_preset("sdxl-tiny", "tiny SDXL for CPU tests: 2-level UNet (32, 64) with text-time embedding, two CLIPs", 64,
                {**SDXL_UNET, **TINY_UNET, "cross_attention_dim": 64, "attention_head_dim": [2, 4],
                 "transformer_layers_per_block": [1, 2], "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 32 + 6 * 8,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
                {**SDXL_VAE, **TINY_VAE}, TINY_CLIP_L, TINY_CLIP_L),
)


def _unet_family(name: str, prefix: str, presets) -> Family:
    return Family(
        name=name, pipelines=unet_pipelines(prefix), plan=UNET_PLAN, read_info=functools.partial(read_unet_info, family=name), call_kwargs=unet_call_kwargs,
        bench_kwargs=unet_bench_kwargs, presets=presets, axes=frozenset({"cfg", "dp"}), denoiser="unet",
        refusals={**REFUSALS, **FAST_PATH_REFUSALS}, layout=unet_layout, gpu_dtype=torch.float16, controlnet=UNET_CONTROLNET,
    )


SD = _unet_family("sd", "StableDiffusion", SD_PRESETS)
SDXL = _unet_family("sdxl", "StableDiffusionXL", SDXL_PRESETS)
