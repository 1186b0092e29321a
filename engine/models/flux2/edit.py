"""FLUX.2's editing forms: reference images on Flux2Pipeline (dev) and Flux2KleinPipeline, klein's inpainting
(Flux2KleinInpaintPipeline) and klein-KV (Flux2KleinKVPipeline) — which pipeline a request runs, how many
reference images each takes, their size rules.

What the transformer gets. Each reference image is encoded by the VAE at its own size (at most 1024² pixels,
its aspect kept, sides cut to multiples of 16) and its latent tokens join the image stream (`hidden_states`
[B, S_out + Σ S_ref, 128]) with their own position ids in `img_ids` (frame 10 · (i + 1) for reference i);
the pipeline keeps the first S_out outputs. The plan's "image" group is the whole concatenation — split
with its ids, gathered whole before the pipeline slices it — as Kontext's. klein-KV puts the references
first and drops them from the output itself (engine/models/flux2/kv.py). Inpainting conditions on the image
it repaints (encoded the same way, as the first reference) and on further references (`image_reference`).
The text encoders never see the images: the prompt is text alone.

Sizes. Without --height/--width the output has the first image's size after that ≤ 1024² fit (the
pipelines' own default); inpainting always draws at the repainted image's fitted size.
"""

from __future__ import annotations

import math

from ..family import PipelineSpec, pipeline_specs

AREA = 1024 * 1024
"""Pixels above which the pipelines shrink an input image (its aspect kept) before encoding it."""
MULTIPLE = 16
"""Pixels per token side: the VAE's 8 × the 2 × 2 patchify (every FLUX.2 VAE has four levels)."""
MAX_DEV_REFERENCES = 10
"""Reference images FLUX.2-dev takes: Black Forest Labs' model card gives up to 10 (their API docs recommend
at most 6)."""
MAX_KLEIN_REFERENCES = 4
"""Reference images FLUX.2-klein (4B and 9B) takes: up to 4 in Black Forest Labs' docs. Inpainting counts the
repainted image among them (it is encoded as the first reference)."""
MIN_SIDE, MAX_ASPECT = 64, 8
"""Flux2ImageProcessor.check_image_input's limits on a reference image (Flux2Pipeline, klein, klein-KV)."""


def fitted(image) -> tuple[int, int]:
    """(height, width) the pipelines encode `image` at: shrunk to AREA pixels if larger (diffusers'
    `_resize_to_target_area`), then cut to multiples of 16."""
    width, height = image.size
    if width * height > AREA:
        scale = math.sqrt(AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return height // MULTIPLE * MULTIPLE, width // MULTIPLE * MULTIPLE


def reference_size(images: list) -> tuple[int, int]:
    """The default output size of Flux2Pipeline / klein / klein-KV with reference images: the first one's
    fitted size. Checks every image as the pipelines do (a ValueError here, before any collective, instead of
    one raised inside the pipeline call)."""
    for i, image in enumerate(images):
        width, height = image.size
        which = f"--image {i + 1}" if len(images) > 1 else "--image"
        if min(width, height) < MIN_SIDE:
            raise ValueError(f"{which} is {width}x{height}: FLUX.2's reference images need sides of at least "
                             f"{MIN_SIDE} pixels")
        if max(width / height, height / width) > MAX_ASPECT:
            raise ValueError(f"{which} is {width}x{height}: FLUX.2's reference images need an aspect ratio of at "
                             f"most {MAX_ASPECT}:1")
    return fitted(images[0])


def inpaint_size(images: list) -> tuple[int, int]:
    """What Flux2KleinInpaintPipeline draws at, whatever it is asked: the repainted (first) image's fitted size."""
    height, width = fitted(images[0])
    if not height or not width:
        raise ValueError(f"--image is {images[0].width}x{images[0].height}: smaller than FLUX.2's {MULTIPLE}-pixel "
                         f"token")
    return height, width


_IMAGE, _MASK = "image", "mask_image"
DEV_PIPELINES = pipeline_specs(
    # Text to image, or an edit of 1 to 10 reference images.
    PipelineSpec(cls="Flux2Pipeline", inputs=(_IMAGE,), max_images=MAX_DEV_REFERENCES, size_rule=reference_size),
)
KLEIN_PIPELINES = pipeline_specs(
    PipelineSpec(cls="Flux2KleinPipeline", inputs=(_IMAGE,), max_images=MAX_KLEIN_REFERENCES,
                 size_rule=reference_size, variants={"mask_image": "Flux2KleinInpaintPipeline"}),
    # The first image is repainted where the mask is white; the others are references for it.
    PipelineSpec(cls="Flux2KleinInpaintPipeline", inputs=(_IMAGE, _MASK), required=(_IMAGE, _MASK), strength=True,
                 max_images=MAX_KLEIN_REFERENCES, size_rule=inpaint_size, fixed_size=True,
                 references_arg="image_reference"),
)
KV_PIPELINES = pipeline_specs(
    PipelineSpec(cls="Flux2KleinKVPipeline", inputs=(_IMAGE,), max_images=MAX_KLEIN_REFERENCES,
                 size_rule=reference_size),
)
