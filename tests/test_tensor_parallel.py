"""Tensor parallelism on the tiny Flux: TP-2, TP-4, TP-2×Ulysses-2, TP-2×Ring-2 (and TP-2×CFG-2 on the
model called directly) against one process; sharded loading reads exactly each rank's byte ranges; a
TP degree that does not split the model fails with a clear message before any collective.

Case: 112×144 (63 image tokens) with 77 text tokens — uneven for every sequence split.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import rel_l2, run_distributed

CASE = dict(height=112, width=144, max_sequence_length=77)
LAYOUTS = {2: [dict(tp=2)], 4: [dict(tp=4), dict(tp=2, ulysses=2), dict(tp=2, ring=2)]}


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from engine.models import get_preset

    return str(get_preset("flux-tiny").save(tmp_path_factory.mktemp("flux-tiny-tp") / "model"))


def _request():
    from engine import GenerateRequest

    return GenerateRequest(prompt="a small red circle top left", steps=2, seed=7, **CASE)


# The other transformer families at TP-2, from their presets (sharded init), with guidance on.
OTHER_FAMILIES = ("sd3-tiny", "pixart-tiny")


def _family_request():
    from engine import GenerateRequest

    return GenerateRequest(prompt="a small red circle top left", height=80, width=48, steps=2, seed=5,
                           max_sequence_length=24, guidance=4.5)


def _family_runs(tp: int) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    for model in OTHER_FAMILIES:
        engine = Engine(EngineConfig(model=model, tp=tp))
        out[model] = engine.generate(_family_request(), output_type="latent").latents.clone()
        engine.close()
    return out


def _engine_runs(world: int, model_dir: str):
    from engine import Engine, EngineConfig
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.attention import ParallelAttention
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.plan import apply_plan
    from engine.models import family
    from tests.test_plan_mechanism import _inputs

    out = {}
    for degrees in LAYOUTS[world]:
        engine = Engine(EngineConfig(model=model_dir, ulysses=degrees.get("ulysses"), ring=degrees.get("ring"),
                                     tp=degrees["tp"]))
        # Loaded sharded: every TP-split weight holds 1/tp of the full one.
        q = engine.denoiser.transformer_blocks[0].attn.to_q.weight
        assert q.shape[0] == engine.denoiser.transformer_blocks[0].attn.to_q.out_features // degrees["tp"]
        out[str(degrees)] = engine.generate(_request(), output_type="latent").latents.clone()
        engine.close()
    if world == 2:
        # A preset initialises only its shard, with the same logical weights as the saved directory.
        engine = Engine(EngineConfig(model="flux-tiny", tp=2))
        out["preset tp2"] = engine.generate(_request(), output_type="latent").latents.clone()
        engine.close()
        out |= _family_runs(2)
    else:
        # TP × CFG: the transformer called directly on a [uncond, cond] batch.
        model, kw = _inputs()
        ref = model(**kw)[0]
        mesh = Mesh.build(ParallelConfig(tp=2, cfg=2), torch.device("cpu"))
        applied = apply_plan(model, family("flux").plan, mesh, ParallelAttention(mesh))
        got = model(**kw)[0]
        applied.remove()
        out["direct tp2 cfg2"] = rel_l2(got, ref)
        # remove() put the full weights back.
        assert torch.equal(model(**kw)[0], ref)
    return out


@pytest.fixture(scope="module")
def single(tiny_flux_dir):
    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=tiny_flux_dir))
    latents = engine.generate(_request(), output_type="latent").latents.clone()
    engine.close()
    return {"flux": latents} | _family_runs(1)


@pytest.mark.parametrize("world", [2, 4])
def test_tp_layouts_equal_single_process(tiny_flux_dir, single, world):
    for rank, res in enumerate(run_distributed(_engine_runs, world, world, tiny_flux_dir, timeout=300)):
        for layout, lat in res.items():
            err = lat if isinstance(lat, float) else rel_l2(lat, single.get(layout, single["flux"]))
            assert err <= 1e-5, f"{world} ranks, rank {rank}, {layout}: rel L2 {err:.2e}"


def test_sharded_loading_reads_exactly_each_ranks_bytes(tiny_flux_dir):
    from pathlib import Path

    from engine.models import family
    from engine.loading.slices import SafetensorsSlices
    from engine.loading.sharded import load_sharded_denoiser
    from shardiff_parallel.tensor import local_shards

    fam = family("flux")
    folder = Path(tiny_flux_dir) / "transformer"
    full = SafetensorsSlices(folder)
    tensor_bytes = {n: e.nbytes for n, e in full.entries.items()}
    full_model = load_sharded_denoiser(tiny_flux_dir, fam, tp=1, tp_rank=0, dtype=torch.float32, device="cpu")
    shards = local_shards(full_model, fam.plan.tp_styles, 2, 1)
    # Bytes asked for, per tensor (safetensors copies exactly those out of its memory map).
    covered = {n: torch.zeros(b, dtype=torch.int32) for n, b in tensor_bytes.items()}
    for t in range(2):
        reader = SafetensorsSlices(folder, record_ranges=True)
        model = load_sharded_denoiser(tiny_flux_dir, fam, tp=2, tp_rank=t, dtype=torch.float32, device="cpu",
                                      reader=reader)
        sl = local_shards(full_model, fam.plan.tp_styles, 2, t)
        expected = sum(b if n not in sl else b // 2 for n, b in tensor_bytes.items())
        assert reader.bytes_read == expected, (t, reader.bytes_read, expected)
        assert reader.bytes_read < 0.55 * sum(tensor_bytes.values())
        for name, start, end in reader.ranges:
            covered[name][start:end] += 1
        # Each shard is the matching slice of the full weights.
        for name, p in model.named_parameters():
            ref = dict(full_model.named_parameters())[name].data
            assert torch.equal(p, ref if name not in sl else sl[name].take(ref)), name
        assert {n for n, _ in model.named_parameters()} == set(tensor_bytes)
    # Across the two ranks every sharded byte is read exactly once, replicated ones (the row-split
    # layers' biases too) by both.
    covered = torch.cat(list(covered.values()))
    replicated = sum(b for n, b in tensor_bytes.items() if n not in shards)
    assert int((covered == 2).sum()) == replicated
    assert int((covered == 1).sum()) + replicated == sum(tensor_bytes.values())
    assert int((covered > 2).sum()) == 0


def test_tp_degree_that_does_not_split_the_model_is_a_clear_error():
    from engine import Engine, EngineConfig
    from engine.loading import inspect_model
    from engine.models.mmdit import check_tp_widths as check_flux_tp
    from shardiff_parallel.tensor import Colwise, local_shards

    with pytest.raises(ValueError, match=r"--tp 3 does not divide the model's 8 attention heads.*: 2, 4, 8"):
        Engine(EngineConfig(model="flux-tiny", tp=3))
    check_flux_tp(inspect_model("flux-tiny"), 4)
    # The generic mechanism names the layer whose width the degree does not split (an MLP of width 6).
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"output width of 0 is 6, which --tp 4 does not divide"):
        local_shards(mlp, {"0": Colwise()}, 4, 0)
