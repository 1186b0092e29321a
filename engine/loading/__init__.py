"""Loading models: the safety gate for directories (`safety.py`), facts from configs before any weight
(`inspect.py`), whole pipelines from presets or directories (`pipeline.py`), a denoiser holding only
its tensor-parallel shard (`sharded.py`, reading slices of safetensors with `slices.py`), and the
`--tp auto` rule counted from configs and headers (`auto_tp.py`)."""

from .inspect import inspect_model, is_preset
from .pipeline import load_pipeline

__all__ = ["inspect_model", "is_preset", "load_pipeline"]
