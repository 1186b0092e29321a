"""Qwen-Image's editing pipelines: img2img, inpainting, Edit, Edit-Plus (several reference images), Edit
inpainting — which pipeline a request runs, their size rules, and the edit models' presets.

What the transformer gets. img2img and inpainting hand it what text-to-image does (the pipeline noises
the input image's latents; inpainting blends the kept region back after each step). The Edit pipelines
append each reference image's latent tokens to the image stream (`hidden_states` [B, S_out + Σ S_ref, 64])
with its own token grid in `img_shapes` ([(1, h_out, w_out), (1, h_ref, w_ref), …]: the rotary table
gives reference i the frame index i + 1, the text's positions start after the largest grid), and keep
the first S_out outputs. The plan's "image" group is the whole concatenation — split with the rotary
table computed whole, gathered whole before the pipeline slices it — as Kontext's. Edit-2511's
`zero_cond_t` modulates the reference tokens with the timestep 0 (`modulate_index`, split with them).
The text comes from Qwen2.5-VL seeing the images (its processor: engine/loading/processors.py).

Sizes. Every Edit form encodes each reference at ~1024² pixels (its aspect kept, sides multiples of 32)
whatever the output size; Edit and Edit-Plus draw at the size asked, by default (as diffusers) at 1024²
pixels with the aspect of the image (Edit-Plus: of the last image); Edit inpainting always draws at that
size (asking for another is refused).
"""

from __future__ import annotations

from engine.presets.components import QWEN25_VL_7B, QWEN_IMAGE_VAE, TINY_QWEN25_VL, qwen25_vl, qwen_image_vae
from engine.presets.spec import Component, PresetSpec, Processor

from ..family import PipelineSpec, pipeline_specs

EDIT_AREA = 1024 * 1024
"""Pixels the Edit pipelines encode each reference at, and draw at by default (diffusers' constants)."""
MAX_REFERENCES = 3
"""Reference images Edit-Plus takes: Qwen's model cards for Edit-2509 / -2511 give 1 to 3 as its range."""


def edit_size(images: list) -> tuple[int, int]:
    """(height, width) QwenImageEditPipeline draws at by default: EDIT_AREA at the first image's aspect."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(EDIT_AREA, images[0].width / images[0].height)
    return height, width


def edit_plus_size(images: list) -> tuple[int, int]:
    """(height, width) QwenImageEditPlusPipeline draws at by default: EDIT_AREA at the last image's aspect."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    width, height = calculate_dimensions(EDIT_AREA, images[-1].width / images[-1].height)
    return height, width


def edit_plus_call(request, height: int, width: int) -> dict:
    """QwenImageEditPlusPipeline runs one prompt per call (diffusers refuses a batch of them)."""
    if isinstance(request.prompt, list) and len(request.prompt) > 1:
        raise ValueError("QwenImageEditPlusPipeline takes one prompt per call; give each prompt its own request")
    return {}


_IMAGE, _MASK = "image", "mask_image"
QWEN_IMAGE_PIPELINES = pipeline_specs(
    PipelineSpec(cls="QwenImagePipeline", variants={"image": "QwenImageImg2ImgPipeline"}),
    PipelineSpec(cls="QwenImageImg2ImgPipeline", inputs=(_IMAGE,), required=(_IMAGE,), strength=True,
                 variants={"mask_image": "QwenImageInpaintPipeline"}),
    PipelineSpec(cls="QwenImageInpaintPipeline", inputs=(_IMAGE, _MASK), required=(_IMAGE, _MASK), strength=True),
    # Qwen-Image-Edit: the reference image edited; with a mask, repainted there.
    PipelineSpec(cls="QwenImageEditPipeline", inputs=(_IMAGE,), required=(_IMAGE,), size_rule=edit_size,
                 variants={"mask_image": "QwenImageEditInpaintPipeline"}),
    PipelineSpec(cls="QwenImageEditInpaintPipeline", inputs=(_IMAGE, _MASK), required=(_IMAGE, _MASK), strength=True,
                 size_rule=edit_size, fixed_size=True),
    # Qwen-Image-Edit-2509 / -2511: one to three reference images.
    PipelineSpec(cls="QwenImageEditPlusPipeline", inputs=(_IMAGE,), required=(_IMAGE,), max_images=MAX_REFERENCES,
                 size_rule=edit_plus_size, call_extra=edit_plus_call),
)

