"""Step caching under the mesh: diffusers' cache hooks, with one decision for the whole image.

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

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from diffusers.hooks.hooks import HookRegistry, StateManager
from diffusers.hooks.first_block_cache import (
    _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK, FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState)
from diffusers.hooks.taylorseer_cache import (
    _TAYLORSEER_CACHE_HOOK, _TRANSFORMER_BLOCK_IDENTIFIERS, TaylorSeerCacheConfig, TaylorSeerCacheHook,
    TaylorSeerState)

from .mesh import Mesh

METHODS = ("off", "first-block", "taylorseer")
FIRST_BLOCK_DEFAULT = 0.08
"""Relative L1 change of the first block's residual under which the other blocks are reused."""
TAYLORSEER_DEFAULT = 4
"""Calls between two computed ones once TaylorSeer forecasts (after `TAYLORSEER_WARMUP` computed calls)."""
TAYLORSEER_WARMUP = 3


@dataclass(frozen=True)
class CacheConfig:
    method: str
    """"first-block" or "taylorseer"."""
    threshold: float = FIRST_BLOCK_DEFAULT
    interval: int = TAYLORSEER_DEFAULT

    def describe(self) -> str:
        if self.method == "first-block":
            return f"first-block:{self.threshold:g}"
        return f"taylorseer:{self.interval}"


def parse_cache(text: str | None) -> CacheConfig | None:
    """`--cache off | first-block[:THRESHOLD] | taylorseer[:INTERVAL]` → CacheConfig (None: off);
    ValueError naming what is wrong."""
    if text is None or text == "off":
        return None
    if not isinstance(text, str):
        raise ValueError(f"--cache must be a string such as first-block:0.08, got {text!r}")
    method, _, param = text.partition(":")
    if method == "first-block":
        try:
            threshold = float(param) if param else FIRST_BLOCK_DEFAULT
        except ValueError:
            raise ValueError(f"--cache first-block:THRESHOLD takes a number, got {param!r}") from None
        if not (math.isfinite(threshold) and 0 < threshold <= 1):
            raise ValueError(f"--cache first-block:{param}: the threshold is a relative change in (0, 1] "
                             f"(default {FIRST_BLOCK_DEFAULT}; larger reuses more steps)")
        return CacheConfig("first-block", threshold=threshold)
    if method == "taylorseer":
        try:
            interval = int(param) if param else TAYLORSEER_DEFAULT
        except ValueError:
            raise ValueError(f"--cache taylorseer:INTERVAL takes an integer, got {param!r}") from None
        if not 2 <= interval <= 16:
            raise ValueError(f"--cache taylorseer:{param}: the interval is 2 … 16 calls between computed ones "
                             f"(default {TAYLORSEER_DEFAULT})")
        return CacheConfig("taylorseer", interval=interval)
    raise ValueError(f"--cache {text!r}: unknown method {method!r}; use one of {', '.join(METHODS)} "
                     "(first-block[:THRESHOLD], taylorseer[:INTERVAL])")


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


@dataclass
class AppliedCache:
    model: torch.nn.Module
    config: CacheConfig
    log: CacheLog
    hooked: list[tuple[torch.nn.Module, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Empty caches and log: every request starts fresh."""
        self.model._reset_stateful_cache()
        self.log.clear()

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
    """The blocks of the model's ModuleLists `names`, in call order."""
    blocks = []
    for name in names:
        stack = model.get_submodule(name)
        assert isinstance(stack, torch.nn.ModuleList), f"{name} of {type(model).__name__} is no ModuleList"
        blocks.extend(stack)
    return blocks


def apply_step_cache(model: torch.nn.Module, config: CacheConfig, mesh: Mesh, *, stacks: tuple[str, ...],
                     cfg_pairs: bool = False) -> AppliedCache:
    """Install `config`'s hooks on `model` (its block `stacks`, in call order, for the first-block
    cache; its attention modules for TaylorSeer)."""
    applied = AppliedCache(model, config, CacheLog())
    if config.method == "first-block":
        blocks = block_stacks(model, stacks)
        assert len(blocks) >= 3, f"{type(model).__name__}: first-block caching needs 3 blocks or more"
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
    import re

    ts = TaylorSeerCacheConfig(cache_interval=config.interval, disable_cache_before_step=TAYLORSEER_WARMUP,
                               taylor_factors_dtype=torch.float32)
    first = True
    for name, module in model.named_modules():
        if not any(re.fullmatch(p, name) for p in _TRANSFORMER_BLOCK_IDENTIFIERS):
            continue
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
