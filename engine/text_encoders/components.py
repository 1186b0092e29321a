"""Which components of a model are its text encoders, and each one on the meta device (no memory).

A text encoder is a pipeline component named `text_encoder*` that is a transformers model: every
diffusers text-to-image pipeline names them so (Flux's CLIP + T5, SD3's three, Sana's Gemma-2,
Qwen-Image's Qwen2.5-VL, ...). The model's description (engine/loading/model.py) lists them: presets
from their spec, directories from model_index.json and each component's config.json (through the safety
gate: transformers classes only).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from engine.loading.model import ResolvedModel, resolve_model


def text_encoder_classes(model: str | ResolvedModel) -> dict[str, str]:
    """Component name → transformers class name of every text encoder of `model`, in pipeline order."""
    return resolve_model(model).text_encoders


def component_folder(model: str | ResolvedModel, name: str) -> Path:
    return resolve_model(model).folder(name)


def empty_text_encoder(model: str | ResolvedModel, name: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Text encoder `name` of `model` with its parameters on the meta device (buffers real, on the CPU).

    A fresh module each call (sharding changes it in place). `dtype`: the default dtype while a
    directory's model is built, as transformers' from_pretrained does (buffers computed at init).
    """
    model = resolve_model(model)
    if model.preset is not None:
        return model.preset.empty_model(name)
    import transformers
    from accelerate import init_empty_weights

    cls_name = model.text_encoders.get(name)
    if cls_name is None:
        raise ValueError(f"{model} has no transformers text encoder {name!r}")
    cls = getattr(transformers, cls_name)
    folder = model.folder(name)
    config = cls.config_class.from_dict(json.loads((folder / "config.json").read_text()))
    # include_buffers=False: buffers such as rotary frequencies and CLIP's position ids hold real values.
    with init_empty_weights(include_buffers=False):
        module = cls._from_config(config, dtype=dtype) if dtype is not None else cls(config)
    # init_empty_weights re-registers every parameter, which unties tied ones (T5's shared /
    # encoder.embed_tokens, an LM head tied to its embeddings): tie them again, as from_pretrained does.
    module.tie_weights()
    return module


def counting_model(model: str | ResolvedModel, name: str) -> torch.nn.Module:
    """A cached meta-device text encoder, only for counting (never sharded, never run): building
    T5-XXL on the meta device takes seconds, and the automatic choices ask several times."""
    return _counting_model(resolve_model(model), name)


@functools.lru_cache(maxsize=16)
def _counting_model(model: ResolvedModel, name: str) -> torch.nn.Module:
    return empty_text_encoder(model, name)
