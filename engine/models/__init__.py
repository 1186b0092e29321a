"""Model families: each declares its parallel plan and how its pipeline is called, as data.

Adding a family = one module here with its plan, a `Family` entry below, its ModelInfo reader in
engine/model_info.py, a preset in engine/presets.py, and a parity test. The engine itself does not
change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from parallel.plan import ModelPlan

from .flux import FLUX_PLAN, flux_bench_kwargs, flux_call_kwargs, flux_token_counts
from .flux_cfg import flux_uses_cfg
from .pixart import PIXART_PLAN, pixart_bench_kwargs, pixart_call_kwargs
from .sana import SANA_PLAN, SANA_SP_REFUSAL, SANA_TP_REFUSAL, sana_bench_kwargs, sana_call_kwargs
from .sd3 import SD3_PLAN, sd3_bench_kwargs, sd3_call_kwargs
from .unet import REFUSALS as UNET_REFUSALS, UNET_PLAN, unet_bench_kwargs, unet_call_kwargs, unet_layout


def _guidance_on(kwargs: dict) -> bool:
    """Pipelines that batch [negative, prompt] do so when guidance_scale > 1 (diffusers' rule)."""
    return kwargs.get("guidance_scale", 1.0) > 1
from .flux_tp import check_flux_tp, check_tp_widths


@dataclass(kw_only=True, frozen=True)
class Family:
    name: str
    plan: ModelPlan
    call_kwargs: Callable[..., dict]
    """GenerateRequest → family-specific pipeline kwargs (prompt, guidance, …); the engine adds size,
    steps, generator and output type."""
    axes: frozenset[str]
    """Mesh axes (with degree > 1) this family can use."""
    bench_kwargs: Callable[..., dict]
    """(ModelInfo, text_tokens=, device=, dtype=) → pipeline kwargs with random embeddings of the
    real shapes, for engine.bench (no text encoders)."""
    denoiser: str = "transformer"
    """Pipeline attribute holding the model the plan applies to."""
    check_tp: Callable[..., None] = lambda info, tp: None
    """(ModelInfo, tp) → ValueError if the TP degree does not split the model evenly (before any collective)."""

    uses_cfg: Callable[[dict], bool] = _guidance_on
    """Pipeline kwargs → whether that call runs two guidance branches (what --cfg 2 splits)."""
    cfg_pairs: bool = False
    """The pipeline runs the guidance branches as two sequential denoiser calls (Flux true CFG), not as
    one batch: the engine applies the plan with `cfg_pairs` (see parallel/cfg_pairs.py)."""
    refusals: Mapping[str, str] = field(default_factory=dict)
    """Axis → why this family cannot use it (said to the user instead of a generic message)."""
    layout: Callable[..., tuple] | None = None
    """(world, EngineConfig, guided: list[bool] | None) → (ParallelConfig, why) for families whose
    layout follows the batch of requests (UNets: CFG split or data parallel, engine/models/unet.py);
    None: degrees from the config (resolve_degrees)."""
    gpu_dtype: torch.dtype = torch.bfloat16
    """What `--dtype auto` runs on GPUs. UNets: fp16, their published precision — in bf16, 30 guided
    steps amplify rounding to 1.1–1.5% between two ways of computing one image, in fp16 to 0.13–0.20%
    (BENCHMARKS.md, issue 6)."""
    token_counts: Callable[..., dict[str, int]] | None = None
    """(ModelInfo, pipeline kwargs, height, width) → tokens of each group of the plan's sequence, so
    that `--tp-comm sequence` can check its even split before any collective (the split itself checks
    again, on the real inputs)."""

    @property
    def pipeline_plan(self) -> ModelPlan:
        """The plan as the engine applies it under this family's pipeline."""
        return replace(self.plan, cfg_pairs=True) if self.cfg_pairs else self.plan

    def check_cfg(self, degrees: dict[str, int], kwargs: dict) -> None:
        if degrees.get("cfg", 1) > 1 and not self.uses_cfg(kwargs):
            hint = ("true CFG: --negative-prompt and --true-cfg-scale > 1" if self.cfg_pairs
                    else "--guidance > 1")
            raise ValueError(
                f"--cfg 2 puts the two classifier-free-guidance branches on different ranks, but this "
                f"{self.name} request has guidance off (needs {hint}); drop --cfg or give those ranks "
                + ("to --ulysses/--ring" if {"ulysses", "ring"} & self.axes else "to data parallel (--dp)")
            )

    def check_tp_comm(self, parallel) -> None:
        """ValueError if `parallel` asks for the sequence form of TP and this family has no plan for it."""
        if parallel.tp_sequence and self.plan.tensor_sequence is None:
            have = sorted(n for n, f in FAMILIES.items() if f.plan.tensor_sequence is not None)
            raise ValueError(
                f"{self.name} models have no sequence-form tensor-parallel plan (--tp-comm {parallel.tp_comm} is "
                f"available for: {', '.join(have)}); use --tp-comm allreduce"
            )

    def check_axes(self, degrees: dict[str, int]) -> None:
        for a, d in degrees.items():
            if d > 1 and a in self.refusals:
                raise ValueError(f"{self.name} models cannot use --{a}: {self.refusals[a]}")
        bad = [a for a, d in degrees.items() if d > 1 and a not in self.axes]
        if bad:
            raise ValueError(
                f"{self.name} models do not support --{' / --'.join(bad)} yet; "
                f"axes available for {self.name}: {', '.join('--' + a for a in sorted(self.axes))}"
            )


FAMILIES: dict[str, Family] = {
    "flux": Family(
        name="flux", plan=FLUX_PLAN, call_kwargs=flux_call_kwargs, bench_kwargs=flux_bench_kwargs,
        axes=frozenset({"ulysses", "ring", "tp", "cfg"}), check_tp=check_flux_tp,
        uses_cfg=flux_uses_cfg, cfg_pairs=True, token_counts=flux_token_counts,
    ),
    "sd3": Family(
        name="sd3", plan=SD3_PLAN, call_kwargs=sd3_call_kwargs, bench_kwargs=sd3_bench_kwargs,
        axes=frozenset({"ulysses", "ring", "cfg", "tp"}), check_tp=check_tp_widths,
    ),
    "pixart": Family(
        name="pixart", plan=PIXART_PLAN, call_kwargs=pixart_call_kwargs, bench_kwargs=pixart_bench_kwargs,
        axes=frozenset({"ulysses", "ring", "cfg", "tp"}), check_tp=check_tp_widths,
    ),
    "sana": Family(
        name="sana", plan=SANA_PLAN, call_kwargs=sana_call_kwargs, bench_kwargs=sana_bench_kwargs,
        axes=frozenset({"cfg"}), refusals={"ulysses": SANA_SP_REFUSAL, "ring": SANA_SP_REFUSAL, "tp": SANA_TP_REFUSAL},
    ),
    **{
        name: Family(
            name=name, plan=UNET_PLAN, call_kwargs=unet_call_kwargs, bench_kwargs=unet_bench_kwargs,
            axes=frozenset({"cfg", "dp"}), denoiser="unet", refusals=UNET_REFUSALS, layout=unet_layout,
            gpu_dtype=torch.float16,
        )
        for name in ("sd", "sdxl")
    },
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
