"""The whole Flux pipeline on a tiny random model saved as a diffusers directory: every layout gives
the single-process image, and the single-process image is diffusers' own FluxPipeline image.

Sizes cover the even case (128², 512 text tokens) and the uneven one (112×144 → 63 image tokens,
77 text tokens: neither divides 2 or 4). One 4-rank layout also splits the VAE decode by rows
(`--vae-parallel on`: 16 and 14 latent rows over 4 ranks). Layouts also place the text encoders (--text-encoders): on the
first rank, broadcast, or sharded (read in slices from the directory's safetensors).
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import rel_l2, run_distributed

CASES = [dict(height=128, width=128, max_sequence_length=512), dict(height=112, width=144, max_sequence_length=77)]
# (ulysses, ring, vae_parallel, text encoders)
LAYOUTS = {1: [(1, 1, "auto", "auto")], 2: [(2, 1, "auto", "first"), (1, 2, "auto", "sharded")],
           4: [(2, 2, "auto", "sharded"), (4, 1, "auto", "first"), (1, 4, "auto", "auto"), (2, 2, "on", "auto")]}


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from engine.models import get_preset

    return str(get_preset("flux-tiny").save(tmp_path_factory.mktemp("flux-tiny") / "model"))


def _generate_all(world: int, model_dir: str):
    from engine import Engine, EngineConfig, GenerateRequest

    out = {}
    for ulysses, ring, vae, text_encoders in LAYOUTS[world]:
        engine = Engine(EngineConfig(model=model_dir, ulysses=ulysses, ring=ring, vae_parallel=vae,
                                     text_encoders=text_encoders))
        for i, case in enumerate(CASES):
            req = GenerateRequest(prompt="a small red circle top left", steps=3, seed=7, **case)
            latents = engine.generate(req, output_type="latent").latents
            result = engine.generate(req, output_type="np")
            assert result.params["vae_split"] == (world if vae == "on" else 1), result.params
            out[(ulysses, ring, vae, i)] = (latents.clone(), torch.from_numpy(result.image).clone())
        if vae == "on":
            # 16 px = 2 latent rows: fewer than the 4 ranks, refused before any collective.
            small = GenerateRequest(prompt="x", steps=1, height=16, width=64)
            try:
                engine.check_request(small, engine.parallel)
                raise AssertionError("a 16-pixel-high request was not refused under --vae-parallel on")
            except ValueError as e:
                assert "--vae-parallel on" in str(e) and "--height ≥ 32" in str(e), e
        engine.close()
    return out


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
        lat, img = single[(1, 1, "auto", i)]
        assert torch.isfinite(ref).all()
        assert rel_l2(lat, ref) <= 1e-5, f"case {case}: latents differ from diffusers by {rel_l2(lat, ref):.2e}"
        assert rel_l2(img, torch.from_numpy(ref_img)) <= 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_equals_single_process(tiny_flux_dir, single, world):
    results = run_distributed(_generate_all, world, world, tiny_flux_dir, timeout=300)
    for rank, res in enumerate(results):
        for (u, r, vae, i), (lat, img) in res.items():
            ref_lat, ref_img = single[(1, 1, "auto", i)]
            assert lat.shape == ref_lat.shape
            err = rel_l2(lat, ref_lat)
            assert err <= 1e-4, f"rank {rank} ulysses {u} ring {r} case {CASES[i]}: latents rel L2 {err:.2e}"
            assert rel_l2(img, ref_img) <= 1e-4, f"rank {rank} ulysses {u} ring {r} vae {vae}: image differs"
