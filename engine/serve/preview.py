"""Partial images of a streamed request, made on the ranks at agreed steps.

Which steps: `preview_steps(total, count)` — `count` evenly spaced steps of the pipeline call's
`total` denoising steps (its `num_timesteps`: with img2img strength, the steps it really runs), never
the last (the final image follows it). Every rank computes the same steps from the same request, so
where the VAE decode is split over the ranks of the image (a collective) all of them decode together.

What is shown: the clean image the model predicts at that step, not the noisy latents. For the flow-
matching schedulers (Flux, SD3, Qwen-Image, Sana, Lumina2, Z-Image, FLUX.2) one Euler step is
x' = x + (σ' − σ)·v, so the prediction x₀ = x' − σ'·v follows from the latents before and after the
step; other schedulers show the current latents. The latents are then decoded by the model's own VAE
— at half their side from 32 latent rows and columns up (a quarter of the decode's work; the preview
is scaled back to the image's size) — and encoded as the final image is (docs/SERVING.md: what it
adds). Latent layouts decoded: 4-D (B, C, h, w) and Flux's packed
tokens (its pipelines' `_unpack_latents`); a family with another layout streams no partial images,
only the final one.

Only the first pipeline call of the job's first dp slice previews: partial images are of image 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .encode import Encoding, b64_image

POOL_FROM = 16
"""Latents of at least 2 × this many rows and columns are decoded at half their side (previews only)."""


@dataclass(frozen=True)
class Previews:
    count: int
    """Partial images wanted (1–3)."""
    encoding: Encoding


def preview_steps(total: int, count: int) -> list[int]:
    """0-based steps after which a partial image is made: evenly spaced, before the last step."""
    steps = {round((k + 1) * total / (count + 1)) - 1 for k in range(count)}
    return sorted(s for s in steps if 0 <= s < total - 1)


class StepHook:
    """The worker's per-step callback: the agreed stop (engine/runtime/stop.py), then the previews."""

    takes_latents = True

    def __init__(self, stop, previews: Previews | None, *, send, decodes, sends: bool, size: tuple[int, int] = (0, 0)):
        """`send(index, b64)`: hands a partial image to the controller (the first rank only: `sends`).
        `decodes()`: whether this rank decodes the previews, asked once the layout is set (the first
        rank; every rank of the first slice when the VAE decode is split, a collective)."""
        self.stop, self.previews, self.send = stop, previews, send
        self.height, self.width = size
        self.decodes, self.sends = decodes if previews is not None else None, sends
        self.calls = 0
        self.steps: list[int] = []
        self.previous: torch.Tensor | None = None
        self.sent = 0

    def __call__(self, step: int, pipeline=None, latents=None) -> None:
        self.stop(step)
        if self.decodes is None or latents is None:
            return
        if step == 0:
            self.calls += 1
            if self.calls == 1 and self.decodes():
                total = getattr(pipeline, "num_timesteps", None) or 0
                self.steps = preview_steps(int(total), self.previews.count)
        if self.calls != 1 or not self.steps:
            return
        if step + 1 in self.steps:
            self.previous = latents.detach().clone()
        if step in self.steps:
            image = predicted_image(pipeline, latents, self.previous, self.height, self.width)
            self.previous = None
            if image is not None and self.sends:
                self.send(self.sent, b64_image(image, {}, self.previews.encoding))
            self.sent += 1


def predicted_image(pipeline, latents: torch.Tensor, previous: torch.Tensor | None, height: int, width: int):
    """The PIL image the model predicts from `latents` (and the latents one step before), or None where
    the latent layout is not one decoded here."""
    x = latents[:1]
    scheduler = pipeline.scheduler
    index = getattr(scheduler, "step_index", None)
    if previous is not None and "FlowMatch" in type(scheduler).__name__ and index is not None and index >= 1:
        sigma, sigma_next = (float(scheduler.sigmas[i]) for i in (index - 1, index))
        if sigma_next != sigma:
            v = (x - previous[:1]) / (sigma_next - sigma)
            x = x - sigma_next * v
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        return None
    if x.ndim == 3:
        unpack = getattr(pipeline, "_unpack_latents", None)
        if unpack is None:
            return None
        try:
            x = unpack(x, height, width, pipeline.vae_scale_factor)
        except (RuntimeError, TypeError, ValueError):  # another packing (Kontext's resized reference)
            return None
    if x.ndim != 4:
        return None
    if min(x.shape[-2:]) >= 2 * POOL_FROM:
        # Half the latent side: a quarter of the VAE's work, the preview drawn at half size and scaled up.
        x = torch.nn.functional.avg_pool2d(x, 2)
    config = vae.config
    x = x / getattr(config, "scaling_factor", 1.0) + (getattr(config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        decoded = vae.decode(x.to(vae.dtype), return_dict=False)[0]
    image = pipeline.image_processor.postprocess(decoded.float(), output_type="pil")[0]
    return image if image.size == (width, height) or not width else image.resize((width, height), Image.BILINEAR)
