"""The pure half of checking what a user asks for: fields, sizes and numbers, from values alone.

Nothing here reads a file, asks a GPU or touches a process group, and it imports neither torch.distributed
nor the engine's heavy parts: engine/config.py runs `check_fields` whenever a GenerateRequest is built
(the CLI, the Python API and the server alike), and the server's controller checks sizes before any rank
exists. What needs the world — the input images, the model's pipeline forms, the memory a rank can still
allocate — is engine/request_check.py, which builds on this.

- `check_fields(request)`: the request's own values: prompt, positive sizes and counts, finite guidance
  scales (`--guidance nan` is refused, not run), a seed that torch.Generator takes (0 … 2**64 - 1; beyond
  that every rank would die with "Overflow when unpacking long long"), the input images' types, ranges
  and combinations.
- `resolve_size(request, info)`: the output size and its multiples (naming the nearest valid sizes).
- `needed_bytes(...)`: the memory rule, a floor counted from the ModelInfo.

Every message is one line and a `ValueError`.
"""

from __future__ import annotations

import math
import os
import sys

import torch

SEED_MAX = 2**64 - 1
"""torch.Generator.manual_seed takes any integer that fits 64 bits."""

ACTIVATION_WIDTHS = 2, 4
"""Lower bound of the denoiser's live activations, in units of (tokens × hidden width): the residual
stream and its normalised copy (2, never split by TP) while the MLP's hidden layer (4 widths wide in
every family's blocks, split by TP) is being computed."""

IMAGE_FIELDS = {"image": "RGB", "mask_image": "L", "control_image": "RGB"}
"""Request field → the PIL mode the pipelines get it in (engine/inputs.py reads them)."""
LIST_FIELDS = ("image",)
"""Image fields that may hold several images, in order (a list): several reference images, for the
pipelines that take them (`PipelineSpec.max_images`)."""
FLAGS = {"image": "--image", "mask_image": "--mask-image", "control_image": "--control-image",
         "strength": "--strength", "pag_scale": "--pag-scale", "controlnet": "--controlnet"}


# ------------------------------------------------------------------------------------ fields


