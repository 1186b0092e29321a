"""Checking what a user asks for before any rank works on it: one set of rules for the CLI, the Python
API (Engine.generate) and the server's controller.

- `check_fields(request)`: the request's own values (run when a GenerateRequest is built): prompt,
  positive sizes and counts, finite guidance scales (`--guidance nan` is refused, not run), a seed that
  torch.Generator takes (0 … 2**64 - 1; beyond that every rank would die with "Overflow when unpacking
  long long").
- `check_request(request, info, family, layout, memory_bytes)`: the request against the model and the
  layout it will run on: size multiples (naming the nearest valid sizes), true CFG needs a negative
  prompt, the family's own refusals, CFG-parallel needs guidance, even TP token pieces, and memory:
  a size whose tensors cannot fit is refused here with its count (see `needed_bytes`), not by an
  allocator traceback on every rank.
- `check_requests(requests, target)`: a batch, as the server's controller sees it: the layout the
  engine will choose for it (engine/data_parallel.choose_layout, the same function) and every request.
- Output files (the CLI's): engine.image_io.resolve_output_path, before the generation.

All of it is pure: no collective, no weights, no GPU work — only the model's configs (`ModelInfo` from
`engine.loading.inspect_model`, its `Family`) and a memory figure the caller measured
(`available_bytes`). Every message is one line and a `ValueError`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.tensor_seq import check_token_split

from .vae_parallel import check_vae_rows

SEED_MAX = 2**64 - 1
"""torch.Generator.manual_seed takes any integer that fits 64 bits."""

ACTIVATION_WIDTHS = 2, 4
"""Lower bound of the denoiser's live activations, in units of (tokens × hidden width): the residual
stream and its normalised copy (2, never split by TP) while the MLP's hidden layer (4 widths wide in
every family's blocks, split by TP) is being computed."""


@dataclass(frozen=True)
class CheckedRequest:
    family_kwargs: dict
    """The pipeline's arguments but size, steps, generator and output type: prompt, guidance, input
    images, strength, pag_scale, … (engine/pipelines.py)."""
    height: int
    width: int
    call: object = None
    """The PreparedCall (engine/pipelines.py): the pipeline class chosen, its arguments, the branch count
    and the input images' records."""


@dataclass(frozen=True)
class Target:
    """What a batch of requests is checked against, without the engine: the attributes of an Engine
    that engine/data_parallel.choose_layout reads, and the memory one rank has for activations."""

    info: object
    """ModelInfo (engine.loading.inspect_model)."""
    family: object
    """Family (engine.models.family)."""
    config: object
    """EngineConfig."""
    parallel: ParallelConfig
    """The layout the engine was built on (what every rank reports once loaded)."""
    explicit_layout: bool = False
    tp_note: str = ""
    memory_bytes: int | None = None
    """Bytes one rank can still allocate (the smallest over the ranks); None: not checked."""
    dtype: torch.dtype = torch.float32
    """The precision the ranks run in (what they report once loaded)."""


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
    from .inputs import check_request_inputs

    check_request_inputs(request)  # input images, strength, pag_scale (engine/inputs.py)


def _integer(name: str, v, *, low: int, high: int | None = None, high_text: str = "", hint: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        what = (f"an integer from {low} to {high_text or high}" if high is not None
                else "a positive integer" if low == 1 else f"an integer ≥ {low}")
        raise ValueError(f"{name} must be {what}{f' ({hint})' if hint else ''}, got {v}")


# ------------------------------------------------------------------------------------ request × model


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


def check_request(request, info, family, layout: ParallelConfig, *, dtype: torch.dtype = torch.float32,
                  memory_bytes: int | None = None, vae_parallel: str = "auto", controlnets: int = 0) -> CheckedRequest:
    """`request` on `family`'s model `info`, run on `layout`; ValueError (one line), no collective.

    `memory_bytes`: what one rank can still allocate (`available_bytes`); None skips the memory check.
    `vae_parallel`: the engine's --vae-parallel (`on` needs a latent row per rank of the image).
    `controlnets`: the ControlNets the engine holds (the request then runs the ControlNet form).
    """
    from .pipelines import prepare_call

    check_fields(request)
    if request.negative_prompt is None and request.true_cfg_scale > 1:
        raise ValueError("--true-cfg-scale > 1 needs a --negative-prompt")
    # The pipeline class the request selects (img2img, inpainting, PAG, …) and its arguments.
    call = prepare_call(request, info, family, lambda r, default: resolve_size(r, info, default),
                        controlnets=controlnets)
    family_kwargs, height, width = call.kwargs, call.height, call.width
    family.check_cfg(layout.degrees(), family_kwargs, info, call.branches)
    family.check_size(info, layout, height, width)
    check_vae_rows(vae_parallel, info, layout.world_size // layout.dp, height)
    if layout.tp_sequence and family.token_counts is not None:
        # Even TP pieces of every sp piece, checked here so that the mistake is reported once, up front.
        counts = family.token_counts(info, family_kwargs, height, width)
        check_token_split(counts, sp=layout.sp, tp=layout.tp)
    if memory_bytes is not None:
        need, what = needed_bytes(request, info, family, family_kwargs, layout, height, width, dtype)
        if need > memory_bytes:
            raise ValueError(
                f"--height {height} --width {width} needs at least {need / 2**30:.1f} GiB on each rank ({what}), "
                f"more than the {memory_bytes / 2**30:.1f} GiB it can allocate; use a smaller size"
                + (" or more ranks (--ulysses/--ring split the tokens)" if "denoiser" in what else "")
            )
    return CheckedRequest(family_kwargs, height, width, call)


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
    return torch.empty((), dtype=dtype).element_size()


def available_bytes(device: torch.device, local_ranks: int = 1) -> int:
    """What one rank can still allocate: on a GPU, its free memory plus what PyTorch's allocator holds
    unused; on the CPU, the machine's available RAM shared by the `local_ranks` processes on it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return _cpu_available() // max(1, local_ranks)


def _cpu_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_requests(requests: list, target: Target) -> tuple[ParallelConfig, str, list[CheckedRequest]]:
    """(layout, why, each request checked) for a batch, from `target` alone — what the engine's
    generate_batch will do, decided before any rank is involved."""
    from engine.data_parallel import choose_layout

    layout, why = choose_layout(target, requests)
    checked = [check_request(r, target.info, target.family, layout, dtype=target.dtype,
                             memory_bytes=target.memory_bytes, vae_parallel=target.config.vae_parallel,
                             controlnets=len(target.config.controlnets))
               for r in requests]
    return layout, why, checked
