"""Cheap facts about a model (preset name, built-in model or diffusers directory), read without weights.

Every rank checks parallel degrees against head counts and image sizes BEFORE the first collective, so a
user mistake becomes one clear ValueError on every rank instead of a hang. The facts come from the
model's description (engine/loading/model.py: the preset spec, or the directory's JSON configs through
the safety gate, read by the family's own reader); these are its short forms for callers holding a name.
"""

from __future__ import annotations

from pathlib import Path

from engine.models import PRESETS, ModelInfo

from .model import ResolvedModel, resolve_model


def is_preset(model: str | Path | ResolvedModel) -> bool:
    if isinstance(model, ResolvedModel):
        return model.preset is not None
    return isinstance(model, str) and model in PRESETS


def inspect_model(model: str | Path | ResolvedModel) -> ModelInfo:
    """Shapes and limits of a preset or diffusers directory, from configs only."""
    return resolve_model(model).info


def component_class(model: str | Path | ResolvedModel, name: str) -> str | None:
    """The class of pipeline component `name` ("vae": "AutoencoderKL"), from the preset or model_index.json."""
    return resolve_model(model).component_class(name)


def component_config(model: str | Path | ResolvedModel, name: str) -> dict:
    """The config of pipeline component `name`, from the preset or the directory (no weights)."""
    return resolve_model(model).config(name)
