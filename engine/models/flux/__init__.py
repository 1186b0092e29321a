"""Flux (FluxPipeline and its img2img / inpaint / Fill / Kontext / Control forms, FluxTransformer2DModel):
the family's plans, pipelines, call, config reader and presets.

Sequence parallelism splits the joint [text, image] stream (engine/models/flux/attention.py); TP's
plans are in engine/models/flux/tp.py. The editing pipelines need nothing more from the plans:
- Fill and Control concatenate their conditioning latents (masked image and mask; control image) to
  the noisy latents along the channels (`hidden_states` [B, S, 64 + 320] / [B, S, 128]): tokens stay
  tokens, each rank's piece carries its own conditioning channels, `x_embedder` (replicated) reads them.
- Kontext appends the reference image's tokens to the sequence (`hidden_states` [B, S_img + S_ref, 64],
  `img_ids` with its own positions: first id 1) and keeps the first S_img of the output: the plan
  splits the whole concatenation as the "image" group, ids alike, and gathers it whole before the
  pipeline slices it. Attention does not care where on the ranks a token lands. CFG: FluxPipeline's true CFG (a negative prompt and
true_cfg_scale > 1) calls the transformer twice per step, prompt then negative prompt, and combines
the two predictions after the second call: the engine runs those two calls on the two cfg ranks at
once (`cfg_pairs`, parallel/plan/cfg_pairs.py). Flux-dev's embedded `guidance_scale` is not CFG
(one call), so it does not count.
"""

from __future__ import annotations

import torch

from engine.presets.components import CLIP_L, FLUX_VAE, T5_XXL, TINY_CLIP_L, TINY_KL, TINY_T5, clip_text, kl_vae, t5_encoder
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import (BatchSplit, JointSeqDim, ModelPlan, Processors, Residuals, SeqDim, SequenceSplit,
                                    TensorPlan)

from ..family import ControlNetSpec, Family, ModelInfo, PipelineSpec, pipeline_specs, prompt_kwargs, vae_scale
from ..mmdit import check_tp_widths
from .attention import FluxParallelAttnProcessor
from .tp import FLUX_TP_PLAN, FLUX_TP_SEQUENCE_PLAN

FLUX_PLAN = ModelPlan(
    attention=Processors({
        "transformer_blocks.*.attn": FluxParallelAttnProcessor,
        "single_transformer_blocks.*.attn": FluxParallelAttnProcessor,
    }),
    sequence=SequenceSplit(
        inputs={
            "hidden_states": SeqDim("image", 1),
            "img_ids": SeqDim("image", -2),
            "encoder_hidden_states": SeqDim("text", 1),
            "txt_ids": SeqDim("text", -2),
        },
        output=SeqDim("image", 1),
    ),
    batch=BatchSplit({
        "hidden_states": 0, "encoder_hidden_states": 0, "pooled_projections": 0, "timestep": 0, "guidance": 0,
    }),
    tensor=TensorPlan(FLUX_TP_PLAN, FLUX_TP_SEQUENCE_PLAN),
    # A ControlNet's block samples, added to the image stream: split like it (FLUX_CONTROLNET_PLAN
    # leaves them so).
    residuals=Residuals({"controlnet_block_samples": SeqDim("image", 1),
                         "controlnet_single_block_samples": SeqDim("image", 1)}),
)

# FluxControlNetModel: the same blocks over the same streams. A Union ControlNet prepends one mode
# token to the text stream inside forward (and one id to txt_ids), so the text is not split at the
# input — every rank would prepend it — but where the first block receives it; the rotary table
# (over [text + mode, image]) where `pos_embed` returns it, each group's segment by its own split.
# The image stream and the control latents are split at the input; the block samples leave as this
# rank's pieces (`residual_output`), which the transformer adds to its own pieces. No batch part:
# under true CFG the pipeline runs the ControlNet once (cond) for both transformer calls, so every
# cfg rank runs it whole-batch.
_ROTARY = JointSeqDim(("text", "image"), 0)
FLUX_CONTROLNET_PLAN = ModelPlan(
    attention=FLUX_PLAN.attention,
    sequence=SequenceSplit(
        inputs={"hidden_states": SeqDim("image", 1), "controlnet_cond": SeqDim("image", 1)},
        modules={"pos_embed": (_ROTARY, _ROTARY)},
        module_inputs={"transformer_blocks.0": {"encoder_hidden_states": SeqDim("text", 1)}},
        residual_output=SeqDim("image", 1),
    ),
    tensor=TensorPlan(FLUX_TP_PLAN),
)

