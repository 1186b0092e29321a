"""VAE plans as data, and the one mechanism that runs a diffusers VAE's encoder and decoder split by rows.

A `VaePlan` says, for one VAE class, what its total downsampling factor is, which attention modules
get a split-aware processor, which modules pad their input themselves before a convolution, and
which module classes are row-local (they need nothing: pointwise, channel-wise, nearest up- /
down-sampling of whole rows). `apply_vae_plan` then
- puts stand-ins in place of every nn.Conv2d that reads other rows (parallel/halo.py: halo rows from
  the ranks above and below) and every nn.GroupNorm (parallel/group_norm.py: the whole image's
  statistics) — the same Parameters, so dtype casts and state dicts are untouched;
- sets the plan's processors on the attention modules (diffusers' `set_processor` where the module has it);
- hooks the encoder and the decoder: the pre-hook splits the input rows over the group (a decoder's
  latent rows; an encoder's image rows in blocks of the downsampling factor, so every stride-2 step
  keeps ownership aligned) and the post-hook all-gathers the output, so the VAE's own `decode` /
  `encode` (and the pipeline calling them) get the whole tensor back, on every rank.
Modules of a class the plan does not cover are refused when the plan is applied, never run wrong.

Whether a call is split is decided per call: `when(height_px, width_px, ranks)` (the engine's
auto rule or `on`), and only where every rank gets at least one unit of rows; otherwise the call
runs whole, exactly as without the plan. `remove()` puts every module, processor and hook back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .group_norm import RowGroupNorm
from .halo import RowConv2d, RowContext, RowSplit, conv_refusal, gather_rows, needs_halo, take_rows
from .sharding import split_sizes

# Containers and row-local leaves every plan may hold (no spatial mixing of their own).
ALWAYS_LOCAL = frozenset({"ModuleList", "Sequential", "Identity", "Dropout", "Linear", "SiLU", "ReLU", "GELU"})


@dataclass(kw_only=True, frozen=True)
class VaePlan:
    factor: Callable[[torch.nn.Module], int]
    """VAE → image rows per latent row (the encoder's total downsampling, the decoder's upsampling)."""
    attention: Mapping[str, Callable[[RowContext, object], object]] = field(default_factory=dict)
    """Attention module class → factory(rows, original processor) of its split-aware processor."""
    pre_padded: Mapping[str, Callable[[torch.nn.Module], Mapping[str, tuple[int, int]]]] = field(default_factory=dict)
    """Module class → {conv child: (top, bottom) zero rows the module pads itself before that conv}."""
    row_local: frozenset[str] = frozenset()
    """Module classes that need nothing under a row split (besides ALWAYS_LOCAL)."""
    checks: Mapping[str, Callable[[torch.nn.Module], str | None]] = field(default_factory=dict)
    """Module class → why this instance cannot run split (None: it can), for config-dependent forms."""


@dataclass
class AppliedVaePlan:
    vae: torch.nn.Module
    rows: RowContext
    last: dict[str, int] = field(default_factory=dict)
    """"encode" / "decode" → ranks the last call was split over (1: it ran whole)."""
    _handles: list = field(default_factory=list)
    _swapped: list = field(default_factory=list)
    """(owner, attribute, original module)."""
    _processors: list = field(default_factory=list)
    """(attention module, original processor)."""

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for owner, attr, original in reversed(self._swapped):
            setattr(owner, attr, original)
        self._swapped.clear()
        for module, proc in self._processors:
            _set_processor(module, proc)
        self._processors.clear()
        self.rows.split = None


def _set_processor(module, proc) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(proc)
    else:  # SanaMultiscaleLinearAttention keeps its processor as a plain attribute
        module.processor = proc


def plan_refusals(vae: torch.nn.Module, plan: VaePlan) -> list[str]:
    """Modules of `vae` that `plan` cannot run split (empty: all covered)."""
    known = {"Conv2d", "GroupNorm", *ALWAYS_LOCAL, *plan.row_local, *plan.attention, *plan.pre_padded}
    out = []
    for part in ("encoder", "decoder"):
        for name, m in getattr(vae, part).named_modules(prefix=part):
            cls = type(m).__name__
            if cls not in known:
                out.append(f"{name} ({cls})")
            elif isinstance(m, torch.nn.Conv2d) and (why := conv_refusal(m)):
                out.append(f"{name} (Conv2d with {why})")
            elif cls in plan.checks and (why := plan.checks[cls](m)):
                out.append(f"{name} ({cls}: {why})")
    return out


def apply_vae_plan(
    vae: torch.nn.Module,
    plan: VaePlan,
    *,
    group: dist.ProcessGroup | None = None,
    simulate: tuple[int, int] | None = None,
    when: Callable[[int, int, int], bool] = lambda height, width, ranks: True,
) -> AppliedVaePlan:
    """Run `vae.encoder` / `vae.decoder` split over `group` (every rank of it calls with the same input).

    `simulate=(N, i)` instead: one process computes piece i of an N-way split and returns that piece
    (halo rows zero, statistics local — the per-rank cost, not the image), for memory measurements.
    """
    assert (group is None) != (simulate is None), "a process group or a simulated split"
    refused = plan_refusals(vae, plan)
    if refused:
        raise ValueError(f"{type(vae).__name__} cannot be split by rows: its plan does not cover {', '.join(refused)}")
    world, index = simulate if simulate is not None else (dist.get_world_size(group), dist.get_rank(group))
    factor = plan.factor(vae)
    applied = AppliedVaePlan(vae, RowContext())
    rows = applied.rows
    for part in (vae.encoder, vae.decoder):
        _swap_modules(part, plan, rows, applied)
        for m in part.modules():
            cls = type(m).__name__
            if cls in plan.attention:
                applied._processors.append((m, m.processor))
                _set_processor(m, plan.attention[cls](rows, m.processor))

    def begin(kind: str, x: torch.Tensor, unit: int):
        """Split `x` (rows in blocks of `unit`) when the rule and the size allow; None: whole."""
        rows.split = None
        applied.last[kind] = 1
        H, W = x.shape[-2:]
        units = H // unit
        px = factor // unit  # image pixels per row of x
        if world == 1 or H % unit or units < world or not when(H * px, W * px, world):
            return None
        rows.split = RowSplit(tuple(split_sizes(units, world)), index, group)
        applied.last[kind] = world
        return take_rows(x, rows.split, unit)

    def pre_hook(kind: str, unit: int):
        def hook(module, args, kwargs):
            if not args or not isinstance(args[0], torch.Tensor) or args[0].ndim != 4:
                rows.split = None
                return None
            local = begin(kind, args[0], unit)
            return None if local is None else ((local, *args[1:]), kwargs)

        return hook

    def post_hook(module, args, out):
        split, rows.split = rows.split, None
        if split is None or split.simulated:
            return out
        return gather_rows(out, split)

    # Decoder: one latent row per unit; encoder: `factor` image rows per unit (one latent row out).
    applied._handles += [
        vae.decoder.register_forward_pre_hook(pre_hook("decode", 1), with_kwargs=True),
        vae.decoder.register_forward_hook(post_hook),
        vae.encoder.register_forward_pre_hook(pre_hook("encode", factor), with_kwargs=True),
        vae.encoder.register_forward_hook(post_hook),
    ]
    return applied


def _swap_modules(part: torch.nn.Module, plan: VaePlan, rows: RowContext, applied: AppliedVaePlan) -> None:
    pre_pads: dict[int, tuple[int, int]] = {}
    for m in part.modules():
        cls = type(m).__name__
        if cls in plan.pre_padded:
            for child, pad in plan.pre_padded[cls](m).items():
                pre_pads[id(getattr(m, child))] = pad
    new: dict[int, torch.nn.Module] = {}
    for m in part.modules():
        if type(m) is torch.nn.Conv2d and needs_halo(m, pre_pads.get(id(m), (0, 0))):
            new[id(m)] = RowConv2d(m, rows, pre_pads.get(id(m), (0, 0)))
        elif type(m) is torch.nn.GroupNorm:
            new[id(m)] = RowGroupNorm(m, rows)
    # Every attribute that holds a replaced module (a module may sit under two names).
    for owner in list(part.modules()):
        for attr, child in list(owner._modules.items()):
            if child is not None and id(child) in new:
                applied._swapped.append((owner, attr, child))
                setattr(owner, attr, new[id(child)])
