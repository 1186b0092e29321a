"""The generic plan mechanism on the tiny Flux transformer called directly: batch split over the cfg
axis, sequence split over ring × ulysses, and both at once, against one process."""

from __future__ import annotations

import torch

from tests.harness import run_distributed

LAYOUTS = {2: [dict(cfg=2), dict(ulysses=2)], 4: [dict(cfg=2, ulysses=2), dict(cfg=2, ring=2)]}


def _inputs():
    from engine.models import get_preset
    from diffusers import FluxPipeline

    pipe = get_preset("flux-tiny").build_pipeline(dtype=torch.float32, device="cpu", with_text_encoders=False)
    g = torch.Generator().manual_seed(3)
    B, txt, h, w = 2, 13, 10, 14  # 35 image tokens, 13 text tokens: uneven for 2 and 4 ranks
    kw = dict(
        hidden_states=torch.randn(B, (h // 2) * (w // 2), 16, generator=g),
        encoder_hidden_states=torch.randn(B, txt, 64, generator=g),
        pooled_projections=torch.randn(B, 32, generator=g),
        timestep=torch.tensor([0.3, 0.7]),
        guidance=torch.tensor([3.5, 3.5]),
        img_ids=FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32),
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )
    return pipe.transformer, kw


def _run(world: int):
    from engine.models import family
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.attention import ParallelAttention
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.plan import apply_plan

    model, kw = _inputs()
    ref = model(**kw)[0]
    out = {}
    for degrees in LAYOUTS[world]:
        mesh = Mesh.build(ParallelConfig(**degrees), torch.device("cpu"))
        applied = apply_plan(model, family("flux").plan, mesh, ParallelAttention(mesh))
        got = model(**kw)[0]
        applied.remove()
        out[str(degrees)] = ((got - ref).norm() / ref.norm()).item()
    return out


def test_cfg_and_sequence_splits_match_one_process():
    for world in (2, 4):
        for rank, errs in enumerate(run_distributed(_run, world, world)):
            for layout, err in errs.items():
                assert err <= 1e-5, f"{world} ranks, rank {rank}, {layout}: rel error {err:.2e}"
