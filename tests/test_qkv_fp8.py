"""`--quantize-qkv fp8`: attention's Q, K and V rounded to e4m3 per token and head, sent so through the
Ulysses exchange and around Ring — and the split result equals one process's with the same rounding.

Pure attention on 2 and 4 gloo processes over every exchange path (Ulysses' stacked Q/K/V, its head
chunks, the general path of uneven and grouped-query heads, Ring, the hybrid), then the engine: the split
image equals the one-process image made with the option (tests/test_fast_path.py runs it beside the other
fast options), and the trained `shapes` model still draws its prompts.
"""

from __future__ import annotations

import pytest
import torch

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.config import ParallelConfig
from shardiff_parallel.mesh import Mesh
from shardiff_parallel.qkv_fp8 import pack, round_trip, unpack, wire_ratio
from shardiff_parallel.sharding import split_sizes, take_piece
from tests.harness import run_distributed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_rows_arrive_as_the_one_process_rounding(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 7, 6, 16, generator=gen).to(dtype) * torch.logspace(-3, 3, 16).to(dtype)
    x[0, 0, 0, 0] = 0  # a row of zeros: a floor scale, zeros back
    packed = pack(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, 7, 6, 16 + 4)
    got = unpack(packed, dtype)
    assert got.dtype == dtype and torch.equal(got, round_trip(x))
    assert torch.equal(got[0, 0, 0, 0], torch.zeros(16, dtype=dtype))
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself relative to its row's maximum.
    err = (got.float() - x.float()).abs() / x.float().abs().amax(-1, keepdim=True).clamp(min=1e-30)
    assert err.max() <= 2**-4 + 1e-3
    assert 0 < (got.float() - x.float()).norm() / x.float().norm() < 0.05
    # Rounded values packed again (a Ring block forwarded after Ulysses' exchange) keep their e4m3 values.
    assert torch.equal(pack(got)[..., :16], packed[..., :16])
    assert wire_ratio(128, torch.bfloat16) == pytest.approx(0.516, abs=1e-3)


def _reference(q, k, v):
    n_rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(n_rep, dim=2).double() for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


LAYOUTS = {2: [(2, 1, 1), (2, 1, 2), (1, 2, 1)], 4: [(4, 1, 1), (2, 2, 1), (1, 4, 1)]}
"""(ulysses, ring, head chunks) per world size."""
HEADS = [(8, 8, 37), (6, 2, 45), (6, 6, 21)]
"""(query heads, key/value heads, tokens): the stacked exchange; grouped-query and uneven heads (the general one)."""


def _cases(world: int) -> dict:
    import torch.distributed as dist

    sent, passed = [], []
    exchange, p2p = dist.all_to_all_single, dist.batch_isend_irecv

    def spy(out, x, **kw):  # what the Ulysses exchanges carry
        sent.append(x.dtype)
        return exchange(out, x, **kw)

    def ring_spy(ops):  # what Ring's K/V blocks travel as
        passed.extend(op.tensor.dtype for op in ops)
        return p2p(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = spy, ring_spy
    errors = {}
    for ulysses, ring, chunks in LAYOUTS[world]:
        mesh = Mesh.build(ParallelConfig(ulysses=ulysses, ring=ring), torch.device("cpu"))
        attention = ParallelAttention(mesh, "auto", head_chunks=chunks, qkv="fp8")
        P, me = mesh.size("sp"), mesh.coord("sp")
        for i, (hq, hkv, n) in enumerate(HEADS):
            gen = torch.Generator().manual_seed(i)
            q = torch.randn(2, n, hq, 16, generator=gen)
            k, v = (torch.randn(2, n, hkv, 16, generator=gen) * 3 for _ in range(2))
            sizes = split_sizes(n, P)
            del sent[:], passed[:]
            out = attention(*(take_piece(t, 1, sizes, me) for t in (q, k, v)), sizes)
            want = take_piece(_reference(round_trip(q), round_trip(k), round_trip(v)), 1, sizes, me)
            exact = take_piece(_reference(q, k, v), 1, sizes, me)
            # Ulysses: the inputs' exchanges in bytes, the output's back in the model's dtype.
            assert (ulysses == 1 and not sent) or (torch.uint8 in sent and torch.float32 in sent), sent
            assert (ring == 1 and not passed) or (passed and set(passed) == {torch.uint8}), passed
            errors[(ulysses, ring, chunks, i)] = (((out.double() - want).norm() / want.norm()).item(),
                                                  ((out.double() - exact).norm() / exact.norm()).item())
    dist.all_to_all_single, dist.batch_isend_irecv = exchange, p2p
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_split_attention_on_fp8_inputs_equals_one_process(world):
    for rank, errs in enumerate(run_distributed(_cases, world, world)):
        assert len(errs) == len(LAYOUTS[world]) * len(HEADS)
        for case, (err, trade) in errs.items():
            assert err <= 1e-5, f"rank {rank} (ulysses, ring, chunks, case)={case}: {err:.2e} from one process"
            assert 1e-3 < trade < 0.1, f"rank {rank} {case}: {trade:.2e} from exact attention: was anything rounded?"


def test_the_option_is_refused_where_no_attention_is_split():
    from engine import EngineConfig
    from engine.preflight import preflight

    with pytest.raises(ValueError, match="--quantize-qkv must be off or fp8"):
        EngineConfig(quantize_qkv="int8")
    assert "exchange no Q, K or V" in (preflight(EngineConfig(model="sd1.5-tiny", quantize_qkv="fp8")).error or "")
    assert "Sana's self-attention is linear" in (preflight(EngineConfig(model="sana-tiny", quantize_qkv="fp8")).error
                                                 or "")


def test_the_bench_spells_it_qkv8_on_our_layouts_only():
    from engine.bench.layouts import parse_layout

    lay = parse_layout("u2r2:compile:qkv8:fp8")
    assert (lay.quantize_qkv, lay.quantize, lay.compile, lay.approximate) == ("fp8", "fp8", True, True)
    assert parse_layout("u4").quantize_qkv == "off" and not parse_layout("u4").approximate
    for bad in ("diffusers:qkv8", "xfuser-u2:qkv8"):
        with pytest.raises(ValueError, match="qkv8"):
            parse_layout(bad)
