"""Regional torch.compile of a denoiser's repeated blocks (one compiled graph per block type).

Compiling only the repeated blocks (diffusers' `_repeated_blocks`: Flux's double- and single-stream
blocks) gives the speed of a whole-model compile — the elementwise work around attention (AdaLN
modulation, RMSNorm, RoPE, GELU, residuals) is fused — for a fraction of the compile time, since all
57 Flux blocks share two graphs. The Ulysses all-to-alls are functional collectives, so they trace
into the graph; the Ring's P2P exchange is a graph break (the ring loop stays eager).
"""

from __future__ import annotations

import torch


def compile_denoiser(model: torch.nn.Module, *, mode: str | None = None) -> list[torch.nn.Module]:
    """Compile `model`'s repeated blocks in place; returns them (see `uncompile`)."""
    blocks = getattr(model, "_repeated_blocks", None) or repeated_block_classes(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile")
    # One graph per (block type, layout, resolution): several layouts in one process (engine.bench)
    # would otherwise hit dynamo's recompile limit and silently fall back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = [m for m in model.modules() if type(m).__name__ in blocks]
    # Inductor fuses elementwise chains and keeps their bf16 intermediates in fp32, which eager rounds
    # to bf16 after every op: over 8 guided steps that alone moved SD3.5-large 2.33% (PixArt-Σ 2.81%)
    # from the eager image, over the 1% bar. Emulating eager's casts brought SD3.5 to 0.88% at the same
    # speed (130.0 vs 130.0 ms per step on one H200; BENCHMARKS.md), so it is on unless a mode is given
    # (torch.compile takes a mode or options, not both).
    options = None if mode is not None else {"emulate_precision_casts": True}
    for m in compiled:
        # dynamic=False: each resolution gets its own static-shape graph (shape-polymorphic kernels
        # are slower, and a server sees few distinct resolutions).
        m.compile(mode=mode, dynamic=False, options=options)
    return compiled


def repeated_block_classes(model: torch.nn.Module) -> list[str]:
    """Class names of the blocks stacked in the model's ModuleLists (SD3 and PixArt do not declare
    diffusers' `_repeated_blocks`): a ModuleList of ≥ 2 modules of one class is a stack of blocks."""
    names = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) >= 2:
            kinds = {type(b).__name__ for b in m}
            if len(kinds) == 1:
                names.extend(kinds)
    return sorted(set(names))


def uncompile(blocks: list[torch.nn.Module]) -> None:
    """Back to eager (nn.Module.compile keeps the compiled callable in `_compiled_call_impl`)."""
    for m in blocks:
        m._compiled_call_impl = None
