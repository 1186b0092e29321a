"""FP8 linears: the CPU emulation is the exact dequantized product; a row-split (TP) layer quantizes with
the whole rows' scales, so an FP8 MLP over TP-2 / TP-4 equals the 1-process FP8 MLP; the GPU kernel
equals the emulation (gpu mark)."""

from __future__ import annotations

import pytest
import torch

from tests.harness import rel_l2, run_distributed


def _dequantized(q, scale):
    return q.double() * scale.double()


def test_emulation_is_the_dequantized_product():
    from shardiff_kernels.fp8 import quantize_rows, row_amax, scaled_linear

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    x[3] = 0  # a zero token: scale floor, no division by zero
    qx, sx = quantize_rows(x, row_amax(x))
    qw, sw = quantize_rows(w, row_amax(w))
    y = scaled_linear(qx, sx, qw, sw.view(-1), b, torch.float32, emulate=True)
    ref = _dequantized(qx, sx) @ _dequantized(qw, sw).t() + b.double()
    assert torch.isfinite(y).all() and y[3].sub(b).abs().max() == 0
    assert rel_l2(y, ref) < 1e-6
    # Quantization error of e4m3 (3 mantissa bits): a few percent of the product, never more.
    assert 1e-3 < rel_l2(y, x @ w.t() + b) < 0.08


def test_row_scale_of_a_piece_is_the_whole_rows():
    """Quantizing a column piece of a row with the whole row's maximum gives that piece of the whole
    row's quantization, bit for bit."""
    from shardiff_kernels.fp8 import quantize_rows, row_amax

    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    q, _ = quantize_rows(w, row_amax(w))
    q_piece, _ = quantize_rows(w[:, 32:64], row_amax(w))
    assert torch.equal(q[:, 32:64].view(torch.uint8), q_piece.view(torch.uint8))


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.up = torch.nn.Linear(64, 256)
        self.down = torch.nn.Linear(256, 64)
        self.keep = torch.nn.Linear(64, 64)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2

    def forward(self, x):
        return self.keep(self.down(torch.nn.functional.gelu(self.up(x))))


def _mlp_fp8(tp: int):
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.fp8 import Fp8Rule, quantize_linears
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.tensor import Colwise, Rowwise, shard_model

    x = torch.randn(3, 21, 64, generator=torch.Generator().manual_seed(3))
    model = _MLP()
    rule = Fp8Rule(keep=("keep",))
    if tp == 1:
        done = quantize_linears(model, rule)
    else:
        mesh = Mesh.build(ParallelConfig(tp=tp), torch.device("cpu"))
        shard_model(model, {"up": Colwise(), "down": Rowwise()}, mesh)
        done = quantize_linears(model, rule, tp_group=mesh.group("tp"))
    assert sorted(done.replaced) == ["down", "up"] and list(done.kept) == ["keep"]
    assert model.up.weight is None and model.keep.weight.dtype == torch.float32
    return model(x)


def test_fp8_under_tp_equals_one_process():
    one = _mlp_fp8(1)
    for tp in (2, 4):
        for rank, got in enumerate(run_distributed(_mlp_fp8, tp, tp)):
            err = rel_l2(got, one)
            assert err <= 1e-6, f"TP-{tp} rank {rank}: FP8 MLP differs from 1 process by {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with FP8 (sm 8.9+)")
def test_gpu_kernel_equals_emulation():
    from shardiff_kernels.fp8 import fp8_refusal, quantize_rows, row_amax, scaled_linear

    dev = torch.device("cuda")
    if fp8_refusal(dev):
        pytest.skip(fp8_refusal(dev))
    g = torch.Generator(device=dev).manual_seed(0)
    for m, k, n in ((4608, 3072, 3072), (4608, 3072, 12288), (77, 256, 512)):
        x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device=dev, generator=g, dtype=torch.bfloat16)
        qx, sx = quantize_rows(x, row_amax(x))
        qw, sw = quantize_rows(w, row_amax(w))
        real = scaled_linear(qx, sx, qw, sw.view(-1), b, torch.bfloat16, emulate=False)
        emu = scaled_linear(qx, sx, qw, sw.view(-1), b, torch.float32, emulate=True)
        # The kernel rounds its fp32 sums to bf16 once: within bf16's half-ulp of the emulation.
        assert rel_l2(real, emu) < 4e-3, (m, k, n, rel_l2(real, emu))
