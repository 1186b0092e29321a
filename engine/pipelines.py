"""Which diffusers pipeline runs a request, built from the already loaded components, and what it is given.

The choice starts at the model directory's class (model_index.json: FluxFillPipeline,
FluxKontextPipeline, StableDiffusion3Pipeline, …) and follows the family's `PipelineSpec.variants`
links (engine/models/*) for what the request brings that the class does not take: the engine's
`--controlnet` → its ControlNet form, `--image` → its img2img form, then `--mask-image` → its
inpainting form, then `--pag-scale` → its PAG form; the form reached must take as many input
images as the request brings (`PipelineSpec.max_images`: several reference images). Each
pipeline other than the loaded one is made once with diffusers' `from_pipe` — the same module objects,
no weight loaded or copied — and kept, so the plan applied to the denoiser, LoRAs fused into it and
compiled blocks serve every one of them.

Before each call `bind` tells the plan's batch part how many guidance branches the pipeline batches
(for the cfg split of whole branches) and gives a PAG pipeline the mesh's perturbed-attention
processors (parallel/plan/perturbed.py) through diffusers' own `set_pag_applied_layers`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .inputs import FLAGS, IMAGE_FIELDS, count, default_size, each, fit, load_inputs, record

ORDER = ("controlnet", "image", "mask_image", "pag")
"""The order in which a request's additions move from one pipeline class to another."""
# Family call arguments a pipeline may not take, with the value that means "not asked for" and the flag
# that asks for it: a class without them (FluxFill has no true CFG) runs when they are unset, and says
# so when they are set.
NEUTRAL = {"negative_prompt": (None, "--negative-prompt"), "true_cfg_scale": (1.0, "--true-cfg-scale"),
           "max_sequence_length": (None, "--max-sequence-length"), "num_images_per_prompt": (1, "--num-images-per-prompt")}


@dataclass
class PreparedCall:
    """One request, checked and ready for its pipeline (everything but steps, generator and output type)."""

    spec: object
    """The PipelineSpec that runs it."""
    kwargs: dict
    """Prompt, guidance, input images, strength, pag_scale and the class's own extras."""
    height: int
    width: int
    branches: int | None
    """Guidance branches the pipeline batches per denoiser call; None: two sequential calls (Flux true CFG)."""
    records: dict = field(default_factory=dict)
    """Input field → its record for the PNG metadata (pixel hash, size, path)."""

    @property
    def size_kwargs(self) -> dict:
        return {"height": self.height, "width": self.width} if self.spec.sized else {}


def _takes(spec, what: str) -> bool:
    if what == "controlnet":
        return spec.controlnet
    return spec.pag if what == "pag" else what in spec.inputs


def choose(family, directory_class: str, request, *, controlnets: int = 0):
    """The PipelineSpec of `family` that runs `request` on a model whose model_index names
    `directory_class` (with `controlnets` ControlNets loaded beside it: its ControlNet form); ValueError
    (no collective) when the request asks for what no form of it does."""
    spec = family.pipeline(directory_class)
    brings = [n for n in IMAGE_FIELDS if getattr(request, n) is not None]
    asks = brings + (["pag"] if request.pag_scale is not None else []) + (["controlnet"] if controlnets else [])
    for what in ORDER:
        if what in asks and not _takes(spec, what):
            if what not in spec.variants:
                raise ValueError(_no_form(family, spec, what))
            spec = family.pipeline(spec.variants[what])
    for name in brings:
        if name not in spec.inputs:
            raise ValueError(_no_form(family, spec, name))
    missing = [FLAGS[n] for n in spec.required if n not in brings]
    if missing:
        raise ValueError(f"{spec.cls} needs {' and '.join(missing)}")
    given = count(request.image)
    if given > spec.max_images:
        takes = "one input image" if spec.max_images == 1 else f"at most {spec.max_images} input images"
        raise ValueError(f"--image: {spec.cls} takes {takes}, got {given}")
    if request.strength is not None and not spec.strength:
        raise ValueError(f"--strength: {spec.cls} takes none (it is for image-to-image and inpainting pipelines)")
    return spec


def max_input_images(family, directory_class: str) -> int:
    """The most input images any pipeline form of a model of `directory_class` takes (0: none takes an
    image): what the server tells a client sending more, before the request's own check."""
    seen, todo, most = set(), [directory_class], 0
    while todo:
        spec = family.pipeline(todo.pop())
        if spec.cls in seen:
            continue
        seen.add(spec.cls)
        most = max(most, spec.max_images if "image" in spec.inputs else 0)
        todo.extend(spec.variants.values())
    return most


