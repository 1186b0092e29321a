"""Sana split by image rows (2, 3 and 4 ways, uneven), CFG × sequence, TP and TP × sequence, on the
tiny random Sana directory (Q/K norms across heads as SANA 1.5, sincos positions as the 4K model, a
DC-AE of scale 32), against one process, which equals diffusers' own SanaPipeline.

224 × 160 pixels are 7 × 5 latent rows × columns: 7 rows split [4, 3], [3, 2, 2] and [2, 2, 2, 1]
(a one-row piece, whose halo comes from both neighbours). Also: the linear-attention split as a pure
function, the processors against diffusers' on one process, and the refusals (TP degrees, too few rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.harness import run_distributed

HEIGHT, WIDTH = 224, 160
# On 4 gloo processes, each layout on ranks 0..n-1 (as engine.bench runs them). The tiny model has 2 heads:
# Ulysses-3 and -4 run only because Sana's linear attention splits no heads.
LAYOUTS = [dict(ulysses=2), dict(ring=3), dict(ulysses=4), dict(ulysses=2, ring=2), dict(cfg=2, ulysses=2),
           dict(tp=2), dict(tp=2, ulysses=2)]
WORLD = 4


def _request():
    from engine import GenerateRequest

    return GenerateRequest(prompt="a small red circle top left", negative_prompt="blue stripes", height=HEIGHT,
                           width=WIDTH, steps=2, seed=5, max_sequence_length=24, guidance=4.5)


def _call_kwargs():
    from engine.models import family

    req = _request()
    return dict(family("sana").call_kwargs(req), height=HEIGHT, width=WIDTH, num_inference_steps=req.steps,
                generator=torch.Generator("cpu").manual_seed(req.seed))


def _engine_run(folder: str, **degrees) -> tuple[torch.Tensor, torch.Tensor]:
    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=folder, **degrees))
    lat = engine.generate(_request(), output_type="latent").latents.clone()
    img = torch.from_numpy(np.asarray(engine.generate(_request(), output_type="np").image))
    engine.close()
    return lat, img


def _layouts(folder: str) -> dict:
    """Every layout's latents on the ranks that ran it; the engine's (all ranks) at the end."""
    import torch.distributed as dist
    from diffusers import SanaPipeline

    from engine.models import family
    from shardiff_parallel.attention import ParallelAttention
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.plan import apply_plan

    pipe = SanaPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    # new_group is collective over the world: every rank builds every mesh, in the same order.
    configs = [ParallelConfig(**d) for d in LAYOUTS]
    meshes = [Mesh.build(c, torch.device("cpu"), ranks=list(range(c.world_size))) for c in configs]
    out = {}
    for degrees, mesh in zip(LAYOUTS, meshes):
        if mesh is None:
            continue
        applied = apply_plan(pipe.transformer, family("sana").plan, mesh, ParallelAttention(mesh))
        out[str(degrees)] = pipe(**_call_kwargs(), output_type="latent").images
        applied.remove()
    dist.barrier()
    # The engine's own path: degrees resolved without a head count, TP shards read from the directory.
    out["engine ulysses 4"] = _engine_run(folder, ulysses=4)
    out["engine tp 2 ring 2"] = _engine_run(folder, tp=2, ring=2)
    return out


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from engine.models import get_preset

    return str(get_preset("sana-tiny").save(tmp_path_factory.mktemp("sana") / "sana-tiny"))


@pytest.fixture(scope="module")
def single(folder):
    return _engine_run(folder)


def test_single_process_equals_diffusers(folder, single):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for key, output_type in ((0, "latent"), (1, "np")):
        ref = pipe(**_call_kwargs(), output_type=output_type).images
        ref = torch.as_tensor(np.asarray(ref if key == 0 else ref[0]))
        assert ref.shape == single[key].shape and torch.isfinite(ref).all()
        assert _rel(single[key], ref) <= 1e-5, f"output {key} differs from diffusers by {_rel(single[key], ref):.2e}"


def test_row_splits_cfg_and_tp_equal_one_process(folder, single):
    results = run_distributed(_layouts, WORLD, folder, timeout=300)
    for rank, res in enumerate(results):
        ran = [d for d in LAYOUTS if rank < np.prod(list(d.values()))]
        assert sorted(res) == sorted([str(d) for d in ran] + ["engine ulysses 4", "engine tp 2 ring 2"]), rank
        for name, got in res.items():
            pairs = zip(("latents", "image"), got, single) if isinstance(got, tuple) else [("latents", got, single[0])]
            for what, a, b in pairs:
                assert _rel(a, b) <= 1e-4, f"rank {rank} {name}: {what} rel L2 {_rel(a, b):.2e}"


def test_linear_attention_split_is_exact():
    """Per-rank key-value states of uneven pieces, summed (what the all-reduce does), applied to each
    piece's queries, equal the whole sequence's linear attention (float64 reference)."""
    from shardiff_parallel.linear_attention import apply_kv_state, kv_state

    g = torch.Generator().manual_seed(0)
    B, H, D, S = 2, 3, 8, 29
    q, k, v = (torch.randn(B, H, D, S, generator=g).relu() for _ in range(3))
    v = v - 0.3  # values of both signs
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref = (v64 @ k64.transpose(-1, -2) @ q64) / ((k64.sum(-1, keepdim=True).transpose(-1, -2) @ q64) + 1e-15)
    for sizes in ([15, 14], [10, 10, 9], [8, 7, 7, 7], [29]):
        pieces = [(t.split(sizes, dim=-1)) for t in (q, k, v)]
        state = sum(kv_state(kp, vp) for kp, vp in zip(pieces[1], pieces[2]))
        assert state.dtype == torch.float32 and state.shape == (B, H, D + 1, D)
        out = torch.cat([apply_kv_state(state, qp, 1e-15) for qp in pieces[0]], dim=-1)
        assert _rel(out, ref) <= 1e-5, f"pieces {sizes}: {_rel(out, ref):.2e}"


def test_processors_equal_diffusers_on_one_process():
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    from engine.models.sana import SanaCrossAttnProcessor, SanaLinearAttnProcessor
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.plan import SeqContext

    torch.manual_seed(0)
    ctx = SeqContext(Mesh.single(torch.device("cpu")))
    x = torch.randn(2, 35, 32)
    text = torch.randn(2, 11, 16)
    bias = torch.zeros(2, 1, 11)
    bias[0, :, 7:] = -10000.0  # padded text tokens of the first prompt
    for qk_norm in (None, "rms_norm_across_heads"):
        kv = 4 if qk_norm else None
        self_attn = Attention(query_dim=32, heads=4, dim_head=8, kv_heads=kv, qk_norm=qk_norm, bias=False,
                              processor=SanaLinearAttnProcessor2_0())
        cross = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16, kv_heads=2 if qk_norm else None,
                          qk_norm=qk_norm, bias=True, processor=SanaAttnProcessor2_0())
        with torch.no_grad():
            ref = self_attn(x)
            self_attn.set_processor(SanaLinearAttnProcessor(ctx))
            assert _rel(self_attn(x), ref) <= 1e-6
            ref = cross(x, encoder_hidden_states=text, attention_mask=bias)
            cross.set_processor(SanaCrossAttnProcessor(ctx))
            assert _rel(cross(x, encoder_hidden_states=text, attention_mask=bias), ref) <= 1e-6
            # The form a TP rank runs (heads from the width, the mask broadcast), here with all heads.
            got = SanaCrossAttnProcessor.shard_heads(cross, x, text, bias)
            assert _rel(got, ref) <= 1e-6


def test_impossible_layouts_are_refused():
    from engine.loading import inspect_model
    from engine.models import family
    from shardiff_parallel.config import ParallelConfig

    sana = family("sana")
    big = inspect_model("sana-4.8b")
    assert (big.num_heads, big.num_layers) == (70, 60)
    assert dict((w, n) for w, n in big.tp_widths) == {"attention heads": 70, "cross-attention heads": 20,
                                                       "Mix-FFN channels": 5600}
    for tp in (2, 5, 10):
        sana.check_tp(big, tp)
    with pytest.raises(ValueError, match=r"--tp 7 does not divide the model's 20 cross-attention heads; TP degrees "
                                         r"that work for this model: 2, 5, 10$"):
        sana.check_tp(big, 7)
    with pytest.raises(ValueError, match=r"--tp 4 does not divide the model's 70 attention heads; .*: 2, 5, 10$"):
        sana.check_tp(big, 4)
    sana.check_axes(dict(cfg=2, ulysses=2, ring=2, tp=2))
    # Ulysses splits no Sana heads: any degree resolves (70 heads would refuse --ulysses 4 elsewhere).
    assert sana.degree_heads(big, 8, 2) % (4 * 2) == 0 and not sana.heads_split
    tiny = inspect_model("sana-tiny")
    with pytest.raises(ValueError, match=r"--height 96 gives 3 rows of image tokens, fewer than the 4 sequence-parallel"
                                         r" ranks .*use --height 128 or more"):
        sana.check_size(tiny, ParallelConfig(ulysses=2, ring=2), 96, 96)
    sana.check_size(tiny, ParallelConfig(ulysses=2, ring=2), 128, 96)
    sana.check_size(tiny, ParallelConfig(cfg=2), 32, 32)
