"""A preset's weights: each parameter a pure function of (seed, its fully qualified name).

Weights are never built in fp32 on the CPU first: modules are created with parameters on the meta
device, then each parameter is materialised directly on the target device. The generator runs on
that device, so values are identical for one device type and seed; CPU and CUDA builds differ
(different RNGs). A tensor-parallel loader draws one parameter alone and keeps its shard
(engine/loading/sharded.py).
"""

from __future__ import annotations

import hashlib
import math

import torch

NORM_BIAS_SCALE = 0.0
BIAS_SCALE = 0.02  # small but nonzero, so bias handling (e.g. sharding) is exercised


def parameter_seed(seed: int, name: str) -> int:
    """64-bit generator seed from (seed, fully qualified parameter name)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_parameter(
    name: str, shape: tuple[int, ...] | torch.Size, *, is_norm: bool, seed: int,
    device: torch.device | str, dtype: torch.dtype,
) -> torch.Tensor:
    """The value of one parameter, reproducible alone.

    `name` is "<component>.<parameter path>", e.g. "transformer.x_embedder.weight";
    `is_norm` says the owning module is a normalisation layer. Values are drawn in
    fp32 on `device` and then cast, so a bf16 build equals the fp32 build cast.
    Matrices/convs: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) keeps each layer roughly
    variance-preserving, so 57 Flux blocks stay finite in bf16; norm scales are 1.
    """
    shape = tuple(shape)
    device = torch.device(device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    is_bias = name.endswith("bias")
    if len(shape) >= 2:
        bound = 1.0 / math.sqrt(out.numel() // shape[0])
    elif is_norm:
        return out.fill_(NORM_BIAS_SCALE if is_bias else 1.0).to(dtype)
    else:
        bound = BIAS_SCALE
    gen = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
    return out.uniform_(-bound, bound, generator=gen).to(dtype)


def is_norm_module(module: torch.nn.Module) -> bool:
    # LayerNorm, GroupNorm, diffusers' RMSNorm, T5LayerNorm, ..., Qwen-Image's VAE's QwenImageRMS_norm.
    name = type(module).__name__
    return "Norm" in name or name.endswith("_norm")


def materialize_(model: torch.nn.Module, *, prefix: str, seed: int, device: torch.device | str,
                 dtype: torch.dtype) -> torch.nn.Module:
    """Replace every meta parameter of `model` in place by its deterministic value.

    Tied parameters (T5's shared/embed_tokens) stay tied: each distinct meta
    tensor is materialised once, under its first name, and put back everywhere.
    """
    done: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, param in list(module.named_parameters(recurse=False)):
            if id(param) not in done:
                full = f"{prefix}.{module_name}.{pname}" if module_name else f"{prefix}.{pname}"
                value = init_parameter(full, param.shape, is_norm=is_norm_module(module), seed=seed, device=device,
                                       dtype=dtype)
                done[id(param)] = torch.nn.Parameter(value, requires_grad=False)
            setattr(module, pname, done[id(param)])
    # Buffers were built for real on the CPU (position ids, ...); keep int buffers' dtype.
    model.to(device)
    for module in model.modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf.is_floating_point():
                setattr(module, bname, buf.to(dtype))
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left on the meta device"
    return model.eval()