def flux_controlnet_refusals(controlnet: dict) -> list[str]:
    if int(controlnet.get("num_layers", 19)) < 1:
        return ["num_layers 0 (shardiff splits the text stream where the first dual-stream block takes it)"]
    return []


def flux_controlnet_sequence_refusal(controlnet: dict) -> str | None:
    if controlnet.get("conditioning_embedding_channels") is not None:
        return ("this Flux ControlNet takes its control image in pixels (conditioning_embedding_channels: an "
                "input hint block of convolutions), which is not split by tokens: run it without --ulysses / --ring")
    return None


FLUX_CONTROLNET = ControlNetSpec(
    classes=("FluxControlNetModel",), plan=FLUX_CONTROLNET_PLAN, denoiser_class="FluxTransformer2DModel",
    match=("num_attention_heads", "attention_head_dim", "in_channels", "joint_attention_dim", "pooled_projection_dim",
           "guidance_embeds", "axes_dims_rope", "patch_size"),
    refusals=flux_controlnet_refusals, multi="FluxMultiControlNetModel",
    sequence_refusal=flux_controlnet_sequence_refusal,
    # InstantX's Union for FLUX.1-dev: 5 dual-stream and 10 single-stream blocks, 10 modes.
    derive=lambda layers, single_layers=0, num_mode=None: dict(num_layers=layers, num_single_layers=single_layers,
                                                               num_mode=num_mode),
)

# Where FluxPipeline's own default image size comes from when the VAE config has none.
DEFAULT_SIZE = 1024


def flux_call_kwargs(request) -> dict:
    """FluxPipeline arguments that depend on the request beyond size, steps, seed and output type."""
    return {**prompt_kwargs(request), "true_cfg_scale": request.true_cfg_scale}


def flux_uses_cfg(kwargs: dict) -> bool:
    has_negative = kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None
    return kwargs.get("true_cfg_scale", 1.0) > 1 and has_negative


