"""The engine: load a pipeline once, parallelize its denoiser, serve many generate() calls.

Every rank runs the same diffusers pipeline call (text encoding, scheduler, VAE are diffusers' own
code, unchanged); the denoiser is split over the mesh, by the plan of its model family, and — with
`--vae-parallel` — the VAE decode by rows over the ranks of one image (engine/vae_parallel.py). Each
rank ends up with the same latents, so the image equals the single-device image up to rounding.

The API is SPMD: in a multi-process job every rank constructs the Engine and calls generate() with
the same request (checked: a rank with another request stops the job with a message).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.mesh import Mesh
from shardiff_parallel.tensor import local_shards

from engine.controlnet import load_controlnets
from engine.loading import load_pipeline
from engine.loading.sharded import load_sharded_denoiser
from engine.runtime.distributed import agree, init_distributed
from engine.runtime.quiet import loading_bars
from engine.runtime.stop import step_callback_kwargs

from . import vae_parallel
from .config import EngineConfig, GenerateRequest
from .data_parallel import choose_layout, generate_batch
from .lora import LoraState, check_loras, parse_lora
from .pipelines import Pipelines
from .placement import Placement
from .preflight import Preflight, preflight
from .request_check import CheckedBatch, CheckedRequest, available_bytes, check_request


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

        `parallel` overrides the degrees of `config` (the API can pass a full ParallelConfig), kept for
        every request. The steps: preflight → agree → mesh → load → parallelize → compile → graphs → VAE split.
        """
        self.config = config = config or EngineConfig()
        pre = preflight(config, parallel)  # every decision and check, no collective (engine/preflight.py)
        self.env = init_distributed(pre.device, self.timeout)
        pre.agree()  # the first collective: every rank's verdict and configuration, compared
        self._adopt(pre)
        mesh = self._mesh(pre.parallel)  # collective: the layout's process groups
        if not mesh.is_first:
            _quiet_libraries()
        self._load(pre, mesh)
        self.placement = self._place(pre.parallel)
        """The layout applied: mesh, attention, plans (engine/placement.py; `use_layout` moves it)."""
        self._compile()
        self.graphs = None
        """The CUDA-graphed denoiser forward (config.cuda_graphs), or None."""
        self.capture_graphs()
        self.vae_split = None
        """The VAE's applied row-split plan over the mesh's image ranks (engine/vae_parallel.py), or None."""
        self.install_vae_split()
        self.gate = None
        """A PreparationGate (engine/runtime/gate.py) that every pipeline call runs inside, or None."""

    # ------------------------------------------------------------------ the steps of __init__

    def _adopt(self, pre: Preflight) -> None:
        """What the preflight decided becomes the engine's."""
        self.explicit_layout = pre.given is not None
        """A ParallelConfig given by the caller is kept for every request (no per-batch choice)."""
        self.model = pre.model
        """The model's description (engine/loading/model.py), resolved once by the preflight."""
        self.info, self.family = pre.info, pre.family
        self.device, self.dtype = pre.device, pre.dtype
        self.tp_note = pre.tp_note
        """Why `--tp auto` chose TP (empty when it did not)."""
        self.lora_notes = pre.lora_notes
        """Notes on the LoRAs for the user (keys that match no layer)."""
        self.processor_note = pre.processor_note
        """Which vision-language processors were built without torchvision (empty: none)."""
        self.text_encoders = pre.text_encoders
        self.meshes: dict[ParallelConfig, Mesh] = {}
        """Layout → its mesh, built once (`use_layout` switches between them)."""

    def _mesh(self, parallel: ParallelConfig) -> Mesh:
        """The mesh of `parallel`, built on first use (collective: new_group) and kept."""
        if parallel not in self.meshes:
            self.meshes[parallel] = Mesh.build(parallel, self.device, timeout=self.timeout)
        return self.meshes[parallel]

    def _load(self, pre: Preflight, mesh: Mesh) -> None:
        """The text encoders' groups and shards, the denoiser's TP shard, the pipeline, its ControlNets and
        pipeline forms, the LoRAs fused."""
        # Collective: the text encoders' groups; then what each rank loads of them (none, a shard, all).
        self.text_encoders.setup(mesh, self.timeout)
        components = self.text_encoders.components(dtype=self.dtype, device=self.device, seed=self.config.weights_seed)
        tp, tp_rank = pre.parallel.tp, mesh.coord("tp")
        if tp > 1:
            # Each rank reads / initialises only its TP shard of the denoiser (never the full weights).
            components[self.family.denoiser] = load_sharded_denoiser(
                self.model, self.family, tp=tp, tp_rank=tp_rank, dtype=self.dtype, device=self.device,
                seed=self.config.weights_seed,
            )
        with loading_bars(show=mesh.is_first):
            self.pipe = load_pipeline(self.model, dtype=self.dtype, device=self.device, seed=self.config.weights_seed,
                                      components=components)
        self.pipe.set_progress_bar_config(disable=not mesh.is_first, leave=False)
        self.text_encoders.install(self.pipe)
        # The engine's ControlNet(s): loaded from --controlnet, or the model directory's own.
        self.controlnet = (load_controlnets(pre.controlnets, self.family, dtype=self.dtype, device=self.device)
                           if pre.controlnets else getattr(self.pipe, "controlnet", None))
        self.pipelines = Pipelines(self.pipe, self.family, self.info, self.dtype, on_new=self.text_encoders.install,
                                   controlnet=self.controlnet)
        """The loaded pipeline and its img2img / inpainting / PAG forms (engine/pipelines.py)."""
        self.denoiser = getattr(self.pipe, self.family.denoiser)
        shards = local_shards(self.denoiser, self.family.plan.tp_styles, tp, tp_rank) if tp > 1 else {}
        self.loras = LoraState(self.pipe, self.family, shards)
        """LoRAs fused into this rank's weights (engine/lora.py)."""
        self.loras.set(pre.loras)

    def _place(self, parallel: ParallelConfig) -> Placement:
        """The denoiser and ControlNets split by their plans on `parallel`'s mesh."""
        return Placement.apply(parallel, self._mesh(parallel), family=self.family, denoiser=self.denoiser,
                               controlnet=self.controlnet, attention_backend=self.config.attention_backend,
                               quantize=self.config.quantize, quantize_qkv=self.config.quantize_qkv,
                               cache=self.config.cache_config)

    def _compile(self) -> None:
        if self.config.compile:
            from engine.runtime.compile import compile_denoiser

            compile_denoiser(self.denoiser)

    # ------------------------------------------------------------------ the layout

    @property
    def timeout(self) -> timedelta:
        """Of every process group: a dead peer ends the job after this long."""
        return timedelta(seconds=self.config.timeout_s)

    @property
    def parallel(self) -> ParallelConfig:
        return self.placement.parallel

    @property
    def mesh(self) -> Mesh:
        return self.placement.mesh

    @property
    def attention(self):
        return self.placement.attention

    @property
    def plan(self):
        return self.placement.plan

    @property
    def controlnet_plans(self) -> list:
        return self.placement.controlnet_plans

    def use_layout(self, parallel: ParallelConfig) -> None:
        """Move the plans onto the mesh of `parallel` (same processes, same weights).

        Collective when that mesh is new (new_group), so every rank calls this with the same layout: the
        caller agreed on the requests first, and the layout is a pure function of them.
        """
        if parallel == self.parallel:
            return
        self.placement.remove()
        self.placement = self._place(parallel)
        self.capture_graphs()
        self.install_vae_split()
        self.pipe.set_progress_bar_config(disable=not self.mesh.is_first, leave=False)

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
        so a new plan (`use_layout`) starts from no graphs."""
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
        if self.config.quantize != "off" and tuple(parse_lora(v) for v in loras) != self.loras.active:
            raise ValueError("the LoRAs were fused into the weights before --quantize fp8 put them in FP8: switching "
                             "them needs the bf16 weights, which are gone; start the engine with the LoRAs wanted")
        specs, notes = check_loras(loras, self.model, self.family, self.info)
        self.loras.set(specs)
        return notes

    # ------------------------------------------------------------------ requests

    def check_request(self, request: GenerateRequest, parallel: ParallelConfig | None = None) -> CheckedRequest:
        """`request` on `parallel` (default: the current layout), checked and ready for its pipeline: the
        form chosen, its input images read (engine/request_check.py); ValueError, no collective."""
        memory = available_bytes(self.device, _local_ranks())
        return check_request(request, self.info, self.family, parallel or self.parallel, dtype=self.dtype,
                             memory_bytes=memory, vae_parallel=self.config.vae_parallel,
                             controlnets=len(self.config.controlnets))

    def check_batch(self, requests: list[GenerateRequest]) -> CheckedBatch:
        """`requests` checked once on this rank: the layout generate_batch will use for them, and each
        request on it (no collective; ValueError). Hand the result to generate_batch, which then checks
        nothing again."""
        layout, why = choose_layout(self, list(requests))
        return CheckedBatch(layout, why, tuple(self.check_request(r, layout) for r in requests))

    def choose_layout(self, requests: list[GenerateRequest]) -> tuple[ParallelConfig, str]:
        """The layout generate_batch will use for `requests` and why (no collective)."""
        return choose_layout(self, requests)

    def generate_batch(self, requests: list[GenerateRequest] | CheckedBatch, *, output_type: str = "pil",
                       on_step=None) -> list | None:
        """Several images: spread over the dp ranks; results in request order on the first rank, None
        on the others (engine/data_parallel.py). Every rank calls it with the same requests, or with its
        `check_batch` of them."""
        return generate_batch(self, requests, output_type=output_type, on_step=on_step)

    def generate(self, request: GenerateRequest, *, output_type: str = "pil", on_step=None) -> GenerateResult:
        """One request on every rank. `on_step(step)`: called after every denoising step on every rank; it
        may stop the call by raising (engine/runtime/stop.py)."""
        error, checked, layout = None, None, self.parallel
        try:
            if self.family.layout is not None:
                layout, _ = choose_layout(self, [request])
            checked = self.check_request(request, layout)
        except ValueError as e:
            error = str(e)
        # The input images' pixel hashes too: every rank must have read the same pictures.
        agree("request", checked.agreed_form() if checked is not None else None, error)
        self.use_layout(layout)
        return self.run(checked, output_type=output_type, on_step=on_step)

    def run(self, checked: CheckedRequest, *, output_type: str = "pil", on_step=None) -> GenerateResult:
        """A checked request on the current layout, which it was checked for: the pipeline call alone (no
        check, no agreement: generate and generate_batch did both)."""
        request, call = checked.request, checked.call
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
        cache = self.placement.cache
        if cache is not None:
            cache.reset()  # every request starts from empty caches
        _sync(self.device)
        start = time.perf_counter()
        # Some pipelines also draw from torch's global generator (the SD3 ControlNet pipeline samples its
        # control image's latents with no generator): seeded from the request, so every rank draws the
        # same and the image is reproducible; the caller's global generator state is left as it was.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), cache_context(cache):
            torch.manual_seed(request.seed)
            out = self.call_pipeline(pipe, kwargs)
        _sync(self.device)
        seconds = time.perf_counter() - start
        params = {
            **request.to_dict(),
            "height": call.height,
            "width": call.width,
            "model": self.config.model,
            "pipeline": call.spec.cls,
            "inputs": call.records,
            "loras": self.loras.records,
            "controlnets": list(self.config.controlnets),
            "layout": self.parallel.describe(),
            "size": [call.width, call.height],
            "parallel": self.parallel.degrees(),
            "tp_comm": self.parallel.tp_comm,
            "text_encoders": self.text_encoders.plan.placement,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention_backend": self.attention.kernel_for(self.device, self.dtype).name,
            "vae_parallel": self.config.vae_parallel,
            "quantize": self.describe_quantize(),
            "quantize_qkv": self.config.quantize_qkv,
            "cache": None if cache is None else {"method": cache.config.describe(), **cache.log.summary()},
            "seconds": round(seconds, 3),
        }
        if output_type != "latent":
            # Ranks the decode was split over by rows (1: whole on every rank).
            params["vae_split"] = self.vae_split.last.get("decode", 1) if self.vae_split is not None else 1
        images = out.images
        if output_type == "latent":
            return GenerateResult(None, images, params, seconds)
        return GenerateResult(images[0], None, params, seconds, images=list(images))

    def describe_fast_path(self) -> str:
        """For the layout line: what the fast path trades (empty on the exact path)."""
        parts = []
        if self.config.quantize != "off":
            fp8 = self.placement.plan.parts["quantize"].done
            how = "the FP8 kernel" if self.describe_quantize() == "fp8" else "an exact CPU emulation of the FP8 kernel"
            parts.append(f"{fp8.describe()}, {how}")
        if self.config.quantize_qkv == "fp8":
            sent = " and ".join(a for a in ("Ulysses", "Ring") if getattr(self.parallel, a.lower()) > 1)
            parts.append("attention's Q, K, V rounded to fp8 e4m3 per token and head" + (f" (sent so through {sent})"
                                                                                           if sent else ""))
        if self.placement.cache is not None:
            parts.append(f"step cache {self.placement.cache.config.describe()}")
        return "; fast path (not the exact image): " + ", ".join(parts) if parts else ""

    def describe_quantize(self) -> str:
        """"off", "fp8" (the FP8 kernel) or "fp8 (emulated)" (the CPU's exact emulation of it)."""
        if self.config.quantize == "off":
            return "off"
        from shardiff_kernels.fp8 import uses_kernel

        return "fp8" if uses_kernel(self.device) else "fp8 (emulated)"

    def call_pipeline(self, pipe, kwargs: dict):
        """`pipe(**kwargs)`, inside `self.gate` when one is set: an exception that every rank raises
        before the call's first collective is then agreed on as a request error (engine/runtime/gate.py)."""
        if self.gate is None:
            return pipe(**kwargs)
        with self.gate.pipeline_call():
            return pipe(**kwargs)

    def describe_vae(self, batch: CheckedBatch) -> str:
        """What the VAE decode of the batch's first request will do on its layout, for the layout line."""
        first, layout = batch.requests[0], batch.layout
        return vae_parallel.describe(self, layout.world_size // layout.dp, first.height, first.width)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.remove()
            self.graphs = None
        if self.vae_split is not None:
            self.vae_split.remove()
            self.vae_split = None
        self.placement.remove()
        self.text_encoders.remove()


def cache_context(cache):
    """The step cache's context around a pipeline call (parallel/plan/cache.py), if there is a cache."""
    return contextlib.nullcontext() if cache is None else cache.context()


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
