"""Rows of NCHW activations split over the ranks that share one image: the split, the halo exchange
and the convolution that sees its neighbours' rows.

Legend: B batch, C channels, H rows (the split dim, -2), W columns; "real frame": row 0 is this
rank's first own row.

A `RowSplit` gives each rank a contiguous run of `units` — the coarsest rows of the network (latent
rows for a decoder; blocks of F image rows for an encoder that downsamples F times) — uneven allowed
(the first ones one longer, as parallel/sharding.py). At every level of the network a rank then holds
`units × m` rows for one m shared by all ranks (m = rows per unit at that level), so each rank knows
every rank's row count from its own and no collective is needed to learn shapes; a stride-2
convolution keeps ownership aligned because every rank starts on a multiple of the stride.

`fetch_rows` brings the rows just above and below this rank's piece from whichever ranks own them
(usually the neighbours; several hops when a neighbour holds fewer rows than the halo), zeros past
the image edges. `RowConv2d` runs the convolution on the local rows exactly as the module would (its
own zero padding included) and then recomputes, in place, only the few output rows whose window
reached past an interior edge, from the halo rows and a handful of local rows — so no full-size
copy of the activation is made (concatenating halos first would copy the largest tensor of a 4096²
decode once per convolution).

Simulated split (`group is None`): one process computes one rank's share of an N-way split (for
per-rank memory measurements at world size 1); halo rows are zeros, so the values are not the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .sharding import gather_pieces


@dataclass(frozen=True)
class RowSplit:
    units: tuple[int, ...]
    """Coarsest rows of each rank, in rank order (every one ≥ 1)."""
    index: int
    """This rank's piece."""
    group: dist.ProcessGroup | None
    """The ranks sharing the image (rank i of the group holds piece i); None: simulated split."""

    def __post_init__(self):
        assert self.units and min(self.units) >= 1 and 0 <= self.index < len(self.units), self

    @property
    def world(self) -> int:
        return len(self.units)

    @property
    def simulated(self) -> bool:
        return self.group is None

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.world - 1

    def rows(self, local_rows: int) -> list[int]:
        """Every rank's rows at the level where this rank holds `local_rows`."""
        per_unit, rest = divmod(local_rows, self.units[self.index])
        assert rest == 0 and per_unit >= 1, f"{local_rows} rows do not fit the row split {self.units}"
        return [u * per_unit for u in self.units]

    def peer(self, i: int) -> int:
        return dist.get_global_rank(self.group, i)


def take_rows(x_BCHW: torch.Tensor, split: RowSplit, rows_per_unit: int) -> torch.Tensor:
    """This rank's rows of a whole tensor whose rows are `rows_per_unit` × the split's units."""
    sizes = [u * rows_per_unit for u in split.units]
    assert sum(sizes) == x_BCHW.shape[-2], (sizes, tuple(x_BCHW.shape))
    return x_BCHW.narrow(-2, sum(sizes[: split.index]), sizes[split.index])


def gather_rows(x_BCHW: torch.Tensor, split: RowSplit) -> torch.Tensor:
    """The whole tensor on every rank of the split (all-gather of the row pieces)."""
    assert not split.simulated
    return gather_pieces(x_BCHW, x_BCHW.ndim - 2, split.rows(x_BCHW.shape[-2]), split.group)


