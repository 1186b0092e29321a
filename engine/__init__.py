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

__all__ = ["Engine", "EngineConfig", "GenerateRequest", "GenerateResult"]


def __getattr__(name: str):
    # The engine (torch.distributed, diffusers, the model families) is imported when first asked for, so
    # that `engine.config` — the dataclasses, their checks, the CLI's flags — stays import-light.
    if name in ("Engine", "GenerateResult"):
        from . import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