def check_fields(request) -> None:
    """The values of one GenerateRequest, alone (no model needed)."""
    prompt = request.prompt
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise ValueError("negative prompt must be a string")
    _integer("--num-images-per-prompt", request.num_images_per_prompt, low=1)
    _integer("--steps", request.steps, low=1)
    _integer("--seed", request.seed, low=0, high=SEED_MAX, high_text="2**64 - 1",
             hint="torch.Generator('cpu').manual_seed takes 64 bits")
    for name, v in (("--height", request.height), ("--width", request.width)):
        if v is not None:
            _integer(name, v, low=1)
    if request.max_sequence_length is not None:
        _integer("--max-sequence-length", request.max_sequence_length, low=1)
    for name, v in (("--guidance", request.guidance), ("--true-cfg-scale", request.true_cfg_scale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")
        if v < 0:
            raise ValueError(f"{name} must be ≥ 0, got {v}")
    scales = request.controlnet_scale
    if scales is not None:
        values = list(scales) if isinstance(scales, (tuple, list)) else [scales]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"--controlnet-scale must be finite numbers ≥ 0 (one, or one per ControlNet), got {scales!r}")
        if not values:
            raise ValueError("--controlnet-scale: give at least one value")
    if request.control_mode is not None:
        _integer("--control-mode", request.control_mode, low=0)
    _check_inputs(request)


def _integer(name: str, v, *, low: int, high: int | None = None, high_text: str = "", hint: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        what = (f"an integer from {low} to {high_text or high}" if high is not None
                else "a positive integer" if low == 1 else f"an integer ≥ {low}")
        raise ValueError(f"{name} must be {what}{f' ({hint})' if hint else ''}, got {v}")


def _is_image_value(value) -> bool:
    """A path, or a PIL image (which exists only where PIL was imported: no import needed to tell)."""
    if isinstance(value, (str, os.PathLike)):
        return True
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def _check_inputs(request) -> None:
    """What can be said of a request's image inputs without reading them: types, ranges, combinations."""
    for name in IMAGE_FIELDS:
        value = getattr(request, name)
        if name in LIST_FIELDS and isinstance(value, list):
            if not value:
                raise ValueError(f"{FLAGS[name]}: an empty list; give one image, or several")
            bad = next((v for v in value if not _is_image_value(v)), None)
            if bad is not None:
                raise ValueError(f"{FLAGS[name]} must be paths or PIL images, got a {type(bad).__name__} in the list")
        elif value is not None and not _is_image_value(value):
            raise ValueError(f"{FLAGS[name]} must be a path or a PIL image, got {type(value).__name__}")
    if request.mask_image is not None and request.image is None:
        raise ValueError("--mask-image needs --image: the mask says which part of that image to repaint")
    if request.strength is not None:
        if not 0 < request.strength <= 1:
            raise ValueError(f"--strength must be in (0, 1] (the share of the denoising redone from the input "
                             f"image), got {request.strength}")
        if request.image is None:
            raise ValueError("--strength is how far to move away from an input image: it needs --image")
        if request.steps * request.strength < 1:
            raise ValueError(f"--strength {request.strength} × --steps {request.steps} leaves no denoising step; "
                             "raise --steps or --strength")
    if request.pag_scale is not None and not request.pag_scale > 0:
        raise ValueError(f"--pag-scale must be > 0 (leave it out for no perturbed-attention guidance), "
                         f"got {request.pag_scale}")


# ------------------------------------------------------------------------------------ sizes and memory


def nearest_multiples(value: int, multiple: int) -> str:
    lo = value // multiple * multiple
    return " or ".join(str(v) for v in (lo, lo + multiple) if v > 0)


def resolve_size(request, info, default: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width): the request's, or `default` (the input image's, engine/inputs.py), or the model's
    default; multiples of what the pipeline needs."""
    m = info.spatial_multiple
    height = request.height or (default[0] if default else info.default_size)
    width = request.width or (default[1] if default else info.default_size)
    for name, v in (("height", height), ("width", width)):
        if v % m:
            raise ValueError(
                f"--{name} {v} is not a multiple of {m}, which {info.pipeline_class} needs "
                f"(VAE factor × patch size); use {nearest_multiples(v, m)}"
            )
    return height, width


def needed_bytes(request, info, family, family_kwargs: dict, layout: ParallelConfig, height: int, width: int,
                 dtype: torch.dtype) -> tuple[int, str]:
    """A lower bound of the bytes one rank must hold at once for `request`, and what they are.

    The rule, counted from the ModelInfo only, so that it never refuses what would fit (every term is
    something the pipeline cannot avoid holding, on the layout's split):
    - denoising: tokens × hidden width × (2 + 4 / tp) × dtype bytes for the images of one pipeline call
      (× 2 when guidance runs its two branches as one batch on this rank), tokens being this rank's
      share of the image tokens (height / spatial multiple × width / spatial multiple, over ring ×
      ulysses): the residual stream, its normalised copy and the MLP's hidden layer (ACTIVATION_WIDTHS);
    - decoding: the decoded images, 3 × height × width each, once in the pipeline's dtype (the VAE's
      output) and once in float32 (diffusers' postprocessing) — whatever the VAE's own activations add,
      tiled or not, comes on top.
    Attention scores, weights of other components and the allocator's slack are left out (they depend
    on the kernel and the layout); the figure is a floor, compared with what the rank can allocate.
    """
    images = (len(request.prompt) if isinstance(request.prompt, list) else 1) * request.num_images_per_prompt
    m = info.spatial_multiple
    tokens = math.ceil((height // m) * (width // m) / layout.sp)
    hidden = info.num_heads * info.head_dim
    branches = 2 if family.uses_cfg(family_kwargs) and not family.cfg_pairs and layout.cfg == 1 else 1
    base, mlp = ACTIVATION_WIDTHS
    denoise = images * branches * tokens * hidden * itemsize(dtype) * (base + mlp / layout.tp)
    decode = images * 3 * height * width * (itemsize(dtype) + 4)
    if denoise >= decode:
        return int(denoise), f"denoiser activations: {tokens} tokens × {hidden} wide per image"
    return int(decode), f"{images} decoded {height}×{width} image(s) in {str(dtype).removeprefix('torch.')} and float32"


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
