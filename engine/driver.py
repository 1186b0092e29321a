"""The engine: load a pipeline once, parallelize its denoiser, serve many generate() calls.

Every rank runs the same diffusers pipeline call (text encoding, scheduler, VAE are diffusers' own
code, unchanged); the denoiser is split over the mesh, by the plan of its model family, and — with
`--vae-parallel` — the VAE decode by rows over the ranks of one image (engine/vae_parallel.py). Each
rank ends up with the same latents, so the image equals the single-device image up to rounding.

The API is SPMD: in a multi-process job every rank constructs the Engine and calls generate() with
the same request (checked: a rank with another request stops the job with a message).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch

from shardiff_kernels.registry import choose_kernel
from shardiff_parallel.mesh import Mesh
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.config import ParallelConfig, resolve_degrees
from shardiff_parallel.plan import apply_plan
from shardiff_parallel.tensor import local_shards

from engine.controlnet import apply_controlnet_plans, check_controlnets, load_controlnets
from engine.loading import inspect_model, load_pipeline
from engine.loading.auto_tp import choose_tp
from engine.loading.sharded import load_sharded_denoiser
from engine.models import ModelInfo, check_tp_comm, family
from engine.runtime.distributed import agree, init_distributed, launched_world_size, pick_device
from engine.runtime.quiet import loading_bars
from engine.text_encoders.encoders import TextEncoders
from engine.runtime.stop import step_callback_kwargs

from . import vae_parallel
from .config import EngineConfig, GenerateRequest
from .data_parallel import choose_layout, generate_batch, use_layout
from .validation import available_bytes, check_request
from .lora import LoraState, check_loras
from .pipelines import Pipelines, PreparedCall


@dataclass
class GenerateResult:
    image: object | None
    """The image as the pipeline returns it for output_type ('pil': PIL image, 'np': HWC array), or None."""
    latents: torch.Tensor | None
    """The pipeline's latents (output_type='latent'), identical on every rank."""
    params: dict = field(default_factory=dict)
    """Everything needed to reproduce the image (saved into the PNG)."""
    seconds: float = 0.0
    images: list = field(default_factory=list)
    """Every image of the request (a batch of prompts × num_images_per_prompt); `image` is the first."""


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, parallel: ParallelConfig | None = None):
        """Join the process group (under torchrun), check the layout, load and parallelize the model.

        `parallel` overrides the degrees of `config` (the API can pass a full ParallelConfig).
        """
        self.config = config = config or EngineConfig()
        self.explicit_layout = parallel is not None
        """A ParallelConfig given by the caller is kept for every request (no per-batch choice)."""
        error = None
        self.tp_note = ""
        """Why `--tp auto` chose TP (empty when it did not)."""
        device = torch.device("cpu")
        loras, self.lora_notes = [], []
        controlnet_dirs = []
        """Notes on the LoRAs for the user (keys that match no layer)."""
        try:
            device = pick_device(config.device)
            self.info: ModelInfo = inspect_model(config.model)
            self.family = family(self.info.family)
            self.dtype = config.torch_dtype(device, self.family.gpu_dtype)
            world = launched_world_size()
            tp = config.tp
            if tp is None and parallel is None and self.family.layout is None:
                tp, self.tp_note = choose_tp(
                    config.model, self.info, self.family, world_size=world, dp=config.dp, cfg=config.cfg,
                    dtype=self.dtype, gpu_bytes=_gpu_bytes(device),
                    text_bytes=TextEncoders.bytes_for_room(config, ranks=world // config.dp, dtype=self.dtype),
                )
            tp = tp or 1
            self.family.check_tp(self.info, parallel.tp if parallel is not None else tp)
            if parallel is None and self.family.layout is not None:
                # UNets pick CFG split / data parallel themselves (engine/models/unet.py): planned here
                # for one guided image, chosen again for each batch by generate / generate_batch.
                parallel, _ = self.family.layout(world, config, None)
            if parallel is None:
                parallel = resolve_degrees(
                    world, self.family.degree_heads(self.info, world, tp), ulysses=config.ulysses, ring=config.ring,
                    tp=tp, cfg=config.cfg, dp=config.dp, tp_comm=config.tp_comm,
                )
            parallel.check_world_size(world)
            if self.family.heads_split:
                parallel.check_heads(self.info.num_heads)
            self.family.check_axes(parallel.degrees())
            check_tp_comm(self.family, parallel)
            choose_kernel(config.attention_backend, device, self.dtype, need_lse=parallel.ring > 1)
            if config.cuda_graphs and device.type != "cuda":
                raise ValueError("--cuda-graphs needs CUDA GPUs; none is visible to this process")
            vae_parallel.preflight(config)
            self.text_encoders = TextEncoders.preflight(
                config, self.family, parallel, world=world, explicit_layout=self.explicit_layout, dtype=self.dtype,
                gpu_bytes=_gpu_bytes(device))
            loras, self.lora_notes = check_loras(config.loras, config.model, self.family, self.info)
            if config.controlnets and self.family.pipeline(self.info.pipeline_class).controlnet:
                raise ValueError(f"--controlnet: the model directory's {self.info.pipeline_class} holds its own "
                                 "ControlNet; leave --controlnet out (or give the text-to-image model directory)")
            controlnet_dirs = check_controlnets(config.controlnets, config.model, self.family, parallel,
                                                cuda_graphs=config.cuda_graphs)
        except ValueError as e:
            error = str(e)
        timeout = timedelta(seconds=config.timeout_s)
        self.env = init_distributed(device, timeout)
        # The first collective: everyone's preflight errors and configuration, compared.
        # The resolved degrees are compared too: `--tp auto` is decided on each rank from its GPU.
        agree("engine configuration", {**asdict(config), "degrees": parallel.degrees() if error is None else None,
                                       "text_encoders": (self.text_encoders.plan.placement, self.text_encoders.plan.degrees)
                                       if error is None else None}, error)
        self.parallel = parallel
        self.device = device
        self.mesh = Mesh.build(parallel, device, timeout=timeout)
        self.meshes = {parallel: self.mesh}
        """Layout → its mesh, built once (engine/data_parallel.py switches between them)."""
        if not self.mesh.is_first:
            _quiet_libraries()
        # Collective: the text encoders' groups; then what each rank loads of them (none, a shard, all).
        self.text_encoders.setup(self.mesh, timeout)
        components = self.text_encoders.components(dtype=self.dtype, device=device, seed=config.weights_seed)
        if parallel.tp > 1:
            # Each rank reads / initialises only its TP shard of the denoiser (never the full weights).
            components[self.family.denoiser] = load_sharded_denoiser(
                config.model, self.family, tp=parallel.tp, tp_rank=self.mesh.coord("tp"), dtype=self.dtype,
                device=device, seed=config.weights_seed,
            )
        with loading_bars(show=self.mesh.is_first):
            self.pipe = load_pipeline(
                config.model, dtype=self.dtype, device=device, seed=config.weights_seed, components=components
            )
        self.pipe.set_progress_bar_config(disable=not self.mesh.is_first, leave=False)
        self.text_encoders.install(self.pipe)
        # The engine's ControlNet(s): loaded from --controlnet, or the model directory's own.
        self.controlnet = (load_controlnets(controlnet_dirs, self.family, dtype=self.dtype, device=device)
                           if controlnet_dirs else getattr(self.pipe, "controlnet", None))
        self.pipelines = Pipelines(self.pipe, self.family, self.info, self.dtype, on_new=self.text_encoders.install,
                                   controlnet=self.controlnet)
        """The loaded pipeline and its img2img / inpainting / PAG forms (engine/pipelines.py)."""
        self.attention = ParallelAttention(self.mesh, config.attention_backend)
        self.denoiser = getattr(self.pipe, self.family.denoiser)
        shards = local_shards(self.denoiser, self.family.plan.tp_styles, parallel.tp, self.mesh.coord("tp")) if parallel.tp > 1 else {}
        self.loras = LoraState(self.pipe, self.family, shards)
        """LoRAs fused into this rank's weights (engine/lora.py)."""
        self.loras.set(loras)
        self.plan = apply_plan(self.denoiser, self.family.pipeline_plan, self.mesh, self.attention)
        self.controlnet_plans = self.apply_controlnet_plans(self.mesh)
        if config.compile:
            from engine.runtime.compile import compile_denoiser

            compile_denoiser(self.denoiser)
        self.graphs = None
        """The CUDA-graphed denoiser forward (config.cuda_graphs), or None."""
        self.capture_graphs()
        self.vae_split = None
        """The VAE's applied row-split plan over the mesh's image ranks (engine/vae_parallel.py), or None."""
        self.install_vae_split()
        self.gate = None
        """A PreparationGate (engine/runtime/gate.py) that every pipeline call runs inside, or None."""

    def apply_controlnet_plans(self, mesh) -> list:
        """The ControlNets' plans on `mesh` (none without a ControlNet)."""
        if self.controlnet is None or self.family.controlnet is None:
            return []
        return apply_controlnet_plans(self.controlnet, self.family, mesh, self.attention)

    def install_vae_split(self) -> None:
        """(Re)install the VAE's row split on the current mesh (its image group changes with the layout)."""
        if self.vae_split is not None:
            self.vae_split.remove()
            self.vae_split = None
        error = None
        try:
            self.vae_split = vae_parallel.install(self)
        except ValueError as e:
            error = str(e)
        if self.config.vae_parallel == "on":
            # Every rank applies the same plan to the same model; one message if it cannot.
            agree("VAE row split", None, error)

    def capture_graphs(self) -> None:
        """(Re)install the CUDA-graphed forward: graphs captured on one plan replay its collectives,
        so a new plan (engine/data_parallel.use_layout) starts from no graphs."""
        if self.graphs is not None:
            self.graphs.remove()
            self.graphs = None
        if self.config.cuda_graphs:
            from engine.runtime.cuda_graphs import GraphedForward

            self.graphs = GraphedForward(self.denoiser).install()

    @property
    def is_first(self) -> bool:
        return self.mesh.is_first

    def set_loras(self, loras) -> list[str]:
        """Fuse exactly `loras` ("PATH[:SCALE]" / (path, scale) / LoraSpec; [] = none) in place of the
        current ones, between requests, without reloading the base (engine/lora.py). Every rank calls it
        with the same list; no collective (ValueError, on every rank alike, for a bad file). Returns notes
        for the user (keys that match no layer)."""
        specs, notes = check_loras(loras, self.config.model, self.family, self.info)
        self.loras.set(specs)
        return notes

    def check_request(self, request: GenerateRequest, parallel: ParallelConfig) -> PreparedCall:
        """`request` on `parallel`, ready for its pipeline (engine/pipelines.py chooses it and reads the
        input images); ValueError, no collective. The rules are engine/validation.py's, shared with the
        CLI and the server."""
        memory = available_bytes(self.device, _local_ranks())
        checked = check_request(request, self.info, self.family, parallel, dtype=self.dtype, memory_bytes=memory,
                                vae_parallel=self.config.vae_parallel, controlnets=len(self.config.controlnets))
        return checked.call

    def choose_layout(self, requests: list[GenerateRequest]) -> tuple[ParallelConfig, str]:
        """The layout generate_batch will use for `requests` and why (no collective)."""
        return choose_layout(self, requests)

    def generate_batch(self, requests: list[GenerateRequest], *, output_type: str = "pil", on_step=None) -> list | None:
        """Several images: spread over the dp ranks; results in request order on the first rank, None
        on the others (engine/data_parallel.py). Every rank calls it with the same requests."""
        return generate_batch(self, requests, output_type=output_type, on_step=on_step)

    def generate(self, request: GenerateRequest, *, output_type: str = "pil", agreed: bool = False,
                 on_step=None) -> GenerateResult:
        """One request on every rank. `agreed`: generate_batch already checked it on every rank (the dp
        ranks then run different requests, so no collective here). `on_step(step)`: called after every
        denoising step on every rank; it may stop the call by raising (engine/runtime/stop.py)."""
        error, layout = None, self.parallel
        try:
            if not agreed and self.family.layout is not None:
                layout, _ = choose_layout(self, [request])
            call = self.check_request(request, layout)
        except ValueError as e:
            error, call = str(e), None
        if agreed:
            assert error is None, error
        else:
            # The input images' pixel hashes too: every rank must have read the same pictures.
            agree("request", {**request.to_dict(), "inputs": call and call.records}, error)
            use_layout(self, layout)
        height, width = call.height, call.width
        pipe = self.pipelines.get(call.spec)
        self.pipelines.bind(pipe, call, self.plan, self.denoiser, self.controlnet_plans)
        if self.graphs is not None and self.pipelines.processors_changed(call):
            # A graph replays the processors it was captured with; PAG swaps some for the call.
            self.capture_graphs()
        kwargs = dict(
            **call.kwargs,
            **call.size_kwargs,
            num_inference_steps=request.steps,
            # As diffusers documents for reproducible results: the noise comes from a CPU generator, so
            # it is the same on every rank and on every device.
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type=output_type,
            **step_callback_kwargs(pipe, on_step),
        )
        if self.vae_split is not None:
            self.vae_split.last.clear()
        _sync(self.device)
        start = time.perf_counter()
        # Some pipelines also draw from torch's global generator (the SD3 ControlNet pipeline samples its
        # control image's latents with no generator): seeded from the request, so every rank draws the
        # same and the image is reproducible; the caller's global generator state is left as it was.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(request.seed)
            out = self.call_pipeline(pipe, kwargs)
        _sync(self.device)
        seconds = time.perf_counter() - start
        params = {
            **request.to_dict(),
            "height": height,
            "width": width,
            "model": self.config.model,
            "pipeline": call.spec.cls,
            "inputs": call.records,
            "loras": self.loras.records,
            "controlnets": list(self.config.controlnets),
            "layout": self.parallel.describe(),
            "size": [width, height],
            "parallel": self.parallel.degrees(),
            "tp_comm": self.parallel.tp_comm,
            "text_encoders": self.text_encoders.plan.placement,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention_backend": self.attention.kernel_for(self.device, self.dtype).name,
            "vae_parallel": self.config.vae_parallel,
            "seconds": round(seconds, 3),
        }
        if output_type != "latent":
            # Ranks the decode was split over by rows (1: whole on every rank).
            params["vae_split"] = self.vae_split.last.get("decode", 1) if self.vae_split is not None else 1
        images = out.images
        if output_type == "latent":
            return GenerateResult(None, images, params, seconds)
        return GenerateResult(images[0], None, params, seconds, images=list(images))

    def call_pipeline(self, pipe, kwargs: dict):
        """`pipe(**kwargs)`, inside `self.gate` when one is set: an exception that every rank raises
        before the call's first collective is then agreed on as a request error (engine/runtime/gate.py)."""
        if self.gate is None:
            return pipe(**kwargs)
        with self.gate.pipeline_call():
            return pipe(**kwargs)

    def describe_vae(self, request: GenerateRequest, layout: ParallelConfig | None = None) -> str:
        """What the VAE decode of `request` will do on `layout` (default: the current one), for the layout line."""
        layout = layout or self.parallel
        call = self.check_request(request, layout)
        return vae_parallel.describe(self, layout.world_size // layout.dp, call.height, call.width)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.remove()
            self.graphs = None
        if self.vae_split is not None:
            self.vae_split.remove()
            self.vae_split = None
        self.plan.remove()
        for plan in self.controlnet_plans:
            plan.remove()
        self.text_encoders.remove()


def _gpu_bytes(device: torch.device) -> int | None:
    """One GPU's total memory (the same on every rank of a node of one GPU kind); None on CPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def _local_ranks() -> int:
    """Processes of this job on this machine (they share its RAM when running on the CPU)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quiet_libraries() -> None:
    """Other ranks stay quiet: the first rank speaks for the job."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
