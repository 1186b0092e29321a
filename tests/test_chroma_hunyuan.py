"""Chroma and HunyuanImage-2.1 end to end on tiny random diffusers directories: every layout (Ulysses-2,
Ring-2, TP-2, CFG-2, and their products on 4 ranks) gives the single-process latents, and the single
process gives diffusers' own pipeline's for the same seed.

Sizes are uneven for every split: Chroma 48×80 → 15 image tokens, HunyuanImage 96×160 → 15. Both
carry text masks through every layout: Chroma's T5 padding (an additive mask: see engine/models/chroma.py),
HunyuanImage's padded Qwen2.5-VL and ByT5 tokens (dropped keys). Each second request is a batch of two
prompts of different lengths, so the samples' masks differ. HunyuanImage's prompt quotes a text to
render, so its ByT5 glyph tokens are used.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import rel_l2, run_distributed

MODELS = ("chroma-tiny", "hunyuanimage-2.1-tiny")
PROMPT, OTHER, NEGATIVE = "a small red circle top left", "a green tree", "blue stripes"
LAYOUTS = {
    2: [dict(ulysses=2), dict(ring=2), dict(tp=2), dict(cfg=2)],
    4: [dict(ulysses=2, ring=2), dict(cfg=2, ulysses=2), dict(tp=2, ring=2)],
}


def _requests(model: str) -> list:
    from engine import GenerateRequest

    if model == "chroma-tiny":
        common = dict(height=48, width=80, steps=2, seed=5)
        return [GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE, guidance=4.0, **common),
                GenerateRequest(prompt=[PROMPT, OTHER], guidance=1.0, **common)]
    common = dict(height=96, width=160, steps=2, seed=5)
    return [GenerateRequest(prompt=f'{PROMPT} with the words "Hi there"', negative_prompt=NEGATIVE, **common),
            GenerateRequest(prompt=[PROMPT, OTHER], **common)]


def _family(model: str):
    from engine.loading import inspect_model
    from engine.models import family

    return family(inspect_model(model).family)


def _runs(model: str, degrees: dict) -> list:
    """The requests a layout can run: CFG layouts only those with both branches."""
    reqs = _requests(model)
    if degrees.get("cfg", 1) > 1:
        fam = _family(model)
        reqs = [r for r in reqs if fam.uses_cfg(fam.call_kwargs(r))]
    return reqs


def _generate(world: int, dirs: dict[str, str]) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    for model in dirs:
        for degrees in [{}] if world == 1 else LAYOUTS[world]:
            engine = Engine(EngineConfig(model=dirs[model], **degrees))
            if degrees.get("tp", 1) > 1 and model == "chroma-tiny":  # the approximator's MLPs are split too
                mlp = engine.denoiser.distilled_guidance_layer.layers[0].linear_1
                assert mlp.weight.shape[0] == mlp.out_features // 2
            for i, req in enumerate(_runs(model, degrees)):
                out[(model, str(degrees), i)] = engine.generate(req, output_type="latent").latents.clone()
            engine.close()
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from engine.models import get_preset

    root = tmp_path_factory.mktemp("chroma-hunyuan")
    return {m: str(get_preset(m).save(root / m)) for m in MODELS}


@pytest.fixture(scope="module")
def single(dirs):
    return _generate(1, dirs)


def test_single_process_equals_diffusers(dirs, single):
    from diffusers import DiffusionPipeline

    from engine.pipelines import fit_call

    for model in MODELS:
        pipe = DiffusionPipeline.from_pretrained(dirs[model], dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        fam = _family(dirs[model])
        for i, req in enumerate(_requests(model)):
            kw = dict(fit_call(type(pipe).__name__, fam.call_kwargs(req)), height=req.height, width=req.width,
                      num_inference_steps=req.steps, generator=torch.Generator("cpu").manual_seed(req.seed),
                      output_type="latent")
            ref, got = pipe(**kw).images, single[(model, "{}", i)]
            assert torch.isfinite(ref).all() and got.shape == ref.shape, model
            assert rel_l2(got, ref) <= 1e-5, f"{model} request {i}: differs from diffusers by {rel_l2(got, ref):.2e}"


def test_masks_are_exercised(dirs):
    """The cases above do go through the masks: Chroma's T5 mask keeps a prefix of its padded text,
    HunyuanImage's two prompts keep different numbers of Qwen2.5-VL tokens and the first one's ByT5
    glyph tokens are real."""
    from diffusers import DiffusionPipeline

    chroma = DiffusionPipeline.from_pretrained(dirs["chroma-tiny"], dtype=torch.float32, local_files_only=True)
    mask = chroma.encode_prompt([PROMPT, OTHER], do_classifier_free_guidance=False, device="cpu")[2]
    kept = mask.sum(1).tolist()
    assert kept[0] != kept[1] and max(kept) < mask.shape[1]
    hunyuan = DiffusionPipeline.from_pretrained(dirs["hunyuanimage-2.1-tiny"], dtype=torch.float32,
                                                local_files_only=True)
    _, mask, _, mask_2 = hunyuan.encode_prompt([f'{PROMPT} "Hi"', OTHER], device="cpu", batch_size=2)
    kept = mask.sum(1).tolist()
    assert kept[0] != kept[1] and max(kept) < mask.shape[1]
    assert mask_2[0].sum() > 0 and mask_2[1].sum() == 0


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_equal_single_process(dirs, single, world):
    results = run_distributed(_generate, world, world, dirs, timeout=500)
    for rank, res in enumerate(results):
        assert {(m, i) for m, _, i in res} == {(m, i) for m, d, i in single}
        for (model, degrees, i), lat in res.items():
            err = rel_l2(lat, single[(model, "{}", i)])
            assert err <= 1e-5, f"rank {rank} {model} {degrees} request {i}: latents rel L2 {err:.2e}"
