"""Where one request's time and memory go: text encoding, the denoising loop, the VAE decode.

Installed on a built pipeline for a benchmark only: `pipe.encode_prompt` and `pipe.vae.decode` are
wrapped on the instance (the pipeline's own code calls them) and restored by `remove`. Each phase is
timed between device synchronisations, so the phases add up to the request; the denoising loop is what
lies between the text encoding and the decode (denoiser calls, scheduler steps, host work). On CUDA the
peak memory of each phase is read by resetting the allocator's peak at the phase's start.
"""

from __future__ import annotations

import time

import torch

PHASES = ("text", "denoise", "vae")


class PhaseTimer:
    def __init__(self, pipe, device: torch.device):
        self.pipe, self.device = pipe, device
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}
        self._mark = 0.0
        self._restore = []
        self._wrap(pipe, "encode_prompt", "text", before="start")
        self._wrap(pipe.vae, "decode", "vae", before="denoise")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _close(self, phase: str) -> None:
        """End `phase` now: its time since the last mark, its peak; start the next."""
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._mark
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.peak_gib[phase] = max(self.peak_gib.get(phase, 0.0), round(peak, 2))
            torch.cuda.reset_peak_memory_stats(self.device)
        self._mark = now

    def _wrap(self, owner, name: str, phase: str, *, before: str) -> None:
        original = getattr(owner, name)
        had_own = name in vars(owner)

        def timed(*args, **kwargs):
            self._close(before)
            out = original(*args, **kwargs)
            self._close(phase)
            return out

        setattr(owner, name, timed)
        self._restore.append(lambda: setattr(owner, name, original) if had_own else delattr(owner, name))

    def start(self) -> None:
        """Call right before the request: clears the figures of the last one."""
        self.seconds, self.peak_gib = {}, {}
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._mark = time.perf_counter()

    def finish(self) -> dict:
        """Call right after the request: the phases' seconds (post-processing counted in `vae`)."""
        self._close("vae")
        self.seconds.pop("start", None)
        self.peak_gib.pop("start", None)
        return {"seconds": {p: round(self.seconds.get(p, 0.0), 3) for p in PHASES},
                "peak_gib": {p: self.peak_gib.get(p) for p in PHASES} if self.peak_gib else None}

    def remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()


def weight_gib(pipe) -> dict[str, float]:
    """GiB of weights this rank holds per pipeline component (a TP shard counts as what it holds, a
    DTensor as its local part; a component this rank does not load counts 0)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            local = (p.to_local() if isinstance(p, DTensor) else p for p in part.parameters())
            out[name] = round(sum(t.numel() * t.element_size() for t in local) / 2**30, 3)
        elif part is None and name.startswith("text_encoder"):
            out[name] = 0.0
    return out
