"""Ulysses, Ring and their hybrid against single-process attention, on 2 and 4 gloo processes.

Joint sequences ([text, image] groups, each split separately, as Flux does) and lengths that the
degree does not divide are part of every case.
"""

from __future__ import annotations

import pytest
import torch

from shardiff_parallel.mesh import Mesh
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.sharding import split_sizes, take_piece
from tests.harness import run_distributed

LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)]}
LENGTH_SETS = [(64, 96), (77, 61), (5, 3)]  # even; uneven (CLIP's 77 text tokens); fewer tokens than ranks+1


def _reference(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())


def _cases(world: int, kernel: str, dtype: torch.dtype, head_chunks: int = 1):
    errors = {}
    for ulysses, ring in LAYOUTS[world]:
        if head_chunks > 1 and ring > 1:
            continue  # chunks pipeline the Ulysses exchanges; with Ring they are not used
        mesh = Mesh.build(ParallelConfig(ulysses=ulysses, ring=ring), torch.device("cpu"))
        attention = ParallelAttention(mesh, kernel, head_chunks=head_chunks)
        for lengths in LENGTH_SETS:
            gen = torch.Generator().manual_seed(hash(lengths) % 2**31)
            groups = [[torch.randn(2, n, 8, 16, generator=gen) for _ in range(3)] for n in lengths]
            ref = _reference(*(torch.cat([g[i] for g in groups], 1) for i in range(3)))
            P, me = mesh.size("sp"), mesh.coord("sp")
            piece_sizes = [split_sizes(n, P) for n in lengths]
            local = [torch.cat([take_piece(g[i], 1, s, me) for g, s in zip(groups, piece_sizes)], 1) for i in range(3)]
            ref_local = torch.cat(
                [take_piece(r, 1, s, me) for r, s in zip(ref.split(list(lengths), 1), piece_sizes)], 1
            )
            joint = [sum(p) for p in zip(*piece_sizes)]
            out = attention(*(t.to(dtype) for t in local), joint)
            assert out.shape == ref_local.shape and out.dtype == dtype
            err = ((out.double() - ref_local).norm() / ref_local.norm()).item()
            errors[(ulysses, ring, lengths)] = err
    return errors


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kernel", ["auto", "math"])
def test_sequence_parallel_attention_matches_single_process(world, kernel):
    results = run_distributed(_cases, world, world, kernel, torch.float32)
    for rank, errs in enumerate(results):
        for case, err in errs.items():
            assert err <= 1e-5, f"rank {rank} (ulysses, ring, lengths)={case}: relative error {err:.2e}"


@pytest.mark.parametrize("world,head_chunks", [(2, 2), (2, 4), (4, 2)])
def test_head_chunked_ulysses_matches_single_process(world, head_chunks):
    """All exchanges in flight at once, chunk by chunk (8 heads: every chunk splits over the ranks)."""
    assert 8 % (head_chunks * world) == 0, "the chunked path must be the one under test"
    results = run_distributed(_cases, world, world, "auto", torch.float32, head_chunks)
    for rank, errs in enumerate(results):
        assert errs
        for case, err in errs.items():
            assert err <= 1e-5, f"rank {rank} chunks {head_chunks} (ulysses, ring, lengths)={case}: error {err:.2e}"


def test_sequence_parallel_attention_bf16():
    for rank, errs in enumerate(run_distributed(_cases, 4, 4, "auto", torch.bfloat16)):
        for case, err in errs.items():
            assert err <= 2e-2, f"rank {rank} {case}: relative error {err:.2e}"


def test_heads_ulysses_cannot_share_are_a_clear_error():
    # Uneven heads are allowed (tests/test_uneven_heads.py); fewer heads than Ulysses ranks are not.
    ParallelConfig(ulysses=5).check_heads(24)
    with pytest.raises(ValueError, match=r"8 attention heads, fewer than --ulysses 16.*--ulysses 8 --ring 2"):
        ParallelConfig(ulysses=16).check_heads(8)


def test_degrees_must_multiply_to_world_size():
    with pytest.raises(ValueError, match=r"multiply to 6, but 4 process\(es\).*--ulysses 4"):
        ParallelConfig(ulysses=3, ring=2).check_world_size(4)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelConfig(ring=0)
