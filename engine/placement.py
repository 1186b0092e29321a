"""One layout applied to the engine's models: its mesh, its attention, the denoiser's and ControlNets' plans.

The engine holds one `Placement` at a time (`Engine.placement`). A family whose layout follows the batch
(UNets: CFG split or data parallel, engine/data_parallel.py) moves to another one between requests with
`Engine.use_layout`: the old placement's hooks are removed and a new one is applied on the layout's
mesh (built once per layout and kept by the engine); the weights never move. Not to be confused with
the text encoders' placement (engine/text_encoders/placement.py), which is decided once at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.mesh import Mesh
from shardiff_parallel.plan import apply_plan

from engine.controlnet import apply_controlnet_plans


@dataclass
class Placement:
    parallel: ParallelConfig
    """The layout."""
    mesh: Mesh
    """Its process groups."""
    attention: ParallelAttention
    """The attention over the mesh that the plans' processors call."""
    plan: object
    """The denoiser's applied plan (parallel/plan.py; remove() undoes it)."""
    controlnet_plans: list = field(default_factory=list)
    """Each ControlNet's applied plan (none without a ControlNet)."""

    @classmethod
    def apply(cls, parallel: ParallelConfig, mesh: Mesh, *, family, denoiser, controlnet,
              attention_backend: str, quantize: str = "off", quantize_qkv: str = "off",
              cache=None) -> "Placement":
        """Split `denoiser` (and `controlnet`, if any) by `family`'s plans on `mesh`, with the fast path's
        parts where asked (`quantize` "fp8": the family's FP8 rule; `quantize_qkv` "fp8": attention's inputs
        rounded to FP8; `cache`: a CacheConfig on the family's block stacks); no collective."""
        attention = ParallelAttention(mesh, attention_backend, qkv=quantize_qkv)
        plan = apply_plan(denoiser, fast_plan(family, quantize, cache), mesh, attention)
        controlnet_plans = ([] if controlnet is None or family.controlnet is None
                            else apply_controlnet_plans(controlnet, family, mesh, attention))
        return cls(parallel, mesh, attention, plan, controlnet_plans)

    @property
    def cache(self):
        """The step cache installed on the denoiser (parallel/plan/cache.py: its log, its reset), or None."""
        return self.plan.parts.get("cache")

    def remove(self) -> None:
        self.plan.remove()
        for plan in self.controlnet_plans:
            plan.remove()


def fast_plan(family, quantize: str = "off", cache=None, *, keep_originals: bool = False):
    """The family's plan, with the fast path's parts where asked (the preflight checked the family has
    what they need: an FP8 rule, block stacks). `keep_originals`: the FP8 part keeps the bf16 weights so
    that removing the plan restores them (benchmarks running several layouts on one model)."""
    from shardiff_parallel.plan import Quantize, StepCache

    plan = family.pipeline_plan
    if quantize == "fp8":
        plan = replace(plan, quantize=Quantize(family.fp8, keep_originals=keep_originals))
    if cache is not None:
        if family.cache_setup is not None:
            family.cache_setup()
        plan = replace(plan, cache=StepCache(cache, family.cache_stacks))
    return plan
