"""Loading models: the safety gate for directories (`safety.py`), the model resolved once into its
description (`model.py`: source, family, ModelInfo, components) and its short forms (`inspect.py`), whole
pipelines from presets or directories (`pipeline.py`), a denoiser holding only its tensor-parallel shard
(`sharded.py`, reading slices of safetensors with `slices.py`), and the `--tp auto` rule counted from
configs and headers (`auto_tp.py`)."""

from .inspect import inspect_model, is_preset
from .model import ResolvedModel, resolve_model
from .pipeline import load_pipeline

__all__ = ["ResolvedModel", "inspect_model", "is_preset", "load_pipeline", "resolve_model"]
