"""LoRAs (`--lora PATH[:SCALE]`, `EngineConfig.loras`, `Engine.set_loras`), fused into the weights each
rank holds — also a tensor-parallel shard — and switched between requests without reloading anything.

Reading: diffusers' own loaders. The pipeline class's `lora_state_dict` converts the file's format
(diffusers/PEFT, Kohya, XLabs, …) to diffusers' keys; the component models' `load_lora_adapter` (and
the mixin's `load_lora_into_text_encoder`) build PEFT's LoRA layers with their ranks and alpha
scalings. They do that on a *skeleton*: a copy of each touched component whose weights are one shared
zero (no memory), because diffusers' loader refuses or widens a layer whose weight is a TP shard, and
so that the live model is never wrapped (its hooks, compiled blocks and CUDA graphs stay valid).

Fusing: for every LoRA layer of the skeleton, the live weight gets Σ scale × ΔW, where ΔW is PEFT's own
`get_delta_weight` (B·A·alpha/r). A TP-sharded weight gets only its slice, computed from the slice of
the factor along the base layer's split (`Colwise`: rows of B; `Rowwise`: columns of A;
parallel/tensor.py `local_shards`): each rank computes and holds only its part, and the sharded load
still read only slices of the base. Fused weights are plain weights, so Ulysses, Ring, CFG and TP run
them unchanged, at the speed of the base model.

Switching (`Engine.set_loras`, for a server between requests; every rank calls it with the same list):
the first fuse keeps a host copy of each weight it touches (this rank's shard); a switch copies those
back — bitwise the base, no drift — and fuses the new set. Cost: one host-to-device copy of the touched
weights and the ΔW products; no file of the base is read again. `set_loras([])` restores the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoraSpec:
    path: str
    scale: float = 1.0
    """diffusers' adapter weight (`set_adapters(..., weights)`): ΔW is multiplied by it."""
    name: str | None = None
    """A server's adapter name (`--lora NAME=PATH[:SCALE]`: requests choose it by name); None: fused always."""

    def record(self) -> dict:
        """What the PNG metadata says of it."""
        named = {"name": self.name} if self.name is not None else {}
        return {**named, "path": self.path, "scale": self.scale, "sha256": _file_sha256(self.path)}


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A named adapter's name: what a request may write, never a path."""


def parse_adapter(value) -> LoraSpec | None:
    """`"NAME=PATH[:SCALE]"` → LoraSpec with its name; None for a plain `PATH[:SCALE]` (a file of that very
    name, `a=b.safetensors`, stays a path)."""
    if isinstance(value, LoraSpec):
        if value.name is not None:
            return value
        # EngineConfig parsed "NAME=PATH:SCALE" as a path already: the name is still in it.
        named = parse_adapter(value.path)
        return None if named is None else dataclasses.replace(named, scale=value.scale)
    if not isinstance(value, str):
        return None
    name, sep, rest = value.partition("=")
    if not sep or not ADAPTER_NAME.fullmatch(name) or not rest or Path(value).expanduser().is_file():
        return None
    return dataclasses.replace(parse_lora(rest), name=name)


def split_adapters(values) -> tuple[tuple[LoraSpec, ...], tuple[LoraSpec, ...]]:
    """(plain LoRAs, fused for every request; named adapters, chosen per request) of `--lora` values;
    ValueError for a name given twice."""
    plain, named = [], {}
    for value in values:
        adapter = parse_adapter(value)
        if adapter is None:
            plain.append(parse_lora(value))
        elif adapter.name in named:
            raise ValueError(f"--lora {adapter.name}=…: the adapter name {adapter.name!r} is given twice")
        else:
            named[adapter.name] = adapter
    return tuple(plain), tuple(named.values())


