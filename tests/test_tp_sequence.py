"""The sequence forms of tensor parallelism (`tp_comm="sequence"` and `"overlap"`, parallel/tensor_seq.py)
on the tiny Flux.

TP-2, TP-4, TP-2×Ulysses-2, TP-2×Ring-2 and TP-2×CFG-2 (Flux true CFG: the two branches' calls on
different ranks) pipeline latents equal one process and the all-reduce form (on the same engine, the
plan moved between the forms); the overlap form here runs its fused gathers and reduce-scatters with
gloo collectives (the symmetric-memory kernels need CUDA: tests/test_collective_matmul.py), which
exercises its hand-out of the fused products to the linears and the single-stream blocks' rank-major
order with permuted rotary tables; the residual stream between blocks really holds 1/tp of the tokens;
the compiled blocks give the same latents without a graph break; token counts that do not split
evenly, a model without a sequence plan and an unknown form are clear ValueErrors.

Case: 112×128 (56 image tokens) with 24 text tokens, so that every sp piece splits evenly over tp
(the form needs it), and a batch of 2 images (the token dim is not the leading one after the batch).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.harness import run_distributed
from tests.harness import rel_l2
from tests.test_tensor_parallel import tiny_flux_dir  # noqa: F401 (a fixture)

CASE = dict(height=112, width=128, max_sequence_length=24, num_images_per_prompt=2)
TEXT, IMAGE = 24, 56
LAYOUTS = {2: [dict(tp=2)], 4: [dict(tp=4), dict(tp=2, ulysses=2), dict(tp=2, ring=2), dict(tp=2, cfg=2)]}
TRUE_CFG = dict(negative_prompt="blurry", true_cfg_scale=4.0)


def _request(**over):
    from engine import GenerateRequest

    return GenerateRequest(**{**dict(prompt="a small red circle top left", steps=2, seed=7, **CASE), **over})


def _layout_request(degrees: dict, **over):
    """--cfg 2 needs guidance on: Flux true CFG."""
    return _request(**(TRUE_CFG if degrees.get("cfg", 1) > 1 else {}), **over)


def _block_tokens(engine, degrees: dict) -> list:
    """Tokens [text, image] that the first double-stream block returns (its residual streams)."""
    seen = []
    block = engine.denoiser.transformer_blocks[0]
    handle = block.register_forward_hook(lambda m, a, out: seen.append([t.shape[1] for t in out]))
    engine.generate(_layout_request(degrees, steps=1), output_type="latent")
    handle.remove()
    return seen[0]


def _runs(world: int, model_dir: str) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    for degrees in LAYOUTS[world]:
        engine = Engine(EngineConfig(model=model_dir, ulysses=degrees.get("ulysses"), ring=degrees.get("ring"),
                                     tp=degrees["tp"], cfg=degrees.get("cfg", 1), tp_comm="sequence"))
        sp = engine.parallel.sp
        res = engine.generate(_layout_request(degrees), output_type="latent")
        assert res.params["tp_comm"] == "sequence" and "(sequence)" in res.params["layout"], res.params
        seq, seq_tokens = res.latents.clone(), _block_tokens(engine, degrees)
        engine.use_layout(dataclasses.replace(engine.parallel, tp_comm="overlap"))
        res = engine.generate(_layout_request(degrees), output_type="latent")
        assert "(overlap)" in res.params["layout"], res.params
        overlap, overlap_tokens = res.latents.clone(), _block_tokens(engine, degrees)
        # The all-reduce form on the same engine and weights: only the plan's hooks move.
        engine.use_layout(dataclasses.replace(engine.parallel, tp_comm="allreduce"))
        allreduce = engine.generate(_layout_request(degrees), output_type="latent").latents.clone()
        ar_tokens = _block_tokens(engine, degrees)
        engine.close()
        out[str(degrees)] = dict(seq=seq, overlap=overlap, allreduce=allreduce, seq_tokens=seq_tokens,
                                 overlap_tokens=overlap_tokens, ar_tokens=ar_tokens,
                                 sp=sp, tp=degrees["tp"], cfg="cfg" in degrees)
    if world == 2:
        out["errors"] = _errors(model_dir)
    return out


def _errors(model_dir: str) -> dict:
    """The messages of the mistakes, found on every rank alike (no rank left waiting in a collective)."""
    from engine import Engine, EngineConfig
    from engine.models import family
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.attention import ParallelAttention
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.plan import apply_plan
    from tests.test_plan_mechanism import _inputs

    msgs = {}
    engine = Engine(EngineConfig(model=model_dir, tp=2, tp_comm="sequence"))
    # 112×144: 63 image tokens, which 2 does not divide; refused before the pipeline runs.
    with pytest.raises(ValueError) as e:
        engine.generate(_request(width=144), output_type="latent")
    msgs["engine uneven"] = str(e.value)
    assert torch.isfinite(engine.generate(_request(steps=1), output_type="latent").latents).all()  # still usable
    engine.close()
    # The mechanism itself checks the real inputs (here 35 image and 13 text tokens), before any collective.
    model, kw = _inputs()
    mesh = Mesh.build(ParallelConfig(tp=2, tp_comm="sequence"), torch.device("cpu"))
    applied = apply_plan(model, family("flux").plan, mesh, ParallelAttention(mesh))
    with pytest.raises(ValueError) as e:
        model(**kw)
    msgs["mechanism uneven"] = str(e.value)
    applied.remove()
    with pytest.raises(ValueError) as e:
        Engine(EngineConfig(model="sd3-tiny", tp=2, tp_comm="sequence"))
    msgs["sd3"] = str(e.value)
    return msgs


@pytest.fixture(scope="module")
def single(tiny_flux_dir):  # noqa: F811
    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=tiny_flux_dir))
    out = {cfg: engine.generate(_layout_request(dict(cfg=2 if cfg else 1)), output_type="latent").latents.clone()
           for cfg in (False, True)}
    engine.close()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_form_equals_single_process_and_all_reduce_form(tiny_flux_dir, single, world):  # noqa: F811
    for rank, res in enumerate(run_distributed(_runs, world, world, tiny_flux_dir, timeout=300)):
        errors = res.pop("errors", None)
        for layout, r in res.items():
            where = f"{world} ranks, rank {rank}, {layout}"
            ref = single[r["cfg"]]
            assert rel_l2(r["seq"], ref) <= 1e-5, f"{where}: sequence form vs 1 process {rel_l2(r['seq'], ref):.2e}"
            assert rel_l2(r["allreduce"], ref) <= 1e-5, where
            assert rel_l2(r["seq"], r["allreduce"]) <= 1e-5, where
            assert rel_l2(r["overlap"], ref) <= 1e-5, f"{where}: overlap form vs 1 process {rel_l2(r['overlap'], ref):.2e}"
            # Between blocks each TP rank holds 1/tp of its sp piece in the sequence form, all of it otherwise.
            piece = [TEXT // r["sp"], IMAGE // r["sp"]]
            assert r["seq_tokens"] == r["overlap_tokens"] == [n // r["tp"] for n in piece], (where, r["seq_tokens"])
            assert r["ar_tokens"] == piece, (where, r["ar_tokens"])
        if errors is not None:
            engine_msg, mechanism_msg, sd3_msg = errors["engine uneven"], errors["mechanism uneven"], errors["sd3"]
            assert "63 image tokens" in engine_msg and "--tp-comm allreduce" in engine_msg, engine_msg
            assert "text" not in engine_msg, engine_msg  # its 24 text tokens split fine: not blamed
            assert "35 image tokens" in mechanism_msg and "13 text tokens" in mechanism_msg, mechanism_msg
            assert "sd3 models have no sequence-form" in sd3_msg and "available for: flux" in sd3_msg, sd3_msg


def _compiled(model_dir: str, tp_comm: str):
    from torch._dynamo.utils import counters

    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=model_dir, tp=2, tp_comm=tp_comm, compile=True))
    latents = engine.generate(_request(), output_type="latent").latents.clone()
    engine.close()
    # The collectives trace as functional collectives, and the overlap form's hand-out of fused products
    # to the linears traces too: no graph break in the compiled blocks.
    return latents, sum(counters["graph_break"].values())


@pytest.mark.parametrize("tp_comm", ["sequence", "overlap"])
def test_compiled_blocks_match(tiny_flux_dir, single, tp_comm):  # noqa: F811
    for rank, (latents, breaks) in enumerate(run_distributed(_compiled, 2, tiny_flux_dir, tp_comm, timeout=300)):
        assert rel_l2(latents, single[False]) <= 1e-5, f"rank {rank}: {rel_l2(latents, single[False]):.2e}"
        assert breaks == 0, f"rank {rank}: {breaks} graph breaks"


def test_bad_values_are_clear_errors():
    from engine import EngineConfig
    from engine.bench.layouts import parse_layout
    from engine.runtime.distributed import UserError
    from engine.generate import build_parser
    from engine.models import check_tp_comm_plan, family
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.plan import apply_plan
    from shardiff_parallel.tensor_seq import check_token_split

    for make in (lambda: ParallelConfig(tp=2, tp_comm="ring"), lambda: EngineConfig(tp_comm="reduce-scatter")):
        with pytest.raises(ValueError, match=r"--tp-comm must be allreduce, sequence or overlap, got '"):
            make()
    with pytest.raises(UserError, match="--tp-comm"):
        build_parser().parse_args(["--tp-comm", "scatter"])
    assert build_parser().parse_args(["--tp-comm", "sequence"]).tp_comm == "sequence"
    assert build_parser().parse_args(["--tp-comm", "overlap"]).tp_comm == "overlap"
    assert parse_layout("t4o:compile").config == ParallelConfig(tp=4, tp_comm="overlap")
    # The bench spelling: `s` right after the tp degree, nowhere else.
    assert parse_layout("t2su2:compile").config == ParallelConfig(tp=2, ulysses=2, tp_comm="sequence")
    assert parse_layout("t4").config.tp_comm == "allreduce"
    for bad in ("u2s", "t4ss", "xfuser-t2s"):
        with pytest.raises(ValueError, match=bad):
            parse_layout(bad)
    # Uneven sp pieces: 66 image tokens over 2 sp ranks are pieces of 33, which tp 2 does not split.
    uneven = r"66 image tokens \(pieces of \[33, 33\].*--tp-comm allreduce.*multiples of 4"
    with pytest.raises(ValueError, match=uneven):
        check_token_split({"image": 66, "text": 24}, sp=2, tp=2)
    check_token_split({"image": 64, "text": 24}, sp=2, tp=4)
    # Models without a sequence plan refuse it (with tp 1 the form is moot).
    seq2 = ParallelConfig(tp=2, tp_comm="sequence")
    check_tp_comm_plan(family("flux"), seq2)
    check_tp_comm_plan(family("sd3"), ParallelConfig(tp_comm="sequence"))
    for name in ("sd3", "pixart", "sana"):
        with pytest.raises(ValueError, match=f"{name} models have no sequence-form"):
            check_tp_comm_plan(family(name), seq2)
    # The mechanism refuses too, before it touches the model (no process group needed to get there).
    mesh = Mesh(seq2, (0, 1), 0, torch.device("cpu"), {"dp": 0, "cfg": 0, "ring": 0, "ulysses": 0, "tp": 0}, {})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Linear has no sequence-form tensor-parallel plan"):
        apply_plan(model, family("sd3").plan, mesh, None)
    assert not model._forward_hooks and not model._forward_pre_hooks
