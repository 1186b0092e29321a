"""Flux's classifier-free guidance as far as --cfg is concerned.

FluxPipeline's true CFG (a negative prompt and true_cfg_scale > 1) calls the transformer twice per
step, prompt then negative prompt, and combines the two predictions after the second call: the
engine runs those two calls on the two cfg ranks at once (Family.cfg_pairs, parallel/cfg_pairs.py).
Flux-dev's embedded `guidance_scale` is not CFG (one call), so it does not count.
"""

from __future__ import annotations


def flux_uses_cfg(kwargs: dict) -> bool:
    has_negative = kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None
    return kwargs.get("true_cfg_scale", 1.0) > 1 and has_negative
