"""The step-cache part of a plan: diffusers' cache hooks under the mesh, one decision for the whole image.

Two methods, both diffusers' own hooks (`diffusers.hooks`):
- `first-block[:THRESHOLD]` (first-block cache): every call computes the first transformer block;
  when its output residual differs from the last computed call's by less than THRESHOLD (relative L1:
  Σ|r − r_prev| / Σ|r_prev|), the other blocks are skipped and their cached residual is added instead.
  Under a split each rank holds a piece of the residual, so the two sums are all-reduced over the
  ranks of the image before the comparison: every rank takes the same branch (a rank that skipped
  while another computed would hang the next collective), and the decision is the one-GPU decision,
  computed from the same sums (up to the order of fp32 additions). The cached residuals stay split:
  each rank keeps only its own piece.
- `taylorseer[:INTERVAL]` (TaylorSeer): the attention modules are computed on a fixed schedule (every
  INTERVAL-th call after a warm-up) and forecast in between from finite differences of their last
  outputs. The schedule depends on the call count alone, so every rank agrees without communicating;
  each forecasts its own piece.

Guidance branches: a pipeline that batches [uncond, cond] decides once for the batch (the cfg ranks'
sums are added, as one GPU averages over the batch); one that runs them as two calls (Flux true CFG,
`cfg_pairs`) keeps a state per call (diffusers' cache contexts), and each cfg rank decides for its own
call from the sums of its call's pieces only. Every request starts from empty caches (`reset`).
The decisions are logged per call (`CacheLog`) for the result, the PNG metadata and the bench.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from diffusers.hooks.hooks import CacheContext, HookRegistry, StateManager, _set_cache_context
from diffusers.hooks.first_block_cache import (
    _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK, FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState)
from diffusers.hooks.taylorseer_cache import (
    _TAYLORSEER_CACHE_HOOK, TaylorSeerCacheConfig, TaylorSeerCacheHook,
    TaylorSeerState)

from ..cache_config import TAYLORSEER_WARMUP, CacheConfig, parse_cache  # noqa: F401 — the part's options
from ..mesh import Mesh
from .context import Installed, SeqContext


@dataclass
class CacheLog:
    """Per cache context ("cond", "uncond", or the engine's one), whether each call computed (True)
    or reused (False) the cached blocks."""

    calls: dict[str, list[bool]] = field(default_factory=dict)

    def record(self, context: str, computed: bool) -> None:
        self.calls.setdefault(context, []).append(bool(computed))

    def clear(self) -> None:
        self.calls.clear()

    def summary(self) -> dict:
        """{context: {"computed": [call indices], "reused": [call indices]}}."""
        return {name: {"computed": [i for i, c in enumerate(v) if c], "reused": [i for i, c in enumerate(v) if not c]}
                for name, v in self.calls.items()}

    @property
    def reused(self) -> int:
        return sum(not c for v in self.calls.values() for c in v)


class _Decision:
    """Where a rank's residual sums are added up: the image's ranks (all but dp), each cfg rank in its
    own slot so that cfg-pair calls can keep their decisions apart."""

    def __init__(self, mesh: Mesh, cfg_pairs: bool):
        self.group = mesh.group("image")
        self.slots = mesh.size("cfg")
        self.slot = mesh.coord("cfg")
        self.cfg_pairs = cfg_pairs

    def relative_change(self, residual: torch.Tensor, previous: torch.Tensor) -> float:
        sums = torch.zeros(self.slots, 2, dtype=torch.float64, device=residual.device)
        sums[self.slot, 0] = (residual - previous).abs().sum(dtype=torch.float64)
        sums[self.slot, 1] = previous.abs().sum(dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(sums, group=self.group)
        change, base = (sums[self.slot] if self.cfg_pairs else sums.sum(dim=0)).tolist()
        return change / base if base > 0 else math.inf


class _MeshHeadHook(FBCHeadBlockHook):
    """diffusers' first-block head hook, deciding from the whole image's sums (see `_Decision`)."""

    def __init__(self, state_manager: StateManager, threshold: float, decision: _Decision, log: CacheLog):
        super().__init__(state_manager, threshold)
        self.decision = decision
        self.log = log

    @torch.compiler.disable
    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        state = self.state_manager.get_state()
        previous = state.head_block_residual
        compute = previous is None or self.decision.relative_change(hidden_states_residual, previous) > self.threshold
        self.log.record(self.state_manager.context.name, compute)
        return compute


class _LoggedTaylorSeerHook(TaylorSeerCacheHook):
    """diffusers' TaylorSeer hook; the first hooked module logs the schedule."""

    def __init__(self, *args, log: CacheLog | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = log

    @torch.compiler.disable
    def _measure_should_compute(self):
        compute, state = super()._measure_should_compute()
        if self.log is not None:
            self.log.record(self.state_manager.context.name, compute)
        return compute, state


@dataclass(frozen=True)
class StepCache:
    """A plan's step cache: `config`'s method on the model's block `stacks` (ModuleList names, in call
    order: what the first-block cache walks; TaylorSeer hooks the attention modules instead). Not a
    family's declaration but the engine's option (`--cache`), over the stacks the family names."""

    config: CacheConfig
    stacks: tuple[str, ...]

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "AppliedCache":
        return apply_step_cache(model, self.config, ctx.mesh, stacks=self.stacks, cfg_pairs="cfg_pairs" in parts)


class AppliedCache(Installed):
    def __init__(self, model: torch.nn.Module, config: CacheConfig, log: CacheLog):
        super().__init__()
        self.model, self.config, self.log = model, config, log
        self.hooked: list[tuple[torch.nn.Module, str]] = []

    def reset(self) -> None:
        """Empty caches and log: every request starts fresh."""
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)
        self.log.clear()

    @contextlib.contextmanager
    def context(self, name: str = "image"):
        """The hooks' cache context around a pipeline call: their state is kept per context. Pipelines
        that name their own (Flux's "cond" / "uncond") set them inside; the others run in this one."""
        _set_cache_context(self.model, CacheContext(name))
        try:
            yield
        finally:
            _set_cache_context(self.model, None)

    def remove(self) -> None:
        for module, name in self.hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
        self.hooked.clear()
        _hooks_changed(self.model)


def _hooks_changed(model: torch.nn.Module) -> None:
    """diffusers caches which submodules carry hooks (to set cache contexts): stale once we add or
    remove some, as its own `enable_cache` notes."""
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def block_stacks(model: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The blocks of the model's ModuleLists `names`, in call order. A name may end in a slice of the
    list (`transformer_blocks[:-1]`: SD3.5's last block returns no text stream, which the cache's
    residuals need, so it is computed every step)."""
    blocks = []
    for spec in names:
        name, _, cut = spec.partition("[")
        stack = model.get_submodule(name)
        assert isinstance(stack, torch.nn.ModuleList), f"{name} of {type(model).__name__} is no ModuleList"
        if cut:
            start, _, stop = cut.rstrip("]").partition(":")
            stack = list(stack)[slice(int(start) if start else None, int(stop) if stop else None)]
        blocks.extend(stack)
    return blocks


def attention_modules(blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The attention modules (diffusers' `Attention`: they take a processor) of `blocks`, outermost only."""
    found = []
    for block in blocks:
        inner: set[int] = set()
        for _, m in block.named_modules():
            if id(m) in inner or not hasattr(m, "set_processor"):
                continue
            found.append(m)
            inner.update(id(sub) for sub in m.modules())
    return found


def apply_step_cache(model: torch.nn.Module, config: CacheConfig, mesh: Mesh, *, stacks: tuple[str, ...],
                     cfg_pairs: bool = False) -> AppliedCache:
    """Install `config`'s hooks on `model` (its block `stacks`, in call order, for the first-block
    cache; its attention modules for TaylorSeer)."""
    applied = AppliedCache(model, config, CacheLog())
    if config.method == "first-block":
        blocks = block_stacks(model, stacks)
        assert len(blocks) >= 2, f"{type(model).__name__}: first-block caching needs a first block and others"
        manager = StateManager(FBCSharedBlockState, (), {})
        head = _MeshHeadHook(manager, config.threshold, _Decision(mesh, cfg_pairs), applied.log)
        HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(head, _FBC_LEADER_BLOCK_HOOK)
        applied.hooked.append((blocks[0], _FBC_LEADER_BLOCK_HOOK))
        for i, block in enumerate(blocks[1:], start=1):
            hook = FBCBlockHook(manager, is_tail=i == len(blocks) - 1)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, _FBC_BLOCK_HOOK)
            applied.hooked.append((block, _FBC_BLOCK_HOOK))
        _hooks_changed(model)
        return applied
    ts = TaylorSeerCacheConfig(cache_interval=config.interval, disable_cache_before_step=TAYLORSEER_WARMUP,
                               taylor_factors_dtype=torch.float32)
    first = True
    for module in attention_modules(block_stacks(model, stacks)):
        manager = StateManager(TaylorSeerState, init_kwargs={"taylor_factors_dtype": ts.taylor_factors_dtype,
                                                              "max_order": ts.max_order, "is_inactive": False})
        hook = _LoggedTaylorSeerHook(ts.cache_interval, ts.disable_cache_before_step, ts.taylor_factors_dtype,
                                     manager, log=applied.log if first else None)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _TAYLORSEER_CACHE_HOOK)
        applied.hooked.append((module, _TAYLORSEER_CACHE_HOOK))
        first = False
    assert applied.hooked, f"{type(model).__name__} has no attention modules for TaylorSeer"
    _hooks_changed(model)
    return applied