def parse_lora(value) -> LoraSpec:
    """`"PATH"`, `"PATH:SCALE"`, `(path, scale)` or a LoraSpec → LoraSpec; ValueError for a bad scale."""
    if isinstance(value, LoraSpec):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        path, scale = value
    elif isinstance(value, (str, os.PathLike)):
        path, scale = str(value), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a colon in the path itself (C:\\..., a URL-like name): no scale given
    else:
        raise ValueError(f"--lora takes PATH[:SCALE], got {value!r}")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"--lora {value!r}: the scale must be a number") from None
    return LoraSpec(str(path), scale)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def loader_class(family, pipeline_class: str):
    """The diffusers pipeline class whose LoRA loader reads this model's LoRAs: the model's own, or another
    pipeline of its family that has one (SanaPAGPipeline has none, SanaPipeline does); None if none has."""
    import diffusers

    for name in (pipeline_class, *(p.cls for p in family.pipelines)):
        cls = getattr(diffusers, name)
        if hasattr(cls, "lora_state_dict"):
            return cls
    return None


def read_lora(cls, spec: LoraSpec) -> tuple[dict, dict | None, dict | None]:
    """(state dict in diffusers' keys, network alphas, metadata) of one LoRA file; ValueError if it is
    not a safetensors LoRA."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise ValueError(f"--lora {spec.path!r}: no such file")
    if path.suffix != SUFFIX:
        raise ValueError(f"--lora {spec.path!r}: only {SUFFIX} LoRA files are loaded (pickle files can run code)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"--lora {spec.path!r} is not a readable safetensors file ({e})") from None
    kwargs = dict(use_safetensors=True, local_files_only=True, return_lora_metadata=True)
    if "return_alphas" in inspect.signature(cls.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    try:
        out = cls.lora_state_dict(str(path), **kwargs)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ValueError(f"--lora {spec.path!r}: diffusers cannot read it as a LoRA ({e})") from None
    state, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    return state, (alphas or None), (metadata or None)


def _module_of(key: str, layers: set[str]) -> str | None:
    """The layer (a module with its own weight) that a LoRA key belongs to, or None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        if name in layers:
            return name
    return None


def _weight_layers(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}


def match_keys(state: dict, skeletons: dict[str, torch.nn.Module]) -> tuple[list[str], list[str]]:
    """(matched, unmatched) keys of a converted LoRA state dict, against the components it names."""
    layers = {name: _weight_layers(m) for name, m in skeletons.items()}
    matched, unmatched = [], []
    for key in state:
        prefix, _, rest = key.partition(".")
        ok = prefix in layers and _module_of(rest, layers[prefix]) is not None
        (matched if ok else unmatched).append(key)
    return matched, unmatched


def check_loras(values, model, family, info) -> tuple[list[LoraSpec], list[str]]:
    """Parsed LoRAs and notes for the user (keys that match nothing), checked against the model's configs
    (components on the meta device: names only, no memory) before any weight or collective; ValueError
    for a file that cannot be used."""
    specs = [parse_lora(v) for v in values]
    if not specs:
        return [], []
    cls = loader_class(family, info.pipeline_class)
    if cls is None:
        raise ValueError(f"--lora: {info.pipeline_class} ({family.name}) has no LoRA loader in diffusers")
    notes, skeletons = [], {}
    for spec in specs:
        state, _, _ = read_lora(cls, spec)
        extra = sorted(k for k in state if "lora" not in k and "alpha" not in k)
        if extra:
            raise ValueError(f"--lora {spec.path!r} holds weights that are not LoRA factors ({', '.join(extra[:3])}, …): "
                             "LoRAs that replace layers (Flux Control LoRAs' norms) and other adapter kinds (LoKr) "
                             "are not supported")
        if any("lora_magnitude_vector" in k for k in state):
            raise ValueError(f"--lora {spec.path!r} is a DoRA (magnitude vectors): only plain LoRAs are fused")
        for prefix in {k.partition(".")[0] for k in state}:
            if prefix not in skeletons and _is_component(prefix, family):
                empty = empty_component(model, prefix)
                if empty is not None:
                    skeletons[prefix] = empty
        matched, unmatched = match_keys(state, skeletons)
        if not matched:
            raise ValueError(f"--lora {spec.path!r}: none of its {len(state)} keys matches a layer of {model} "
                             f"(first: {', '.join(sorted(state)[:3])})")
        if unmatched:
            notes.append(f"LoRA {spec.path}: {len(unmatched)} of {len(state)} keys match no layer and are ignored "
                         f"(first: {', '.join(sorted(unmatched)[:3])})")
        text = {k.partition(".")[0] for k in matched} - {family.denoiser}
        if text and not hasattr(cls, "load_lora_into_text_encoder"):
            raise ValueError(f"--lora {spec.path!r} has {', '.join(sorted(text))} keys, which {cls.__name__}'s "
                             "loader does not read")
    return specs, notes


