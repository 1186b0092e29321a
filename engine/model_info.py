"""Cheap facts about a model (preset name or diffusers directory), read without weights.

Every rank calls `inspect_model` to check parallel degrees against head counts and
image sizes BEFORE the first collective, so a user mistake becomes one clear
ValueError on every rank instead of a hang. It reads only the preset spec or
the directory's JSON configs. `read_model_index` is also the safety gate that
`engine.loading` relies on: only diffusers/transformers classes, no custom code.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.presets import PRESETS, PresetSpec

ALLOWED_LIBRARIES = ("diffusers", "transformers")
# Pipeline class -> family the engine knows how to parallelise.
FAMILIES = {"FluxPipeline": "flux"}
# Components the engine never loads (loading passes None): Stable Diffusion's safety checker (a
# `stable_diffusion` class, not diffusers/transformers, and a download) and its image processor.
NOT_LOADED = ("safety_checker", "feature_extractor")
# Keys of model_index.json that would make diffusers fetch or run non-library code.
CUSTOM_CODE_KEYS = ("custom_pipeline", "_custom_pipeline", "auto_map")
# Where FluxPipeline's own default image size comes from when the VAE config has none.
FLUX_DEFAULT_SIZE = 1024
# Trained models shipped inside the package (plain diffusers directories), by name. A name here wins
# over a directory of the same name in the working directory: write ./shapes to mean that one.
BUILTIN_MODELS: dict[str, Path] = {"shapes": Path(__file__).resolve().parent / "assets" / "shapes"}


@dataclass(kw_only=True, frozen=True)
class ModelInfo:
    source: str  # "preset" or "directory"
    family: str  # "flux"
    pipeline_class: str
    num_heads: int
    head_dim: int
    num_layers: int  # Flux: dual-stream blocks
    num_single_layers: int  # Flux: single-stream blocks
    in_channels: int  # transformer input channels (packed latents)
    joint_attention_dim: int  # text-embedding width the transformer expects
    pooled_projection_dim: int
    vae_scale_factor: int  # pixels per latent cell
    spatial_multiple: int  # height/width must be a multiple of this (Flux: vae_scale_factor * 2)
    default_size: int  # pixels
    uses_guidance_embeds: bool


def is_preset(model: str) -> bool:
    return model in PRESETS


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, not {type(data).__name__}")
    return data


def model_dir(model: str | Path) -> Path:
    """The directory `model` names (a built-in model's name or a path), or ValueError saying it is none."""
    if isinstance(model, str) and model in BUILTIN_MODELS:
        path = BUILTIN_MODELS[model]
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"built-in model {model!r} is missing from this installation ({path}); reinstall shardiff, "
                f"or recreate it with: python -m engine.toy.train --out {path}"
            )
        return path
    path = Path(model)
    if not path.exists():
        raise ValueError(
            f"model {str(model)!r} is neither a known preset ({', '.join(sorted(PRESETS))}), "
            f"a built-in model ({', '.join(sorted(BUILTIN_MODELS))}), nor an existing directory"
        )
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a directory (expected a diffusers model directory)")
    return path


def _class_in(library: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(library), name, None)
    except ImportError:
        return None


def read_model_index(path: Path) -> dict[str, Any]:
    """model_index.json of a diffusers directory, refused unless it names only library classes."""
    index = _read_json(path / "model_index.json", f"model directory {path}")
    for key in CUSTOM_CODE_KEYS:
        if index.get(key) is not None:
            raise ValueError(f"{path}/model_index.json sets {key!r}: custom pipeline code is not supported")
    cls_name = index.get("_class_name")
    if not isinstance(cls_name, str):
        raise ValueError(f"{path}/model_index.json has no '_class_name' string naming the pipeline class")
    from diffusers import DiffusionPipeline

    cls = _class_in("diffusers", cls_name)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise ValueError(f"{path}/model_index.json: {cls_name!r} is not a diffusers pipeline class")
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if isinstance(entry, (bool, int, float)):  # a pipeline setting (requires_safety_checker, ...)
            continue
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ValueError(f"{path}/model_index.json: component {name!r} must be [library, class], got {entry!r}")
        library, component_cls = entry
        if library is None and component_cls is None:  # an absent optional component
            continue
        if name in NOT_LOADED:
            continue
        if library not in ALLOWED_LIBRARIES:
            raise ValueError(
                f"{path}/model_index.json: component {name!r} comes from library {library!r}; "
                f"only {' and '.join(ALLOWED_LIBRARIES)} components are allowed (no custom code)"
            )
        if not isinstance(component_cls, str) or not isinstance(_class_in(library, component_cls), type):
            raise ValueError(f"{path}/model_index.json: component {name!r}: {component_cls!r} is not a {library} class")
    return index


