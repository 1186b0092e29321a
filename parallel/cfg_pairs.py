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

Skipping a forward uses diffusers' own hook registry (`new_forward`, as its caching hooks do); the
split/gather hooks of the plan see `SeqContext.skip` and stay out of the way.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .sharding import gather_pieces

_HOOK_NAME = "shardiff_cfg_pairs"


class _SkipHook(ModelHook):
    """Runs the model's forward only on calls this rank owns."""

    def __init__(self, pairs: "CfgPairs"):
        super().__init__()
        self.pairs = pairs

    def new_forward(self, module, *args, **kwargs):
        if not self.pairs.ctx.skip:
            return self.fn_ref.original_forward(*args, **kwargs)
        out = torch.empty_like(self.pairs.like)
        return Transformer2DModelOutput(sample=out) if self.pairs.return_dict else (out,)


class CfgPairs:
    """State of one parallelized model's (call 1, call 2) pairs; removed with the plan."""

    def __init__(self, model: torch.nn.Module, ctx):
        self.model = model
        self.ctx = ctx
        self.sig = inspect.signature(model.forward)
        self.call = 0  # index of the next call within its pair
        self.first: torch.Tensor | None = None  # call 1's output (rank 0) or placeholder (rank 1)
        self.like: torch.Tensor | None = None
        self.return_dict = True
        self.registry = HookRegistry.check_if_exists_or_initialize(model)
        self.registry.register_hook(_SkipHook(self), _HOOK_NAME)
        self._pre = model.register_forward_pre_hook(self.pre_hook, with_kwargs=True, prepend=True)

    def reset(self) -> None:
        """Forget a half-finished pair (a pipeline call that failed between the two calls)."""
        self.call, self.first, self.ctx.skip = 0, None, False

    def pre_hook(self, module, args, kwargs):
        bound = self.sig.bind_partial(*args, **kwargs)
        self.ctx.skip = self.call != self.ctx.mesh.coord("cfg")
        if self.ctx.skip:
            # The output of these models has the shape of their latent input.
            self.like = bound.arguments["hidden_states"]
            self.return_dict = bound.arguments.get("return_dict", True)
        return None

    def post_hook(self, module, args, output):
        k, self.call = self.call, 1 - self.call
        self.ctx.skip = False
        x = output[0] if isinstance(output, tuple) else next(iter(output.values()))
        if k == 0:
            self.first = x
            return output
        mine = self.first if self.ctx.mesh.coord("cfg") == 0 else x
        assert self.first is not None and mine.shape == x.shape, "cfg pair calls of different shapes"
        both = gather_pieces(mine.unsqueeze(0).contiguous(), 0, [1, 1], self.ctx.mesh.group("cfg"))
        if self.ctx.mesh.coord("cfg") == 1:
            self.first.copy_(both[0])  # the pipeline holds this tensor as call 1's result
        self.first = None
        result = both[1]
        if isinstance(output, tuple):
            return (result, *output[1:])
        output[next(iter(output.keys()))] = result
        return output

    def remove(self) -> None:
        self._pre.remove()
        self.registry.remove_hook(_HOOK_NAME)
        self.reset()