def _no_form(family, spec, what: str) -> str:
    flag = FLAGS["pag_scale" if what == "pag" else what]
    have = [p.cls for p in family.pipelines if _takes(p, what) and (what == "controlnet" or not p.controlnet)]
    kind = {"image": "an input image", "mask_image": "an inpainting mask", "control_image": "a control image",
            "pag": "perturbed-attention guidance", "controlnet": "a ControlNet"}[what]
    hint = ""
    if what == "control_image" and any(p.controlnet for p in family.pipelines):
        hint = "; or give a ControlNet (--controlnet DIR)"
    if not have:
        return f"{flag}: shardiff runs no {family.name} pipeline that takes {kind}{hint}"
    return (f"{flag}: {spec.cls} has no form that takes {kind}; the {family.name} pipelines that do: "
            f"{', '.join(have)} (a model directory of one of those, or of the text-to-image one){hint}")


def _call_params(cls_name: str) -> dict:
    import diffusers

    return inspect.signature(getattr(diffusers, cls_name).__call__).parameters


def fit_call(cls_name: str, kwargs: dict) -> dict:
    """`kwargs` without the arguments `cls_name` does not take; ValueError if one of them was asked for."""
    params = _call_params(cls_name)
    out = {}
    for key, value in kwargs.items():
        if key in params:
            out[key] = value
        elif key in NEUTRAL and value != NEUTRAL[key][0]:
            raise ValueError(f"{NEUTRAL[key][1]}: {cls_name} takes none")
    return out


def prepare_call(request, info, family, resolve_size, *, controlnets: int = 0) -> PreparedCall:
    """Choose the pipeline, read the input images, build the call; ValueError for bad input, no
    collective, no weights (engine/request_check.py runs it for the CLI, the API and the server).
    `resolve_size(request, default)` → (height, width): the size rule, `default` the input image's size.
    `controlnets`: how many ControlNets the engine holds."""
    spec = choose(family, info.pipeline_class, request, controlnets=controlnets)
    images = load_inputs(request)
    height, width = resolve_size(request, _default_size(spec, images, info.spatial_multiple))
    if spec.fixed_size and (height, width) != (sized := spec.size_rule(_listed(images["image"]))):
        raise ValueError(f"--height/--width: {spec.cls} draws at {sized[1]}x{sized[0]} for this input image (its own "
                         f"size rule), not {width}x{height}; leave --height and --width out")
    kwargs = fit_call(spec.cls, family.call_kwargs(request))
    for name, image in images.items():
        if name == "image" and spec.references_arg is not None and isinstance(image, list):
            image, references = image[0], image[1:]
            if references:
                kwargs[spec.references_arg] = references
        if isinstance(image, list) and spec.max_images == 1:
            image = image[0]  # a list of one, for a pipeline that takes one image
        kwargs[spec.arg(name)] = image if spec.sized else each(image, lambda im: fit(im, height, width))
    if spec.controlnet:
        kwargs.update(controlnet_call(spec, request, max(controlnets, 1), kwargs.pop(spec.arg("control_image"))))
    elif request.controlnet_scale is not None or request.control_mode is not None:
        raise ValueError(f"{'--controlnet-scale' if request.controlnet_scale is not None else '--control-mode'}: "
                         f"{spec.cls} runs no ControlNet (give --controlnet DIR)")
    if request.strength is not None:
        kwargs["strength"] = request.strength
    if spec.pag:
        default = _call_params(spec.cls)["pag_scale"].default
        kwargs["pag_scale"] = request.pag_scale if request.pag_scale is not None else default
    if spec.call_extra is not None:
        kwargs.update(spec.call_extra(request, height, width))
    records = {n: record(getattr(request, n), images[n]) for n in images}
    return PreparedCall(spec, kwargs, height, width, branches(family, spec, kwargs), records)


def _listed(image) -> list:
    return image if isinstance(image, list) else [image]


def _default_size(spec, images: dict, multiple: int) -> tuple[int, int] | None:
    """The output size without --height/--width: the class's own rule from its input images, else the first
    input image's size."""
    if spec.size_rule is not None and "image" in images:
        return spec.size_rule(_listed(images["image"]))
    return default_size(images, multiple)


