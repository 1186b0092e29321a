"""CFG parallelism for pipelines that run the two guidance branches as two sequential calls.

Flux's true CFG calls the transformer twice per step — first the prompt, then the negative prompt —
and combines the two noise predictions only after the second call returns. So the first call's
result is not needed until then, and the two calls can run at the same time on the two cfg ranks:

    cfg rank 0: call 1 computes (cond)      call 2 skipped → exchange → returns rank 1's result
    cfg rank 1: call 1 skipped → placeholder   call 2 computes (negative) → exchange, fills placeholder

A skipped call returns at once with an uninitialised tensor of the output's shape; rank 1's pipeline
then makes call 2 immediately, while rank 0 is still computing call 1. When both reach the end of
call 2, one all-gather over the cfg group gives every rank both results: the placeholder returned by
call 1 is filled in place (the pipeline still holds it) and call 2 returns the negative branch. Every
rank then combines and steps the scheduler exactly as on one GPU.

Skipping a forward uses diffusers' own hook registry (`new_forward`, as its caching hooks do). The
pair's step runs first among the plan's steps (parallel/plan/apply.py): on a call it skips, no other
part splits or gathers anything.

These pipelines batch no branches, so a plan with a `BatchSplit` takes this part in its place under such
a pipeline (`Family.pipeline_plan`).

A model that returns more tokens than its pipeline reads (Qwen-Image 2.1 returns its whole joint sequence —
the prompt, the condition images, the target — of a length that differs between the prompt's call and the
negative prompt's; the pipeline keeps the target, its last tokens) exchanges only what is read: `tail`
gives, from the call's arguments, how many of the output's last tokens (dim 1) that is. The placeholder
then has the latent input's shape, and only its last `tail` tokens are filled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ..sharding import gather_pieces
from .context import Installed, SeqContext

_HOOK_NAME = "shardiff_cfg_pairs"


@dataclass(frozen=True)
class CfgPairs:
    """The cfg axis splits pairs of sequential calls (see the module doc)."""

    tail: Callable[[dict], int] | None = None
    """The call's bound arguments → how many of the output's last tokens the pipeline reads, where it reads
    fewer than the model returns; None: the whole output."""

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention, parts) -> "PairState | None":
        if ctx.mesh.size("cfg") == 1:
            return None
        return PairState(model, ctx, self.tail)


class _SkipHook(ModelHook):
    """Runs the model's forward only on calls this rank owns."""

    def __init__(self, pairs: "PairState"):
        super().__init__()
        self.pairs = pairs

    def new_forward(self, module, *args, **kwargs):
        if not self.pairs.skip:
            return self.fn_ref.original_forward(*args, **kwargs)
        out = torch.empty_like(self.pairs.like)
        return Transformer2DModelOutput(sample=out) if self.pairs.return_dict else (out,)


class PairState(Installed):
    """State of one parallelized model's (call 1, call 2) pairs; removed with the plan."""

    calls = True

    def __init__(self, model: torch.nn.Module, ctx: SeqContext, tail: Callable[[dict], int] | None = None):
        super().__init__()
        self.model = model
        self.mesh = ctx.mesh
        self.tail = tail
        self.read: int | None = None
        """Tokens of this call's output that the pipeline reads (its last ones); None: all."""
        self.call = 0  # index of the next call within its pair
        self.skip = False
        """The call in progress is computed by the other cfg rank: nothing is split or gathered."""
        self.first: torch.Tensor | None = None  # call 1's output (rank 0) or placeholder (rank 1)
        self.like: torch.Tensor | None = None
        self.return_dict = True
        self.registry = HookRegistry.check_if_exists_or_initialize(model)
        self.registry.register_hook(_SkipHook(self), _HOOK_NAME)

    def reset(self) -> None:
        """Forget a half-finished pair (a pipeline call that failed between the two calls)."""
        self.call, self.first, self.skip = 0, None, False

    def before(self, arguments: dict) -> bool:
        self.skip = self.call != self.mesh.coord("cfg")
        self.read = None if self.tail is None else self.tail(arguments)
        if self.skip:
            # The output of these models has the shape of their latent input.
            self.like = arguments["hidden_states"]
            self.return_dict = arguments.get("return_dict", True)
        return self.skip

    def after(self, output):
        k, self.call = self.call, 1 - self.call
        self.skip = False
        x = output[0] if isinstance(output, tuple) else next(iter(output.values()))
        if k == 0:
            self.first = x
            return output
        mine = self.first if self.mesh.coord("cfg") == 0 else x
        assert self.first is not None, "the second call of a cfg pair without its first"
        if self.read is not None:
            mine, x = (t[:, t.shape[1] - self.read :] for t in (mine, x))
        assert mine.shape == x.shape, "cfg pair calls of different shapes"
        both = gather_pieces(mine.unsqueeze(0).contiguous(), 0, [1, 1], self.mesh.group("cfg"))
        if self.mesh.coord("cfg") == 1:
            # The pipeline holds this tensor as call 1's result (the tokens it reads of it).
            self.first[:, self.first.shape[1] - both.shape[2] :].copy_(both[0])
        self.first = None
        result = both[1]
        if isinstance(output, tuple):
            return (result, *output[1:])
        output[next(iter(output.keys()))] = result
        return output

    def remove(self) -> None:
        self.registry.remove_hook(_HOOK_NAME)
        self.reset()
