"""The Lumina2 and Z-Image families end to end on tiny random diffusers directories made here.

Every layout gives the single-process latents, and one process gives diffusers' own pipeline result:
Ulysses-2, Ring-2, TP-2 and CFG-2 on 2 processes; Ulysses-2 × Ring-2, Ulysses-4 (6 heads on 4 ranks:
2, 2, 1, 1 — Lumina2's 6 query / 2 key-value heads repeated first), CFG-2 × Ulysses-2 and TP-2 ×
Ulysses-2 (3 heads per TP rank: 2 / 1) on 4; and SD3's 6 heads on Ulysses-4 (SD3.5-large's 38 on 4),
uneven heads through another family's pipeline. Captions are padded: Lumina2 pads the prompt to 96
tokens (about 40 are real, so ring blocks of padding only occur), and a batch of two prompts of
different lengths gives both models' joint streams a padding mask. 48×64 images: 12 image tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.harness import rel_l2, run_distributed

MODELS = ("lumina2-tiny", "z-image-tiny")
UNEVEN_ONLY = "sd3-tiny"
PROMPT = "a small red circle top left"
# Long enough that Z-Image's caption needs more 32-token blocks than the short prompts' do.
LONG = "a very large green tree in the center of a bright sunny field with many yellow flowers and tall grass " * 2
NEGATIVE = "blue stripes"
LAYOUTS = {
    1: [(m, {}) for m in (*MODELS, UNEVEN_ONLY)],
    2: [(m, d) for m in MODELS for d in (dict(ulysses=2), dict(ring=2), dict(tp=2), dict(cfg=2))],
    4: [(m, d) for m in MODELS
        for d in (dict(ulysses=2, ring=2), dict(ulysses=4), dict(cfg=2, ulysses=2), dict(tp=2, ulysses=2))]
       + [(UNEVEN_ONLY, dict(ulysses=4))],
}


def _requests():
    from engine import GenerateRequest

    common = dict(height=64, width=48, steps=2, seed=5, guidance=4.5, negative_prompt=NEGATIVE, max_sequence_length=96)
    return GenerateRequest(prompt=PROMPT, **common), GenerateRequest(prompt=[PROMPT, LONG], **common)


def _run(world: int, dirs: dict[str, str]):
    from engine import Engine, EngineConfig

    out = {}
    one, batch = _requests()
    for model, degrees in LAYOUTS[world]:
        engine = Engine(EngineConfig(model=dirs[model], **degrees))
        lat = engine.generate(one, output_type="latent").latents.clone()
        imgs = engine.generate(batch, output_type="np").images
        out[(model, str(degrees))] = (lat, torch.from_numpy(np.stack(imgs)))
        engine.close()
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from engine.models import get_preset

    root = tmp_path_factory.mktemp("lumina-zimage")
    return {m: str(get_preset(m).save(root / m)) for m in (*MODELS, UNEVEN_ONLY)}


@pytest.fixture(scope="module")
def single(dirs):
    return _run(1, dirs)


def test_single_process_equals_diffusers(dirs, single):
    from diffusers import DiffusionPipeline

    from engine.loading import inspect_model
    from engine.models import family

    for model in MODELS:
        pipe = DiffusionPipeline.from_pretrained(dirs[model], dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        fam = family(inspect_model(dirs[model]).family)
        for key, req in enumerate(_requests()):
            kw = dict(fam.call_kwargs(req), height=req.height, width=req.width, num_inference_steps=req.steps,
                      generator=torch.Generator("cpu").manual_seed(req.seed))
            ref = pipe(**kw, output_type="latent" if key == 0 else "np").images
            ref = ref if key == 0 else torch.from_numpy(ref)
            got = single[(model, "{}")][key]
            assert torch.isfinite(ref).all() and got.shape == ref.shape, model
            assert rel_l2(got, ref) <= 1e-5, f"{model} request {key}: differs from diffusers by {rel_l2(got, ref):.2e}"


def test_a_reused_request_gives_the_same_images(dirs):
    """ZImagePipeline rewrites the prompt list it is given (chat template): the engine hands it a copy."""
    from engine import Engine, EngineConfig

    _, batch = _requests()
    engine = Engine(EngineConfig(model=dirs["z-image-tiny"]))
    first, again = (engine.generate(batch, output_type="latent").latents for _ in range(2))
    engine.close()
    assert batch.prompt == [PROMPT, LONG] and torch.equal(first, again)


def test_the_captions_are_padded(dirs):
    """What the layouts are tested on: Lumina2's prompt is mostly padding (ring blocks of padding only),
    and both models' joint streams carry a padding mask for the batch of two prompts."""
    from diffusers import DiffusionPipeline

    from engine.loading import inspect_model
    from engine.models import family

    masks = {}
    for model in MODELS:
        pipe = DiffusionPipeline.from_pretrained(dirs[model], dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        fam = family(inspect_model(dirs[model]).family)
        hooks = [getattr(pipe.transformer, stack)[0].register_forward_pre_hook(
            lambda module, args, key=(model, stack): masks.setdefault(key, []).append(args[1]))
            for stack in ("context_refiner", "layers")]
        for req in _requests():
            pipe(**fam.call_kwargs(req), height=req.height, width=req.width, num_inference_steps=1,
                 output_type="latent")
        for h in hooks:
            h.remove()
    text = masks[("lumina2-tiny", "context_refiner")][0]
    real = int(text[0].sum())
    assert text.shape[1] == 96 and 24 < real < 48, real
    # Lumina2: no mask for one prompt (each branch is its own call), one for the two prompts' call.
    assert masks[("lumina2-tiny", "layers")][0] is None
    assert any(m is not None for m in masks[("lumina2-tiny", "layers")])
    assert masks[("z-image-tiny", "layers")][-1] is not None


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_equal_single_process(dirs, single, world):
    results = run_distributed(_run, world, world, dirs, timeout=600)
    for rank, res in enumerate(results):
        assert len(res) == len(LAYOUTS[world])
        for (model, degrees), (lat, imgs) in res.items():
            ref_lat, ref_imgs = single[(model, "{}")]
            err, err_img = rel_l2(lat, ref_lat), rel_l2(imgs, ref_imgs)
            assert err <= 1e-4, f"rank {rank} {model} {degrees}: latents rel L2 {err:.2e}"
            assert err_img <= 1e-4, f"rank {rank} {model} {degrees}: batch images rel L2 {err_img:.2e}"


def test_refusals_and_limits():
    from engine import GenerateRequest
    from engine.loading import inspect_model
    from engine.models import family
    from shardiff_parallel.config import resolve_degrees

    lumina, zimage = inspect_model("lumina2"), inspect_model("z-image")
    # TP splits the 8 key/value heads too; Z-Image's 30 heads and 10240-wide MLP: 2, 5 or 10.
    with pytest.raises(ValueError, match=r"--tp 3 does not divide the model's 8 key/value heads.*: 2, 4, 8"):
        family("lumina2").check_tp(lumina, 3)
    family("lumina2").check_tp(lumina, 8)
    with pytest.raises(ValueError, match=r"--tp 4 does not divide the model's 30 attention heads.*: 2, 5"):
        family("zimage").check_tp(zimage, 4)
    # The automatic layout keeps Ulysses dividing the heads; an explicit uneven Ulysses is taken as asked.
    assert resolve_degrees(4, zimage.num_heads).degrees() == dict(dp=1, cfg=1, ring=2, ulysses=2, tp=1)
    assert resolve_degrees(8, zimage.num_heads, ulysses=8).ulysses == 8
    assert resolve_degrees(8, lumina.num_heads).ulysses == 8
    # Guidance: Lumina2 batches nothing (> 1), Z-Image runs CFG for any scale > 0.
    with pytest.raises(ValueError, match=r"guidance off \(needs --guidance > 0\)"):
        family("zimage").check_cfg(dict(cfg=2), family("zimage").call_kwargs(GenerateRequest(prompt=PROMPT, guidance=0)))
    family("zimage").check_cfg(dict(cfg=2), family("zimage").call_kwargs(GenerateRequest(prompt=PROMPT, guidance=0.5)))
    with pytest.raises(ValueError, match=r"guidance off \(needs --guidance > 1\)"):
        family("lumina2").check_cfg(dict(cfg=2), family("lumina2").call_kwargs(GenerateRequest(prompt=PROMPT, guidance=1)))


def test_newbie_backbone_maps_onto_lumina2():
    """NewBie-image-Exp0.1's Next-DiT without its Jina-CLIP conditioning, as a Lumina2 transformer: its
    3.5 B parameters (less the CLIP projections), and every TP degree and Ulysses split of 24 / 8 heads."""
    from accelerate import init_empty_weights
    from diffusers import Lumina2Transformer2DModel

    from engine.models.lumina2 import LUMINA2_PLAN, NEWBIE_BACKBONE, read_lumina2_info
    from shardiff_parallel.heads import head_split
    from shardiff_parallel.tensor import local_numel

    with init_empty_weights():
        model = Lumina2Transformer2DModel(**NEWBIE_BACKBONE)
    total = sum(p.numel() for p in model.parameters())
    assert 3.4e9 < total < 3.6e9, total
    assert len(model.layers) == 36 and model.layers[0].attn.to_k.out_features == 8 * 96
    info = read_lumina2_info({"transformer": NEWBIE_BACKBONE}, source="directory", pipeline_class="Lumina2Pipeline",
                             default_size=None)
    for tp in (2, 4, 8):
        from engine.models import family

        family("lumina2").check_tp(info, tp)
        assert local_numel(model, LUMINA2_PLAN.tp_styles, tp, 0) < total / tp * 1.1
    for u in (2, 4, 8):
        assert head_split(24, 8, u).kv_repeat == 1
