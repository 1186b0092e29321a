"""The engine: load a pipeline once, parallelize its denoiser, serve many generate() calls.

Every rank runs the same diffusers pipeline call (text encoding, scheduler, VAE are diffusers' own
code, unchanged); only the denoiser is split over the mesh, by the plan of its model family. Each
rank ends up with the same latents, so the image equals the single-device image up to rounding.

The API is SPMD: in a multi-process job every rank constructs the Engine and calls generate() with
the same request (checked: a rank with another request stops the job with a message).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch

from kernels import choose_kernel
from parallel import Mesh, ParallelAttention, ParallelConfig, resolve_degrees
from parallel.plan import apply_plan

from .config import EngineConfig, GenerateRequest
from .distributed import agree, init_distributed, launched_world_size, pick_device
from .loading import load_pipeline
from .model_info import ModelInfo, inspect_model
from .models import family


@dataclass
class GenerateResult:
    image: object | None
    """The image as the pipeline returns it for output_type ('pil': PIL image, 'np': HWC array), or None."""
    latents: torch.Tensor | None
    """The pipeline's latents (output_type='latent'), identical on every rank."""
    params: dict = field(default_factory=dict)
    """Everything needed to reproduce the image (saved into the PNG)."""
    seconds: float = 0.0


def nearest_multiples(value: int, multiple: int) -> str:
    lo = value // multiple * multiple
    return " or ".join(str(v) for v in (lo, lo + multiple) if v > 0)


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, parallel: ParallelConfig | None = None):
        """Join the process group (under torchrun), check the layout, load and parallelize the model.

        `parallel` overrides the degrees of `config` (the API can pass a full ParallelConfig).
        """
        self.config = config = config or EngineConfig()
        error = None
        device = torch.device("cpu")
        try:
            device = pick_device(config.device)
            self.dtype = config.torch_dtype(device)
            self.info: ModelInfo = inspect_model(config.model)
            self.family = family(self.info.family)
            world = launched_world_size()
            if parallel is None:
                parallel = resolve_degrees(
                    world, self.info.num_heads, ulysses=config.ulysses, ring=config.ring,
                    tp=config.tp, cfg=config.cfg, dp=config.dp,
                )
            parallel.check_world_size(world)
            parallel.check_heads(self.info.num_heads)
            self.family.check_axes(parallel.degrees())
            choose_kernel(config.attention_backend, device, self.dtype, need_lse=parallel.ring > 1)
        except ValueError as e:
            error = str(e)
        timeout = timedelta(seconds=config.timeout_s)
        self.env = init_distributed(device, timeout)
        # The first collective: everyone's preflight errors and configuration, compared.
        agree("engine configuration", asdict(config), error)
        self.parallel = parallel
        self.device = device
        self.mesh = Mesh.build(parallel, device, timeout=timeout)
        if not self.mesh.is_first:
            _quiet_libraries()
        self.pipe = load_pipeline(config.model, dtype=self.dtype, device=device, seed=config.weights_seed)
        self.pipe.set_progress_bar_config(disable=not self.mesh.is_first, leave=False)
        self.attention = ParallelAttention(self.mesh, config.attention_backend)
        self.denoiser = getattr(self.pipe, self.family.denoiser)
        self.plan = apply_plan(self.denoiser, self.family.plan, self.mesh, self.attention)

    @property
    def is_first(self) -> bool:
        return self.mesh.is_first

    def resolve_size(self, request: GenerateRequest) -> tuple[int, int]:
        m = self.info.spatial_multiple
        height = request.height or self.info.default_size
        width = request.width or self.info.default_size
        for name, v in (("height", height), ("width", width)):
            if v % m:
                raise ValueError(
                    f"--{name} {v} is not a multiple of {m}, which {self.info.pipeline_class} needs "
                    f"(VAE factor × patch size); use {nearest_multiples(v, m)}"
                )
        return height, width

    def generate(self, request: GenerateRequest, *, output_type: str = "pil") -> GenerateResult:
        error = None
        try:
            height, width = self.resolve_size(request)
            if request.negative_prompt is None and request.true_cfg_scale > 1:
                raise ValueError("--true-cfg-scale > 1 needs a --negative-prompt")
        except ValueError as e:
            error, height, width = str(e), 0, 0
        agree("request", request.to_dict(), error)
        kwargs = dict(
            **self.family.call_kwargs(request),
            height=height,
            width=width,
            num_inference_steps=request.steps,
            # As diffusers documents for reproducible results: the noise comes from a CPU generator, so
            # it is the same on every rank and on every device.
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type=output_type,
        )
        _sync(self.device)
        start = time.perf_counter()
        out = self.pipe(**kwargs)
        _sync(self.device)
        seconds = time.perf_counter() - start
        params = {
            **request.to_dict(),
            "height": height,
            "width": width,
            "model": self.config.model,
            "layout": self.parallel.describe(),
            "size": [width, height],
            "parallel": self.parallel.degrees(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention_backend": self.attention.kernel_for(self.device, self.dtype).name,
            "seconds": round(seconds, 3),
        }
        images = out.images
        if output_type == "latent":
            return GenerateResult(None, images, params, seconds)
        return GenerateResult(images[0], None, params, seconds)

    def close(self) -> None:
        self.plan.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quiet_libraries() -> None:
    """Other ranks stay quiet: the first rank speaks for the job."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
