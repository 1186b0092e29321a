"""A preset: every component of a real diffusers pipeline declared as data, built with random weights.

`PresetSpec.components` maps a pipeline attribute to a `Component` (library, model class, config
class or None for diffusers models, config kwargs), so one class builds Flux's CLIP + T5, SD3's
three text encoders, Sana's Gemma-2 and the UNets alike. Models are created on the meta device and
materialised in place (engine/presets/weights.py); schedulers are the real ones, tokenizers ours
(engine/presets/tokenizer.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import tokenizer as tok
from .weights import materialize_


@dataclass(frozen=True)
class Component:
    library: str
    """"diffusers" or "transformers"."""
    cls: str
    """The model class, e.g. "FluxTransformer2DModel", "T5EncoderModel"."""
    config: dict[str, Any]
    """Constructor kwargs (diffusers) or config-class kwargs (transformers)."""
    config_cls: str | None = None
    """transformers' config class ("T5Config"); None for diffusers models, built from kwargs."""


@dataclass(frozen=True)
class Processor:
    """A vision-language processor component (Qwen-Image-Edit's `processor`): image processor + tokenizer."""

    cls: str
    """The transformers processor class ("Qwen2VLProcessor"); without torchvision, its image-and-text form
    (engine/loading/processors.py)."""
    tokenizer: str
    """Its tokenizer's kind (engine.presets.tokenizer)."""
    image_processor: dict[str, Any] = field(default_factory=dict)
    """Its image processor's settings (the model's preprocessor_config.json)."""
    chat_template: bool = False
    """The processor carries its tokenizer's chat template (QwenImage21Pipeline applies the processor's)."""

    def build(self):
        from engine.loading import processors

        tokenizer = tok.make_tokenizer(self.tokenizer)
        return processors.build(self.cls, processors.image_processor(self.cls, **self.image_processor), tokenizer,
                                chat_template=tokenizer.chat_template if self.chat_template else None)


@dataclass(kw_only=True, frozen=True)
class PresetSpec:
    """Everything needed to build (or describe) one model without any file."""

    name: str
    family: str
    """The model family (engine/models/) that runs it."""
    pipeline_class: str
    """A diffusers pipeline class name."""
    description: str
    default_size: int
    """Image side the preset is meant for, in pixels."""
    components: dict[str, Component]
    tokenizers: dict[str, str]
    """Tokenizer attribute → engine.presets.tokenizer kind ("clip" / "t5")."""
    scheduler: tuple[str, dict[str, Any]]
    """(diffusers scheduler class, its config)."""
    processors: dict[str, Processor] = field(default_factory=dict)
    """Processor attribute → its processor (the edit pipelines' vision-language processors)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Pipeline kwargs that are not weights (components left out: image encoders, safety checkers)."""
    guiders: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Guider attribute → (diffusers guider class, its config): components made of a config alone, built
    and saved like the scheduler (HunyuanImage's `guider` / `ocr_guider`)."""

    @property
    def model_components(self) -> tuple[str, ...]:
        return tuple(self.components)

    def config(self, name: str) -> dict[str, Any]:
        return self.components[name].config

    def empty_model(self, name: str) -> torch.nn.Module:
        """Component `name` with its parameters on the meta device (no memory)."""
        from accelerate import init_empty_weights

        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; {self.name} has {', '.join(self.components)}")
        c = self.components[name]
        module = importlib.import_module(c.library)
        cls = getattr(module, c.cls)
        # include_buffers=False: buffers such as CLIP's position_ids hold real values.
        with init_empty_weights(include_buffers=False):
            model = cls(getattr(module, c.config_cls)(**c.config)) if c.config_cls else cls(**c.config)
        if c.library == "transformers":
            # init_empty_weights re-creates every registered parameter, which undoes transformers' tying
            # (T5's shared / encoder.embed_tokens, Qwen3-4B's lm_head / embed_tokens; tied in the real
            # checkpoints and in a from_pretrained load): tie again, outside the context, so both get one
            # value and are counted once.
            model.tie_weights()
        return model

    def build_component(self, name: str, *, dtype: torch.dtype, device, seed: int = 0) -> torch.nn.Module:
        """One model component with its deterministic random weights."""
        return materialize_(self.empty_model(name), prefix=name, seed=seed, device=device, dtype=dtype)

    def other_components(self, *, with_text_encoders: bool) -> dict[str, Any]:
        """The scheduler, the guiders, the processors, and the tokenizers (None without text encoders). A
        vision-language processor costs nothing and some pipelines need one to be built (QwenImage21Pipeline
        counts its template's tokens with it), so it is there either way."""
        import diffusers

        cls_name, config = self.scheduler
        parts: dict[str, Any] = {"scheduler": getattr(diffusers, cls_name)(**config)}
        parts |= {name: getattr(diffusers, cls)(**config) for name, (cls, config) in self.guiders.items()}
        for name, kind in self.tokenizers.items():
            parts[name] = tok.make_tokenizer(kind) if with_text_encoders else None
        for name, processor in self.processors.items():
            parts[name] = processor.build()
        return parts

    def build_pipeline(self, *, dtype: torch.dtype, device, seed: int = 0, with_text_encoders: bool = True,
                       components: dict[str, Any] | None = None):
        """The diffusers pipeline with random weights, built on `device` in `dtype`.

        `with_text_encoders=False` leaves the text encoders and tokenizers None (callers then pass
        prompt embeddings), which skips most of flux-dev's memory. `components`: prebuilt components
        used as given (a tensor-parallel shard of the denoiser).
        """
        import diffusers

        components = components or {}
        names = [n for n in self.model_components
                 if (with_text_encoders or not n.startswith("text_encoder")) and n not in components]
        parts = {n: self.build_component(n, dtype=dtype, device=device, seed=seed) for n in names} | components
        for n in self.model_components:
            parts.setdefault(n, None)
        parts |= self.other_components(with_text_encoders=with_text_encoders)
        return getattr(diffusers, self.pipeline_class)(**parts, **self.extra)

    def save(self, path: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
        """Write the preset as a normal diffusers directory (model_index.json + safetensors), one
        component in memory at a time: the peak is the largest component, not the pipeline."""
        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        others = self.other_components(with_text_encoders=True)
        # A pipeline of meta modules costs nothing and lets diffusers write model_index.json.
        empty = getattr(diffusers, self.pipeline_class)(
            **others, **{n: self.empty_model(n) for n in self.model_components}, **self.extra
        )
        empty.save_config(path)
        del empty
        for name, part in others.items():
            part.save_pretrained(path / name)
        _name_real_classes(path, self.processors)
        for name in self.model_components:
            model = self.build_component(name, dtype=dtype, device="cpu", seed=seed)
            model.save_pretrained(path / name, safe_serialization=True)
            del model
        return path


def _name_real_classes(path: Path, processors: dict[str, Processor]) -> None:
    """model_index.json naming each processor by its transformers class, as the real model's does (built
    without torchvision, the object in the pipeline is its image-and-text form)."""
    if not processors:
        return
    import json

    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update({name: ["transformers", p.cls] for name, p in processors.items()})
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
