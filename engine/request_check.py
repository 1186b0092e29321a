"""Checking a request against the world it will run in: the model, the layout, its input images, memory.

One check per request on every path, whose result is carried instead of checked again:
- the CLI (engine/generate.py) and the Python API (`Engine.generate` / `generate_batch`) check each
  request once per rank (`Engine.check_batch`) and hand the `CheckedBatch` to the generation;
- the server's controller checks each request once when it admits it (`check_requests`, against a
  `Target`: the engine's attributes without the engine), before any rank sees it.

`check_request` reads the input images (engine/inputs.py) and keeps them, decoded, in the
`CheckedRequest` with their records (pixel hashes for the PNG metadata and the ranks' agreement), chooses
the pipeline form (engine/pipelines.py), then checks what the model and the layout ask of the request:
true CFG needs a negative prompt, the family's own refusals, CFG-parallel needs guidance, even TP token
pieces, the VAE's row split, and memory — a size whose tensors cannot fit is refused here with its count
(engine/validation.needed_bytes), not by an allocator traceback on every rank. The request's own fields
were checked when it was built (engine/validation.check_fields). No collective; one-line ValueErrors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.tensor_seq import check_token_split

from .validation import needed_bytes, resolve_size
from .vae_parallel import check_vae_rows


@dataclass(frozen=True)
class CheckedRequest:
    """A request, checked for one layout, with everything its pipeline call needs but steps and generator."""

    request: object
    """The GenerateRequest."""
    call: object
    """The PreparedCall (engine/pipelines.py): the pipeline class chosen, its arguments with the decoded
    input images, the size, the branch count and the input images' records."""

    @property
    def spec(self):
        return self.call.spec

    @property
    def kwargs(self) -> dict:
        return self.call.kwargs

    @property
    def height(self) -> int:
        return self.call.height

    @property
    def width(self) -> int:
        return self.call.width

    @property
    def records(self) -> dict:
        return self.call.records

    def agreed_form(self) -> dict:
        """What the ranks compare: the request, and its input images by their pixel hashes."""
        return {**self.request.to_dict(), "inputs": self.records}


@dataclass(frozen=True)
class CheckedBatch:
    """Requests checked for the layout chosen for them together (engine/data_parallel.choose_layout)."""

    layout: ParallelConfig
    why: str
    """Why that layout, for the layout line."""
    requests: tuple[CheckedRequest, ...]


@dataclass(frozen=True)
class Target:
    """What a batch of requests is checked against, without the engine: the attributes of an Engine
    that engine/data_parallel.choose_layout reads, and the memory one rank has for activations."""

    info: object
    """ModelInfo (engine/loading/model.py)."""
    family: object
    """Family (engine.models.family)."""
    config: object
    """EngineConfig."""
    parallel: ParallelConfig
    """The layout the engine was built on (what every rank reports once loaded)."""
    explicit_layout: bool = False
    tp_note: str = ""
    memory_bytes: int | None = None
    """Bytes one rank can still allocate (the smallest over the ranks); None: not checked."""
    dtype: torch.dtype = torch.float32
    """The precision the ranks run in (what they report once loaded)."""


def check_request(request, info, family, layout: ParallelConfig, *, dtype: torch.dtype = torch.float32,
                  memory_bytes: int | None = None, vae_parallel: str = "auto", controlnets: int = 0) -> CheckedRequest:
    """`request` on `family`'s model `info`, run on `layout`; ValueError (one line), no collective.

    `memory_bytes`: what one rank can still allocate (`available_bytes`); None skips the memory check.
    `vae_parallel`: the engine's --vae-parallel (`on` needs a latent row per rank of the image).
    `controlnets`: the ControlNets the engine holds (the request then runs the ControlNet form).
    """
    from .pipelines import prepare_call

    if request.negative_prompt is None and request.true_cfg_scale > 1:
        raise ValueError("--true-cfg-scale > 1 needs a --negative-prompt")
    # The pipeline class the request selects (img2img, inpainting, PAG, …), its arguments, its images read.
    call = prepare_call(request, info, family, lambda r, default: resolve_size(r, info, default),
                        controlnets=controlnets)
    family_kwargs, height, width = call.kwargs, call.height, call.width
    family.check_cfg(layout.degrees(), family_kwargs, info, call.branches)
    family.check_size(info, layout, height, width)
    check_vae_rows(vae_parallel, info, layout.world_size // layout.dp, height)
    if layout.tp_sequence and family.token_counts is not None:
        # Even TP pieces of every sp piece, checked here so that the mistake is reported once, up front.
        counts = family.token_counts(info, family_kwargs, height, width)
        check_token_split(counts, sp=layout.sp, tp=layout.tp)
    if memory_bytes is not None:
        need, what = needed_bytes(request, info, family, family_kwargs, layout, height, width, dtype)
        if need > memory_bytes:
            raise ValueError(
                f"--height {height} --width {width} needs at least {need / 2**30:.1f} GiB on each rank ({what}), "
                f"more than the {memory_bytes / 2**30:.1f} GiB it can allocate; use a smaller size"
                + (" or more ranks (--ulysses/--ring split the tokens)" if "denoiser" in what else "")
            )
    return CheckedRequest(request, call)


def check_requests(requests: list, target) -> CheckedBatch:
    """A batch checked against `target` (the server's controller, which has no engine): the layout the
    engine's generate_batch will use for it, and every request on it — decided before any rank is involved."""
    from engine.data_parallel import choose_layout

    layout, why = choose_layout(target, requests)
    checked = tuple(check_request(r, target.info, target.family, layout, dtype=target.dtype,
                                  memory_bytes=target.memory_bytes, vae_parallel=target.config.vae_parallel,
                                  controlnets=len(target.config.controlnets))
                    for r in requests)
    return CheckedBatch(layout, why, checked)


def available_bytes(device: torch.device, local_ranks: int = 1) -> int:
    """What one rank can still allocate: on a GPU, its free memory plus what PyTorch's allocator holds
    unused; on the CPU, the machine's available RAM shared by the `local_ranks` processes on it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return _cpu_available() // max(1, local_ranks)


def _cpu_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
