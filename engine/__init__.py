"""shardiff engine: load once, generate many images, each split over all ranks of the job.

    from engine import Engine, EngineConfig, GenerateRequest
    engine = Engine(EngineConfig(model="flux-dev", ulysses=2, ring=2))   # on every rank (torchrun)
    result = engine.generate(GenerateRequest(prompt="a red fox in snow", seed=7))
    if engine.is_first:
        result.image.save("fox.png")
"""

from .runtime.quiet import drop_known_warnings

drop_known_warnings()  # before any diffusers pipeline module is imported

from .config import EngineConfig, GenerateRequest  # noqa: E402
from .driver import Engine, GenerateResult  # noqa: E402

__all__ = ["Engine", "EngineConfig", "GenerateRequest", "GenerateResult"]
