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


# ------------------------------------------------------------------ reference tokens (FLUX.2-klein-KV)

KV_LENGTHS = (5, 11, 13)  # text, reference, target tokens: none divides 4


def _masked_reference(q, k, v, allowed):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v.double())


def _local(tensors, sizes, me):
    """This rank's joint piece: each group's own piece, in group order."""
    return torch.cat([take_piece(t, 1, s, me) for t, s in zip(tensors, sizes)], 1)


def _reference_cases(world: int) -> dict:
    """The first step (references attend each other only; their K/V kept) and a cached step (the kept K/V beside
    the text's and the target's), against dense masked attention, on every layout of `world` ranks."""
    from shardiff_parallel.block_causal import PrefixKV

    T, Rn, N = KV_LENGTHS
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, T + Rn + N, 8, 16, generator=gen) for _ in range(3))
    refs = torch.zeros(T + Rn + N, dtype=torch.bool)
    refs[T : T + Rn] = True
    first = _masked_reference(q, k, v, ~refs[:, None] | refs[None, :])
    # The cached step: new text and target tokens; the references' keys and values are the first step's.
    q2, k2, v2 = (torch.randn(2, T + N, 8, 16, generator=gen) for _ in range(3))
    k_all, v_all = (torch.cat([b[:, :T], a[:, T : T + Rn], b[:, T:]], 1) for a, b in ((k, k2), (v, v2)))
    cached = _masked_reference(q2, k_all, v_all, torch.ones(T + N, T + Rn + N, dtype=torch.bool))
    errors = {}
    for ulysses, ring in LAYOUTS[world]:
        mesh = Mesh.build(ParallelConfig(ulysses=ulysses, ring=ring), torch.device("cpu"))
        attention = ParallelAttention(mesh, "math")
        P, me = mesh.size("sp"), mesh.coord("sp")
        sizes = [split_sizes(n, P) for n in KV_LENGTHS]
        groups = lambda t: (t[:, :T], t[:, T : T + Rn], t[:, T + Rn :])  # noqa: E731
        keep = PrefixKV()
        got = attention(*(_local(groups(t), sizes, me) for t in (q, k, v)), [sum(p) for p in zip(*sizes)],
                        references=tuple(zip(sizes[0], sizes[1])), keep=keep)
        ref = _local(groups(first), sizes, me)
        errors[(ulysses, ring, "first")] = ((got.double() - ref).norm() / ref.norm()).item()
        two = [sizes[0], sizes[2]]
        got2 = attention(*(_local((t[:, :T], t[:, T:]), two, me) for t in (q2, k2, v2)),
                         [sum(p) for p in zip(*two)], prefix=keep)
        ref2 = _local((cached[:, :T], cached[:, T:]), two, me)
        errors[(ulysses, ring, "cached")] = ((got2.double() - ref2).norm() / ref2.norm()).item()
    return errors


def test_reference_tokens_attend_each_other_only_and_their_kept_kv_serves_later_steps():
    # Ulysses-4, Ring-4, Ulysses-2 × Ring-2: the references' runs sit in every rank's piece, unevenly.
    for rank, errs in enumerate(run_distributed(_reference_cases, 4, 4)):
        assert len(errs) == 6
        for case, err in errs.items():
            assert err <= 1e-5, f"rank {rank} (ulysses, ring, step)={case}: relative error {err:.2e}"
    # One process: the same rule, one block.
    from shardiff_parallel.block_causal import PrefixKV

    T, Rn, N = KV_LENGTHS
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, T + Rn + N, 2, 8, generator=gen) for _ in range(3))
    refs = torch.zeros(T + Rn + N, dtype=torch.bool)
    refs[T : T + Rn] = True
    got = ParallelAttention(Mesh.single(torch.device("cpu")), "math")(q, k, v, references=((T, Rn),), keep=PrefixKV())
    full = _reference(q, k, v)
    assert ((got.double() - _masked_reference(q, k, v, ~refs[:, None] | refs[None, :])).norm() / full.norm()) <= 1e-6
    assert ((got.double() - full)[:, T : T + Rn].norm() / full.norm()) > 1e-2  # the rule changed the references' rows
