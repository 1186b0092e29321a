"""Load a pipeline from a preset name or a local diffusers directory, safely.

Directories go through the safety gate first (engine/loading/safety.py): only diffusers /
transformers classes, no custom pipeline, safetensors weights only. Nothing is ever downloaded
(local_files_only) and remote code is never trusted.
"""

from __future__ import annotations

import torch

from .model import ResolvedModel, resolve_model
from .safety import NOT_LOADED, check_weight_files


def load_pipeline(model: str | ResolvedModel, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                  components: dict | None = None):
    """The pipeline for `model` (preset name, diffusers directory, or its description) on `device` in `dtype`.

    `seed` only matters for presets (their random weights). `components`: prebuilt components used
    instead of loading them (a tensor-parallel shard of the denoiser, engine/loading/sharded.py).
    """
    components = components or {}
    model = resolve_model(model)
    if model.preset is not None:
        return model.preset.build_pipeline(dtype=dtype, device=device, seed=seed, components=components)
    path, index = model.path, model.index
    check_weight_files(path, index)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True, **_left_out(index),
        **_processors(model, components), **components
    )
    return pipe.to(device)


def _processors(model: ResolvedModel, given: dict) -> dict:
    """The vision-language processors transformers cannot build without torchvision, built for images and
    text (engine/loading/processors.py; the engine says so once, from the preflight)."""
    from . import processors

    return {name: processors.load(cls, model.folder(name)) for name, cls in stand_in_processors(model).items()
            if name not in given}


def stand_in_processors(model: ResolvedModel) -> dict[str, str]:
    """Component → processor class, for the processors of `model` built without torchvision (none when it
    is installed)."""
    from .processors import needs_stand_in

    entries = model.index.items() if model.preset is None else ((n, ["transformers", p.cls])
                                                                for n, p in model.preset.processors.items())
    return {name: entry[1] for name, entry in entries
            if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" and needs_stand_in(entry[1])}


def _left_out(index: dict) -> dict:
    """Pipeline arguments that switch off what we never load: Stable Diffusion's safety checker and
    feature extractor (None, and no warning about it), SDXL's invisible watermark (changes pixels)."""
    kwargs: dict = {name: None for name in NOT_LOADED if name in index}
    if "requires_safety_checker" in index:
        kwargs["requires_safety_checker"] = False
    if index["_class_name"].startswith("StableDiffusionXL"):
        kwargs["add_watermarker"] = False
    return kwargs
