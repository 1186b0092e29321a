"""`python -m engine.bench.fp8_ops`: the FP8 levers one op at a time, on one GPU.

The per-op evidence behind `--quantize fp8` (shardiff_kernels.fp8, parallel/fp8.py) and the FP8
attention candidates:
- GEMMs: each linear shape of a Flux.1-dev block at a token count, `F.linear` in bf16 against
  `torch._scaled_mm` on e4m3 with row-wise scales (what the engine runs), with per-tensor scales, and
  with fast accumulation; then the whole FP8 linear as the engine runs it (quantize the input
  per token + scaled matmul) compiled, against the compiled bf16 linear — what the quantization costs.
- Attention: cuDNN bf16 SDPA (the engine's default kernel) against cuDNN's FP8 SDPA
  (`nvidia-cudnn-frontend`, when it imports), Q/K/V quantized per tensor, output bf16; time and the
  relative L2 of each against an fp32 reference on a slice of the queries.

    python -m engine.bench.fp8_ops --tokens 4608,16896 --attention-tokens 4608,16896,66048

Protocol: `triton.testing.do_bench` medians (warm-up 25 ms, repeat 100 ms), fresh random inputs.
Legend: M tokens, K / N in / out features; S tokens of attention, H heads, D head dim.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

# Flux.1-dev (hidden 3072, MLP 12288): (what, K, N) of each linear shape of a block.
SHAPES = (("q / k / v / attn out", 3072, 3072), ("MLP up", 3072, 12288), ("MLP down", 12288, 3072),
          ("single proj_out", 15360, 3072))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine.bench.fp8_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4608,16896", help="M of the GEMMs (Flux 1024²: 4608, 2048²: 16896)")
    p.add_argument("--attention-tokens", default="4608,16896,66048")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gemm_rows(tokens: list[int]) -> list[dict]:
    from shardiff_kernels.fp8 import E4M3, quantize_rows, row_amax, scaled_linear
    from shardiff_parallel.fp8 import Fp8Matmul

    rows = []
    dev = torch.device("cuda")
    for M in tokens:
        for what, K, N in SHAPES:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5
            b = torch.randn(N, device=dev, dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
            qx, sx = quantize_rows(x, row_amax(x))
            qw, sw = quantize_rows(w, row_amax(w))
            sw = sw.view(-1)
            tx, tw = x.abs().max().float() / 448, w.abs().max().float() / 448
            qtx, qtw = (x.float() / tx).to(E4M3), (w.float() / tw).to(E4M3)
            bf16 = _bench(lambda: torch.nn.functional.linear(x, w, b))
            row = _bench(lambda: scaled_linear(qx, sx, qw, sw, b, torch.bfloat16, emulate=False))
            row_fast = _bench(lambda: torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw.view(1, -1), bias=b,
                                                       out_dtype=torch.bfloat16, use_fast_accum=True))
            tensor = _bench(lambda: torch._scaled_mm(qtx, qtw.t(), scale_a=tx, scale_b=tw, bias=b,
                                                     out_dtype=torch.bfloat16))
            tensor_fast = _bench(lambda: torch._scaled_mm(qtx, qtw.t(), scale_a=tx, scale_b=tw, bias=b,
                                                          out_dtype=torch.bfloat16, use_fast_accum=True))
            lin = torch.nn.Linear(K, N, device=dev, dtype=torch.bfloat16)
            lin.weight.data.copy_(w)
            lin.bias.data.copy_(b)
            fp8 = Fp8Matmul(w)
            bf16_c = torch.compile(lambda x: lin(x), dynamic=False)
            fp8_c = torch.compile(lambda x: fp8(x, b), dynamic=False)
            e2e_bf16, e2e_fp8 = _bench(lambda: bf16_c(x)), _bench(lambda: fp8_c(x))
            flop = 2 * M * K * N
            rows.append(dict(
                op=what, M=M, K=K, N=N, bf16_ms=bf16, fp8_row_ms=row, fp8_row_fast_ms=row_fast,
                fp8_tensor_ms=tensor, fp8_tensor_fast_ms=tensor_fast,
                compiled_bf16_linear_ms=e2e_bf16, compiled_fp8_linear_ms=e2e_fp8,
                bf16_tflops=flop / bf16 / 1e9, fp8_row_tflops=flop / row / 1e9,
                rel_l2_bf16=_rel(torch.nn.functional.linear(x, w, b), ref), rel_l2_fp8_row=_rel(fp8_c(x), ref),
            ))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _cudnn_fp8_attention(B: int, H: int, S: int, D: int, scale: float):
    """A built cuDNN FP8 SDPA graph (Q/K/V e4m3 in BHSD order, output bf16) and its runner, or the
    reason it cannot run."""
    try:
        import cudnn
    except ImportError as e:
        return None, f"nvidia-cudnn-frontend is not installed ({e})"
    shape, stride = (B, H, S, D), (H * S * D, S * D, D, 1)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT)
    q, k, v = (graph.tensor(uid=u, dim=shape, stride=stride, data_type=cudnn.data_type.FP8_E4M3) for u in (0, 1, 2))
    scalars = {name: graph.tensor(uid=u, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)
               for name, u in (("descale_q", 5), ("descale_k", 6), ("descale_v", 7), ("descale_s", 8),
                               ("scale_s", 9), ("scale_o", 10))}
    o, _, _, amax_o = graph.sdpa_fp8(q=q, k=k, v=v, attn_scale=scale, generate_stats=False, use_causal_mask=False,
                                     **scalars)
    o.set_uid(3).set_output(True).set_dim(shape).set_stride(stride).set_data_type(cudnn.data_type.BFLOAT16)
    amax_o.set_uid(12).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(
        cudnn.data_type.FLOAT)
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
    except Exception as e:  # a cuDNN that lacks the FP8 engine for this shape
        return None, f"cuDNN {cudnn.backend_version_string()} cannot build it: {str(e).splitlines()[0][:200]}"
    dev = torch.device("cuda")
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=dev)
    out = torch.empty(shape, dtype=torch.bfloat16, device=dev)
    amax = torch.empty(1, dtype=torch.float32, device=dev)
    ones = torch.ones(1, dtype=torch.float32, device=dev)
    s_scale = torch.full((1,), 448.0, device=dev)  # probabilities are ≤ 1: P quantized against 1
    s_descale = torch.full((1,), 1 / 448.0, device=dev)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)

    def run(q8, k8, v8, dq, dk, dv):
        pack = {0: q8, 1: k8, 2: v8, 5: dq, 6: dk, 7: dv, 8: s_descale, 9: s_scale, 10: ones, 3: out, 12: amax}
        graph.execute(pack, workspace, handle=handle)
        return out

    return run, f"cuDNN {cudnn.backend_version_string()}"


def attention_rows(tokens: list[int], H: int, D: int) -> list[dict]:
    from shardiff_kernels.fp8 import E4M3

    rows = []
    dev = torch.device("cuda")
    scale = D ** -0.5
    for S in tokens:
        q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        Sq = min(S, 512)  # the fp32 reference on a slice of the queries
        scores = (q[:, :, :Sq].float() @ k.float().transpose(-1, -2)) * scale
        ref = torch.softmax(scores, dim=-1) @ v.float()
        del scores
        sdpa = torch.ops.aten._scaled_dot_product_cudnn_attention
        bf16 = lambda: sdpa(q, k, v, None, False, 0.0, False, False, scale=scale)[0]
        bf16_ms = _bench(bf16)
        row = dict(S=S, H=H, D=D, cudnn_bf16_ms=bf16_ms, rel_l2_cudnn_bf16=_rel(bf16()[:, :, :Sq], ref),
                   tflops_bf16=4 * S * S * H * D / bf16_ms / 1e9)
        run, note = _cudnn_fp8_attention(1, H, S, D, scale)
        row["fp8_kernel"] = note
        if run is not None:
            def quantize(t):
                s = t.abs().amax().float().clamp(min=1e-12) / 448
                return (t.float() / s).to(E4M3), s.view(1)

            (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
            fp8_ms = _bench(lambda: run(q8, k8, v8, dq, dk, dv))
            quant_ms = _bench(lambda: (quantize(q), quantize(k), quantize(v)))
            row.update(cudnn_fp8_ms=fp8_ms, quantize_qkv_eager_ms=quant_ms,
                       rel_l2_cudnn_fp8=_rel(run(q8, k8, v8, dq, dk, dv)[:, :, :Sq], ref),
                       tflops_fp8=4 * S * S * H * D / fp8_ms / 1e9)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("engine.bench.fp8_ops times GPU kernels: it needs a CUDA GPU")
    from shardiff_kernels.fp8 import fp8_refusal

    reason = fp8_refusal(torch.device("cuda"))
    if reason:
        raise SystemExit(reason)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}",
          flush=True)
    gemms = gemm_rows([int(t) for t in args.tokens.split(",") if t])
    attn = attention_rows([int(t) for t in args.attention_tokens.split(",") if t], args.heads, args.head_dim)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "gemm": gemms, "attention": attn}, f, indent=1)
    print("\n| op | M | bf16 ms | fp8 row ms | row fast | tensor | tensor fast | compiled linear bf16 → fp8 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in gemms:
        print(f"| {r['op']} {r['K']}→{r['N']} | {r['M']} | {r['bf16_ms']:.3f} | {r['fp8_row_ms']:.3f} | "
              f"{r['fp8_row_fast_ms']:.3f} | {r['fp8_tensor_ms']:.3f} | {r['fp8_tensor_fast_ms']:.3f} | "
              f"{r['compiled_bf16_linear_ms']:.3f} → {r['compiled_fp8_linear_ms']:.3f} |")
    print("\n| S | cuDNN bf16 ms (rel L2) | cuDNN FP8 ms (rel L2) | quantize Q,K,V ms |")
    print("|---|---|---|---|")
    for r in attn:
        fp8 = (f"{r['cudnn_fp8_ms']:.3f} ({r['rel_l2_cudnn_fp8']:.4f})" if "cudnn_fp8_ms" in r else r["fp8_kernel"])
        print(f"| {r['S']} | {r['cudnn_bf16_ms']:.3f} ({r['rel_l2_cudnn_bf16']:.4f}) | {fp8} | "
              f"{r.get('quantize_qkv_eager_ms', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