def fetch_rows(
    x_BCHW: torch.Tensor, split: RowSplit, needs: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows just above, rows just below) this rank's piece of the global tensor.

    `needs[q]` = (rows above, rows below) that rank q asks for; every rank passes the same list (it
    follows from the global geometry and the split), so each rank knows what to send to whom. Rows
    outside the image are zeros. Point-to-point with only the ranks that own the rows.
    """
    sizes = split.rows(x_BCHW.shape[-2])
    starts = [sum(sizes[:q]) for q in range(split.world)]
    me, (above, below) = split.index, needs[split.index]
    B, C, _, W = x_BCHW.shape
    top = x_BCHW.new_zeros((B, C, above, W))
    bottom = x_BCHW.new_zeros((B, C, below, W))
    if split.simulated:
        return top, bottom
    a, b = starts[me], starts[me] + sizes[me]
    ops, landing = [], []
    for q in range(split.world):
        if q == me:
            continue
        aq, bq = starts[q], starts[q] + sizes[q]
        # What I need from q: my halo ranges intersected with q's rows.
        for buf, lo, hi in ((top, a - above, a), (bottom, b, b + below)):
            lo2, hi2 = max(lo, aq), min(hi, bq)
            if lo2 < hi2:
                piece = x_BCHW.new_empty((B, C, hi2 - lo2, W))
                ops.append(dist.P2POp(dist.irecv, piece, split.peer(q), split.group))
                landing.append((buf, lo2 - lo, piece))
        # What q needs from me: the same rule seen from q.
        q_above, q_below = needs[q]
        for lo, hi in ((aq - q_above, aq), (bq, bq + q_below)):
            lo2, hi2 = max(lo, a), min(hi, b)
            if lo2 < hi2:
                ops.append(dist.P2POp(dist.isend, x_BCHW[:, :, lo2 - a : hi2 - a].contiguous(), split.peer(q), split.group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for buf, offset, piece in landing:
        buf[:, :, offset : offset + piece.shape[2]] = piece
    return top, bottom


@dataclass(frozen=True)
class _RowGeometry:
    """A convolution along H in the real frame of one rank holding L rows."""

    k: int
    s: int
    pt: int
    """Zero rows above the real rows in the convolution's input (the caller's pre-padding + its own)."""
    pb: int

    def n_out(self, L: int) -> int:
        return (L + self.pt + self.pb - self.k) // self.s + 1

    def needs(self, L: int) -> tuple[int, int]:
        """Rows above / below the real rows that the windows of the owned outputs read."""
        above = self.pt if self.top_wrong() else 0
        below = max(0, (self.n_out(L) - 1) * self.s - self.pt + self.k - L)
        return above, below

    def top_wrong(self) -> int:
        """Outputs whose window starts above row 0 (they read the zero padding at an inner edge)."""
        return -(-self.pt // self.s)

    def bottom_first_wrong(self, L: int) -> int:
        """First output whose window ends below the last real row."""
        return max(0, (L + self.pt - self.k) // self.s + 1)


def row_conv2d(conv: torch.nn.Conv2d, x: torch.Tensor, split: RowSplit, pre_pad: tuple[int, int]) -> torch.Tensor:
    """`conv(x)` for this rank's rows of the image-wide convolution.

    `x` holds this rank's real rows plus `pre_pad` = (top, bottom) zero rows that the calling module
    added itself (diffusers' Downsample2D pads one row below before its padding-0 convolution): on an
    inner edge those rows stand where the neighbour's rows belong, so they count as halo.
    """
    k, s, ph, pw = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.padding[1]
    L = x.shape[-2] - pre_pad[0] - pre_pad[1]
    geo = _RowGeometry(k, s, pre_pad[0] + ph, pre_pad[1] + ph)
    sizes = split.rows(L)
    assert sum(sizes[: split.index]) % s == 0, f"rows {sizes} do not start on multiples of stride {s}"
    needs = [geo.needs(n) for n in sizes]
    if not any(a or b for a, b in needs):
        return conv._conv_forward(x, conv.weight, conv.bias)
    top, bottom = fetch_rows(x[:, :, pre_pad[0] : pre_pad[0] + L], split, needs)
    real = x[:, :, pre_pad[0] : pre_pad[0] + L]
    n_out = geo.n_out(L)
    jt = 0 if split.first else min(n_out, geo.top_wrong())
    jb = n_out if split.last else min(n_out, geo.bottom_first_wrong(L))
    top_end = (jt - 1) * s - geo.pt + k  # real rows the top fix reads
    bottom_start = jb * s - geo.pt  # first real row the bottom fix reads

    def conv_rows(stitched: torch.Tensor) -> torch.Tensor:
        # The stitched rows carry their own H padding (halo or zeros): pad only along W.
        return F.conv2d(stitched, conv.weight, conv.bias, (s, conv.stride[1]), (0, pw), conv.dilation, conv.groups)

    if (jt and top_end > L) or (jb < n_out and bottom_start < 0) or jt > jb:
        # A piece thinner than the kernel: every output row reads a halo, compute them all at once.
        out = conv_rows(torch.cat([top, real, bottom], dim=2))
        assert out.shape[-2] == n_out
        return out
    out = conv._conv_forward(x, conv.weight, conv.bias)
    assert out.shape[-2] == n_out, (tuple(out.shape), n_out)
    if jt:
        out[:, :, :jt] = conv_rows(torch.cat([top, real[:, :, :top_end]], dim=2))
    if jb < n_out:
        out[:, :, jb:] = conv_rows(torch.cat([real[:, :, bottom_start:], bottom], dim=2))
    return out


class RowContext:
    """The split of the call in progress (None: no split, every stand-in behaves as its original).

    Owned by one applied VAE plan and shared by its stand-ins and processors; set by the
    encoder / decoder pre-hook of each call, cleared by its post-hook.
    """

    def __init__(self):
        self.split: RowSplit | None = None


class RowConv2d(torch.nn.Conv2d):
    """An nn.Conv2d stand-in (the same Parameters, so state dicts and dtype casts are unchanged) that
    convolves this rank's rows as the whole image would; without a split, the plain convolution."""

    def __init__(self, conv: torch.nn.Conv2d, rows: RowContext, pre_pad: tuple[int, int] = (0, 0)):
        torch.nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(conv, name))
        self.weight, self.bias = conv.weight, conv.bias
        self.rows, self.pre_pad = rows, pre_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.rows.split
        if split is None:
            return super().forward(x)
        return row_conv2d(self, x, split, self.pre_pad)


def conv_refusal(conv: torch.nn.Conv2d) -> str | None:
    """Why `row_conv2d` cannot run this convolution exactly (None: it can)."""
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding {conv.padding!r}"
    if conv.dilation[0] != 1:
        return f"dilation {conv.dilation}"
    return None


def needs_halo(conv: torch.nn.Conv2d, pre_pad: tuple[int, int] = (0, 0)) -> bool:
    """False for convolutions that read one row per output row (1×1, no padding): nothing to stand in for."""
    return conv.kernel_size[0] > 1 or conv.padding[0] > 0 or conv.stride[0] > 1 or any(pre_pad)
