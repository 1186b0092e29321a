"""A model's plan as a composition of parts, and `apply_plan`, which installs them in order.

Two orders matter, and they are written down here and nowhere else:

- INSTALL: what each part does to the model when the plan is applied. The batch part first (the
  perturbed pair and the residuals read its branches); attention processors before the perturbed
  pair (whose normal rows may run them); TP shards before the sequence form's module hooks
  (inside the TP part) and before any stand-in (which wraps a shard); a counted group's split before the
  sequence split that reads it; module splits after the runs';
  FP8 right after the TP shards (a row-split layer must be a RowParallelLinear by then, and the
  sequence form's stand-ins keep their products in bf16); the step cache last (its hooks wrap the
  blocks as every other part left them). `remove()` undoes the parts in the reverse order (stand-ins
  first, then the shards under them).
- STEPS: the work of the parts that act around each forward call of the whole model, from one
  pre-hook (each part's `before`, in this order) and one hook (each part's `after`, in the reverse
  order). The cfg pair decides first whether this rank computes the call at all; the batch split
  comes before the sequence split (grids and counted groups first: they fix their groups' lengths, by
  whole rows or from a forward argument); the residuals need both; the TP split refines this rank's sp
  piece, so on the way out the TP gather runs before the sp gather, which runs before the cfg gather,
  which runs before the pair exchange.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields

import torch

from ..attention import ParallelAttention
from ..mesh import Mesh
from .batch import BatchSplit
from .cache import StepCache
from .cfg_pairs import CfgPairs
from .context import Installed, SeqContext
from .counted import CountedTokens
from .grids import RowGrids
from .perturbed import PerturbedPlan
from .processors import Processors
from .quantize import Quantize
from .residuals import Residuals
from .runs import LayerRun
from .sequence import SequenceSplit
from .tensor import TensorPlan, sequence_refusal

INSTALL = ("batch", "attention", "perturbed", "tensor", "quantize", "cfg_pairs", "runs", "counted", "sequence",
           "grids", "residuals", "cache")
STEPS = ("cfg_pairs", "batch", "grids", "counted", "sequence", "residuals", "tensor")


@dataclass(kw_only=True, frozen=True)
class ModelPlan:
    """One model class's plan: each concern a part (None / empty: the model has none of it)."""

    attention: Processors | None = None
    """Attention processors (parallel/plan/processors.py)."""
    sequence: SequenceSplit | None = None
    """Where the tokens are split over sp and gathered back (parallel/plan/sequence.py)."""
    batch: BatchSplit | None = None
    """The guidance branches batched into one call, split over cfg (parallel/plan/batch.py)."""
    cfg_pairs: CfgPairs | None = None
    """The guidance branches as two sequential calls, one per cfg rank (parallel/plan/cfg_pairs.py):
    in place of `batch`, under a pipeline that runs them so."""
    tensor: TensorPlan | None = None
    """Tensor parallelism (parallel/plan/tensor.py)."""
    runs: tuple[LayerRun, ...] = ()
    """Stacks of blocks split where they start and gathered where they end (parallel/plan/runs.py)."""
    grids: RowGrids | None = None
    """Token groups split in whole rows of their 2-D grid (parallel/plan/grids.py)."""
    counted: CountedTokens | None = None
    """A token group whose length is a forward argument (parallel/plan/counted.py)."""
    residuals: Residuals | None = None
    """Inputs computed split by another model of the mesh (parallel/plan/residuals.py)."""
    perturbed: PerturbedPlan | None = None
    """How the layers that perturbed-attention guidance (PAG) perturbs run under the mesh
    (parallel/plan/perturbed.py); None: the family has no PAG pipeline."""
    quantize: Quantize | None = None
    """Linears in FP8 (parallel/plan/quantize.py): the engine's `--quantize fp8` over the family's rule."""
    cache: StepCache | None = None
    """A step cache over the block stacks (parallel/plan/cache.py): the engine's `--cache`."""

    def __post_init__(self):
        assert self.batch is None or self.cfg_pairs is None, "the cfg axis splits a batch or pairs of calls, not both"

    @property
    def tp_styles(self) -> dict:
        """The TP styles (parallel/tensor.py), empty without a tensor part: what loaders and size
        estimates read."""
        return dict(self.tensor.styles) if self.tensor is not None else {}

    def check(self, model: torch.nn.Module, mesh: Mesh) -> None:
        """What this plan cannot do on `mesh`, before anything touches the model."""
        sequence_refusal(self.tensor, model, mesh)
        if mesh.size("tp") > 1:
            assert self.tensor is not None, f"no tensor-parallel plan for {type(model).__name__}"
        if mesh.size("sp") > 1:
            assert (self.sequence is not None and self.sequence.gathers()) or self.runs, (
                "a sequence-parallel plan must say what to gather")
        if self.sequence is not None and self.sequence.residual_output is not None and self.batch is not None:
            assert self.batch.output_dim is None, (
                "residual outputs stay split over cfg too: BatchSplit(output_dim=None)")

    def parts(self):
        """(field name, part) in install order; a run is one part each."""
        for name in INSTALL:
            value = getattr(self, name)
            for part in value if isinstance(value, tuple) else (value,):
                if part is not None:
                    yield name, part


# Every part has its place in the install order; the steps are some of them.
assert {f.name for f in fields(ModelPlan)} == set(INSTALL) and set(STEPS) <= set(INSTALL)


@dataclass
class AppliedPlan:
    model: torch.nn.Module
    context: SeqContext
    parts: dict = field(default_factory=dict)
    """Field name → what installing that part left (runs: a tuple, one per run); parts that do nothing
    on this mesh are absent. The caller talks to the owner of what it sets or reads: the batch part
    takes the announced branch count (`parts["batch"].branches`), the perturbed part holds the PAG
    processors (`parts["perturbed"].processors`)."""
    _installed: list = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for part in reversed(self._installed):
            part.remove()
        self._installed.clear()
        self.parts.clear()


def apply_plan(model: torch.nn.Module, plan: ModelPlan, mesh: Mesh, attention: ParallelAttention) -> AppliedPlan:
    plan.check(model, mesh)
    sig = inspect.signature(model.forward)
    ctx = SeqContext(mesh)
    applied = AppliedPlan(model, ctx)
    for name, part in plan.parts():
        installed = part.install(model, ctx, attention, applied.parts)
        if installed is None:
            continue
        applied._installed.append(installed)
        if name == "runs":
            applied.parts[name] = (*applied.parts.get(name, ()), installed)
        else:
            applied.parts[name] = installed
    steps = [applied.parts[n] for n in STEPS if n in applied.parts and applied.parts[n].calls]
    if steps:
        calls = _Calls(ctx, sig, steps)
        applied._handles.append(model.register_forward_pre_hook(calls.before, with_kwargs=True))
        applied._handles.append(model.register_forward_hook(calls.after))
    return applied


class _Calls:
    """The parts' steps around each forward call of the model."""

    def __init__(self, ctx: SeqContext, sig: inspect.Signature, steps: list[Installed]):
        self.ctx, self.sig, self.steps = ctx, sig, steps
        self.ran = 0
        """Steps whose `before` ran in the call in progress: only their `after` run."""

    def before(self, module, args, kwargs):
        self.ctx.begin()
        bound = self.sig.bind_partial(*args, **kwargs)
        self.ran = 0
        for step in self.steps:
            self.ran += 1
            if step.before(bound.arguments):
                break  # another rank computes this call
        return bound.args, bound.kwargs

    def after(self, module, args, output):
        for step in reversed(self.steps[: self.ran]):
            output = step.after(output)
        return output
