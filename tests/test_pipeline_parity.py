"""The whole Flux pipeline on a tiny random model saved as a diffusers directory: every layout gives
the single-process image, and the single-process image is diffusers' own FluxPipeline image.

Sizes cover the even case (128², 512 text tokens) and the uneven one (112×144 → 63 image tokens,
77 text tokens: neither divides 2 or 4). Layouts also place the text encoders (--text-encoders): on the
first rank, broadcast, or sharded (read in slices from the directory's safetensors).
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

CASES = [dict(height=128, width=128, max_sequence_length=512), dict(height=112, width=144, max_sequence_length=77)]
# (ulysses, ring, text encoders)
LAYOUTS = {1: [(1, 1, "auto")], 2: [(2, 1, "first"), (1, 2, "sharded")],
           4: [(2, 2, "sharded"), (4, 1, "first"), (1, 4, "auto")]}


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from engine.models import get_preset

    return str(get_preset("flux-tiny").save(tmp_path_factory.mktemp("flux-tiny") / "model"))


def _generate_all(world: int, model_dir: str):
    from engine import Engine, EngineConfig, GenerateRequest

    out = {}
    for ulysses, ring, text_encoders in LAYOUTS[world]:
        engine = Engine(EngineConfig(model=model_dir, ulysses=ulysses, ring=ring, text_encoders=text_encoders))
        for i, case in enumerate(CASES):
            req = GenerateRequest(prompt="a small red circle top left", steps=3, seed=7, **case)
            latents = engine.generate(req, output_type="latent").latents
            image = engine.generate(req, output_type="np").image
            out[(ulysses, ring, i)] = (latents.clone(), torch.from_numpy(image).clone())
        engine.close()
    return out


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def single(tiny_flux_dir):
    return _generate_all(1, tiny_flux_dir)


def test_single_process_equals_diffusers_flux_pipeline(tiny_flux_dir, single):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for i, case in enumerate(CASES):
        kw = dict(prompt="a small red circle top left", num_inference_steps=3, guidance_scale=3.5, **case)
        ref = pipe(**kw, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
        ref_img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
        lat, img = single[(1, 1, i)]
        assert torch.isfinite(ref).all()
        assert _rel(lat, ref) <= 1e-5, f"case {case}: latents differ from diffusers by {_rel(lat, ref):.2e}"
        assert _rel(img, torch.from_numpy(ref_img)) <= 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_equals_single_process(tiny_flux_dir, single, world):
    results = run_distributed(_generate_all, world, world, tiny_flux_dir, timeout=300)
    for rank, res in enumerate(results):
        for (u, r, i), (lat, img) in res.items():
            ref_lat, ref_img = single[(1, 1, i)]
            assert lat.shape == ref_lat.shape
            err = _rel(lat, ref_lat)
            assert err <= 1e-4, f"rank {rank} ulysses {u} ring {r} case {CASES[i]}: latents rel L2 {err:.2e}"
            assert _rel(img, ref_img) <= 1e-4
