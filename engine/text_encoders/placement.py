"""Where the text encoders live: `--text-encoders replicated|first|sharded|auto`, decided before loading.

- replicated: every rank holds and runs every text encoder (diffusers' own path).
- first: the first rank of each image's ranks holds them and encodes; the embeddings are broadcast to
  the other ranks of that image, which never load a text encoder. One encoding rank per image, not
  per node: the embeddings are a few MB (T5-XXL, 512 tokens: 4 MiB in bf16), far less than what the
  denoiser exchanges per step, and every extra copy costs a whole encoder of GPU memory.
- sharded: each text encoder is split over the ranks of the image (tensor parallel, its heads and MLP
  columns; engine/text_encoders/plans.py): each rank holds 1/N of the split weights. An encoder whose
  heads N does not divide splits over the largest divisor of N that does (copies beside each other).
- auto: replicated where everything fits a GPU (always on CPU, and for the small models), sharded
  where the replicated encoders would not fit beside the denoiser. `first` is never chosen by memory:
  its encoding rank holds as much as a replicated one; it frees the other ranks.

"The ranks of the image" are those that draw the same image: all ranks with one data-parallel
coordinate (cfg × ring × ulysses × tp). With --dp D each of the D groups has its own encoding rank or
its own sharded copy, since they encode different prompts. Models whose layout follows the batch (the
UNets' CFG split or data parallel, chosen per request) regroup their ranks between requests, so
`first` / `sharded` need their layout fixed (--parallel cfg|dp, --cfg, --dp).

Counted from configs only (meta-device models), as `--tp auto` counts the denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.loading.model import resolve_model

from .components import counting_model, text_encoder_classes
from .names import check_placement
from .plans import describe_split, local_numel, numel, plan_of, shard_degree

GiB = 2**30


@dataclass(frozen=True)
class TextPlan:
    """The resolved placement of one model's text encoders on one layout."""

    placement: str
    """replicated, first or sharded (auto resolved)."""
    ranks: int
    """Ranks sharing one image: the encoding group of `first`, the split of `sharded`."""
    classes: dict[str, str] = field(default_factory=dict)
    """Component → transformers class."""
    degrees: dict[str, int] = field(default_factory=dict)
    """Component → ranks it is split over (sharded; 1: whole on every rank)."""
    full_bytes: dict[str, int] = field(default_factory=dict)
    """Component → bytes of the whole encoder."""
    local_bytes: dict[str, int] = field(default_factory=dict)
    """Component → bytes the rank holding the most holds."""
    reason: str = ""
    """Why auto chose this (empty when asked for)."""

    @property
    def bytes_per_rank(self) -> int:
        """Text-encoder bytes on the rank holding the most (the encoding rank, for `first`)."""
        return sum(self.local_bytes.values())

    @property
    def replicated_bytes(self) -> int:
        return sum(self.full_bytes.values())

    def rank_bytes(self, image_rank: int) -> int:
        """Bytes held by the rank with index `image_rank` among the ranks of its image."""
        return 0 if self.placement == "first" and image_rank > 0 else self.bytes_per_rank

    def describe(self) -> str:
        """One phrase for the layout line."""
        if not self.classes:
            return "no text encoders"
        gib = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.2f} MiB"  # noqa: E731
        if self.placement == "replicated":
            text = f"text encoders replicated ({gib(self.bytes_per_rank)} per rank)"
        elif self.placement == "first":
            text = (f"text encoders on the first rank of each image, embeddings broadcast ({gib(self.bytes_per_rank)} "
                    f"there, 0 on the {self.ranks - 1} other rank(s))")
        else:
            parts = ", ".join(f"{n} ({self.classes[n]}) {describe_split(self.ranks, d)}" for n, d in self.degrees.items())
            text = (f"text encoders sharded over {self.ranks} ranks: {parts}; {gib(self.bytes_per_rank)} per rank "
                    f"instead of {gib(self.replicated_bytes)}")
        return text + (f"; {self.reason}" if self.reason else "")


def _counted(model, placement: str, ranks: int, dtype: torch.dtype, *, strict: bool, reason: str = "") -> TextPlan:
    classes = text_encoder_classes(model)
    degrees, full, local = {}, {}, {}
    for name, cls in classes.items():
        empty = counting_model(model, name)
        full[name] = numel(empty) * dtype.itemsize
        degree = 1
        if placement == "sharded":
            plan = plan_of(empty)
            if plan is None and strict:
                raise ValueError(f"--text-encoders sharded: {name} ({cls}) has no tensor-parallel plan (neither "
                                 f"shardiff's nor transformers'); use --text-encoders first or replicated")
            degree = shard_degree(empty, plan, ranks) if plan else 1
            local[name] = local_numel(empty, plan, degree) * dtype.itemsize
        else:
            local[name] = full[name]
        degrees[name] = degree
    return TextPlan(placement=placement, ranks=ranks, classes=classes, degrees=degrees, full_bytes=full,
                    local_bytes=local, reason=reason)


def plan_text_encoders(model, placement: str, *, ranks: int, dtype: torch.dtype, room: float | None = None,
                       layout_varies: bool = False) -> TextPlan:
    """The placement of `model`'s (a name, or its description: engine/loading/model.py) text encoders over
    `ranks` ranks per image (ValueError, no collective).

    `room`: bytes one rank has for text encoders beside everything else (None: unknown, as on CPU —
    auto then keeps them replicated). `layout_varies`: the model regroups its ranks per request.
    """
    check_placement(placement)
    model = resolve_model(model)
    if not text_encoder_classes(model) or ranks == 1:
        why = "" if placement in ("auto", "replicated") or not text_encoder_classes(model) else \
            f"--text-encoders {placement} on one rank per image is replicated"
        return _counted(model, "replicated", ranks, dtype, strict=False, reason=why)
    if placement in ("first", "sharded") and layout_varies:
        raise ValueError(
            f"--text-encoders {placement} keeps the text encoders on fixed groups of ranks, but this model chooses "
            "CFG split or data parallel per request (its ranks regroup); fix the layout (--parallel cfg, --parallel "
            "dp, --cfg or --dp) or use --text-encoders replicated"
        )
    if placement != "auto":
        return _counted(model, placement, ranks, dtype, strict=True)
    replicated = _counted(model, "replicated", ranks, dtype, strict=False)
    if room is None or layout_varies or replicated.bytes_per_rank <= room:
        return replicated
    sharded = _counted(model, "sharded", ranks, dtype, strict=False)
    if sharded.bytes_per_rank >= replicated.bytes_per_rank:
        return replicated
    return _counted(model, "sharded", ranks, dtype, strict=False, reason=(
        f"auto: {replicated.bytes_per_rank / GiB:.2f} GiB of replicated text encoders do not fit the "
        f"{max(room, 0) / GiB:.2f} GiB left beside the other weights"))
