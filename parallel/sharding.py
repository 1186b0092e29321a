"""Splitting a sequence over the sequence-parallel ranks and gathering it back, uneven lengths included.

A length that the degree does not divide (Flux at 1008² has 3969 image tokens; CLIP text has 77) is
split unevenly — the first `n % parts` pieces get one token more — instead of padded: no masks, no
wasted attention work, and the result is exactly the unsplit computation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


# torch ≥ 2.13 renamed all_gather_into_tensor (dim-0 output) to all_gather_single.
_all_gather_dim0 = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def split_sizes(n: int, parts: int) -> list[int]:
    """Lengths of the `parts` pieces of a length-`n` sequence (first ones one longer when uneven)."""
    assert parts >= 1 and n >= 0
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def take_piece(x: torch.Tensor, dim: int, sizes: list[int], index: int) -> torch.Tensor:
    start = sum(sizes[:index])
    return x.narrow(dim, start, sizes[index])


def gather_pieces(x_local: torch.Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Inverse of take_piece over a group whose rank i holds piece i."""
    if group is None:
        assert len(sizes) == 1
        return x_local
    assert x_local.shape[dim] == sizes[dist.get_rank(group)]
    longest = max(sizes)
    # all_gather_into_tensor wants equal pieces stacked on dim 0: move the sequence to the front and
    # pad the short pieces (at most one row each), then trim.
    x0 = x_local.movedim(dim, 0)
    if x0.shape[0] < longest:
        pad = x0.new_zeros((longest - x0.shape[0], *x0.shape[1:]))
        x0 = torch.cat([x0, pad])
    x0 = x0.contiguous()
    out = x0.new_empty((len(sizes) * longest, *x0.shape[1:]))
    _all_gather_dim0(out, x0, group=group)
    if any(s != longest for s in sizes):
        out = torch.cat([out[i * longest : i * longest + s] for i, s in enumerate(sizes)])
    return out.movedim(0, dim)


def map_first(output, fn):
    """`output` with `fn` applied to its first entry: a model's output is a tensor, a tuple, or diffusers'
    BaseOutput (an ordered dict whose first entry is the sample)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    key = next(iter(output.keys()))
    output[key] = fn(output[key])
    return output
