"""Everything the engine decides and checks before its first collective, as one ordered list of steps.

`preflight(config, given)` runs `STEPS` in order on one `Preflight`. The model is resolved once, by the
second step, into its description (engine/loading/model.py), which every later step reads — no step
looks the model up by name again. A step is a small function of the preflight: it returns a value,
stored on the preflight under the step's name(s), or only checks (None); a user mistake is a one-line
ValueError. The first mistake ends the list and is kept, not raised: every rank must reach the first
collective (`Preflight.agree`) to learn every rank's verdict, so that a mistake seen on one rank (a model
folder missing on one node) stops all of them with one message instead of leaving the others waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from shardiff_kernels.registry import choose_kernel
from shardiff_parallel.config import ParallelConfig, resolve_degrees

from engine.controlnet import check_controlnets
from engine.loading.auto_tp import choose_tp
from engine.loading.model import ResolvedModel, resolve_model
from engine.models import check_tp_comm_plan
from engine.runtime.distributed import agree, launched_world_size, pick_device
from engine.text_encoders.encoders import TextEncoders

from . import vae_parallel
from .config import EngineConfig
from .lora import check_loras


@dataclass
class Preflight:
    """What the steps found, in the order they found it; `error`: the first mistake (None: none)."""

    config: EngineConfig
    given: ParallelConfig | None
    """A layout the caller gave (Engine(parallel=…)): used as it is, for every request."""
    world: int
    """Processes launched (torchrun's WORLD_SIZE; 1 alone)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model: ResolvedModel | None = None
    dtype: torch.dtype = torch.float32
    tp: int = 1
    """The TP degree asked for, or `--tp auto`'s choice."""
    tp_note: str = ""
    """Why `--tp auto` chose TP (empty when it did not)."""
    parallel: ParallelConfig | None = None
    """The layout the engine is built on."""
    text_encoders: TextEncoders | None = None
    """Where the text encoders live (decided here; its groups are made after the first collective)."""
    loras: list = field(default_factory=list)
    """LoraSpecs to fuse at load."""
    lora_notes: list = field(default_factory=list)
    """Notes on the LoRAs for the user (keys that match no layer)."""
    controlnets: list = field(default_factory=list)
    """The --controlnet directories, checked (engine/controlnet.py ControlNetDir)."""
    processor_note: str = ""
    """Which vision-language processors are built without torchvision, for images and text (empty: none)."""
    error: str | None = None

    @property
    def family(self):
        return self.model.family

    @property
    def info(self):
        return self.model.info

    @property
    def gpu_bytes(self) -> int | None:
        """One GPU's total memory (the same on every rank of a node of one GPU kind); None on CPU."""
        return torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None

    def agree(self) -> None:
        """The first collective: every rank's verdict and configuration, compared (a UserError on every
        rank if any rank found a mistake or they differ). The resolved degrees are compared too: `--tp
        auto` is decided on each rank from its GPU."""
        ok = self.error is None
        plan = self.text_encoders.plan if ok else None
        agree("engine configuration", {**asdict(self.config), "degrees": self.parallel.degrees() if ok else None,
                                       "text_encoders": (plan.placement, plan.degrees) if ok else None}, self.error)


# ------------------------------------------------------------------ the steps, in order


def find_device(p: Preflight) -> torch.device:
    return pick_device(p.config.device)


def resolve(p: Preflight) -> ResolvedModel:
    return resolve_model(p.config.model)


def choose_dtype(p: Preflight) -> torch.dtype:
    return p.config.torch_dtype(p.device, p.family.gpu_dtype)


def choose_tp_degree(p: Preflight) -> tuple[int, str]:
    """The asked TP degree; `--tp auto` (unset): the smallest that fits the weights on one GPU
    (engine/loading/auto_tp.py) — for families whose degrees come from the config, without a given layout."""
    if p.config.tp is not None or p.given is not None or p.family.layout is not None:
        return p.config.tp or 1, ""
    ranks = p.world // p.config.dp
    return choose_tp(p.model, p.info, p.family, world_size=p.world, dp=p.config.dp, cfg=p.config.cfg,
                     dtype=p.dtype, gpu_bytes=p.gpu_bytes,
                     text_bytes=TextEncoders.bytes_for_room(p.config, ranks=ranks, dtype=p.dtype, model=p.model),
                     quantize=p.config.quantize)


def check_tp_split(p: Preflight) -> None:
    p.family.check_tp(p.info, p.given.tp if p.given is not None else p.tp)


def choose_layout(p: Preflight) -> ParallelConfig:
    """The given layout; a UNet's plan for one guided image (chosen again for each batch by generate /
    generate_batch: engine/models/unet.py); or the config's degrees with the unset ones filled."""
    if p.given is not None:
        return p.given
    if p.family.layout is not None:
        return p.family.layout(p.world, p.config, None)[0]
    c = p.config
    return resolve_degrees(p.world, p.family.degree_heads(p.info, p.world, p.tp), ulysses=c.ulysses, ring=c.ring,
                           tp=p.tp, cfg=c.cfg, dp=c.dp, tp_comm=c.tp_comm)


def check_world_size(p: Preflight) -> None:
    p.parallel.check_world_size(p.world)


def check_heads(p: Preflight) -> None:
    if p.family.heads_split:
        p.parallel.check_heads(p.info.num_heads)


def check_axes(p: Preflight) -> None:
    p.family.check_axes(p.parallel.degrees())


def check_tp_comm(p: Preflight) -> None:
    check_tp_comm_plan(p.family, p.parallel)


def check_kernel(p: Preflight) -> None:
    choose_kernel(p.config.attention_backend, p.device, p.dtype, need_lse=p.parallel.ring > 1)


def check_fast_path(p: Preflight) -> None:
    """--quantize fp8 needs the family's FP8 rule and a GPU with FP8 (the CPU emulates it); --quantize-qkv fp8
    needs a family whose attention goes through the mesh's (any device: it is a rounding); --cache needs the
    family's block stacks and no CUDA graphs (a graph replays one branch of the cache's decision)."""
    if p.config.quantize == "fp8":
        if p.family.fp8 is None:
            raise ValueError(f"--quantize fp8: " + p.family.refusals.get(
                "quantize", f"{p.family.name} models have no FP8 rule yet (which linears may run in FP8)")
                + f"; families with one: {', '.join(families_with('fp8'))}")
        from shardiff_kernels.fp8 import fp8_refusal

        reason = fp8_refusal(p.device)
        if reason:
            raise ValueError(reason)
        if p.config.tp_comm == "overlap" and (p.config.tp or 1) > 1:
            raise ValueError("--quantize fp8 with --tp-comm overlap: the fused matmul + reduce-scatter kernels multiply "
                             "in bf16; use --tp-comm allreduce or sequence")
    if p.config.quantize_qkv == "fp8" and "quantize_qkv" in p.family.refusals:
        raise ValueError(f"--quantize-qkv fp8: {p.family.refusals['quantize_qkv']}")
    cache = p.config.cache_config
    if cache is not None:
        if not p.family.cache_stacks:
            raise ValueError(f"--cache {p.config.cache}: " + p.family.refusals.get(
                "cache", f"{p.family.name} models name no block stacks to cache")
                + f"; families that do: {', '.join(families_with('cache_stacks'))}")
        if cache.method not in p.family.cache_methods:
            raise ValueError(f"--cache {p.config.cache}: {p.family.name} models run --cache "
                             f"{' or '.join(p.family.cache_methods)} only (their blocks' stream is not the hidden_states "
                             f"argument diffusers' first-block hooks read)")
        if p.config.cuda_graphs:
            raise ValueError(f"--cache {p.config.cache} with --cuda-graphs: a CUDA graph replays one branch of the "
                             "cache's per-step decision; use --compile without --cuda-graphs")


def families_with(attribute: str) -> list[str]:
    from engine.models import FAMILIES

    return sorted(n for n, f in FAMILIES.items() if getattr(f, attribute))


def check_cuda_graphs(p: Preflight) -> None:
    if p.config.cuda_graphs and p.device.type != "cuda":
        raise ValueError("--cuda-graphs needs CUDA GPUs; none is visible to this process")


def check_vae_split(p: Preflight) -> None:
    vae_parallel.preflight(p.config, p.model)


def place_text_encoders(p: Preflight) -> TextEncoders:
    return TextEncoders.preflight(p.model, p.config, p.parallel, world=p.world, explicit_layout=p.given is not None,
                                  dtype=p.dtype, gpu_bytes=p.gpu_bytes)


def check_lora_files(p: Preflight) -> tuple[list, list]:
    return check_loras(p.config.loras, p.model, p.family, p.info)


def check_model_controlnet(p: Preflight) -> None:
    if p.config.controlnets and p.family.pipeline(p.info.pipeline_class).controlnet:
        raise ValueError(f"--controlnet: the model directory's {p.info.pipeline_class} holds its own "
                         "ControlNet; leave --controlnet out (or give the text-to-image model directory)")


def check_controlnet_dirs(p: Preflight) -> list:
    return check_controlnets(p.config.controlnets, p.model, p.family, p.parallel, cuda_graphs=p.config.cuda_graphs)


def note_processors(p: Preflight) -> str:
    """One line when the model's vision-language processors are built for images and text alone (no
    torchvision: engine/loading/processors.py)."""
    from engine.loading.pipeline import stand_in_processors
    from engine.loading.processors import note

    found = stand_in_processors(p.model)
    return note(found) if found else ""


STEPS: tuple[tuple[str | tuple[str, ...] | None, Callable[[Preflight], object]], ...] = (
    ("device", find_device),
    ("model", resolve),
    ("dtype", choose_dtype),
    (None, check_fast_path),
    (("tp", "tp_note"), choose_tp_degree),
    (None, check_tp_split),
    ("parallel", choose_layout),
    (None, check_world_size),
    (None, check_heads),
    (None, check_axes),
    (None, check_tp_comm),
    (None, check_kernel),
    (None, check_cuda_graphs),
    (None, check_vae_split),
    ("text_encoders", place_text_encoders),
    (("loras", "lora_notes"), check_lora_files),
    (None, check_model_controlnet),
    ("controlnets", check_controlnet_dirs),
    ("processor_note", note_processors),
)
"""(where the step's value goes, the step): None for a check, a tuple for a step that finds two things."""


def preflight(config: EngineConfig, given: ParallelConfig | None = None) -> Preflight:
    """Run STEPS on `config` (and a layout the caller gave); no collective. The first ValueError is kept
    in `error` and ends the list (see the module doc)."""
    p = Preflight(config, given, launched_world_size())
    for target, step in STEPS:
        try:
            value = step(p)
        except ValueError as e:
            p.error = str(e)
            break
        if isinstance(target, tuple):
            for name, v in zip(target, value, strict=True):
                setattr(p, name, v)
        elif target is not None:
            setattr(p, target, value)
    return p
