"""Load a pipeline from a preset name or a local diffusers directory, safely.

Directories are checked first (engine.model_info.read_model_index): only
diffusers/transformers classes, no custom pipeline, safetensors weights only,
because .bin/.pt files are pickles that can run code when loaded. Nothing is
ever downloaded (local_files_only) and remote code is never trusted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.model_info import NOT_LOADED, is_preset, model_dir, read_model_index
from engine.presets import build_pipeline

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_files(path: Path, index: dict) -> None:
    """ValueError naming the first component whose weights exist only as pickles."""
    for name, entry in index.items():
        folder = path / name
        if name.startswith("_") or entry == [None, None] or name in NOT_LOADED or not folder.is_dir():
            continue
        files = [f for f in folder.rglob("*") if f.is_file()]
        has_safetensors = any(f.name.endswith(".safetensors") for f in files)
        pickles = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
        if pickles and not has_safetensors:
            raise ValueError(
                f"{path}: component {name!r} has only pickle weights ({', '.join(pickles)}); "
                f"convert them to .safetensors (pickle files can run code when loaded)"
            )


def load_pipeline(model: str, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                  components: dict | None = None):
    """The pipeline for `model` (preset name or diffusers directory) on `device` in `dtype`.

    `seed` only matters for presets (their random weights). `components`: prebuilt components used
    instead of loading them (a tensor-parallel shard of the denoiser, engine/sharded_loading.py).
    """
    components = components or {}
    if is_preset(model):
        return build_pipeline(model, dtype=dtype, device=device, seed=seed, components=components)
    path = model_dir(model)
    index = read_model_index(path)
    check_weight_files(path, index)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True, **_left_out(index), **components
    )
    return pipe.to(device)


def _left_out(index: dict) -> dict:
    """Pipeline arguments that switch off what we never load: Stable Diffusion's safety checker and
    feature extractor (None, and no warning about it), SDXL's invisible watermark (changes pixels)."""
    kwargs: dict = {name: None for name in NOT_LOADED if name in index}
    if "requires_safety_checker" in index:
        kwargs["requires_safety_checker"] = False
    if index["_class_name"].startswith("StableDiffusionXL"):
        kwargs["add_watermarker"] = False
    return kwargs
