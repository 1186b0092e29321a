"""The model families the engine runs, and the presets they bring.

A family is one module (or folder) here: its parallel plans (sequence, TP, TP sequence form), how
its pipelines are called, its ModelInfo reader from the configs, its presets and its refusals, all
as data in one `Family` (engine/models/family.py). Adding a family = that module, its parity test
and one line in `FAMILIES` below (docs/ADDING_A_MODEL.md). The engine, the loader and the preset
builder stay generic.
"""

from __future__ import annotations

from engine.presets.spec import PresetSpec

from . import chroma, flux, flux2, hunyuan_image, lumina2, pixart, qwen_image, qwen_image21, sana, sd3, unet, zimage
from .family import Family, ModelInfo, PipelineSpec

FAMILIES: dict[str, Family] = {f.name: f for f in (
    flux.FAMILY,
    chroma.FAMILY,
    *flux2.FAMILIES,
    qwen_image.FAMILY,
    qwen_image21.FAMILY,
    hunyuan_image.FAMILY,
    sd3.FAMILY,
    pixart.FAMILY,
    sana.FAMILY,
    lumina2.FAMILY,
    zimage.FAMILY,
    unet.SD,
    unet.SDXL,
)}

PRESETS: dict[str, PresetSpec] = {p.name: p for f in FAMILIES.values() for p in f.presets}
PIPELINES: dict[str, Family] = {p.cls: f for f in FAMILIES.values() for p in f.pipelines}
"""diffusers pipeline class → the family that runs it."""

assert all(p.family in FAMILIES and p.pipeline_class in PIPELINES for p in PRESETS.values())

__all__ = ["FAMILIES", "PIPELINES", "PRESETS", "Family", "ModelInfo", "PipelineSpec", "check_tp_comm_plan", "family",
           "family_of_pipeline", "get_preset"]


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_of_pipeline(pipeline_class: str, where: str) -> Family:
    """The family running `pipeline_class` (a model_index.json `_class_name`), or ValueError naming those
    that are supported."""
    if pipeline_class not in PIPELINES:
        raise ValueError(f"{where}: pipeline class {pipeline_class!r} is not supported; supported: "
                         f"{', '.join(sorted(PIPELINES))}")
    return PIPELINES[pipeline_class]


def get_preset(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def check_tp_comm_plan(fam: Family, parallel) -> None:
    """ValueError if `parallel` asks for the sequence form of TP and `fam` has no plan for it (naming the
    families that do)."""
    if parallel.tp_sequence and not _has_tp_sequence(fam):
        have = sorted(n for n, f in FAMILIES.items() if _has_tp_sequence(f))
        raise ValueError(
            f"{fam.name} models have no sequence-form tensor-parallel plan (--tp-comm {parallel.tp_comm} is "
            f"available for: {', '.join(have)}); use --tp-comm allreduce"
        )


def _has_tp_sequence(fam: Family) -> bool:
    return fam.plan.tensor is not None and fam.plan.tensor.sequence is not None