def controlnet_call(spec, request, nets: int, control_image) -> dict:
    """The ControlNet arguments of a call: the control image (one per net: the same image for each),
    the residual scales, the Union mode."""
    scales = request.controlnet_scale
    if isinstance(scales, (tuple, list)) and len(scales) not in (1, nets):
        raise ValueError(f"--controlnet-scale: {len(scales)} values for {nets} ControlNets (give one, or one per net)")
    params = _call_params(spec.cls)
    out = {spec.arg("control_image"): control_image if nets == 1 else [control_image] * nets}
    if scales is not None:
        values = list(scales) if isinstance(scales, (tuple, list)) else [scales]
        values = values * nets if len(values) == 1 else values
        out["controlnet_conditioning_scale"] = values[0] if nets == 1 else values
    if request.control_mode is not None:
        if "control_mode" not in params:
            raise ValueError(f"--control-mode: {spec.cls} takes none (it is for Flux Union ControlNets)")
        out["control_mode"] = request.control_mode if nets == 1 else [request.control_mode] * nets
    return out


def branches(family, spec, kwargs: dict) -> int | None:
    """Guidance branches the pipeline batches: [uncond,] cond[, perturbed] (diffusers' order); None for
    families that run the guidance branches as two sequential calls (Flux true CFG)."""
    if family.cfg_pairs:
        return None
    return 1 + family.uses_cfg(kwargs) + (spec.pag and kwargs.get("pag_scale", 0) > 0)


def from_pipe(cls_name: str, base, dtype: torch.dtype, **components):
    """diffusers' `cls_name.from_pipe(base)`: the same module objects, nothing loaded or copied;
    `components` adds modules the base has not (a ControlNet)."""
    import diffusers
    import diffusers.utils.logging as dlog

    cls = getattr(diffusers, cls_name)
    extra = {}
    if "add_watermarker" in inspect.signature(cls.__init__).parameters:
        extra["add_watermarker"] = False  # SDXL: as the loader does (it changes pixels)
    # dtype: from_pipe casts every shared module to it (float32 when not given) — a no-op here, about
    # which each model would warn.
    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return cls.from_pipe(base, dtype=dtype, **extra, **components)
    finally:
        dlog.set_verbosity(verbosity)


class Pipelines:
    """The engine's pipelines: the loaded one, and those made from its components when a request needs them."""

    def __init__(self, base, family, info, dtype: torch.dtype, on_new=None, controlnet=None):
        """`on_new(pipe)`: called for each pipeline made here (the engine wraps its text encoding).
        `controlnet`: the engine's ControlNet (or multi-ControlNet wrapper), for the ControlNet forms."""
        self.base, self.family, self.info, self.dtype, self.on_new = base, family, info, dtype, on_new
        self.controlnet = controlnet
        self._made = {type(base).__name__: base}
        self._last_pag: str | None = None

    def get(self, spec):
        """The pipeline of `spec`, made with `from_pipe` on first use (shared modules, no copy)."""
        pipe = self._made.get(spec.cls)
        if pipe is None:
            extra = {"controlnet": self.controlnet} if spec.controlnet and self.controlnet is not None else {}
            pipe = self._made[spec.cls] = from_pipe(spec.cls, self.base, self.dtype, **extra)
            if self.on_new is not None:
                self.on_new(pipe)
        pipe.set_progress_bar_config(**getattr(self.base, "_progress_bar_config", {}))
        return pipe

    def processors_changed(self, call: PreparedCall) -> bool:
        """Whether this call's attention processors differ from the previous call's (a PAG pipeline's
        layers and branches, or none): what CUDA graphs captured on the previous calls assumed."""
        pag = call.spec.cls if call.spec.pag else None
        changed, self._last_pag = pag != self._last_pag, pag
        return changed

    def bind(self, pipe, call: PreparedCall, applied, denoiser, others=()) -> None:
        """Set up the plan for this call (no collective); `others`: the applied plans of the models that
        feed the denoiser (ControlNets), which split the same batch."""
        for plan in (applied, *others):
            batch = plan.parts.get("batch")
            if batch is not None:
                batch.branches = call.branches
        if call.spec.pag:
            perturbed = applied.parts.get("perturbed")
            assert perturbed is not None, f"{self.family.name}'s plan has no perturbed-attention entry"
            for processor in perturbed.processors:
                processor.remember(denoiser)
            pipe.set_pag_applied_layers(pipe.pag_applied_layers, pag_attn_processors=perturbed.processors)
