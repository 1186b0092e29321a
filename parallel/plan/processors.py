"""The attention part of a plan: which attention modules get which processor.

Processors are set through diffusers' own `set_processor` API (no forked model code) on every process,
one included, and the modules' own processors are put back on `remove`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..attention import ParallelAttention
from .context import Installed, SeqContext

ProcessorFactory = Callable[[SeqContext, ParallelAttention], object]
"""(the plan's shared context, the mesh's parallel attention) → an attention processor."""


@dataclass(frozen=True)
class Processors:
    """Module-name glob (`*` crosses dots) → factory of the processor installed on matching modules
    (the first glob a module matches)."""

    globs: Mapping[str, ProcessorFactory]

    def install(self, model: torch.nn.Module, ctx: SeqContext, attention: ParallelAttention, parts) -> Installed:
        return SetProcessors(model, model.named_modules(), self.globs, lambda factory: factory(ctx, attention))


class SetProcessors(Installed):
    """Processors made by `make(factory)` on the modules among `modules` that match a glob."""

    def __init__(self, model: torch.nn.Module, modules: Iterable[tuple[str, torch.nn.Module]],
                 globs: Mapping[str, Callable], make: Callable[[Callable], object]):
        super().__init__()
        self.model = model
        self.old: dict[str, object] = {}
        """Module name → its processor before."""
        for name, module in modules:
            for pattern, factory in globs.items():
                if fnmatch.fnmatchcase(name, pattern):
                    self.old[name] = module.processor
                    module.set_processor(make(factory))
                    break
        assert self.old or not globs, f"plan matched no attention module in {type(model).__name__}"

    def remove(self) -> None:
        for name, proc in self.old.items():
            self.model.get_submodule(name).set_processor(proc)
        self.old.clear()
