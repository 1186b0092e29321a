"""ControlNets beside the model (`--controlnet DIR`, repeatable; `EngineConfig.controlnets`).

Checked before any collective (every rank alike): the directory (config.json, safetensors weights
only), its class against the family's (engine/models/*: `Family.controlnet`), its sizes against the
denoiser's — a mismatch names the sizes —, and what the layout asks of it. Loaded with diffusers'
`from_pretrained` (safetensors, local files only), several wrapped in the family's multi-ControlNet
class (their residuals summed). Each ControlNet is then split by its own plan on the engine's mesh
(`ControlNetSpec.plan`, applied by parallel/plan/ like the denoiser's): its attention processors, TP
shards and input splits as the denoiser's, its residuals left as this rank's pieces, which the
denoiser's plan (its `Residuals` part) adds to its own pieces — no all-gather of residuals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.loading.inspect import component_config
from engine.loading.safety import PICKLE_SUFFIXES, read_json
from shardiff_parallel.plan import apply_plan


@dataclass(frozen=True)
class ControlNetDir:
    path: Path
    cls: str
    config: dict


def controlnet_families() -> list[str]:
    from engine.models import FAMILIES

    return sorted(name for name, fam in FAMILIES.items() if fam.controlnet is not None)


def check_controlnets(paths, model, family, parallel, *, cuda_graphs: bool = False) -> list[ControlNetDir]:
    """The ControlNet directories `paths`, checked against `family`'s model `model` on `parallel`;
    ValueError (one line), no collective, no weights."""
    if not paths:
        return []
    if cuda_graphs:
        # The graphed forward replays tensor inputs; a ControlNet's residuals reach the denoiser as lists.
        raise ValueError("--cuda-graphs does not run with --controlnet yet; leave one of them out")
    spec = family.controlnet
    if spec is None:
        raise ValueError(f"--controlnet: shardiff runs no ControlNet with {family.name} models (it does with: "
                         f"{', '.join(controlnet_families())})")
    if len(paths) > 1 and spec.multi is None:
        raise ValueError(f"--controlnet given {len(paths)} times: the {family.name} pipelines take one ControlNet")
    if parallel.tp > 1 and parallel.tp_sequence:
        raise ValueError("--controlnet runs with the all-reduce form of TP: use --tp-comm allreduce")
    base = component_config(model, family.denoiser)
    out = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise ValueError(f"--controlnet {raw}: no such directory (a ControlNet directory: config.json and "
                             "safetensors weights)")
        config = read_json(path / "config.json", f"--controlnet {raw}")
        cls = config.get("_class_name")
        if cls not in spec.classes:
            raise ValueError(f"--controlnet {raw}: its config names {cls!r}, not a ControlNet of {family.name} "
                             f"models ({', '.join(spec.classes)})")
        files = [f for f in path.iterdir() if f.is_file()]
        if not any(f.name.endswith(".safetensors") for f in files):
            pickles = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
            raise ValueError(f"--controlnet {raw}: no .safetensors weights"
                             + (f" (only pickles: {', '.join(pickles)}; convert them: pickle files can run code "
                                "when loaded)" if pickles else ""))
        mismatches = config_mismatches(spec, base, cls, config) + spec.refusals(config)
        if mismatches:
            raise ValueError(f"--controlnet {raw} does not fit this {family.name} model: {'; '.join(mismatches)}")
        refusal = spec.sequence_refusal(config) if parallel.sp > 1 else None
        if refusal:
            raise ValueError(f"--controlnet {raw}: {refusal}")
        out.append(ControlNetDir(path, cls, config))
    return out


def _value(cls_name: str, config: dict, key: str):
    """`config[key]`, or the class's default where the config leaves it out (lists for tuples)."""
    import inspect

    import diffusers

    v = config.get(key, inspect.signature(getattr(diffusers, cls_name).__init__).parameters[key].default)
    return list(v) if isinstance(v, (list, tuple)) else v


def config_mismatches(spec, denoiser: dict, cls: str, controlnet: dict) -> list[str]:
    """The entries of `spec.match` in which the ControlNet's config differs from the denoiser's, named."""
    out = []
    for key in spec.match:
        mine, theirs = _value(cls, controlnet, key), _value(spec.denoiser_class, denoiser, key)
        if mine != theirs:
            out.append(f"{key} {mine} (the denoiser's: {theirs})")
    return out


def load_controlnets(dirs: list[ControlNetDir], family, *, dtype: torch.dtype, device) -> torch.nn.Module | None:
    """The ControlNet (or the family's multi-ControlNet wrapper of several) on `device`, in `dtype`."""
    if not dirs:
        return None
    import diffusers

    nets = [getattr(diffusers, d.cls).from_pretrained(d.path, torch_dtype=dtype, use_safetensors=True,
                                                      local_files_only=True).to(device).eval()
            for d in dirs]
    if len(nets) == 1:
        return nets[0]
    return getattr(diffusers, family.controlnet.multi)(nets)


def controlnet_modules(controlnet) -> list[torch.nn.Module]:
    """The ControlNet models inside `controlnet` (a multi-ControlNet wrapper holds them in `.nets`)."""
    if controlnet is None:
        return []
    return list(getattr(controlnet, "nets", [controlnet]))


def apply_controlnet_plans(controlnet, family, mesh, attention) -> list:
    """Each ControlNet split by the family's ControlNet plan on `mesh`; the applied plans (remove() each)."""
    return [apply_plan(net, family.controlnet.plan, mesh, attention) for net in controlnet_modules(controlnet)]


def random_controlnet(family, denoiser_config: dict, layers: int, *, seed: int = 0, device="cpu",
                      dtype: torch.dtype = torch.float32, **options) -> torch.nn.Module:
    """A ControlNet for `family`'s denoiser config, with random weights — the zero-initialised output
    projections too, so that its residuals matter — (no weights can be downloaded: tests, benchmarks)."""
    import diffusers

    import inspect

    spec = family.controlnet
    assert spec is not None, f"{family.name} has no ControlNet"
    params = inspect.signature(getattr(diffusers, spec.classes[0]).__init__).parameters
    # The denoiser's entries the ControlNet takes (widths, heads, embeddings), then its own.
    config = {**{k: v for k, v in denoiser_config.items() if k in params and not k.startswith("_")},
              **spec.derive(layers, **options)}
    torch.manual_seed(seed)
    with torch.device(device):
        net = getattr(diffusers, spec.classes[0])(**config)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim and not p.abs().sum():
                # zero_module()'d by diffusers (a ControlNet starts as a no-op when trained).
                p.normal_(0.0, 0.02 if p.ndim > 1 else 0.01)
    return net.to(dtype).eval()


def save_random_controlnet(model, family, out, layers: int, *, seed: int = 0, **options) -> Path:
    """`random_controlnet` for the model `model` (preset or directory), saved as a directory (safetensors)."""
    net = random_controlnet(family, component_config(model, family.denoiser), layers, seed=seed, **options)
    out = Path(out)
    net.save_pretrained(out, safe_serialization=True)
    return out
