"""What a model family is to the engine: its plan, how its pipelines are called, its limits, as data.

Every family module under engine/models/ builds one `Family` (UNets: one per pipeline kind) and the
registry (engine/models/__init__.py) lists them. The engine, the loader and the preset builder only
read these fields; none of them names a family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from engine.presets.spec import PresetSpec
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import CfgPairs, ModelPlan


@dataclass(kw_only=True, frozen=True)
class ModelInfo:
    """Cheap facts about one model, read from its configs (no weights), so that degrees, head counts
    and image sizes are checked on every rank before the first collective."""

    source: str
    """"preset" or "directory"."""
    family: str
    pipeline_class: str
    num_heads: int
    head_dim: int
    num_layers: int
    """Flux: dual-stream blocks; UNets: resolution levels."""
    num_single_layers: int
    """Flux: single-stream blocks; 0 elsewhere."""
    in_channels: int
    """Denoiser input channels (Flux: packed latents)."""
    joint_attention_dim: int
    """Text-embedding width the denoiser expects (UNets: cross-attention width)."""
    pooled_projection_dim: int
    """Pooled text width (0 where there is none)."""
    vae_scale_factor: int
    """Pixels per latent cell."""
    spatial_multiple: int
    """Height and width must be multiples of this (VAE factor × patch size, or the pipeline's own rule)."""
    default_size: int
    """Pixels."""
    uses_guidance_embeds: bool
    """The guidance scale is an input of the denoiser (Flux-dev, LCM UNets), not two branches."""
    num_kv_heads: int = 0
    """Key/value heads of grouped-query attention (Lumina2: 8 for 24 query heads); 0: as num_heads."""
    mlp_width: int = 0
    """Hidden width of the blocks' MLP, which TP splits; 0: 4 × the model width (mmdit.MLP_RATIO)."""
    guidance_distilled: bool = False
    """The pipeline never runs two guidance branches, whatever the guidance scale (step-distilled
    FLUX.2-klein: `is_distilled` in its model_index.json), so there is nothing for --cfg 2 to split."""
    patch_size: int = 1
    """Latent cells per token side (a DiT's patchify); 1 where tokens are latent cells."""
    tp_widths: tuple[tuple[str, int], ...] = ()
    """(what, count) that a TP degree must divide, for families whose check needs more than the heads
    (Sana: cross-attention heads, Mix-FFN channels), read from the configs."""


@dataclass(kw_only=True, frozen=True)
class PipelineSpec:
    """One diffusers pipeline class a family runs: the image inputs it takes and the pipelines it leads
    to when a request brings what it lacks (engine/pipelines.py walks these links)."""

    cls: str
    """The diffusers pipeline class (a model_index.json `_class_name`)."""
    inputs: tuple[str, ...] = ()
    """Image inputs it takes: GenerateRequest fields that are also its call arguments (image,
    mask_image, control_image)."""
    required: tuple[str, ...] = ()
    """Inputs it cannot run without (FluxFill: image and mask_image)."""
    max_images: int = 1
    """How many input images (`image`: reference images, in order) it takes: 1, or more for the
    pipelines that take a list (Qwen-Image-Edit-Plus). A request with more is refused before any collective."""
    strength: bool = False
    """Takes `strength` (how much of the input image's noise schedule is redone)."""
    pag: bool = False
    """A perturbed-attention-guidance pipeline (takes `pag_scale`; batches a perturbed branch)."""
    sized: bool = True
    """Takes height / width. SD / SDXL img2img do not: their output has the input image's size, so the
    engine hands them the image at the requested size."""
    variants: Mapping[str, str] = field(default_factory=dict)
    """What a request brings that this class lacks → the class that takes it, built from the same loaded
    components (diffusers' `from_pipe`): "image" → its img2img form, "mask_image" → its inpainting
    form, "pag" → its PAG form."""
    call_extra: Callable[..., dict] | None = None
    """(request, height, width) → further call arguments of this class (Kontext: its size rule)."""
    size_rule: Callable[[list], tuple[int, int]] | None = None
    """(the input images, in order) → the (height, width) it draws at when the request gives no size, where
    the class's own default is not the first image's size (Qwen-Image-Edit: 1024² pixels at the image's
    aspect, as diffusers does); None: the first input image's size."""
    fixed_size: bool = False
    """It draws at `size_rule`'s size whatever height / width it is given (QwenImageEditInpaintPipeline): a
    request asking for another size is refused."""
    controlnet: bool = False
    """A ControlNet pipeline: its `controlnet` component is the engine's ControlNet(s)."""
    arg_names: Mapping[str, str] = field(default_factory=dict)
    """Input field → this class's call argument, where they differ (SD / SDXL ControlNet pipelines take
    the control image as `image`)."""
    references_arg: str | None = None
    """The call argument that takes the input images after the first, where the class's `image` takes the
    first alone (Flux2KleinInpaintPipeline: the image it repaints, then `image_reference`, the references the
    repainted region follows); None: `image` takes them all."""

    def arg(self, name: str) -> str:
        return self.arg_names.get(name, name)


def pipeline_specs(*specs: PipelineSpec) -> tuple[PipelineSpec, ...]:
    """A family's pipelines, checked: every variant link names one of them."""
    names = {s.cls for s in specs}
    for s in specs:
        assert s.references_arg is None or (s.max_images > 1 and "image" in s.inputs), (
            f"{s.cls}: references_arg without several input images")
        for what, target in s.variants.items():
            assert what in ("controlnet", "image", "mask_image", "pag") and target in names, (
                f"{s.cls}: bad variant {what} → {target}")
    return specs


@dataclass(kw_only=True, frozen=True)
class ControlNetSpec:
    """The ControlNets a family runs (engine/controlnet.py loads and checks them): a ControlNet is a
    denoiser of its own, with its own plan applied on the same mesh."""

    classes: tuple[str, ...]
    """diffusers model classes (a ControlNet directory's config.json `_class_name`)."""
    plan: ModelPlan
    """Its plan: the denoiser's attention processors and TP styles, its inputs split like the
    denoiser's, its residuals left split (`SequenceSplit.residual_output`, `BatchSplit(output_dim=None)`)
    for the denoiser's `Residuals` part."""
    denoiser_class: str
    """The denoiser's diffusers class (whose defaults fill what its config leaves out)."""
    match: tuple[str, ...]
    """Config entries the ControlNet must share with the denoiser (engine/controlnet.py names those
    that differ)."""
    refusals: Callable[[dict], list[str]] = lambda config: []
    """ControlNet config → what else of it shardiff does not run, one phrase each."""
    multi: str | None = None
    """diffusers' wrapper of several ControlNets of this kind (summing their residuals), if any."""
    sequence_refusal: Callable[[dict], str | None] = lambda config: None
    """ControlNet config → why it cannot run under a sequence split (None: it can)."""
    derive: Callable[..., dict] = lambda layers: {}
    """(layers, **options) → what a ControlNet config of `layers` blocks sets beyond the entries it takes
    from the denoiser's config (random-weight ControlNets for tests and benchmarks: engine/controlnet.py)."""


ConfigReader = Callable[..., ModelInfo]
"""(configs: component → config dict, *, source, pipeline_class, default_size) → ModelInfo. `configs`
also holds "pipeline": the pipeline's own settings (model_index.json's non-component entries, or a
preset's `extra`), e.g. FLUX.2-klein's `is_distilled`."""


def guidance_on(kwargs: dict) -> bool:
    """Pipelines that batch [negative, prompt] do so when guidance_scale > 1 (diffusers' rule)."""
    return kwargs.get("guidance_scale", 1.0) > 1


def no_tp_check(info: ModelInfo, tp: int) -> None:
    return None


def no_size_check(info: ModelInfo, parallel, height: int, width: int) -> None:
    return None


@dataclass(kw_only=True, frozen=True)
class Family:
    name: str
    pipelines: tuple[PipelineSpec, ...]
    """diffusers pipeline classes (model_index.json `_class_name`) this family runs, and how a request's
    inputs pick one from another (img2img, inpainting, PAG forms)."""
    plan: ModelPlan
    read_info: ConfigReader
    """The ModelInfo of a model of this family, from the configs of `info_components`."""
    call_kwargs: Callable[..., dict]
    """GenerateRequest → family-specific pipeline kwargs (prompt, guidance, …); the engine adds size,
    steps, generator and output type."""
    axes: frozenset[str]
    """Mesh axes (with degree > 1) this family can use."""
    bench_kwargs: Callable[..., dict]
    """(ModelInfo, text_tokens=, device=, dtype=) → pipeline kwargs with random embeddings of the
    real shapes, for engine.bench (no text encoders)."""
    presets: tuple[PresetSpec, ...] = ()
    """Random-weight presets with the real configs, and their `-tiny` forms for CPU tests."""
    denoiser: str = "transformer"
    """Pipeline attribute holding the model the plan applies to."""
    info_components: tuple[str, ...] = ()
    """Components whose configs `read_info` reads; empty: (denoiser, "vae")."""
    check_tp: Callable[[ModelInfo, int], None] = no_tp_check
    """(ModelInfo, tp) → ValueError if the TP degree does not split the model evenly (before any collective)."""
    uses_cfg: Callable[[dict], bool] = guidance_on
    """Pipeline kwargs → whether that call runs the unconditional guidance branch (what --cfg 2 splits
    off; a PAG pipeline adds its perturbed branch, engine/pipelines.py counts them)."""
    cfg_pairs: bool = False
    """The pipeline runs the guidance branches as two sequential denoiser calls (Flux true CFG), not as
    one batch: the engine applies the plan with a `CfgPairs` part (see parallel/plan/cfg_pairs.py) — the
    plan's own where it sets one (its `tail`), else a plain one."""
    cfg_hint: str = ""
    """What turns guidance on, for the message refusing --cfg 2 without it; empty: "--guidance > 1"
    (or Flux's true CFG with `cfg_pairs`)."""
    heads_split: bool = True
    """Ulysses' all-to-all splits this family's attention heads, so ulysses × tp must divide them.
    False (Sana): its attention needs no all-to-all (linear attention all-reduces a key-value state),
    every degree works, and --ulysses and --ring both just count sequence-parallel ranks."""
    check_size: Callable[..., None] = no_size_check
    """(ModelInfo, ParallelConfig, height, width) → ValueError if that image cannot be split so (Sana:
    fewer latent rows than sequence-parallel ranks), before any collective."""
    refusals: Mapping[str, str] = field(default_factory=dict)
    """Axis (or "quantize", "cache": the fast path's options) → why this family cannot use it (said to the
    user instead of a generic message)."""
    layout: Callable[..., tuple] | None = None
    """(world, EngineConfig, guided: list[bool] | None) → (ParallelConfig, why) for families whose
    layout follows the batch of requests (UNets: CFG split or data parallel, engine/models/unet.py);
    None: degrees from the config (resolve_degrees)."""
    gpu_dtype: torch.dtype = torch.bfloat16
    """What `--dtype auto` runs on GPUs. UNets: fp16, their published precision — in bf16, 30 guided
    steps amplify rounding to 1.1–1.5% between two ways of computing one image, in fp16 to 0.13–0.20%
    (BENCHMARKS.md)."""
    encode_methods: tuple[str, ...] = ("encode_prompt",)
    """The pipeline's methods that run its text encoders (`--text-encoders first` runs them on one rank
    and broadcasts what they return: engine/text_encoders/broadcast.py)."""
    controlnet: ControlNetSpec | None = None
    """The ControlNets this family runs (`--controlnet`); None: none."""
    token_counts: Callable[..., dict[str, int]] | None = None
    """(ModelInfo, pipeline kwargs, height, width) → tokens of each group of the plan's sequence, so
    that `--tp-comm sequence` can check its even split before any collective (the split itself checks
    again, on the real inputs)."""
    fp8: Fp8Rule | None = None
    """Which of the denoiser's linears `--quantize fp8` computes in FP8 (the rest stay in the model's
    dtype), chosen from the error each group adds (`python -m engine.bench.fp8_layers`); None: the
    family has no FP8 rule and `--quantize fp8` is refused."""
    cache_stacks: tuple[str, ...] = ()
    """The denoiser's stacks of blocks (ModuleList names, in call order) that `--cache first-block`
    walks: the first block computed every step, the rest reused while its residual barely changes;
    empty: `--cache` is refused."""
    cache_setup: Callable[[], None] | None = None
    """Run once before the cache hooks are installed (describing a block class to diffusers' registry)."""
    cache_methods: tuple[str, ...] = ("first-block", "taylorseer")
    """The `--cache` methods that run on this family's blocks (diffusers' first-block hooks read a block's
    stream by the name `hidden_states`: a block that names it otherwise runs TaylorSeer only)."""

    def degree_heads(self, info: ModelInfo, world: int, tp: int) -> int:
        """The head count the degree resolution holds ulysses × tp to: the model's heads, or — for a
        family whose Ulysses splits no heads — world × tp, which every ulysses × tp of the world
        divides (so nothing is refused, and the default gives Ulysses all the sequence ranks)."""
        return info.num_heads if self.heads_split else world * tp

    @property
    def config_components(self) -> tuple[str, ...]:
        return self.info_components or (self.denoiser, "vae")

    def pipeline(self, cls: str) -> PipelineSpec:
        spec = next((p for p in self.pipelines if p.cls == cls), None)
        assert spec is not None, f"{self.name} does not run {cls}"
        return spec

    @property
    def pipeline_plan(self) -> ModelPlan:
        """The plan as the engine applies it under this family's pipeline: with `cfg_pairs`, the cfg
        axis splits the pipeline's pairs of calls, not a batch."""
        if not self.cfg_pairs:
            return self.plan
        return replace(self.plan, batch=None, cfg_pairs=self.plan.cfg_pairs or CfgPairs())

    def check_cfg(self, degrees: dict[str, int], kwargs: dict, info: ModelInfo | None = None,
                  branches: int | None = None) -> None:
        """ValueError unless the call runs at least as many guidance branches as there are cfg ranks.
        `branches`: what the call batches (engine/pipelines.py: PAG adds one); None: CFG's one or two."""
        cfg = degrees.get("cfg", 1)
        if cfg == 1:
            return
        elsewhere = "to --ulysses/--ring" if {"ulysses", "ring"} & self.axes else "to data parallel (--dp)"
        if info is not None and info.guidance_distilled:
            raise ValueError(
                f"--cfg {cfg} puts the classifier-free-guidance branches on different ranks, but this "
                f"{info.pipeline_class} model is guidance-distilled (is_distilled): it runs one transformer call per "
                f"step at any guidance scale; drop --cfg or give those ranks to --ulysses/--ring"
            )
        if self.cfg_pairs and cfg > 2:
            raise ValueError(f"--cfg {cfg}: {self.name}'s true CFG runs two transformer calls per step, so "
                             f"--cfg is 1 or 2; give the other ranks {elsewhere}")
        if branches is None or self.cfg_pairs:
            branches = 2 if self.uses_cfg(kwargs) else 1
        if branches >= cfg:
            return
        if branches == 1:
            hint = self.cfg_hint or ("true CFG: --negative-prompt and --true-cfg-scale > 1" if self.cfg_pairs
                                     else "--guidance > 1")
            raise ValueError(
                f"--cfg {cfg} puts the classifier-free-guidance branches on different ranks, but this "
                f"{self.name} request has guidance off (needs {hint}); drop --cfg or give those ranks {elsewhere}"
            )
        raise ValueError(
            f"--cfg {cfg} needs {cfg} guidance branches, but this {self.name} request runs {branches} "
            f"(three are the unconditional, conditional and perturbed ones: --guidance > 1 and --pag-scale); "
            f"use --cfg {branches} or give the other ranks {elsewhere}"
        )

    def check_axes(self, degrees: dict[str, int]) -> None:
        for a, d in degrees.items():
            if d > 1 and a in self.refusals:
                raise ValueError(f"{self.name} models cannot use --{a}: {self.refusals[a]}")
        bad = [a for a, d in degrees.items() if d > 1 and a not in self.axes]
        if bad:
            raise ValueError(
                f"{self.name} models do not support --{' / --'.join(bad)} yet; "
                f"axes available for {self.name}: {', '.join('--' + a for a in sorted(self.axes))}"
            )


def prompt_kwargs(request) -> dict:
    """The prompt arguments most diffusers pipelines share (SD3's names; Flux adds its true CFG)."""
    kwargs = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance,
        num_images_per_prompt=request.num_images_per_prompt,
    )
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    return kwargs


def vae_scale(vae: dict, channels_key: str = "block_out_channels") -> int:
    """Pixels per latent cell: 2^(levels - 1), as the pipelines compute it."""
    return 2 ** (len(vae.get(channels_key, [0] * 4)) - 1)