def _is_component(name: str, family) -> bool:
    """The components diffusers' LoRA loaders write to: the denoiser and the text encoders."""
    return name == family.denoiser or name.startswith("text_encoder")


def empty_component(model, name: str) -> torch.nn.Module | None:
    """Component `name` of `model` (preset, directory or its description) on the meta device, from its
    config; None if the model has no such component."""
    from accelerate import init_empty_weights

    from engine.loading.model import resolve_model

    model = resolve_model(model)
    entry = model.components.get(name)
    if entry is None:
        return None
    library, cls_name = entry
    if model.preset is not None or library == "diffusers":
        return model.empty_model(name)
    import transformers

    cls = getattr(transformers, cls_name)
    config = cls.config_class.from_pretrained(model.folder(name), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        return cls(config)


# ---------------------------------------------------------------- fusing

def skeleton_of(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s structure whose every parameter is a view of one zero: what PEFT's layers need
    to be built (shapes, dtype, device) at no memory."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(type(module), "from_config") and hasattr(module, "register_to_config"):  # diffusers
            skeleton = type(module).from_config(module.config)
        else:  # transformers
            skeleton = type(module)(module.config)
    zero = torch.zeros((), dtype=torch.float32)
    for sub in skeleton.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(zero.expand(p.shape), requires_grad=False))
    return skeleton


@contextlib.contextmanager
def _quiet():
    """diffusers' and transformers' loading reports are about the skeleton's zero weights: not shown."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    before = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(before[0])
        tlog.set_verbosity(before[1])


def _inject(cls, skeleton, name: str, state, alphas, metadata, adapter: str) -> None:
    """diffusers' loader, on the skeleton."""
    from diffusers import ModelMixin

    layers = _weight_layers(skeleton)
    # The keys that match no layer were reported by check_loras; here they would only make diffusers warn.
    part = {k: v for k, v in state.items() if k.startswith(f"{name}.") and _module_of(k[len(name) + 1:], layers)}
    if not part:
        return
    net_alphas = None if metadata else alphas
    with _quiet():
        _load(cls, skeleton, name, part, net_alphas, metadata, adapter, isinstance(skeleton, ModelMixin))


def _load(cls, skeleton, name, part, net_alphas, metadata, adapter, diffusers_model: bool) -> None:
    if diffusers_model:
        skeleton.load_lora_adapter(part, prefix=name, network_alphas=net_alphas, metadata=metadata,
                                   adapter_name=adapter)
    else:
        cls.load_lora_into_text_encoder(part, network_alphas=net_alphas, text_encoder=skeleton, prefix=name,
                                        lora_scale=1.0, adapter_name=adapter, metadata=metadata)


def _local_delta(layer, adapter: str, device, weight_slice) -> torch.Tensor:
    """This rank's ΔW of one LoRA layer: the whole of it, or the slice of a TP-sharded weight computed
    from the factor's slice (plain LoRA on a Linear), else sliced from the whole."""
    from peft.tuners.lora import Linear as LoraLinear

    for factors in (layer.lora_A, layer.lora_B):
        factors[adapter].to(device)
    if weight_slice is None:
        return layer.get_delta_weight(adapter).float()
    if isinstance(layer, LoraLinear) and not layer.fan_in_fan_out:
        A, B = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
        if weight_slice.dim == 0:
            return (weight_slice.take(B) @ A) * layer.scaling[adapter]
        return (B @ weight_slice.take(A)) * layer.scaling[adapter]
    return weight_slice.take(layer.get_delta_weight(adapter).float())


class LoraState:
    """The LoRAs fused into one pipeline's live weights, and the host copies that undo them."""

    def __init__(self, pipe, family, shards: dict | None = None):
        """`shards`: the denoiser's TP slices (parallel.tensor.local_shards), empty without TP."""
        self.pipe, self.family = pipe, family
        self.shards = shards or {}
        self.active: tuple[LoraSpec, ...] = ()
        self.records: list[dict] = []
        """The active LoRAs as the PNG metadata names them (path, scale, file hash)."""
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        """(component, parameter) → its value before any LoRA, on the host."""

    def set(self, specs) -> None:
        """Fuse exactly `specs` (replacing what was fused); no collective."""
        specs = tuple(specs)
        deltas = self._deltas(specs) if specs else {}
        with torch.no_grad():
            for key, original in self._originals.items():
                self._param(key).copy_(original)
            self._originals = {k: v for k, v in self._originals.items() if k in deltas}
            for key, delta in deltas.items():
                p = self._param(key)
                if key not in self._originals:
                    self._originals[key] = p.detach().to("cpu", copy=True)
                p.copy_((p.float() + delta).to(p.dtype))
        self.active = specs
        self.records = [spec.record() for spec in specs]

    def _param(self, key) -> torch.nn.Parameter:
        component, name = key
        return getattr(self.pipe, component).get_parameter(name)

    def _deltas(self, specs) -> dict[tuple[str, str], torch.Tensor]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        cls = loader_class(self.family, type(self.pipe).__name__)
        loaded = [(spec, *read_lora(cls, spec)) for spec in specs]
        names = sorted({k.partition(".")[0] for _, state, _, _ in loaded for k in state})
        deltas: dict[tuple[str, str], torch.Tensor] = {}
        for name in names:
            live = getattr(self.pipe, name, None)
            if not isinstance(live, torch.nn.Module):
                continue
            skeleton = skeleton_of(live)
            adapters = []
            for i, (spec, state, alphas, metadata) in enumerate(loaded):
                if any(k.startswith(f"{name}.") for k in state):
                    _inject(cls, skeleton, name, state, alphas, metadata, f"lora{i}")
                    adapters.append((f"lora{i}", spec.scale))
            for path, layer in skeleton.named_modules():
                if not isinstance(layer, BaseTunerLayer):
                    continue
                for pname in ("weight", "bias"):
                    self._add(deltas, name, path, pname, layer, adapters, live)
        return deltas

    def _add(self, deltas, component, path, pname, layer, adapters, live) -> None:
        full = f"{path}.{pname}"
        if pname == "bias":
            # Only PEFT's lora_bias option adds to the bias: B's own bias times the scaling.
            terms = [(a, s) for a, s in adapters if a in layer.lora_B and layer.lora_B[a].bias is not None]
            if not terms:
                return
        else:
            terms = [(a, s) for a, s in adapters if a in getattr(layer, "lora_A", {})]
        if not terms:
            return
        param = live.get_parameter(full)
        weight_slice = self.shards.get(full) if component == self.family.denoiser else None
        if weight_slice is None and type(param.data) is not torch.Tensor:
            # A text encoder sharded by transformers' tensor parallelism (--text-encoders sharded): DTensors.
            raise ValueError(f"--lora: {component} is sharded (--text-encoders sharded), and LoRAs on sharded text "
                             "encoders are not fused; use --text-encoders replicated or first")
        total = None
        for adapter, scale in terms:
            if getattr(layer, "use_dora", {}).get(adapter):
                raise ValueError("DoRA LoRAs are not supported (only plain LoRAs are fused)")
            if pname == "bias":
                d = layer.lora_B[adapter].bias.to(param.device).float() * layer.scaling[adapter]
                d = d if weight_slice is None else weight_slice.take(d)
            else:
                d = _local_delta(layer, adapter, param.device, weight_slice)
            total = scale * d if total is None else total + scale * d
        assert total.shape == param.shape, f"{component}.{full}: ΔW {tuple(total.shape)} vs weight {tuple(param.shape)}"
        key = (component, full)
        deltas[key] = total if key not in deltas else deltas[key] + total
