"""Heads that Ulysses does not divide, grouped-query attention and padded keys, against one process.

Pure attention on 4 gloo processes, every layout of 4 ranks (Ulysses-4, Ulysses-2 × Ring-2, Ring-4):
6 heads (Ulysses-4 holds 2, 2, 1, 1), grouped-query heads (6 query / 2 key-value heads: Ulysses-2
splits the key-value heads, Ulysses-4 repeats them first; Lumina2's 24 / 8), and key-padding lengths
that leave whole ring blocks without a real key. Sequence lengths the degree does not divide too.
"""

from __future__ import annotations

import pytest
import torch

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.heads import head_split
from shardiff_parallel.mesh import Mesh
from shardiff_parallel.sharding import split_sizes, take_piece
from tests.harness import run_distributed

LAYOUTS = [(4, 1), (2, 2), (1, 4)]
# (query heads, key/value heads, sequence length, real keys per sample or None)
CASES = [
    (6, 6, 37, None),
    (6, 2, 37, None),
    (8, 4, 40, None),
    (24, 8, 21, None),
    (6, 6, 37, [20, 37]),  # sample 0: last 17 keys are padding (Ring-4: its last blocks have none)
    (6, 2, 45, [5, 5]),  # 5 real keys of 45: every block but the first is all padding
    (4, 4, 43, [43, 1]),
]


def _reference(q, k, v, key_lengths):
    """Masked softmax attention in float64, K/V heads repeated as diffusers does."""
    n_rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(n_rep, dim=2).double() for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / q.shape[-1] ** 0.5
    if key_lengths is not None:
        pad = torch.arange(k.shape[1])[None, :] >= torch.tensor(key_lengths)[:, None]
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _cases(kernel: str):
    errors = {}
    for ulysses, ring in LAYOUTS:
        mesh = Mesh.build(ParallelConfig(ulysses=ulysses, ring=ring), torch.device("cpu"))
        attention = ParallelAttention(mesh, kernel)
        P, me = mesh.size("sp"), mesh.coord("sp")
        for i, (hq, hkv, n, key_lengths) in enumerate(CASES):
            gen = torch.Generator().manual_seed(i)
            q = torch.randn(2, n, hq, 8, generator=gen)
            k, v = (torch.randn(2, n, hkv, 8, generator=gen) for _ in range(2))
            ref = _reference(q, k, v, key_lengths)
            sizes = split_sizes(n, P)
            out = attention(*(take_piece(t, 1, sizes, me) for t in (q, k, v)), sizes, key_lengths=key_lengths)
            want = take_piece(ref, 1, sizes, me)
            assert out.shape == want.shape and torch.isfinite(out).all()
            errors[(ulysses, ring, i)] = ((out.double() - want).norm() / want.norm()).item()
    return errors


def test_uneven_and_grouped_heads_and_padding_match_one_process():
    results = run_distributed(_cases, 4, "auto")
    for rank, errs in enumerate(results):
        assert len(errs) == len(LAYOUTS) * len(CASES)
        for (u, r, i), err in errs.items():
            assert err <= 1e-5, f"rank {rank} ulysses {u} ring {r} case {CASES[i]}: relative error {err:.2e}"


def test_head_split_rules():
    # 38 heads on 4: 10, 10, 9, 9; 30 on 8: 4 × 6 + 3 × 2.
    assert head_split(38, 38, 4).q == (10, 10, 9, 9)
    assert head_split(30, 30, 8).q == (4, 4, 4, 4, 4, 4, 3, 3)
    # Lumina2's 24 query / 8 key-value heads: split over the key-value heads up to 8 ranks.
    for u, kv in ((2, 4), (4, 2), (8, 1)):
        split = head_split(24, 8, u)
        assert split.kv_repeat == 1 and split.kv == (kv,) * u and split.q == (3 * kv,) * u
    # 16 ranks exceed the 8 key-value heads: repeated to 24 (plain multi-head), 2 or 1 per rank.
    s16 = head_split(24, 8, 16)
    assert s16.kv_repeat == 3 and max(s16.q) == 2 and min(s16.q) == 1 and sum(s16.q) == 24
    # 3 ranks: 8 key-value heads split 3/3/2 would give 9/9/6 queries; repeating them balances 8/8/8.
    assert head_split(24, 8, 3).q == (8, 8, 8)
    with pytest.raises(ValueError, match="cannot be shared by 8 Ulysses ranks"):
        head_split(6, 6, 8)


def test_layouts_that_remain_impossible_say_what_works():
    ParallelConfig(ulysses=4).check_heads(38)  # uneven: allowed
    ParallelConfig(ulysses=5).check_heads(24)
    ParallelConfig(ulysses=2, tp=2).check_heads(30)  # 15 heads per TP rank: 8 / 7
    with pytest.raises(ValueError, match=r"6 attention heads, fewer than --ulysses 8.*--ulysses 4 --ring 2"):
        ParallelConfig(ulysses=8).check_heads(6)
    with pytest.raises(ValueError, match=r"30 attention heads, which --tp 4 does not divide.*2, 3, 5, 6"):
        ParallelConfig(tp=4).check_heads(30)
    with pytest.raises(ValueError, match=r"\(3 per TP rank of --tp 2\), fewer than --ulysses 4.*--ulysses 2 --ring 2"):
        ParallelConfig(ulysses=4, tp=2).check_heads(6)
    assert ParallelConfig(ulysses=4).uneven_heads(30) and not ParallelConfig(ulysses=2).uneven_heads(30)
    assert ParallelConfig(ulysses=4).heads_note(38) == "uneven heads: 10/10/9/9 of 38 per Ulysses rank"
    assert ParallelConfig(ulysses=2, tp=2).heads_note(30) == "uneven heads: 8/7 of 15 per Ulysses rank"
    assert ParallelConfig(ulysses=16).heads_note(24, 8) == f"uneven heads: {'/'.join(['2'] * 8 + ['1'] * 8)} of 24 per Ulysses rank"
    assert ParallelConfig(ulysses=8).heads_note(24, 8) == ""
