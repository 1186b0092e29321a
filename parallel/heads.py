"""How the ranks of a Ulysses group share a layer's attention heads: evenly or not, grouped-query or not.

Legend: Hq query heads, Hkv key/value heads (Hq = n_rep · Hkv; n_rep 1 is plain multi-head
attention), U Ulysses ranks, f the repeat factor of the K/V heads before the exchange.

Every rank gets a contiguous block of query heads and the key/value heads those queries read
(query head j reads K/V head j // n_rep, as diffusers' repeat does), so each rank's attention is
the unsplit attention of its heads: exact. When U divides the heads the blocks are equal; when it
does not (SD3.5-large's 38 on 4, Z-Image's 30 on 4 or 8), the first ranks hold one block more, as
uneven sequence pieces do, and the all-to-all carries per-rank head counts (parallel/ulysses.py).

Grouped-query attention (Lumina2: 24 query / 8 K/V heads) splits over the K/V heads while U
allows: each rank gets Hkv/U K/V heads and their n_rep query heads, and the exchange moves only
Hkv of K and V, not Hq. Where the degree exceeds the K/V heads (8 on 16 ranks), or splitting them
would leave the query heads badly unbalanced, every K/V head is first repeated f times (f divides
n_rep) — f = n_rep is plain multi-head attention. The f chosen is the one whose busiest rank holds
the fewest query heads (the step waits for that rank); ties go to no idle rank, then to the least
K/V traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sharding import split_sizes


@dataclass(frozen=True)
class HeadSplit:
    kv_repeat: int
    """f: each K/V head is repeated this many times before the exchange (1: none)."""
    q: tuple[int, ...]
    """Query heads held by each Ulysses rank (contiguous blocks, in rank order)."""
    kv: tuple[int, ...]
    """K/V heads (after the repeat) held by each rank; q[u] = kv[u] · n_rep / f."""

    @property
    def even(self) -> bool:
        return len(set(self.q)) == 1


def head_split(num_q: int, num_kv: int, ranks: int) -> HeadSplit:
    """The heads each of `ranks` Ulysses ranks holds (see the module docstring)."""
    if num_kv < 1 or num_q % num_kv:
        raise ValueError(f"{num_q} query heads do not group evenly over {num_kv} key/value heads")
    if ranks > num_q:
        raise ValueError(f"{num_q} attention heads cannot be shared by {ranks} Ulysses ranks: each needs at least one")
    n_rep = num_q // num_kv
    best = None
    for f in (d for d in range(1, n_rep + 1) if n_rep % d == 0):
        kv = split_sizes(num_kv * f, ranks)
        q = [c * (n_rep // f) for c in kv]
        key = (max(q), 0 in q, f)
        if best is None or key < best[0]:
            best = (key, HeadSplit(f, tuple(q), tuple(kv)))
    return best[1]
