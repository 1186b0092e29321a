"""Qwen-Image's editing forms end to end on tiny random diffusers directories: img2img and inpainting
(qwen-image-tiny), Edit and Edit inpainting (qwen-image-edit-tiny), Edit-Plus with two reference images
(qwen-image-edit-plus-tiny, Edit-2511's zero_cond_t). One process gives diffusers' own pipeline's latents
for the same directory, inputs and seed; Ulysses-2, Ring-2, TP-2 and CFG-2 (true CFG: one transformer
call per rank) give the one process's, and so does Edit-Plus under Ulysses-2 with its text encoded on one
rank (`--text-encoders first`).

Splits are uneven: the Edit forms encode each reference at ~1024² pixels, 80×48 → 41×25 tokens and 48×64
→ 28×37 (uneven over two ranks), beside the output's 3×5 (96×160) or, for Edit inpainting (which draws at
its reference's size), 41×25; the prompts and negative prompts have their own text lengths. Every request
runs true CFG, so each layout runs every one of them. Without torchvision here, the pipelines'
Qwen2VLProcessor is the image-and-text one, on both sides (engine/loading/processors.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.harness import rel_l2, run_distributed

MODELS = ("qwen-image-tiny", "qwen-image-edit-tiny", "qwen-image-edit-plus-tiny")
PROMPT, NEGATIVE = "make the circle a red square", "blue"
LAYOUTS = [dict(ulysses=2), dict(ring=2), dict(tp=2), dict(cfg=2)]
FIRST = dict(ulysses=2, text_encoders="first")
"""Edit-Plus also with its text encoded on one rank: Qwen2.5-VL sees the images there, the other rank gets
the embeddings."""


def _images():
    rng = np.random.default_rng(7)
    wide = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (80, 48), 0)
    mask.paste(255, (8, 8, 56, 40))
    return wide, tall, mask


def _requests(model: str) -> list:
    """(the pipeline it must run, the request)."""
    from engine import GenerateRequest

    wide, tall, mask = _images()
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, steps=2, seed=5)
    if model == "qwen-image-tiny":
        return [("QwenImageImg2ImgPipeline", GenerateRequest(image=wide, strength=0.8, height=48, width=80, **common)),
                ("QwenImageInpaintPipeline", GenerateRequest(image=wide, mask_image=mask, strength=0.9, height=48,
                                                             width=80, **common))]
    if model == "qwen-image-edit-tiny":
        return [("QwenImageEditPipeline", GenerateRequest(image=wide, height=96, width=160, **common)),
                ("QwenImageEditInpaintPipeline", GenerateRequest(image=wide, mask_image=mask, strength=0.9, **common))]
    return [("QwenImageEditPlusPipeline", GenerateRequest(image=[wide, tall], height=96, width=160, **common))]


def _generate(world: int, dirs: dict[str, str]) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    for model in MODELS:
        layouts = [{}] if world == 1 else LAYOUTS + ([FIRST] if model == "qwen-image-edit-plus-tiny" else [])
        for degrees in layouts:
            engine = Engine(EngineConfig(model=dirs[model], **degrees))
            for i, (cls, req) in enumerate(_requests(model)):
                result = engine.generate(req, output_type="latent")
                assert result.params["pipeline"] == cls
                out[(model, str(degrees), i)] = result.latents.clone()
            engine.close()
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from engine.models import get_preset

    root = tmp_path_factory.mktemp("qwen-edit")
    return {m: str(get_preset(m).save(root / m)) for m in MODELS}


@pytest.fixture(scope="module")
def single(dirs):
    return _generate(1, dirs)


def _diffusers(cls: str, directory: str):
    import diffusers

    from engine.loading import processors

    extra = {}
    if cls.startswith("QwenImageEdit") and processors.needs_stand_in("Qwen2VLProcessor"):
        extra["processor"] = processors.load("Qwen2VLProcessor", f"{directory}/processor")
    pipe = getattr(diffusers, cls).from_pretrained(directory, dtype=torch.float32, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_single_process_equals_diffusers(dirs, single):
    for model in MODELS:
        for i, (cls, req) in enumerate(_requests(model)):
            kw = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, true_cfg_scale=req.true_cfg_scale,
                      image=req.image, num_inference_steps=req.steps, output_type="latent",
                      generator=torch.Generator("cpu").manual_seed(req.seed))
            if req.mask_image is not None:
                kw["mask_image"] = req.mask_image
            if req.strength is not None:
                kw["strength"] = req.strength
            if req.height is not None:
                kw.update(height=req.height, width=req.width)
            ref, got = _diffusers(cls, dirs[model])(**kw).images, single[(model, "{}", i)]
            assert torch.isfinite(ref).all() and got.shape == ref.shape, (cls, got.shape, ref.shape)
            assert rel_l2(got, ref) <= 1e-5, f"{cls}: differs from diffusers by {rel_l2(got, ref):.2e}"
    # Edit inpainting drew at its reference's size (41×25 tokens), the others at the size asked.
    assert single[("qwen-image-edit-tiny", "{}", 1)].shape[1] == 41 * 25
    assert single[("qwen-image-edit-plus-tiny", "{}", 0)].shape[1] == 3 * 5


def test_layouts_equal_single_process(dirs, single):
    results = run_distributed(_generate, 2, 2, dirs, timeout=600)
    for rank, res in enumerate(results):
        assert {(m, i) for m, _, i in res} == {(m, i) for m, _, i in single}
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
    fam, layout = family("qwen-image"), ParallelConfig()
    edit, plus = inspect_model(dirs["qwen-image-edit-tiny"]), inspect_model(dirs["qwen-image-edit-plus-tiny"])
    for info, kw, msg in [
        (edit, dict(image=[wide, tall]), "--image: QwenImageEditPipeline takes one input image, got 2"),
        (plus, dict(image=[wide, tall, wide, tall]), "--image: QwenImageEditPlusPipeline takes at most 3 input images, got 4"),
        (plus, dict(image=wide, mask_image=mask), "--mask-image: QwenImageEditPlusPipeline has no form that takes an "
                                                  "inpainting mask"),
        (edit, {}, "QwenImageEditPipeline needs --image"),
        (edit, dict(image=wide, mask_image=mask, height=96, width=160),
         "--height/--width: QwenImageEditInpaintPipeline draws at 1312x800 for this input image"),
        (plus, dict(image=wide, prompt=["a", "b"]), "QwenImageEditPlusPipeline takes one prompt per call"),
    ]:
        fields = {"prompt": PROMPT, "steps": 2, **kw}
        with pytest.raises(ValueError, match=msg):
            check_request(GenerateRequest(**fields), info, fam, layout)
    # Without a size: diffusers' default, ~1024² pixels at the image's aspect (Edit-Plus: the last image's).
    assert (check_request(GenerateRequest(prompt=PROMPT, image=wide), edit, fam, layout).width,
            check_request(GenerateRequest(prompt=PROMPT, image=[wide, tall]), plus, fam, layout).height) == (1312, 1184)
