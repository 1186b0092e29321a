"""The safety gate for model directories: only diffusers / transformers classes, no custom code,
safetensors weights only.

`read_model_index` refuses a model_index.json that names custom pipeline code or a component from any
other library; `check_weight_files` refuses components whose weights exist only as pickles (.bin/.pt
files can run code when loaded). Nothing is ever downloaded and remote code is never trusted: every
loader of the engine goes through here first.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from engine.models import PRESETS

ALLOWED_LIBRARIES = ("diffusers", "transformers")
# Components the engine never loads (loading passes None): Stable Diffusion's safety checker (a
# `stable_diffusion` class, not diffusers/transformers, and a download) and its image processor.
NOT_LOADED = ("safety_checker", "feature_extractor")
# Keys of model_index.json that would make diffusers fetch or run non-library code.
CUSTOM_CODE_KEYS = ("custom_pipeline", "_custom_pipeline", "auto_map")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Trained models shipped inside the package (plain diffusers directories), by name. A name here wins
# over a directory of the same name in the working directory: write ./shapes to mean that one.
BUILTIN_MODELS: dict[str, Path] = {"shapes": Path(__file__).resolve().parents[1] / "assets" / "shapes"}


def read_json(path: Path, what: str) -> dict[str, Any]:
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
    index = read_json(path / "model_index.json", f"model directory {path}")
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
        if _is_setting(entry):  # a pipeline setting (requires_safety_checker, ...)
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


def _is_setting(entry) -> bool:
    """A pipeline's own setting in model_index.json, not a component: a number or flag (requires_safety_checker,
    is_distilled), unset (null), or a list of numbers (Qwen-Image 2.1's sample_sigmas)."""
    if entry is None or isinstance(entry, (bool, int, float)):
        return True
    return isinstance(entry, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry)


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