# ---------------------------------------------------------------- presets

# Qwen/Qwen-Image-Edit processor/preprocessor_config.json (Qwen2.5-VL-7B-Instruct's): 28-pixel merged
# patches, from 56² to 12845056 pixels.
QWEN25_VL_IMAGE_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                 merge_size=2)
QWEN25_VL_PROCESSOR = Processor("Qwen2VLProcessor", "qwen2.5-vl", QWEN25_VL_IMAGE_PROCESSOR)
# The tiny presets: the edit pipelines hand Qwen2.5-VL each image at up to ~1024² pixels, which its
# processor would keep (1296 image tokens); at most 64 merged patches of 28² pixels keep the text short.
TINY_QWEN25_VL_PROCESSOR = Processor("Qwen2VLProcessor", "qwen2.5-vl",
                                     {**QWEN25_VL_IMAGE_PROCESSOR, "max_pixels": 64 * 28 * 28})


def qwen_image_preset(name: str, description: str, pipeline_class: str, default_size: int, transformer: dict,
                      vae: dict, text_encoder: dict, scheduler: dict,
                      processor: Processor | None = QWEN25_VL_PROCESSOR) -> PresetSpec:
    """A Qwen-Image preset: text-to-image (`processor` None) or an edit form (its vision-language processor)."""
    return PresetSpec(
        name=name, family="qwen-image", pipeline_class=pipeline_class, description=description,
        default_size=default_size,
        components={
            "transformer": Component("diffusers", "QwenImageTransformer2DModel", transformer),
            "vae": qwen_image_vae(vae),
            "text_encoder": qwen25_vl(text_encoder),
        },
        tokenizers={"tokenizer": "qwen2.5-vl"},
        processors={} if processor is None else {"processor": processor},
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(scheduler)),
    )


def edit_presets(transformer: dict, tiny_transformer: dict, tiny_vae: dict, scheduler: dict) -> tuple[PresetSpec, ...]:
    """Qwen-Image-Edit (the Qwen-Image transformer) and Edit-2511 (with `zero_cond_t`), real and tiny.

    The tiny forms' VAE has one level more than qwen-image-tiny's (scale 16) and 4 channels: every
    reference is encoded at ~1024² pixels whatever the output size, which on a CPU is most of a tiny
    edit's time, and its tokens are a quarter of scale 8's."""
    plus, tiny_plus = {**transformer, "zero_cond_t": True}, {**tiny_transformer, "zero_cond_t": True}
    tiny_vae = {**tiny_vae, "base_dim": 4, "dim_mult": [1, 1, 1, 1, 1], "temperal_downsample": [False, True, True, True]}
    real = dict(default_size=1024, vae=QWEN_IMAGE_VAE, text_encoder=QWEN25_VL_7B, scheduler=scheduler)
    tiny = dict(default_size=128, vae=tiny_vae, text_encoder=TINY_QWEN25_VL, scheduler=scheduler,
                processor=TINY_QWEN25_VL_PROCESSOR)
    return (
        qwen_image_preset("qwen-image-edit", "Qwen-Image-Edit shapes (QwenImageEditPipeline: Qwen-Image's 20.4B MMDiT, "
                    "Qwen2.5-VL-7B seeing the image), random weights", "QwenImageEditPipeline", transformer=transformer,
                    **real),
        qwen_image_preset("qwen-image-edit-plus", "Qwen-Image-Edit-2511 shapes (QwenImageEditPlusPipeline: 1-3 reference "
                    "images, zero_cond_t), random weights", "QwenImageEditPlusPipeline", transformer=plus, **real),
        qwen_image_preset("qwen-image-edit-tiny", "tiny Qwen-Image-Edit for CPU tests: qwen-image-tiny's transformer and "
                    "text encoder, 5-level VAE (scale 16)",
                    "QwenImageEditPipeline", transformer=tiny_transformer, **tiny),
        qwen_image_preset("qwen-image-edit-plus-tiny", "tiny Qwen-Image-Edit-2511 for CPU tests: qwen-image-edit-tiny's "
                    "parts, zero_cond_t", "QwenImageEditPlusPipeline", transformer=tiny_plus, **tiny),
    )
