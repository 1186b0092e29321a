"""Model families: each declares its parallel plan and how its pipeline is called, as data.

Adding a family = one module here with its plan, a `Family` entry below, its ModelInfo reader in
engine/model_info.py, a preset in engine/presets.py, and a parity test. The engine itself does not
change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parallel.plan import ModelPlan

from .flux import FLUX_PLAN, flux_call_kwargs


@dataclass(kw_only=True, frozen=True)
class Family:
    name: str
    plan: ModelPlan
    call_kwargs: Callable[..., dict]
    """GenerateRequest → family-specific pipeline kwargs (prompt, guidance, …); the engine adds size,
    steps, generator and output type."""
    axes: frozenset[str]
    """Mesh axes (with degree > 1) this family can use."""
    denoiser: str = "transformer"
    """Pipeline attribute holding the model the plan applies to."""

    def check_axes(self, degrees: dict[str, int]) -> None:
        bad = [a for a, d in degrees.items() if d > 1 and a not in self.axes]
        if bad:
            raise ValueError(
                f"{self.name} models do not support --{' / --'.join(bad)} yet; "
                f"axes available for {self.name}: {', '.join('--' + a for a in sorted(self.axes))}"
            )


FAMILIES: dict[str, Family] = {
    "flux": Family(name="flux", plan=FLUX_PLAN, call_kwargs=flux_call_kwargs, axes=frozenset({"ulysses", "ring"})),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
