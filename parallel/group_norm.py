"""GroupNorm over rows split across ranks, with the statistics of the whole image.

Legend: B batch, C channels, G groups, N elements of one (sample, group) on this rank.

Each rank reduces its own elements to (count, mean, M2 = Σ(x − mean)²) per (sample, group) in
fp32 — computed a few groups at a time, so a bf16 activation is never copied to fp32 whole — and
the ranks all-gather these few numbers (fp64) and merge them with Chan et al.'s pairwise formula
M2 = Σ M2_i + Σ n_i (mean_i − mean)². That is the two-pass variance of the whole image, not
E[x²] − E[x]², which loses every digit when the mean is large against the spread. The normalisation
itself is one fused kernel (batch_norm in inference form with per-(sample, channel) statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .halo import RowContext, RowSplit
from .sharding import gather_pieces

# fp32 elements converted at once while reducing (256 MiB): bounds the temporary of a bf16 input.
_CHUNK_ELEMENTS = 2**26


def local_moments(x_BGN: torch.Tensor) -> torch.Tensor:
    """(3, B, G) float64: count, mean, M2 of each (sample, group) of this rank's elements."""
    B, G, N = x_BGN.shape
    mean = torch.empty((B, G), dtype=torch.float32, device=x_BGN.device)
    m2 = torch.empty_like(mean)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * N))
    for g in range(0, G, step):
        var_c, mean_c = torch.var_mean(x_BGN[:, g : g + step].float(), dim=-1, correction=0)
        mean[:, g : g + step], m2[:, g : g + step] = mean_c, var_c * N
    count = torch.full_like(mean, float(N))
    return torch.stack([count, mean, m2]).double()


def merge_moments(m_P3BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) (B, G) of the union of P disjoint parts given their (count, mean, M2)."""
    n, mean, m2 = m_P3BG.unbind(1)
    total = n.sum(0)
    mu = (n * mean).sum(0) / total
    return mu, (m2.sum(0) + (n * (mean - mu) ** 2).sum(0)) / total


def global_moments(x_BGN: torch.Tensor, split: RowSplit) -> tuple[torch.Tensor, torch.Tensor]:
    local = local_moments(x_BGN)
    if split.simulated:
        # One process standing in for one rank: its own elements only (the cost is the same).
        return merge_moments(local[None])
    everyone = gather_pieces(local[None], 0, [1] * split.world, split.group)
    return merge_moments(everyone)


def row_group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor, split: RowSplit) -> torch.Tensor:
    B, C = x.shape[:2]
    G = norm.num_groups
    mean_BG, var_BG = global_moments(x.reshape(B, G, -1), split)
    per_channel = C // G
    mean_c = mean_BG.float().repeat_interleave(per_channel, dim=1).reshape(B * C)
    var_c = var_BG.float().repeat_interleave(per_channel, dim=1).reshape(B * C)
    weight = bias = None
    if norm.affine:
        weight, bias = norm.weight.float().repeat(B), norm.bias.float().repeat(B)
    # (1, B·C, N): each (sample, channel) a batch_norm channel with its group's statistics.
    out = F.batch_norm(x.reshape(1, B * C, -1), mean_c, var_c, weight, bias, False, 0.0, norm.eps)
    return out.reshape(x.shape)


class RowGroupNorm(torch.nn.GroupNorm):
    """An nn.GroupNorm stand-in (the same Parameters) that normalises with the whole image's statistics."""

    def __init__(self, norm: torch.nn.GroupNorm, rows: RowContext):
        torch.nn.Module.__init__(self)
        self.num_groups, self.num_channels, self.eps, self.affine = norm.num_groups, norm.num_channels, norm.eps, norm.affine
        self.weight, self.bias = norm.weight, norm.bias
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.rows.split
        if split is None:
            return super().forward(x)
        return row_group_norm(self, x, split)
