"""Build a denoiser holding only this rank's tensor-parallel shard, never the full weights.

The model is created on the meta device from its config (no memory), the family's TP plan says which
slice of each parameter this rank keeps (`parallel.tensor.local_shards`), and each parameter is then
materialised alone, directly on the target device:

- from a diffusers directory: only the slice's bytes are read from the memory-mapped safetensors;
- from a preset: the parameter's deterministic value (engine/presets/weights.py, a function of the
  seed and its name) is drawn and sliced, so TP and non-TP runs hold the same logical weights. One
  full parameter exists at a time (the largest Flux-dev one is 57 M values), so resident memory is
  the shard plus one parameter, not the model.

`apply_plan` later recognises the parameters as already local and only adds the collectives.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights

from shardiff_parallel.tensor import local_shards

from engine.presets.weights import init_parameter, is_norm_module

from .slices import SafetensorsSlices


def empty_from_directory(folder: Path) -> torch.nn.Module:
    import diffusers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ValueError(f"{folder}/config.json: {config.get('_class_name')!r} is not a diffusers model class")
    with init_empty_weights(include_buffers=False):
        return cls.from_config(config)


def empty_model(model, name: str) -> torch.nn.Module:
    """Component `name` of `model` (preset, directory or its description) on the meta device, from its config."""
    from .model import resolve_model

    return resolve_model(model).empty_model(name)


def load_sharded_denoiser(
    model, family, *, tp: int, tp_rank: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
    reader: SafetensorsSlices | None = None,
) -> torch.nn.Module:
    """`family.denoiser` of `model` (preset, directory or its description) with TP rank `tp_rank`'s shard
    (of `tp`) of every weight.

    `reader` may be passed in to inspect what was read (tests count the bytes).
    """
    from .model import resolve_model

    model = resolve_model(model)
    name = family.denoiser
    empty = model.empty_model(name)
    if model.preset is None:
        reader = reader or SafetensorsSlices(model.folder(name))
    shards = local_shards(empty, family.plan.tp_styles, tp, tp_rank)
    modules = dict(empty.named_modules())
    for pname_full, param in list(empty.named_parameters()):
        owner_name, _, pname = pname_full.rpartition(".")
        owner = modules[owner_name]
        sl = shards.get(pname_full)
        if reader is None:
            full = init_parameter(f"{name}.{pname_full}", param.shape, is_norm=is_norm_module(owner), seed=seed,
                                  device=device, dtype=dtype)
            value = full if sl is None else sl.take(full).contiguous()
            del full
        else:
            if reader.shape(pname_full) != tuple(param.shape):
                raise ValueError(f"{reader.folder}: {pname_full} has shape {reader.shape(pname_full)}, "
                                 f"the config implies {tuple(param.shape)}")
            value = reader.read(pname_full, sl).to(device=device, dtype=dtype)
        setattr(owner, pname, torch.nn.Parameter(value, requires_grad=False))
    empty.to(device)
    assert not any(p.is_meta for p in empty.parameters()), "a parameter was left on the meta device"
    return empty.eval()