def _flux_info(*, source: str, pipeline_class: str, transformer: dict[str, Any], vae: dict[str, Any],
               default_size: int | None) -> ModelInfo:
    vae_scale_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return ModelInfo(
        source=source,
        family="flux",
        pipeline_class=pipeline_class,
        num_heads=int(transformer.get("num_attention_heads", 24)),
        head_dim=int(transformer.get("attention_head_dim", 128)),
        num_layers=int(transformer.get("num_layers", 19)),
        num_single_layers=int(transformer.get("num_single_layers", 38)),
        in_channels=int(transformer.get("in_channels", 64)),
        joint_attention_dim=int(transformer.get("joint_attention_dim", 4096)),
        pooled_projection_dim=int(transformer.get("pooled_projection_dim", 768)),
        vae_scale_factor=vae_scale_factor,
        # Flux packs 2x2 latent cells into one token.
        spatial_multiple=vae_scale_factor * 2,
        default_size=int(default_size or vae.get("sample_size") or FLUX_DEFAULT_SIZE),
        uses_guidance_embeds=bool(transformer.get("guidance_embeds", False)),
    )


def _preset_info(spec: PresetSpec) -> ModelInfo:
    if spec.family in ("sd", "sdxl"):
        from engine.models.unet import unet_preset_info

        return unet_preset_info(spec)
    if spec.family in ("sd3", "pixart", "sana"):
        from engine.dit_info import dit_info

        return dit_info(family=spec.family, source="preset", pipeline_class=spec.pipeline_class,
                        transformer=spec.transformer, vae=spec.vae, default_size=spec.default_size)
    assert spec.family == "flux", f"preset {spec.name} has unhandled family {spec.family}"
    return _flux_info(source="preset", pipeline_class=spec.pipeline_class, transformer=spec.transformer,
                      vae=spec.vae, default_size=spec.default_size)


def inspect_model(model: str | Path) -> ModelInfo:
    """Shapes and limits of a preset or diffusers directory, from configs only."""
    if isinstance(model, str) and is_preset(model):
        return _preset_info(PRESETS[model])
    path = model_dir(model)
    index = read_model_index(path)
    cls_name = index["_class_name"]
    from engine.dit_info import DIT_FAMILIES, dit_info

    if cls_name in DIT_FAMILIES:
        return dit_info(
            family=DIT_FAMILIES[cls_name], source="directory", pipeline_class=cls_name, default_size=None,
            transformer=_read_json(path / "transformer" / "config.json", f"model directory {path}"),
            vae=_read_json(path / "vae" / "config.json", f"model directory {path}"),
        )
    from engine.models.unet import UNET_PIPELINES, unet_dir_info

    if cls_name in UNET_PIPELINES:
        return unet_dir_info(path, UNET_PIPELINES[cls_name], cls_name, _read_json)
    if cls_name not in FAMILIES:
        raise ValueError(f"{path}: pipeline class {cls_name!r} is not supported; supported: {', '.join(FAMILIES)}")
    transformer = _read_json(path / "transformer" / "config.json", f"model directory {path}")
    vae = _read_json(path / "vae" / "config.json", f"model directory {path}")
    return _flux_info(source="directory", pipeline_class=cls_name, transformer=transformer, vae=vae,
                      default_size=None)
