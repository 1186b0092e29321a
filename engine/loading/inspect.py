"""Cheap facts about a model (preset name, built-in model or diffusers directory), read without weights.

Every rank calls `inspect_model` to check parallel degrees against head counts and image sizes
BEFORE the first collective, so a user mistake becomes one clear ValueError on every rank instead of
a hang. It reads only the preset spec or the directory's JSON configs (through the safety gate), and
hands them to the family's own reader.
"""

from __future__ import annotations

from pathlib import Path

from engine.models import PRESETS, ModelInfo, family, family_of_pipeline

from .safety import model_dir, read_json, read_model_index


def is_preset(model: str | Path) -> bool:
    return isinstance(model, str) and model in PRESETS


def inspect_model(model: str | Path) -> ModelInfo:
    """Shapes and limits of a preset or diffusers directory, from configs only."""
    if is_preset(model):
        spec = PRESETS[model]
        fam = family(spec.family)
        configs = {n: spec.config(n) for n in fam.config_components}
        configs["pipeline"] = {k: v for k, v in spec.extra.items() if _is_setting(v)}
        return fam.read_info(configs, source="preset", pipeline_class=spec.pipeline_class,
                             default_size=spec.default_size)
    path = model_dir(model)
    index = read_model_index(path)
    cls_name = index["_class_name"]
    fam = family_of_pipeline(cls_name, str(path))
    configs = {n: read_json(path / n / "config.json", f"model directory {path}") for n in fam.config_components}
    # The pipeline's own settings (FLUX.2-klein's is_distilled), beside its components' configs.
    configs["pipeline"] = {k: v for k, v in index.items() if not k.startswith("_") and _is_setting(v)}
    return fam.read_info(configs, source="directory", pipeline_class=cls_name, default_size=None)


def component_class(model: str | Path, name: str) -> str | None:
    """The class of pipeline component `name` ("vae": "AutoencoderKL"), from the preset or model_index.json."""
    if is_preset(model):
        c = PRESETS[model].components.get(name)
        return c.cls if c is not None else None
    entry = read_model_index(model_dir(model)).get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def component_config(model: str | Path, name: str) -> dict:
    """The config of pipeline component `name`, from the preset or the directory (no weights)."""
    if is_preset(model):
        return PRESETS[model].config(name)
    path = model_dir(model)
    return read_json(path / name / "config.json", f"model directory {path}")


def _is_setting(value) -> bool:
    """A pipeline setting (is_distilled, requires_safety_checker, …), not a component entry."""
    return isinstance(value, (bool, int, float, str))