def flux_token_counts(info, kwargs: dict, height: int, width: int) -> dict[str, int]:
    """Tokens of each group that the Flux pipelines give the transformer: T5 pads the prompt to
    max_sequence_length; one image token per 2×2 latent patch, and Kontext's reference image's tokens."""
    import inspect

    from diffusers import FluxPipeline

    text = kwargs.get("max_sequence_length")
    if text is None:
        text = inspect.signature(FluxPipeline.__call__).parameters["max_sequence_length"].default
    m = info.spatial_multiple
    return {"text": text, "image": (height // m) * (width // m) + kontext_reference_tokens(info, kwargs)}


def kontext_call(request, height: int, width: int) -> dict:
    """FluxKontextPipeline rescales the output to `max_area` pixels (1024² by default): the requested size
    is kept by asking for exactly its area. It also resizes the reference image to the nearest resolution
    Kontext was trained at, unless the request keeps the image's own size."""
    return {"max_area": height * width, "_auto_resize": not request.keep_image_size}


def kontext_reference_tokens(info, kwargs: dict) -> int:
    """Tokens of Kontext's reference image, sized as FluxKontextPipeline sizes it (0 without one)."""
    image = kwargs.get("image")
    if "max_area" not in kwargs or image is None:
        return 0
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    m = info.spatial_multiple
    width, height = (v - v % m for v in image.size)
    if kwargs.get("_auto_resize", True):
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return (height // m) * (width // m)


_IMAGE, _MASK, _CONTROL = "image", "mask_image", "control_image"
FLUX_PIPELINES = pipeline_specs(
    PipelineSpec(cls="FluxPipeline", variants={"image": "FluxImg2ImgPipeline", "controlnet": "FluxControlNetPipeline"}),
    PipelineSpec(cls="FluxImg2ImgPipeline", inputs=(_IMAGE,), required=(_IMAGE,), strength=True,
                 variants={"mask_image": "FluxInpaintPipeline", "controlnet": "FluxControlNetImg2ImgPipeline"}),
    PipelineSpec(cls="FluxInpaintPipeline", inputs=(_IMAGE, _MASK), required=(_IMAGE, _MASK), strength=True,
                 variants={"controlnet": "FluxControlNetInpaintPipeline"}),
    # ControlNets (`--controlnet`): the ControlNet's residuals added to the transformer's blocks.
    PipelineSpec(cls="FluxControlNetPipeline", inputs=(_CONTROL,), required=(_CONTROL,), controlnet=True,
                 variants={"image": "FluxControlNetImg2ImgPipeline"}),
    PipelineSpec(cls="FluxControlNetImg2ImgPipeline", inputs=(_IMAGE, _CONTROL), required=(_IMAGE, _CONTROL),
                 strength=True, controlnet=True, variants={"mask_image": "FluxControlNetInpaintPipeline"}),
    PipelineSpec(cls="FluxControlNetInpaintPipeline", inputs=(_IMAGE, _MASK, _CONTROL),
                 required=(_IMAGE, _MASK, _CONTROL), strength=True, controlnet=True),
    # FLUX.1-Fill: its own transformer (masked image and mask as extra input channels).
    PipelineSpec(cls="FluxFillPipeline", inputs=(_IMAGE, _MASK), required=(_IMAGE, _MASK), strength=True),
    # FLUX.1-Kontext: edits the reference image; without one it draws from text alone.
    PipelineSpec(cls="FluxKontextPipeline", inputs=(_IMAGE,), call_extra=kontext_call),
    # FLUX.1-Canny / -Depth: the control image's latents as extra input channels.
    PipelineSpec(cls="FluxControlPipeline", inputs=(_CONTROL,), required=(_CONTROL,),
                 variants={"image": "FluxControlImg2ImgPipeline"}),
    PipelineSpec(cls="FluxControlImg2ImgPipeline", inputs=(_IMAGE, _CONTROL), required=(_IMAGE, _CONTROL),
                 strength=True, variants={"mask_image": "FluxControlInpaintPipeline"}),
    PipelineSpec(cls="FluxControlInpaintPipeline", inputs=(_IMAGE, _MASK, _CONTROL), required=(_IMAGE, _MASK, _CONTROL),
                 strength=True),
)


def flux_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random prompt embeddings of the real shapes (no text encoders), as the anchors were measured."""
    gen = torch.Generator("cpu").manual_seed(1234)
    return dict(
        prompt_embeds=torch.randn(1, text_tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        pooled_prompt_embeds=torch.randn(1, info.pooled_projection_dim, generator=gen).to(device, dtype),
        max_sequence_length=text_tokens,
        guidance_scale=3.5,
    )


def read_flux_info(configs, *, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    transformer, vae = configs["transformer"], configs["vae"]
    scale = vae_scale(vae)
    return ModelInfo(
        source=source,
        family="flux",
        pipeline_class=pipeline_class,
        num_heads=int(transformer.get("num_attention_heads", 24)),
        head_dim=int(transformer.get("attention_head_dim", 128)),
        num_layers=int(transformer.get("num_layers", 19)),
        num_single_layers=int(transformer.get("num_single_layers", 38)),
        in_channels=int(transformer.get("in_channels", 64)),
        joint_attention_dim=int(transformer.get("joint_attention_dim", 4096)),
        pooled_projection_dim=int(transformer.get("pooled_projection_dim", 768)),
        vae_scale_factor=scale,
        # Flux packs 2x2 latent cells into one token.
        spatial_multiple=scale * 2,
        default_size=int(default_size or vae.get("sample_size") or DEFAULT_SIZE),
        uses_guidance_embeds=bool(transformer.get("guidance_embeds", False)),
    )


# ---------------------------------------------------------------- presets

FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
# FLUX.1-schnell is timestep-distilled: fixed sigmas, no resolution-dependent shift.
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}

# black-forest-labs/FLUX.1-dev transformer/config.json (axes_dims_rope is the default).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)
FLUX_TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=8, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)


# The editing models' transformers differ in their input channels only: Fill reads [latents 64, masked
# image 64, mask 256 (an 8×8 pixel patch per latent cell, packed 2×2)], Control [latents 64, control 64];
# both predict the 64 latent channels. At tiny size (4 latent channels): 16 + 16 + 256 and 16 + 16.
FLUX_FILL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "in_channels": 384, "out_channels": 64}
FLUX_CONTROL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "in_channels": 128, "out_channels": 64}
FLUX_TINY_FILL_TRANSFORMER = {**FLUX_TINY_TRANSFORMER, "in_channels": 16 + 16 + 256, "out_channels": 16}
FLUX_TINY_CONTROL_TRANSFORMER = {**FLUX_TINY_TRANSFORMER, "in_channels": 32, "out_channels": 16}


def flux_preset(name: str, description: str, default_size: int, transformer: dict, vae: dict, clip: dict, t5: dict,
                scheduler: dict = FLUX_DEV_SCHEDULER, pipeline_class: str = "FluxPipeline") -> PresetSpec:
    return PresetSpec(
        name=name, family="flux", pipeline_class=pipeline_class, description=description, default_size=default_size,
        components={
            "transformer": Component("diffusers", "FluxTransformer2DModel", transformer),
            "vae": kl_vae(vae),
            "text_encoder": clip_text(clip),
            "text_encoder_2": t5_encoder(t5),
        },
        tokenizers={"tokenizer": "clip", "tokenizer_2": "t5"},
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(scheduler)),
    )


# 4 latent channels x 2x2 packing = the tiny transformer's 16 input channels.
FLUX_TINY_VAE = {**FLUX_VAE, **TINY_KL, "latent_channels": 4, "sample_size": 128}
FLUX_TINY_T5 = {**TINY_T5, "d_model": 64}


def _tiny(name: str, description: str, transformer: dict, pipeline_class: str = "FluxPipeline") -> PresetSpec:
    return flux_preset(name, description, 128, transformer, FLUX_TINY_VAE, TINY_CLIP_L, FLUX_TINY_T5,
                       pipeline_class=pipeline_class)


PRESETS = (
    _tiny("flux-tiny", "tiny Flux for CPU tests: 2+2 blocks, 8 heads x 16, 4-level VAE (scale 8)", FLUX_TINY_TRANSFORMER),
    _tiny("flux-fill-tiny", "tiny FLUX.1-Fill (FluxFillPipeline): flux-tiny reading 16 + 16 + 256 channels",
          FLUX_TINY_FILL_TRANSFORMER, "FluxFillPipeline"),
    _tiny("flux-kontext-tiny", "tiny FLUX.1-Kontext (FluxKontextPipeline): flux-tiny's transformer",
          FLUX_TINY_TRANSFORMER, "FluxKontextPipeline"),
    _tiny("flux-control-tiny", "tiny FLUX.1-Canny/Depth (FluxControlPipeline): flux-tiny reading 32 channels",
          FLUX_TINY_CONTROL_TRANSFORMER, "FluxControlPipeline"),
    flux_preset("flux-dev", "FLUX.1-dev shapes (12B transformer, CLIP-L, T5-XXL), random weights", 1024,
                FLUX_DEV_TRANSFORMER, FLUX_VAE, CLIP_L, T5_XXL),
    flux_preset("flux-kontext-dev", "FLUX.1-Kontext-dev shapes (FluxKontextPipeline, flux-dev's transformer), random weights",
                1024, FLUX_DEV_TRANSFORMER, FLUX_VAE, CLIP_L, T5_XXL, pipeline_class="FluxKontextPipeline"),
    flux_preset("flux-fill-dev", "FLUX.1-Fill-dev shapes (FluxFillPipeline, 384 input channels), random weights", 1024,
                FLUX_FILL_TRANSFORMER, FLUX_VAE, CLIP_L, T5_XXL, pipeline_class="FluxFillPipeline"),
    flux_preset("flux-canny-dev", "FLUX.1-Canny-dev shapes (FluxControlPipeline, 128 input channels), random weights",
                1024, FLUX_CONTROL_TRANSFORMER, FLUX_VAE, CLIP_L, T5_XXL, pipeline_class="FluxControlPipeline"),
    flux_preset("flux-schnell", "FLUX.1-schnell shapes (no guidance embedding, unshifted scheduler), random weights",
                1024, {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}, FLUX_VAE, CLIP_L, T5_XXL,
                FLUX_SCHNELL_SCHEDULER),
)

# --quantize fp8: every linear of the blocks — attention, MLPs and the AdaLN modulation (27% of the weights:
# FP8 halves what each step reads of them) — while the embedders and the final projection, outside the
# blocks, stay in the model's dtype: they add the largest error per parameter. On the trained `shapes` model,
# one group alone in FP8 moves the output by 0.1–1.1% for each block group, modulation included, but 2.8%
# (x_embedder) and 2.2% (final proj_out) for those two (`python -m engine.bench.fp8_layers --model shapes`).
FLUX_FP8 = Fp8Rule(include=("transformer_blocks.*", "single_transformer_blocks.*"))

FAMILY = Family(
    name="flux", pipelines=FLUX_PIPELINES, plan=FLUX_PLAN, read_info=read_flux_info,
    call_kwargs=flux_call_kwargs, bench_kwargs=flux_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "tp", "cfg"}), check_tp=check_tp_widths,
    uses_cfg=flux_uses_cfg, cfg_pairs=True, token_counts=flux_token_counts, controlnet=FLUX_CONTROLNET,
    fp8=FLUX_FP8, cache_stacks=("transformer_blocks", "single_transformer_blocks"),
)
