"""A model, resolved once: what `--model` names, described from its configs before any weight is read.

`resolve_model(name)` turns a preset name, a built-in model's name or a diffusers directory into one
`ResolvedModel` — its source (the PresetSpec, or the directory and its model_index.json, through the
safety gate), its family, its ModelInfo (head counts, sizes, limits), its components and their classes,
and the weights one rank holds on a TP degree (`weight_bytes`, counted once and cached).
The engine's preflight resolves `config.model` once and every check and loader reads that description:
the degrees and sizes checks, `--tp auto` (weights per rank, counted from it), the text-encoder
placement, LoRA and ControlNet checks, the pipeline loader and the TP-sharded loaders. Functions that take
a model accept either a name (resolved on the spot, as a test or a tool has it) or the description.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.models import PRESETS, Family, ModelInfo, family, family_of_pipeline
from engine.presets.spec import PresetSpec

from .safety import NOT_LOADED, model_dir, read_json, read_model_index

TEXT_ENCODER = "text_encoder"
"""Every diffusers pipeline names its text encoders text_encoder, text_encoder_2, …"""


@dataclass(frozen=True, eq=False)
class ResolvedModel:
    """One model as the engine sees it before loading. Two descriptions of the same preset or directory
    are equal (caches of what is counted from them are shared)."""

    name: str
    """What the user gave: a preset or built-in model name, or a directory."""
    preset: PresetSpec | None
    """The preset's spec (random weights), or None for a directory."""
    path: Path | None
    """The diffusers directory (a built-in model's too), or None for a preset."""
    index: Mapping[str, Any]
    """model_index.json, checked by the safety gate (empty for a preset)."""
    family: Family
    info: ModelInfo
    components: Mapping[str, tuple[str, str]]
    """Every weighted component the pipeline loads → (library, class), in pipeline order."""
    configs: Mapping[str, dict] = field(default_factory=dict, repr=False)
    """The component configs read so far (those ModelInfo needed): read once."""

    @property
    def source(self) -> str:
        return "preset" if self.preset is not None else "directory"

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.preset.name if self.preset is not None else str(self.path.resolve()))

    def __eq__(self, other) -> bool:
        return isinstance(other, ResolvedModel) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.name

    @property
    def text_encoders(self) -> dict[str, str]:
        """Component → transformers class of every text encoder, in pipeline order."""
        return {n: cls for n, (lib, cls) in self.components.items() if n.startswith(TEXT_ENCODER) and lib == "transformers"}

    def component_class(self, name: str) -> str | None:
        """The class of component `name` ("vae": "AutoencoderKL"), or None if the model has none."""
        entry = self.components.get(name)
        return entry[1] if entry is not None else None

    def folder(self, name: str) -> Path:
        """Component `name`'s folder of a directory model."""
        assert self.path is not None, f"{self.name} is a preset: its components have no folder"
        return self.path / name

    def config(self, name: str) -> dict:
        """The config of component `name`, from the preset or the directory (no weights)."""
        if self.preset is not None:
            return self.preset.config(name)
        if name not in self.configs:
            self.configs[name] = read_json(self.folder(name) / "config.json", f"model directory {self.path}")
        return self.configs[name]

    def weight_bytes(self, tp: int, dtype, text_bytes: int | None = None, quantize: str = "off") -> int:
        """Bytes of weights one rank holds on `tp` TP ranks, as `--tp auto` counts them from configs and
        headers (engine/loading/auto_tp.py); `text_bytes`: the text encoders' share (None: replicated);
        `quantize` "fp8": the FP8 rule's linears at 1 byte."""
        from .auto_tp import weight_bytes_per_rank

        return weight_bytes_per_rank(self, self.family, tp, dtype, text_bytes, quantize=quantize)

    def empty_model(self, name: str):
        """Component `name` on the meta device, from its config (a diffusers model of a directory; any
        component of a preset)."""
        if self.preset is not None:
            return self.preset.empty_model(name)
        from .sharded import empty_from_directory

        return empty_from_directory(self.folder(name))


def resolve_model(model: str | Path | ResolvedModel) -> ResolvedModel:
    """The description of `model` (a description is returned as it is); ValueError naming what is wrong."""
    if isinstance(model, ResolvedModel):
        return model
    if isinstance(model, str) and model in PRESETS:
        return _preset(model)
    return _directory(model)


def _preset(name: str) -> ResolvedModel:
    spec = PRESETS[name]
    fam = family(spec.family)
    configs = {n: spec.config(n) for n in fam.config_components}
    configs["pipeline"] = {k: v for k, v in spec.extra.items() if _is_setting(v)}
    info = fam.read_info(configs, source="preset", pipeline_class=spec.pipeline_class, default_size=spec.default_size)
    components = {n: (c.library, c.cls) for n, c in spec.components.items()}
    return ResolvedModel(name=name, preset=spec, path=None, index={}, family=fam, info=info, components=components)


def _directory(model: str | Path) -> ResolvedModel:
    path = model_dir(model)
    index = read_model_index(path)
    cls_name = index["_class_name"]
    fam = family_of_pipeline(cls_name, str(path))
    configs = {n: read_json(path / n / "config.json", f"model directory {path}") for n in fam.config_components}
    # The pipeline's own settings (FLUX.2-klein's is_distilled), beside its components' configs.
    settings = {k: v for k, v in index.items() if not k.startswith("_") and _is_setting(v)}
    info = fam.read_info({**configs, "pipeline": settings}, source="directory", pipeline_class=cls_name,
                         default_size=None)
    # Models have a config.json (schedulers, tokenizers and image processors have their own files).
    components = {n: (v[0], v[1]) for n, v in index.items()
                  if not n.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None
                  and n not in NOT_LOADED and (path / n / "config.json").is_file()}
    return ResolvedModel(name=str(model), preset=None, path=path, index=index, family=fam, info=info,
                         components=components, configs=configs)


@functools.lru_cache(maxsize=8)
def denoiser_parts(model: ResolvedModel):
    """(the denoiser on the meta device, parameters of every other component but the text encoders, which
    engine/text_encoders counts per placement): what `--tp auto` counts weights per rank from (configs and
    safetensors headers only). Cached: the automatic choices ask for several TP degrees."""
    from .slices import stored_numel

    name = model.family.denoiser
    assert name in model.components, f"{model.name} has no {name}"
    others = 0
    for n in model.components:
        if n == name or n in model.text_encoders:
            continue
        if model.preset is not None:
            others += sum(p.numel() for p in model.preset.empty_model(n).parameters())
        else:
            others += sum(stored_numel(f) for f in sorted(model.folder(n).glob("*.safetensors")))
    return model.empty_model(name), others


def _is_setting(value) -> bool:
    """A pipeline setting (is_distilled, requires_safety_checker, …), not a component entry."""
    return isinstance(value, (bool, int, float, str))
