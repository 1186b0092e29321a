"""Attention-kernel registry tests (CPU; the `gpu` test runs on CUDA machines only).

Legend: B batch, H heads, Sq/Sk query/key length, D head dim.
Every kernel is checked against the math kernel run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from shardiff_kernels.base import AttentionKernel
from shardiff_kernels.registry import available_kernels, choose_kernel, get_kernel, register_kernel
from shardiff_kernels import registry as registry_mod
from shardiff_kernels.base import HALF_DTYPES

B, H, SQ, SK = 2, 3, 37, 53  # Sq != Sk, neither a multiple of 32
CPU_KERNELS = available_kernels("cpu")
CUDA_KERNELS = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "flash-attn", "flash-attn-4")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _qkv(D, dtype, device="cpu", seed=0, sq=SQ, sk=SK):
    g = torch.Generator().manual_seed(seed)
    q_BHSD = torch.randn(B, H, sq, D, generator=g)
    k_BHSD = torch.randn(B, H, sk, D, generator=g)
    v_BHSD = torch.randn(B, H, sk, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q_BHSD, k_BHSD, v_BHSD)]


def _reference(q_BHSD, k_BHSD, v_BHSD, scale=None):
    """float64 math attention on the (already rounded) inputs."""
    q, k, v = (t.double().cpu() for t in (q_BHSD, k_BHSD, v_BHSD))
    return get_kernel("math")(q, k, v, scale=scale, return_lse=True)


def _rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_float64_reference(name, D, dtype):
    kernel = get_kernel(name)
    q, k, v = _qkv(D, dtype)
    ref_out, ref_lse = _reference(q, k, v)
    out, lse = kernel(q, k, v, return_lse=kernel.provides_lse)
    assert out.shape == (B, H, SQ, D) and out.dtype == dtype
    assert _rel_err(out, ref_out) <= TOL[dtype]
    if kernel.provides_lse:
        assert lse.shape == (B, H, SQ) and lse.dtype == torch.float32
        assert (lse.double() - ref_lse).abs().max().item() <= TOL[dtype]
    else:
        assert lse is None


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_explicit_scale_and_noncontiguous_inputs(name):
    kernel = get_kernel(name)
    q, k, v = _qkv(32, torch.float32, seed=1)
    # (B, S, H, D) storage viewed as (B, H, S, D): the layout a QKV projection gives.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    ref_out, ref_lse = _reference(q, k, v, scale=0.3)
    out, lse = kernel(q, k, v, scale=0.3, return_lse=kernel.provides_lse)
    assert _rel_err(out, ref_out) <= 1e-5
    if kernel.provides_lse:
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-5


def test_lse_is_natural_log_of_scaled_scores():
    q, k, v = _qkv(16, torch.float64)
    _, lse = get_kernel("math")(q, k, v, return_lse=True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(16)
    expected = torch.log(torch.exp(scores).sum(-1))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in CPU_KERNELS if get_kernel(n).provides_lse])
def test_lse_merge_of_two_kv_halves_reproduces_full_attention(name):
    """What Ring attention relies on: partial results over K/V blocks merge exactly."""
    kernel = get_kernel(name)
    q, k, v = _qkv(64, torch.float32, seed=2)
    cut = SK // 2 + 3  # uneven halves on purpose
    o1, lse1 = kernel(q, k[:, :, :cut], v[:, :, :cut], return_lse=True)
    o2, lse2 = kernel(q, k[:, :, cut:], v[:, :, cut:], return_lse=True)
    lse = torch.logaddexp(lse1, lse2)
    out = torch.exp(lse1 - lse).unsqueeze(-1) * o1 + torch.exp(lse2 - lse).unsqueeze(-1) * o2
    ref_out, ref_lse = _reference(q, k, v)
    assert _rel_err(out, ref_out) <= 1e-5
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5


def test_auto_on_cpu_picks_cpu_flash_for_lse():
    assert choose_kernel("auto", "cpu", torch.float32, need_lse=True).name == "sdpa-cpu-flash"
    assert choose_kernel("auto", torch.device("cpu"), torch.bfloat16, True).name == "sdpa-cpu-flash"
    # fp64 is outside the CPU flash op's advertised dtypes: the reference takes it.
    assert choose_kernel("auto", "cpu", torch.float64, need_lse=True).name == "math"


def test_available_kernels_cpu_is_sorted_and_cpu_only():
    names = available_kernels("cpu")
    assert names[0] == "sdpa-cpu-flash" and names[-1] == "math" and "sdpa" in names
    assert not set(names) & set(CUDA_KERNELS)
    assert "sdpa" not in available_kernels("cpu", need_lse=True)
    prios = [get_kernel(n).priority for n in names]
    assert prios == sorted(prios, reverse=True)


def test_kernel_names_constant():
    assert set(registry_mod.KERNEL_NAMES) == {"math", "sdpa", "sdpa-cpu-flash", *CUDA_KERNELS}


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        choose_kernel("no-such-kernel", "cpu", torch.float32, need_lse=True)
    msg = str(exc.value)
    assert "no-such-kernel" in msg and "sdpa-cpu-flash" in msg and "math" in msg
    with pytest.raises(ValueError, match="unknown"):
        get_kernel("no-such-kernel")


def test_sdpa_cannot_give_lse():
    q, k, v = _qkv(16, torch.float32)
    with pytest.raises(ValueError, match="log-sum-exp"):
        get_kernel("sdpa")(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="log-sum-exp") as exc:
        choose_kernel("sdpa", "cpu", torch.float32, need_lse=True)
    assert "sdpa-cpu-flash" in str(exc.value)
    assert choose_kernel("sdpa", "cpu", torch.float32, need_lse=False).name == "sdpa"


@pytest.mark.parametrize("name", CUDA_KERNELS)
def test_cuda_kernel_rejected_on_cpu(name):
    with pytest.raises(ValueError) as exc:
        choose_kernel(name, "cpu", torch.bfloat16, need_lse=False)
    assert "math" in str(exc.value)


def test_bad_inputs_raise_valueerror():
    q, k, v = _qkv(16, torch.float32)
    kernel = get_kernel("math")
    with pytest.raises(ValueError):
        kernel(q[0], k, v)  # 3-D
    with pytest.raises(ValueError):
        kernel(q, k[..., :8], v[..., :8])  # head dims differ
    with pytest.raises(ValueError):
        kernel(q, k, v[:, :, :5])  # k/v lengths differ
    with pytest.raises(ValueError):
        kernel(q, k.double(), v)  # dtypes differ
    with pytest.raises(ValueError):
        get_kernel("sdpa-cpu-flash")(q.double(), k.double(), v.double())  # dtype unsupported
    with pytest.raises(ValueError):
        choose_kernel("auto", "cpu", torch.int32, need_lse=False)


def test_register_kernel_and_dtype_aware_auto(monkeypatch):
    """A fast half-only kernel must not be chosen by "auto" for fp32 (the CUDA flash/cuDNN case)."""
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    math_fn = get_kernel("math").fn
    fake = AttentionKernel(
        name="fake-half", fn=math_fn, devices=frozenset({"cpu"}), provides_lse=True,
        priority=1000, is_available=lambda: True, dtypes=HALF_DTYPES,
    )
    register_kernel(fake)
    with pytest.raises(ValueError, match="already registered"):
        register_kernel(fake)
    assert choose_kernel("auto", "cpu", torch.bfloat16, need_lse=True).name == "fake-half"
    assert choose_kernel("auto", "cpu", torch.float32, need_lse=True).name == "sdpa-cpu-flash"
    with pytest.raises(ValueError, match="supports only"):
        choose_kernel("fake-half", "cpu", torch.float32, need_lse=True)
    gone = AttentionKernel(
        name="fake-half", fn=math_fn, devices=frozenset({"cpu"}), provides_lse=True,
        priority=1000, is_available=lambda: False, dtypes=HALF_DTYPES,
    )
    register_kernel(gone, replace=True)
    assert "fake-half" not in available_kernels("cpu")
    with pytest.raises(ValueError, match="not available"):
        choose_kernel("fake-half", "cpu", torch.bfloat16, need_lse=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", CUDA_KERNELS + ("sdpa", "math"))
@pytest.mark.parametrize("D", [20, 64, 128])
@pytest.mark.parametrize("return_lse", [True, False])
def test_cuda_kernel_matches_math_bf16(name, D, return_lse):
    if name not in available_kernels("cuda", dtype=torch.bfloat16):
        pytest.skip(f"{name} not available on this GPU / install")
    kernel = get_kernel(name)
    if return_lse and not kernel.provides_lse:
        pytest.skip("kernel has no LSE")
    q, k, v = _qkv(D, torch.bfloat16, device="cuda", sq=77, sk=300)
    ref_out, ref_lse = _reference(q, k, v)
    out, lse = kernel(q, k, v, return_lse=return_lse)
    assert out.device.type == "cuda" and out.shape == (B, H, 77, D) and out.dtype == torch.bfloat16
    assert _rel_err(out, ref_out) <= 2e-2
    if return_lse:
        assert lse.shape == (B, H, 77) and lse.dtype == torch.float32
        assert (lse.double().cpu() - ref_lse).abs().max().item() <= 2e-2
    else:
        assert lse is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_respects_dtype():
    bf16 = choose_kernel("auto", "cuda", torch.bfloat16, need_lse=True)
    fp32 = choose_kernel("auto", "cuda", torch.float32, need_lse=True)
    assert fp32.name in ("sdpa-efficient", "math")
    assert torch.bfloat16 in bf16.dtypes and torch.float32 in fp32.dtypes
    if "sdpa-cudnn" in available_kernels("cuda"):
        assert bf16.name == "sdpa-cudnn"
    with pytest.raises(ValueError):
        choose_kernel("sdpa-flash", "cuda", torch.float32, need_lse=True)
