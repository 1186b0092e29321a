"""Building and saving a whole pipeline from a preset spec, shared by the DiT and UNet spec classes.

A spec provides `pipeline_class`, `extra` (pipeline kwargs), `model_components` (names of the
models with random weights), `build_component`, `empty_model` and `other_components` (scheduler,
tokenizers); this mixin turns those into a pipeline or a diffusers directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class BuildsPipeline:
    def build_pipeline(self, *, dtype: torch.dtype, device, seed: int = 0, with_text_encoders: bool = True,
                       components: dict[str, Any] | None = None):
        import diffusers

        components = components or {}  # prebuilt, used as given (a tensor-parallel shard of the denoiser)
        names = [n for n in self.model_components
                 if (with_text_encoders or not n.startswith("text_encoder")) and n not in components]
        parts = {n: self.build_component(n, dtype=dtype, device=device, seed=seed) for n in names} | components
        for n in self.model_components:
            parts.setdefault(n, None)
        parts |= self.other_components(with_text_encoders=with_text_encoders)
        return getattr(diffusers, self.pipeline_class)(**parts, **self.extra)

    def save(self, path: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
        """A normal diffusers directory, one component in memory at a time (as engine.presets.save_preset)."""
        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        others = self.other_components(with_text_encoders=True)
        empty = getattr(diffusers, self.pipeline_class)(
            **others, **{n: self.empty_model(n) for n in self.model_components}, **self.extra
        )
        empty.save_config(path)
        del empty
        for name, part in others.items():
            part.save_pretrained(path / name)
        for name in self.model_components:
            model = self.build_component(name, dtype=dtype, device="cpu", seed=seed)
            model.save_pretrained(path / name, safe_serialization=True)
            del model
        return path
