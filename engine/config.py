"""What a user asks of the engine: how to run (EngineConfig) and what to draw (GenerateRequest).

The CLI, the server and the Python API share these dataclasses. Each field is declared once, with its
docstring; the command line's flags are made from them and the one-line tables `ENGINE_FLAGS` /
`REQUEST_FLAGS` below (engine/cli_flags.py), and so is docs/CLI.md. The parallel degrees are
`shardiff_parallel.config.Degrees`' fields, which the resolved layout (ParallelConfig) shares.

Import-light: building these checks values only (engine/validation.py), never files, GPUs or the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from shardiff_parallel.cache_config import parse_cache
from shardiff_parallel.config import TP_COMMS, Degrees

from engine.text_encoders.names import PLACEMENTS, check_placement
from .cli_flags import (
    IMAGE, INPUTS, LAYOUT, MODEL, PROMPTS, RUNTIME, Flag, auto_or_positive_int, one_or_list, positive_int, scales,
)
from .validation import check_fields

# The trained toy text-to-image model (engine/toy, weights in engine/assets/shapes): a tiny Flux that
# draws the coloured shape a prompt asks for at 64², on any CPU in seconds, through the parallel path.
DEFAULT_MODEL = "shapes"
# --vae-parallel: split the VAE decode / encode by rows over the ranks that share one image (engine/models/vae).
VAE_PARALLEL = ("auto", "on", "off")
# --parallel: how a UNet model (its layout follows the batch) spreads its ranks.
PARALLEL = ("auto", "cfg", "dp")
# --quantize: the denoiser's linears in FP8 (docs/FAST_PATH.md), or not.
QUANTIZE = ("off", "fp8")
# --quantize-qkv: attention's Q, K and V rounded to FP8 (the Ulysses exchange then sends half the bytes), or not.
QUANTIZE_QKV = ("off", "fp8")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass(kw_only=True, frozen=True)
class EngineConfig(Degrees):
    """How the engine runs: the model, the degrees (dp, cfg, ring, ulysses, tp, tp_comm: Degrees' fields,
    ring / ulysses / tp unset for the engine to choose), and the rest below."""

    model: str = DEFAULT_MODEL
    """A built-in model ("shapes"), a random-weight preset (`python -m engine.presets list`) or a local
    diffusers directory (model_index.json, safetensors weights)."""
    parallel: str = "auto"
    """UNet models (SD1.5, SDXL): auto picks, per batch, CFG split for one guided image and data
    parallel for several (engine/models/unet.py); cfg / dp force one of them. Explicit --cfg/--dp win.
    Transformer families take their degrees from --ulysses, --ring, --tp, --cfg and --dp."""
    dtype: str = "auto"
    """bf16 / fp16 / fp32; auto: fp32 on CPU; on GPU the model family's precision (bf16 for the
    transformers, fp16 for the SD1.5/SDXL UNets, which are trained and published in fp16)."""
    device: str | None = None
    """cuda or cpu; unset: CUDA (one GPU per local rank) when available."""
    attention_backend: str = "auto"
    """A kernels/ name (sdpa-cudnn, sdpa-flash, sdpa-cpu-flash, math, flash-attn, …), or auto: the
    fastest available that the layout needs."""
    compile: bool = False
    """Regional torch.compile of the denoiser's repeated blocks (first call per resolution compiles)."""
    cuda_graphs: bool = False
    """Replay each denoiser call as one CUDA graph (engine/runtime/cuda_graphs.py; CUDA only): the CPU stops
    launching ~thousands of kernels per step, which matters when a step is short (1024² over 4 GPUs)
    or the host work per collective is high (--tp-comm overlap). The first call per input shape
    captures (after two warm-up calls)."""
    text_encoders: str = "auto"
    """Where the text encoders live (engine/text_encoders/placement.py): "replicated" (every rank);
    "first" (the first rank of each image encodes, the others receive the embeddings and never load
    an encoder); "sharded" (each encoder split over the ranks of the image, 1/N of its weights each);
    "auto": replicated where it fits beside the other weights (always on CPU), sharded otherwise."""
    weights_seed: int = 0
    """Seed of a preset's random weights (identical on every rank)."""
    timeout_s: float = 600.0
    """Timeout of every process group: a dead peer ends the job after this long, not NCCL's 30 min."""
    vae_parallel: str = "auto"
    """Split the VAE decode (and encode) by rows over the ranks that share one image (every axis but
    dp), exactly: "on" (refused where the VAE has no row-split plan or an image has fewer latent rows
    than those ranks), "off" (every rank decodes the whole image, as diffusers does), or "auto": on
    from the image size where it pays (engine.models.vae.auto_splits)."""
    loras: tuple = ()
    """LoRAs fused into the weights at load, each "PATH[:SCALE]" (from Python also a (path, scale) pair;
    on the command line, repeat the flag): safetensors files in any format diffusers reads
    (engine/lora.py; switch later with Engine.set_loras). engine.serve also takes NAME=PATH[:SCALE]: a
    named adapter that each request may choose ("lora": {"NAME": SCALE}), fused only for those."""
    controlnets: tuple = ()
    """ControlNet directories (config.json + safetensors; engine/controlnet.py), loaded beside the model and
    split like it: every request then runs the family's ControlNet pipeline (it needs a control image).
    Several (repeat the flag): the family's multi-ControlNet form, their residuals summed."""
    quantize: str = "off"
    """The fast path (docs/FAST_PATH.md): "fp8" computes the denoiser's block linears in FP8 e4m3 (per-token
    × per-channel scales; the family's rule keeps embedders, modulation and final layers in the model's
    dtype) on GPUs with FP8 (compute capability 8.9+); on the CPU an exact emulation. Not the exact image:
    its distance from it is measured in BENCHMARKS.md; the image on N ranks equals the FP8 image on one."""
    quantize_qkv: str = "off"
    """The fast path (docs/FAST_PATH.md): "fp8" rounds attention's Q, K and V to FP8 e4m3 (one scale per token
    and head) on every layout, and Ulysses' all-to-all and Ring's K/V blocks carry them so: 0.52× the bytes
    of bf16 for a head dim of 128. Any GPU or the CPU. Not the exact image; the image on N ranks equals the
    one-rank image."""
    cache: str = "off"
    """The fast path's step cache (docs/FAST_PATH.md): "first-block[:THRESHOLD]" reuses the later blocks'
    residual while the first block's output changes less than THRESHOLD (relative L1; default 0.08);
    "taylorseer[:INTERVAL]" forecasts the attention outputs between computed calls (every INTERVAL-th
    call; default 4). Every rank takes the same decision; the result says which steps were reused."""

    def __post_init__(self):
        from .lora import parse_lora  # import-light: torch only

        object.__setattr__(self, "loras", tuple(parse_lora(v) for v in self.loras))
        if isinstance(self.controlnets, (str, os.PathLike)):
            object.__setattr__(self, "controlnets", (self.controlnets,))
        object.__setattr__(self, "controlnets", tuple(str(c) for c in self.controlnets))
        super().__post_init__()  # the degrees and --tp-comm
        check_placement(self.text_encoders)
        if self.parallel not in PARALLEL:
            raise ValueError(f"--parallel must be auto, cfg or dp, got {self.parallel!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.vae_parallel not in VAE_PARALLEL:
            raise ValueError(f"--vae-parallel must be {', '.join(VAE_PARALLEL[:-1])} or {VAE_PARALLEL[-1]}, "
                             f"got {self.vae_parallel!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"--quantize must be {' or '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize_qkv not in QUANTIZE_QKV:
            raise ValueError(f"--quantize-qkv must be {' or '.join(QUANTIZE_QKV)}, got {self.quantize_qkv!r}")
        parse_cache(self.cache)  # a one-line ValueError for an unknown method or a parameter out of range

    @property
    def cache_config(self):
        """The parsed --cache (shardiff_parallel.cache_config.CacheConfig), or None: off."""
        return parse_cache(self.cache)

    def torch_dtype(self, device: torch.device, gpu_default: torch.dtype = torch.bfloat16) -> torch.dtype:
        """The dtype to run in; `gpu_default`: the model family's precision on GPUs (Family.gpu_dtype)."""
        if self.dtype == "auto":
            return gpu_default if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


ENGINE_FLAGS = (
    Flag("model", MODEL),
    Flag("dtype", MODEL),
    Flag("device", MODEL),
    Flag("loras", MODEL, name="--lora", action="append", metavar="[NAME=]PATH[:SCALE]"),
    Flag("controlnets", MODEL, name="--controlnet", action="append", metavar="DIR"),
    Flag("ulysses", LAYOUT, type=positive_int),
    Flag("ring", LAYOUT, type=positive_int),
    Flag("tp", LAYOUT, type=auto_or_positive_int, shown="auto"),
    Flag("tp_comm", LAYOUT, choices=TP_COMMS),
    Flag("cfg", LAYOUT, type=positive_int),
    Flag("dp", LAYOUT, type=positive_int),
    Flag("parallel", LAYOUT, choices=PARALLEL),
    Flag("text_encoders", LAYOUT, choices=PLACEMENTS),
    Flag("vae_parallel", LAYOUT, choices=VAE_PARALLEL),
    Flag("attention_backend", RUNTIME),
    Flag("compile", RUNTIME, action="store_true"),
    Flag("cuda_graphs", RUNTIME, action="store_true"),
    Flag("timeout_s", RUNTIME, name="--timeout", type=float),
    Flag("quantize", RUNTIME, choices=QUANTIZE),
    Flag("quantize_qkv", RUNTIME, choices=QUANTIZE_QKV),
    Flag("cache", RUNTIME, metavar="METHOD[:PARAM]"),
)
"""EngineConfig's command-line flags (engine.generate and engine.serve): one line each."""


@dataclass(kw_only=True, frozen=True)
class GenerateRequest:
    prompt: str | list[str]
    """One prompt, or a batch of prompts (one image each, × num_images_per_prompt)."""
    negative_prompt: str | None = None
    """What the image should not show: the unconditional branch of classifier-free guidance."""
    height: int | None = None
    """Pixels, a multiple of the model's VAE factor × patch size; unset: the input image's size, else the
    model's default size."""
    width: int | None = None
    """Pixels; unset: as height."""
    steps: int = 28
    """Denoising steps."""
    guidance: float = 3.5
    """Guidance scale: classifier-free guidance's (two branches when > 1), or the embedded guidance of
    guidance-distilled models (Flux-dev)."""
    true_cfg_scale: float = 1.0
    """Flux true CFG (needs --negative-prompt): two transformer calls per step when > 1."""
    seed: int = 0
    """Seed of the initial noise: torch.Generator('cpu').manual_seed(seed), as in diffusers (0 … 2**64 - 1);
    the CLI gives its image i the seed + i."""
    max_sequence_length: int | None = None
    """Text tokens; unset: the pipeline's default (512 for Flux's T5)."""
    num_images_per_prompt: int = 1
    """Images per prompt, generated as one batch (the same images as one process on any layout)."""
    image: object = None
    """Input image (a path or a PIL image): img2img, or the image to inpaint / fill / edit (Kontext). On a
    text-to-image model it selects the family's img2img pipeline (engine/pipelines.py). Several reference
    images, in order (a list; on the command line, repeat the flag): for the pipelines that take them
    (Qwen-Image-Edit-Plus, FLUX.2, Qwen-Image 2.1)."""
    mask_image: object = None
    """Inpainting mask (a path or a PIL image; white = repaint); with an input image it selects the
    inpainting pipeline."""
    control_image: object = None
    """Control image: of a ControlNet (--controlnet), or of a Flux Control (Canny / Depth) model."""
    strength: float | None = None
    """img2img / inpainting: the share of the denoising redone from the input image, in (0, 1]; unset:
    the pipeline's default."""
    pag_scale: float | None = None
    """Perturbed-attention guidance scale: runs the family's PAG pipeline (SD3, Sana, PixArt-Σ, SD, SDXL).
    Unset: no PAG (a PAG model directory: its pipeline's default)."""
    keep_image_size: bool = False
    """Kontext: keep the input image's size instead of resizing it to the nearest trained resolution."""
    controlnet_scale: float | tuple | None = None
    """ControlNet residual scale (diffusers' controlnet_conditioning_scale): one number, or one per
    ControlNet (comma-separated on the command line); unset: the pipeline's default (1.0)."""
    control_mode: int | None = None
    """Flux Union ControlNets: the control type (canny, depth, …: the ControlNet's own numbering)."""

    def __post_init__(self):
        if isinstance(self.image, tuple):  # several reference images: one form, a list
            object.__setattr__(self, "image", list(self.image))
        # The same checks for the CLI, the Python API and the server (engine/validation.py); the checks
        # against the model and the world come once per request (engine/request_check.py).
        check_fields(self)

    def to_dict(self) -> dict:
        """JSON-ready (compared across ranks, saved in the PNG): input images as their path or a
        size-and-hash description (engine/inputs.py)."""
        from .inputs import IMAGE_FIELDS, describe

        return {f.name: describe(getattr(self, f.name)) if f.name in IMAGE_FIELDS else getattr(self, f.name)
                for f in fields(self)}


REQUEST_FLAGS = (
    Flag("negative_prompt", PROMPTS),
    Flag("height", IMAGE, type=int),
    Flag("width", IMAGE, type=int),
    Flag("steps", IMAGE, type=int),
    Flag("guidance", IMAGE, type=float),
    Flag("true_cfg_scale", IMAGE, type=float),
    Flag("seed", IMAGE, type=int),
    Flag("max_sequence_length", IMAGE, type=int),
    Flag("image", INPUTS, action="append", gather=one_or_list),
    Flag("mask_image", INPUTS),
    Flag("control_image", INPUTS),
    Flag("controlnet_scale", INPUTS, type=scales),
    Flag("control_mode", INPUTS, type=int),
    Flag("strength", INPUTS, type=float),
    Flag("pag_scale", INPUTS, type=float),
    Flag("keep_image_size", INPUTS, action="store_true"),
)
"""GenerateRequest's command-line flags (engine.generate; prompts and --num-images: engine/batch_cli.py)."""
