"""A text encoder holding only this rank's shard, never the whole encoder.

The encoder is built on the meta device from its config, `parallelize_module` (DTensor) turns the
planned parameters into sharded meta DTensors and installs the collectives, and each parameter is
then materialised alone, directly on the target device, as the local part its DTensor placement says:

- from a preset: the parameter's deterministic value (engine/presets/weights.py, a function of the
  seed and its first name) is drawn and sliced, so sharded and replicated runs hold the same weights;
- from a directory: only the slice's bytes are read from the memory-mapped safetensors
  (engine/loading/slices.py), the checkpoint's names mapped to the model's by transformers' own
  renaming rules (a tensor that transformers converts — fuses, splits — on load is refused).

Tied parameters (T5's shared / encoder.embed_tokens, an LM head tied to its embeddings) stay one
Parameter. Float buffers follow what the replicated load gives: cast to the dtype for presets (as
engine/presets/weights.materialize_ does), built under the dtype for directories (as from_pretrained).
"""

from __future__ import annotations

import re

import torch

from engine.loading.model import resolve_model
from engine.loading.slices import SafetensorsSlices
from engine.presets.weights import init_parameter, is_norm_module
from shardiff_parallel.tensor import Slice

from .components import component_folder, empty_text_encoder
from .plans import plan_of, style_of


def dtensor_styles(model: torch.nn.Module, plan: dict[str, str]) -> dict:
    """Each module the plan matches → its DTensor ParallelStyle (replicated entries left out). Named
    module by module: a pattern present in some blocks only (T5's relative-attention bias lives in the
    first) would otherwise make `parallelize_module` warn about the others."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    make = {
        "colwise": ColwiseParallel,
        "embedding_colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    styles = {}
    for name, _ in model.named_modules():
        style = style_of(name, plan)
        if style in make:
            styles[name] = make[style]()
    return styles


def _aliases(model: torch.nn.Module) -> list[list[tuple[str, str]]]:
    """Each distinct parameter's (module name, parameter name) places, first-seen order first."""
    places: dict[int, list[tuple[str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((module_name, pname))
    return list(places.values())


def _full(module_name: str, pname: str) -> str:
    return f"{module_name}.{pname}" if module_name else pname


def _keep_fp32(model: torch.nn.Module, name: str, dtype: torch.dtype) -> bool:
    """transformers' from_pretrained keeps `_keep_in_fp32_modules` in fp32 when loading fp16, and the
    `_strict` ones for fp16 and bf16 (T5's `wo`)."""
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return any(re.search(rf"(^|\.){re.escape(k)}(\.|$)", name) for k in keep)


class CheckpointNames:
    """Model parameter name → the checkpoint tensor holding it, through transformers' renamings."""

    def __init__(self, model: torch.nn.Module, reader: SafetensorsSlices):
        self.reader = reader
        self.converted: set[str] = set()
        self.names: dict[str, str] = {k: k for k in reader.entries}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, rename_source_key
        except ImportError:  # an older transformers: names as stored
            return
        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        known = dict.fromkeys(model.state_dict(), True)
        prefix = getattr(model, "base_model_prefix", None) or None
        for key in reader.entries:
            target, converter = rename_source_key(key, renamings, converters, prefix, known)
            if converter is not None:
                self.converted.add(target)
            self.names.setdefault(target, key)

    def find(self, candidates: list[str]) -> str:
        for name in candidates:
            if name in self.converted:
                raise ValueError(f"{self.reader.folder}: transformers converts {name} on load (fused or split "
                                 f"tensors); a sharded load cannot read it in slices — use --text-encoders first")
            if name in self.names and self.names[name] in self.reader.entries:
                return self.names[name]
        raise ValueError(f"{self.reader.folder}: the checkpoint has no tensor for {' / '.join(candidates)}")


def load_sharded_text_encoder(model, name: str, device_mesh, *, dtype: torch.dtype, device: torch.device | str,
                              seed: int = 0, reader: SafetensorsSlices | None = None) -> torch.nn.Module:
    """Text encoder `name` of `model` split over `device_mesh` (1-D), holding this rank's shard only.

    `reader` may be passed in to inspect what was read (tests count the bytes).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    model = resolve_model(model)
    preset = model.preset is not None
    empty = empty_text_encoder(model, name, None if preset else dtype)
    plan = plan_of(empty)
    assert plan is not None, f"{name} has no tensor-parallel plan"
    places = _aliases(empty)
    # src_data_rank=None: each rank keeps its own part of the (meta) parameters, nothing is sent.
    parallelize_module(empty, device_mesh, dtensor_styles(empty, plan), src_data_rank=None)
    names = None
    if not preset:
        reader = reader or SafetensorsSlices(component_folder(model, name), weights_name="model")
        names = CheckpointNames(empty, reader)
    modules = dict(empty.named_modules(remove_duplicate=False))
    coord, degree = device_mesh.get_local_rank(), device_mesh.size()
    for group in places:
        params = [getattr(modules[m], p) for m, p in group]
        sharded = [p for p in params if isinstance(p, DTensor)]
        ref = sharded[0] if sharded else params[0]
        placements = ref.placements if sharded else None
        assert all(p.placements == placements for p in sharded), f"tied {group} split two ways"
        sl = None
        if placements is not None and placements[0].is_shard():
            dim = placements[0].dim
            n = ref.shape[dim] // degree
            assert n * degree == ref.shape[dim], f"{group[0]}: {ref.shape[dim]} does not split {degree} ways"
            sl = Slice(dim, ((coord * n, n),))
        first = _full(*group[0])
        if names is None:
            owner = modules[group[0][0]]
            full = init_parameter(f"{name}.{first}", ref.shape, is_norm=is_norm_module(owner), seed=seed,
                                  device=device, dtype=dtype)
            value = full if sl is None else sl.take(full).contiguous()
            del full
        else:
            key = names.find([_full(m, p) for m, p in group])
            if reader.shape(key) != tuple(ref.shape):
                raise ValueError(f"{reader.folder}: {key} has shape {reader.shape(key)}, the config implies "
                                 f"{tuple(ref.shape)}")
            value_dtype = torch.float32 if _keep_fp32(empty, first, dtype) else dtype
            value = reader.read(key, sl).to(device=device, dtype=value_dtype)
        if placements is not None:
            assert tuple(value.shape) == tuple(ref.to_local().shape), (first, value.shape, ref.to_local().shape)
            value = DTensor.from_local(value, device_mesh, placements, run_check=False)
        new = torch.nn.Parameter(value, requires_grad=False)
        for m, p in group:
            setattr(modules[m], p, new)
    for module in empty.modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            buf = buf.to(device)
            if preset and buf.is_floating_point():
                buf = buf.to(dtype)
            module._buffers[bname] = buf
    assert not any(p.is_meta for p in empty.parameters()), "a parameter was left on the meta device"
    return empty.eval()
