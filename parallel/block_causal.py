"""Block-causal attention over pieces of one sequence (Qwen-Image 2.1), and the prefix keys / values a
rank keeps across denoising steps.

Legend: B batch, H heads, Sq queries of this rank, Sk keys of one block, D head dim.

The rule is diffusers' `(q >= k) or same_image_block`, given as runs of the sequence's prefix
(`BlockCausal.segments`, whole-sequence positions): a query in a causal run (text) attends the keys up
to itself, a query in a bidirectional run (a condition image) the keys up to its run's end, a query
after the prefix (the target image) every key. Keys are never attended past that bound, so no future
run leaks into the past.

`attend_block` computes the exact softmax partial — output and log-sum-exp — of a contiguous range of
queries over a contiguous block of keys, wherever both sit in the sequence: per query run one kernel
call over the keys the whole run may see (a prefix of the block), and for a causal run the triangle over
its own keys in plain torch (text runs are short). The parts merge by their log-sum-exps, so Ulysses
(every query of its heads over the whole sequence: one block) and Ring (its queries over each ring
rank's block in turn, parallel/ring.py) give the single-process result; a block no query may see is
skipped (lse -inf).

Prefix caching: the prefix's activations do not depend on the step (Qwen-Image 2.1's causal_condition),
so its keys and values are computed once. Each rank keeps what it attends over (`PrefixKV`): after
Ulysses' exchange, its K/V heads of its ring chunk of the prefix; cached steps attend the target's
queries over [every ring chunk of the prefix, the target's keys], with no mask. FLUX.2-klein-KV's
reference tokens are kept the same way (`keep_rows`: they sit in runs, not as a prefix; parallel/references.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import merge_partial_masked


@dataclass(frozen=True)
class BlockCausal:
    segments: tuple[tuple[int, int, bool], ...]
    """(start, end, causal) runs of the prefix, contiguous from 0; the target follows the last."""

    def __post_init__(self):
        ends = [0] + [e for _, e, _ in self.segments]
        assert all(s == ends[i] and e > s for i, (s, e, _) in enumerate(self.segments)), self.segments

    @property
    def prefix(self) -> int:
        return self.segments[-1][1] if self.segments else 0

    def runs(self, length: int) -> list[tuple[int, int, bool, int]]:
        """(start, end, causal, keys_end) of each run of a sequence of `length` tokens, the target last:
        non-causal queries of a run attend the keys before keys_end."""
        out = [(s, e, c, s if c else e) for s, e, c in self.segments]
        if length > self.prefix:
            out.append((self.prefix, length, False, length))
        return out


class PrefixKV:
    """The prefix's keys and values this rank attends over in cached steps, kept in the prefill."""

    def __init__(self):
        self.k_BHSD: torch.Tensor | None = None
        self.v_BHSD: torch.Tensor | None = None
        self.ring_sizes: list[int] = []
        """Prefix tokens of each ring rank's chunk (what each ring block adds in cached steps)."""

    def keep(self, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, ring_sizes: list[int], ring_rank: int) -> None:
        """Keep the first ring_sizes[ring_rank] keys of this rank's block (its chunk of the prefix); a copy,
        so the prefill's whole K/V is freed."""
        n = ring_sizes[ring_rank]
        self.k_BHSD, self.v_BHSD = k_BHSD[:, :, :n].clone(), v_BHSD[:, :, :n].clone()
        self.ring_sizes = list(ring_sizes)

    def keep_rows(self, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, rows: torch.Tensor, ring_sizes: list[int]) -> None:
        """Keep the keys at `rows` of this rank's block (a copy), ring_sizes[j] of them on ring rank j: reference
        tokens, wherever they sit (parallel/references.py)."""
        self.k_BHSD, self.v_BHSD = k_BHSD.index_select(2, rows), v_BHSD.index_select(2, rows)
        self.ring_sizes = list(ring_sizes)

    def extend(self, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_BHSD is None:
            raise ValueError("cached attention before the prefill kept its prefix (kv_cache_mode 'extract' first)")
        return torch.cat([self.k_BHSD, k_BHSD], dim=2), torch.cat([self.v_BHSD, v_BHSD], dim=2)


def _causal_triangle(q_BHSD, k_BHSD, v_BHSD, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float):
    """(out, lse) in float32 of queries over keys with k_pos <= q_pos (plain torch; -inf lse, zero out
    for a query with no such key)."""
    scores = torch.matmul(q_BHSD.float(), k_BHSD.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    return torch.matmul(p, v_BHSD.float()), lse


def attend_block(kernel, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, *, q_start: int,
                 k_start: int, causal: BlockCausal, length: int, scale: float | None):
    """(out float32, lse) of the queries at [q_start, q_start + Sq) over the keys at [k_start, k_start + Sk)
    of a sequence of `length` tokens, by the block-causal rule; None if no query may see any of them."""
    B, H, Sq, D = q_BHSD.shape
    Sk = k_BHSD.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, Sq, D, dtype=torch.float32, device=q_BHSD.device)
    lse = torch.full((B, H, Sq), float("-inf"), device=q_BHSD.device)
    seen = False
    for start, end, is_causal, keys_end in causal.runs(length):
        lo, hi = max(start, q_start) - q_start, min(end, q_start + Sq) - q_start
        if lo >= hi:
            continue
        rows = slice(lo, hi)
        n = min(max(keys_end - k_start, 0), Sk)  # the block's keys every query of the run sees
        if n:
            o, m = kernel(q_BHSD[:, :, rows], k_BHSD[:, :, :n], v_BHSD[:, :, :n], scale=scale, return_lse=True)
            out[:, :, rows], lse[:, :, rows] = merge_partial_masked(out[:, :, rows], lse[:, :, rows], o, m)
            seen = True
        if is_causal:  # its own keys, up to each query
            k_lo, k_hi = max(start, k_start) - k_start, min(end, k_start + Sk) - k_start
            if k_lo < k_hi:
                q_pos = torch.arange(lo, hi, device=q_BHSD.device) + q_start
                k_pos = torch.arange(k_lo, k_hi, device=q_BHSD.device) + k_start
                o, m = _causal_triangle(q_BHSD[:, :, rows], k_BHSD[:, :, k_lo:k_hi], v_BHSD[:, :, k_lo:k_hi], q_pos,
                                        k_pos, scale)
                out[:, :, rows], lse[:, :, rows] = merge_partial_masked(out[:, :, rows], lse[:, :, rows], o, m)
                seen = True
    return (out, lse) if seen else None
