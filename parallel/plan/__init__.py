"""Model plans as data, and the one generic mechanism that applies them.

A plan says, for one model class, how each concern of parallel inference applies to it, one part per
concern, and `apply_plan` installs the parts on a model over a mesh — forward hooks, processors set
through diffusers' own `set_processor` API, stand-in modules — with no forked model code: adding a
model is writing its plan.

    ModelPlan(
        attention=Processors({...}),          # processors.py: which attention modules get which processor
        sequence=SequenceSplit(...),          # sequence.py:   tokens split over sp, and gathered back
        batch=BatchSplit(...),                # batch.py:      batched guidance branches split over cfg
        cfg_pairs=CfgPairs(),                 # cfg_pairs.py:  or two sequential calls, one per cfg rank
        tensor=TensorPlan(styles, sequence),  # tensor.py:     TP shards, and TP's sequence forms
        runs=(LayerRun(...), ...),            # runs.py:       stacks of blocks split where they start
        grids=RowGrids(...),                  # grids.py:      token groups split in whole rows of a grid
        counted=CountedTokens(...),           # counted.py:    a token group counted by a forward argument
        residuals=Residuals(...),             # residuals.py:  inputs another model of the mesh left split
        perturbed=PerturbedPlan(...),         # perturbed.py:  the PAG layers' perturbed branch
        quantize=Quantize(rule),              # quantize.py:   linears in FP8 (the engine's --quantize)
        cache=StepCache(config, stacks),      # cache.py:      a step cache on the block stacks (--cache)
    )

What the parts share is in context.py: token groups and where tensors hold them (`SeqDim`,
`JointSeqDim`), and `SeqContext`, the per-rank lengths of each group in the call in progress — what
attention processors read. Anything else a part keeps from call to call is its own state, on the
object its `install` returns; a processor or another part that needs it holds that object.

Adding a part (a new concern: a cache over a stack of blocks, a quantized linear, a new kind of input):

1. A module here with a frozen dataclass — the part's data, what a family writes in its plan — whose
   `install(model, ctx, attention, parts)` puts it on the model and returns an `Installed` (or None
   where the mesh needs nothing of it). `parts` holds what the parts installed before it returned,
   by field name (`parts.get("batch")`). Its module hooks go into `handles`; anything else it changes
   it undoes in `remove`.
2. If it acts around each forward call of the whole model, its `Installed` sets `calls` and
   overrides `before(arguments)` (the bound arguments, changed in place) and `after(output)`.
3. A field on `ModelPlan` (apply.py), and the part's name in `INSTALL` and, if it has steps, in
   `STEPS`, where its order against the others is right; apply.py's doc says why the orders are
   what they are.
4. A test of the part alone (tests/test_plan_parts.py has the pattern: a toy module, gloo ranks).
No other part and no shared hook changes.
"""

from .apply import INSTALL, STEPS, AppliedPlan, ModelPlan, apply_plan
from .batch import BatchSplit, BatchState
from .cache import AppliedCache, CacheConfig, CacheLog, StepCache, parse_cache
from .cfg_pairs import CfgPairs
from .context import Installed, JointSeqDim, SeqContext, SeqDim
from .counted import CountedTokens
from .grids import GridState, RowGrids, RowsArg, grid_conv
from .perturbed import PerturbedPlan
from .processors import Processors
from .quantize import Quantize, Quantized
from .residuals import Residuals
from .runs import LayerRun, RunState, prefix_lengths
from .sequence import SequenceSplit
from .tensor import TensorPlan

__all__ = [
    "INSTALL", "STEPS", "AppliedCache", "AppliedPlan", "BatchSplit", "BatchState", "CacheConfig", "CacheLog",
    "CfgPairs", "CountedTokens", "Quantize", "Quantized", "StepCache", "parse_cache", "GridState", "Installed",
    "JointSeqDim", "LayerRun", "ModelPlan", "PerturbedPlan", "Processors", "Residuals", "RowGrids", "RowsArg",
    "RunState", "SeqContext", "SeqDim", "SequenceSplit", "TensorPlan", "apply_plan", "grid_conv", "prefix_lengths",
]
