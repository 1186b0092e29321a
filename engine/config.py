"""What a user asks of the engine: how to run (EngineConfig) and what to draw (GenerateRequest).

The CLI and the Python API share these dataclasses; the CLI is a thin argparse layer over them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from shardiff_parallel.config import check_tp_comm

from engine.text_encoders.names import check_placement
from .validation import check_fields

# The trained toy text-to-image model (engine/toy, weights in engine/assets/shapes): a tiny Flux that
# draws the coloured shape a prompt asks for at 64², on any CPU in seconds, through the parallel path.
DEFAULT_MODEL = "shapes"
# --vae-parallel: split the VAE decode / encode by rows over the ranks that share one image (engine/models/vae).
VAE_PARALLEL = ("auto", "on", "off")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass(kw_only=True, frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    """A built-in model ("shapes"), a random-weight preset name or a local diffusers directory (model_index.json, safetensors)."""
    ulysses: int | None = None
    """Ulysses degree; None: chosen so that all ranks are used (see parallel.config.resolve_degrees)."""
    ring: int | None = None
    """Ring degree; None: chosen so that all ranks are used."""
    tp: int | None = None
    """Tensor-parallel degree; None (auto): 1, unless the weights do not fit one GPU — then the smallest
    degree that makes them fit (engine/loading/auto_tp.py)."""
    tp_comm: str = "allreduce"
    """TP communication: "allreduce"; "sequence" (reduce-scatter / all-gather: each TP rank keeps 1/tp
    of the tokens between TP regions; parallel/tensor_seq.py); or "overlap" (sequence, with the long
    collectives fused with their matmuls — hidden behind them on CUDA; the fastest TP from 1536² up).
    Ignored when tp is 1."""
    cfg: int = 1
    """CFG-parallel degree (1 or 2)."""
    dp: int = 1
    """Data-parallel degree (independent images)."""
    parallel: str = "auto"
    """UNet models (SD1.5, SDXL): auto picks, per batch, CFG split for one guided image and data
    parallel for several (engine/models/unet.py); cfg / dp force one of them. Explicit --cfg/--dp win.
    Transformer families take their degrees from the fields above (auto: unset ones filled)."""
    dtype: str = "auto"
    """bf16 / fp16 / fp32; auto: fp32 on CPU; on GPU the model family's precision (bf16 for the
    transformers, fp16 for the SD1.5/SDXL UNets, which are trained and published in fp16)."""
    device: str | None = None
    """cuda / cpu; None: CUDA (one GPU per local rank) when available."""
    attention_backend: str = "auto"
    """A kernels/ name, or auto: the fastest available that the layout needs."""
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
    """LoRAs fused into the weights at load: "PATH[:SCALE]" strings or (path, scale) pairs, safetensors
    files in any format diffusers reads (engine/lora.py; switch later with Engine.set_loras)."""
    controlnets: tuple = ()
    """ControlNet directories (config.json + safetensors; engine/controlnet.py), loaded beside the model:
    every request then runs the family's ControlNet pipeline (it needs a control image). Several: the
    family's multi-ControlNet form, their residuals summed."""

    def __post_init__(self):
        from .lora import parse_lora

        object.__setattr__(self, "loras", tuple(parse_lora(v) for v in self.loras))
        if isinstance(self.controlnets, (str, os.PathLike)):
            object.__setattr__(self, "controlnets", (self.controlnets,))
        object.__setattr__(self, "controlnets", tuple(str(c) for c in self.controlnets))
        check_tp_comm(self.tp_comm)
        check_placement(self.text_encoders)
        if self.parallel not in ("auto", "cfg", "dp"):
            raise ValueError(f"--parallel must be auto, cfg or dp, got {self.parallel!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.vae_parallel not in VAE_PARALLEL:
            raise ValueError(f"--vae-parallel must be {', '.join(VAE_PARALLEL[:-1])} or {VAE_PARALLEL[-1]}, "
                             f"got {self.vae_parallel!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")

    def torch_dtype(self, device: torch.device, gpu_default: torch.dtype = torch.bfloat16) -> torch.dtype:
        """The dtype to run in; `gpu_default`: the model family's precision on GPUs (Family.gpu_dtype)."""
        if self.dtype == "auto":
            return gpu_default if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


@dataclass(kw_only=True, frozen=True)
class GenerateRequest:
    prompt: str | list[str]
    """One prompt, or a batch of prompts (one image each, × num_images_per_prompt)."""
    negative_prompt: str | None = None
    height: int | None = None
    """Pixels; None: the model's default size."""
    width: int | None = None
    steps: int = 28
    guidance: float = 3.5
    """Flux-dev's embedded guidance scale."""
    true_cfg_scale: float = 1.0
    """Flux true CFG (needs --negative-prompt): two transformer calls per step when > 1."""
    seed: int = 0
    """Seed of the initial noise: torch.Generator('cpu').manual_seed(seed), as in diffusers (0 … 2**64 - 1)."""
    max_sequence_length: int | None = None
    """T5 text tokens; None: the pipeline's default (512 for Flux)."""
    num_images_per_prompt: int = 1
    """Images per prompt, generated as one batch (the same images as one process on any layout)."""
    image: object = None
    """Input image (a path or a PIL image): img2img, or the image to inpaint / fill / edit (Kontext).
    On a text-to-image model it selects the family's img2img pipeline (engine/pipelines.py)."""
    mask_image: object = None
    """Inpainting mask (path or PIL image; white = repaint); with `image` it selects the inpainting pipeline."""
    control_image: object = None
    """Control image of a Flux Control (Canny / Depth) model."""
    strength: float | None = None
    """img2img / inpainting: the share of the denoising redone from the input image, in (0, 1]; None:
    the pipeline's default."""
    pag_scale: float | None = None
    """Perturbed-attention guidance scale; selects the family's PAG pipeline. None: no PAG (a PAG model
    directory: its pipeline's default)."""
    keep_image_size: bool = False
    """Kontext: keep the input image's size instead of resizing it to the nearest trained resolution."""
    controlnet_scale: float | tuple | None = None
    """ControlNet residual scale (diffusers' controlnet_conditioning_scale): one number, or one per
    ControlNet; None: the pipeline's default (1.0)."""
    control_mode: int | None = None
    """Flux Union ControlNets: the control type (canny, depth, …: the ControlNet's own numbering)."""

    def __post_init__(self):
        # The same checks for the CLI, the Python API and the server (engine/validation.py).
        check_fields(self)

    def to_dict(self) -> dict:
        """JSON-ready (compared across ranks, saved in the PNG): input images as their path or a
        size-and-hash description (engine/inputs.py)."""
        from .inputs import IMAGE_FIELDS, describe

        return {f.name: describe(getattr(self, f.name)) if f.name in IMAGE_FIELDS else getattr(self, f.name)
                for f in fields(self)}
