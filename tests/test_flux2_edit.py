"""FLUX.2's editing forms end to end on tiny random diffusers directories: reference images on Flux2Pipeline
(flux2-dev-tiny) and Flux2KleinPipeline (flux2-klein-tiny, a base model: CFG), klein's inpainting with a
further reference, and klein-KV (flux2-klein-kv-tiny: the references' K/V computed in the first step, reused in
the next two). One process gives diffusers' own pipeline's latents for the same directory, inputs and seed;
Ulysses-2, Ring-2, TP-2 and CFG-2 (where the pipeline runs two branches) give the one process's.

Every split is uneven: the references are 80×64 → 4×5 tokens and 64×96 → 6×4 beside a 3×5 output (or, without
a size, the first reference's 4×5); the text is padded to 45. klein-KV runs three requests in a row on one
engine — two references, then one other reference, then none — so a cache left from one request would show in
the next, and after each one no processor still holds a kept K/V.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness import rel_l2, run_distributed

MODELS = ("flux2-dev-tiny", "flux2-klein-tiny", "flux2-klein-kv-tiny")
PROMPT = "a small red circle top left"
LAYOUTS = [dict(ulysses=2), dict(ring=2), dict(tp=2), dict(cfg=2)]


def _images():
    rng = np.random.default_rng(7)
    wide = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (96, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (8, 8, 56, 40))
    return wide, tall, mask


def _requests(model: str) -> list:
    """(the pipeline it must run, the request)."""
    from engine import GenerateRequest

    wide, tall, mask = _images()
    common = dict(prompt=PROMPT, max_sequence_length=45, steps=2, seed=5)
    if model == "flux2-dev-tiny":
        return [("Flux2Pipeline", GenerateRequest(image=[wide, tall], guidance=4.0, height=48, width=80, **common))]
    if model == "flux2-klein-tiny":
        return [("Flux2KleinPipeline", GenerateRequest(image=[wide, tall], guidance=4.0, **common)),
                ("Flux2KleinInpaintPipeline", GenerateRequest(image=[wide, tall], mask_image=mask, strength=0.9,
                                                              guidance=4.0, **common))]
    kv = dict(common, steps=3, height=48, width=80)
    return [("Flux2KleinKVPipeline", GenerateRequest(image=[wide, tall], **kv)),
            ("Flux2KleinKVPipeline", GenerateRequest(image=tall, **kv)),
            ("Flux2KleinKVPipeline", GenerateRequest(**kv))]


def _kept(engine) -> int:
    """K/V entries the KV processors still hold."""
    processors = (getattr(m, "processor", None) for m in engine.denoiser.modules())
    return sum(len(p.kv.kept) for p in processors if hasattr(p, "kv"))


def _generate(world: int, dirs: dict[str, str]) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    for model in MODELS:
        for degrees in [{}] if world == 1 else LAYOUTS:
            if degrees.get("cfg", 1) > 1 and model != "flux2-klein-tiny":
                continue  # FLUX.2-dev and klein-KV run one transformer call per step
            engine = Engine(EngineConfig(model=dirs[model], **degrees))
            for i, (cls, req) in enumerate(_requests(model)):
                result = engine.generate(req, output_type="latent")
                assert result.params["pipeline"] == cls
                out[(model, str(degrees), i)] = result.latents.clone()
                if model == "flux2-klein-kv-tiny":
                    assert _kept(engine) == 0, "a request's reference K/V outlived it"
            engine.close()
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from engine.models import get_preset

    root = tmp_path_factory.mktemp("flux2-edit")
    return {m: str(get_preset(m).save(root / m)) for m in MODELS}


@pytest.fixture(scope="module")
def single(dirs):
    return _generate(1, dirs)


def test_single_process_equals_diffusers(dirs, single):
    import diffusers

    for model in MODELS:
        for i, (cls, req) in enumerate(_requests(model)):
            pipe = getattr(diffusers, cls).from_pretrained(dirs[model], dtype=torch.float32, local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            kw = dict(prompt=req.prompt, max_sequence_length=45, num_inference_steps=req.steps, output_type="latent",
                      generator=torch.Generator("cpu").manual_seed(req.seed))
            if cls != "Flux2KleinKVPipeline":
                kw["guidance_scale"] = req.guidance
            if cls == "Flux2KleinInpaintPipeline":  # the first image repainted, the rest its references
                kw.update(image=req.image[0], image_reference=req.image[1:], mask_image=req.mask_image,
                          strength=req.strength)
            elif req.image is not None:
                kw["image"] = req.image
            if req.height is not None:
                kw.update(height=req.height, width=req.width)
            ref, got = pipe(**kw).images, single[(model, "{}", i)]
            assert torch.isfinite(ref).all() and got.shape == ref.shape, (cls, got.shape, ref.shape)
            assert rel_l2(got, ref) <= 1e-5, f"{cls} request {i}: differs from diffusers by {rel_l2(got, ref):.2e}"
    # Without a size, klein drew at its first reference's size (4×5 tokens of 16 pixels: 64×80).
    assert single[("flux2-klein-tiny", "{}", 0)].shape[-2:] == (8, 10)


def test_layouts_equal_single_process(dirs, single):
    results = run_distributed(_generate, 2, 2, dirs, timeout=600)
    for rank, res in enumerate(results):
        expected = {(m, i) for m, _, i in single}
        assert {(m, i) for m, _, i in res} == expected
        assert sum(1 for m, d, _ in res if "cfg" in d) == 2  # klein and its inpainting under CFG-2
        for (model, degrees, i), lat in res.items():
            err = rel_l2(lat, single[(model, "{}", i)])
            assert err <= 1e-5, f"rank {rank} {model} {degrees} request {i}: latents rel L2 {err:.2e}"


def test_edit_requests_refused_before_any_collective(dirs):
    from shardiff_parallel.config import ParallelConfig

    from engine import GenerateRequest
    from engine.loading import inspect_model
    from engine.models import family
    from engine.request_check import check_request

    wide, tall, mask = _images()
    klein, kv = inspect_model(dirs["flux2-klein-tiny"]), inspect_model(dirs["flux2-klein-kv-tiny"])
    small = Image.new("RGB", (48, 96))
    for fam, info, kw, layout, msg in [
        ("flux2-klein", klein, dict(image=[wide] * 5), {}, "Flux2KleinPipeline takes at most 4 input images, got 5"),
        ("flux2-klein", klein, dict(image=small), {}, r"--image is 48x96: FLUX.2's reference images need sides of at "
                                                      "least 64 pixels"),
        ("flux2-klein", klein, dict(image=wide, strength=0.5), {}, "--strength: Flux2KleinPipeline takes none"),
        ("flux2-klein", klein, dict(image=wide, mask_image=mask, height=48, width=80), {},
         "--height/--width: Flux2KleinInpaintPipeline draws at 80x64 for this input image"),
        ("flux2-klein-kv", kv, dict(image=wide, negative_prompt="blue"), {}, "Flux2KleinKVPipeline has no negative"),
        ("flux2-klein-kv", kv, dict(image=wide, mask_image=mask), {},
         "--mask-image: shardiff runs no flux2-klein-kv pipeline that takes an inpainting mask"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_request(GenerateRequest(prompt=PROMPT, **kw), info, family(fam), ParallelConfig(**layout))
    with pytest.raises(ValueError, match="flux2-klein-kv models cannot use --cfg: Flux2KleinKVPipeline runs one"):
        family("flux2-klein-kv").check_axes(dict(cfg=2, ulysses=2))
    from engine import EngineConfig
    from engine.preflight import preflight

    assert "already reuses work across steps" in (preflight(EngineConfig(model="flux2-klein-kv-tiny",
                                                                         cache="first-block")).error or "")
    # Without a size: the first reference's, fitted to 1024² pixels (a 2048×1536 image: 1182×886 → 1168×880).
    big = Image.new("RGB", (2048, 1536))
    checked = check_request(GenerateRequest(prompt=PROMPT, image=[big, wide]), klein, family("flux2-klein"),
                            ParallelConfig())
    assert (checked.width, checked.height) == (1168, 880)


def test_cached_step_before_its_first_is_an_error():
    from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

    from engine.models import family, get_preset
    from shardiff_parallel.attention import ParallelAttention
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.plan import apply_plan

    model = get_preset("flux2-klein-kv-tiny").build_component("transformer", dtype=torch.float32, device="cpu")
    mesh = Mesh.single(torch.device("cpu"))
    applied = apply_plan(model, family("flux2-klein-kv").plan, mesh, ParallelAttention(mesh))
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 6, 16, generator=g), timestep=torch.tensor([0.5]),
              encoder_hidden_states=torch.randn(1, 3, 96, generator=g), img_ids=torch.zeros(1, 6, 4),
              txt_ids=torch.zeros(1, 3, 4), return_dict=False)
    with pytest.raises(ValueError, match="a cached FLUX.2-klein-KV step before its first step kept the references"):
        model(**kw, kv_cache=Flux2KVCache(2, 2), kv_cache_mode="cached")
    applied.remove()
