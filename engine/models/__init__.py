"""Per-family parallel plans. Adding a model family = a plan here plus its parity test."""

from __future__ import annotations

from parallel.plan import ModelPlan

from .flux import FLUX_PLAN

# Keyed by the diffusers transformer class name.
PLANS: dict[str, ModelPlan] = {
    "FluxTransformer2DModel": FLUX_PLAN,
}


def plan_for(model) -> ModelPlan:
    name = type(model).__name__
    if name not in PLANS:
        raise ValueError(f"no parallel plan for {name}; supported: {', '.join(sorted(PLANS))}")
    return PLANS[name]
