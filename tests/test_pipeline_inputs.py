"""Bad input to the editing pipelines, PAG and LoRAs: one clear ValueError line before any collective.

In process: Engine.check_request, GenerateRequest and check_loras raise before anything is agreed, so
the engine's first collective (`agree`) carries the one line to every rank, as for every other mistake
(tests/test_cli_errors.py runs that path on torchrun ranks). Then one real command line: an img2img +
LoRA run whose layout line and PNG name the pipeline, the input image's pixel hash and the LoRA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_cli_errors import _run


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from PIL import Image
    from safetensors.torch import save_file

    from engine.models import get_preset

    root = tmp_path_factory.mktemp("inputs")
    out = {m: str(get_preset(m).save(root / m)) for m in ("flux-tiny", "flux-fill-tiny")}
    rng = np.random.default_rng(0)
    out["png"] = str(root / "in.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out["png"])
    out["not_image"] = str(root / "notes.png")
    (root / "notes.png").write_text("not an image")
    out["lora"] = str(root / "style.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 128) * 0.1,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 2) * 0.1}, out["lora"])
    out["lora_nomatch"] = str(root / "other.safetensors")
    save_file({f"transformer.blocks.{i}.attn.q.lora_A.weight": torch.zeros(2, 4) for i in range(4)}, out["lora_nomatch"])
    out["lora_bin"] = str(root / "style.bin")
    (root / "style.bin").write_bytes(b"\x80\x04pickle")
    return out


@pytest.fixture(scope="module")
def flux(dirs):
    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model=dirs["flux-tiny"]))
    yield engine
    engine.close()


def _req(**kw):
    from engine import GenerateRequest

    return GenerateRequest(prompt="a cat", steps=2, height=64, width=64, **kw)


def test_request_fields_refused_without_a_model(dirs):
    for kw, msg in [
        (dict(mask_image=dirs["png"]), "--mask-image needs --image"),
        (dict(image=dirs["png"], strength=0.0), r"--strength must be in \(0, 1\]"),
        (dict(image=dirs["png"], strength=1.5), r"--strength must be in \(0, 1\]"),
        (dict(image=dirs["png"], strength=0.2), r"leaves no denoising step"),
        (dict(strength=0.5), "needs --image"),
        (dict(pag_scale=0.0), "--pag-scale must be > 0"),
        (dict(image=3), "--image must be a path or a PIL image"),
    ]:
        with pytest.raises(ValueError, match=msg):
            _req(**kw)


def test_model_dependent_inputs_refused_before_any_collective(dirs, flux):
    from engine.lora import check_loras
    from engine.loading import inspect_model
    from engine.models import family

    layout = flux.parallel
    for kw, msg in [
        (dict(image=dirs["png"] + ".missing"), "--image .*: no such file"),
        (dict(image=dirs["not_image"]), "--image .* cannot be read as an image"),
        (dict(pag_scale=2.0), "--pag-scale: shardiff runs no flux pipeline that takes perturbed-attention"),
        (dict(control_image=dirs["png"]), "--control-image: FluxPipeline has no form that takes a control image.*FluxControlPipeline"),
        (dict(image=dirs["png"], negative_prompt="x", true_cfg_scale=2.0, mask_image=dirs["png"]), None),
    ]:
        if msg is None:  # a valid request: the inpainting pipeline, mask read as one channel
            call = flux.check_request(_req(**kw), layout)
            assert call.spec.cls == "FluxInpaintPipeline" and call.kwargs["mask_image"].mode == "L"
            assert call.records["image"]["path"] == dirs["png"] and len(call.records["image"]["sha256"]) == 64
            continue
        with pytest.raises(ValueError, match=msg):
            flux.check_request(_req(**kw), layout)
    from engine.runtime.distributed import UserError

    with pytest.raises(UserError, match="--image .* cannot be read as an image"):  # the engine's one line
        flux.generate(_req(image=dirs["not_image"]))
    with pytest.raises(ValueError, match="only .safetensors LoRA files"):
        flux.set_loras([dirs["lora_bin"]])
    with pytest.raises(ValueError, match="--cfg 3: flux.s true CFG runs two transformer calls"):
        flux.family.check_cfg(dict(cfg=3), {"true_cfg_scale": 4.0, "negative_prompt": "x"})
    sd3 = family("sd3")
    with pytest.raises(ValueError, match="--cfg 3 needs 3 guidance branches.*runs 2"):
        sd3.check_cfg(dict(cfg=3), {"guidance_scale": 4.5}, branches=2)

    fill_info = inspect_model(dirs["flux-fill-tiny"])
    from engine.pipelines import choose

    fam = family("flux")
    with pytest.raises(ValueError, match="FluxFillPipeline needs --mask-image"):
        choose(fam, fill_info.pipeline_class, _req(image=dirs["png"]))
    from engine.pipelines import fit_call

    with pytest.raises(ValueError, match="--negative-prompt: FluxFillPipeline takes none"):
        fit_call("FluxFillPipeline", {"prompt": "a", "negative_prompt": "b"})
    with pytest.raises(ValueError, match="--mask-image: FluxKontextPipeline has no form that takes an inpainting mask"):
        choose(fam, "FluxKontextPipeline", _req(image=dirs["png"], mask_image=dirs["png"]))
    with pytest.raises(ValueError, match="--image: shardiff runs no sana pipeline that takes an input image"):
        choose(family("sana"), "SanaPipeline", _req(image=dirs["png"]))
    with pytest.raises(ValueError, match="--pag-scale: StableDiffusion3InpaintPipeline has no form"):
        choose(sd3, "StableDiffusion3Pipeline", _req(image=dirs["png"], mask_image=dirs["png"], pag_scale=2.0))

    info = inspect_model(dirs["flux-tiny"])
    with pytest.raises(ValueError, match="only .safetensors LoRA files"):
        check_loras([dirs["lora_bin"]], dirs["flux-tiny"], fam, info)
    with pytest.raises(ValueError, match="no such file"):
        check_loras([dirs["lora"] + ".gone"], dirs["flux-tiny"], fam, info)
    with pytest.raises(ValueError, match=r"none of its 4 keys matches a layer .*first: transformer\.blocks\.0\.attn\.q"):
        check_loras([dirs["lora_nomatch"]], dirs["flux-tiny"], fam, info)
    with pytest.raises(ValueError, match="PixArtSigmaPipeline .* has no LoRA loader"):
        check_loras([dirs["lora"]], "pixart-tiny", family("pixart"), inspect_model("pixart-tiny"))
    with pytest.raises(ValueError, match="the scale must be a number"):
        from engine.lora import parse_lora

        parse_lora((dirs["lora"], "big"))
    specs, notes = check_loras([f"{dirs['lora']}:0.5"], dirs["flux-tiny"], fam, info)
    assert specs[0].scale == 0.5 and not notes


def test_cli_img2img_with_lora(dirs, tmp_path):
    from engine.image_io import image_sha256, read_png_params
    from PIL import Image

    args = ["--model", dirs["flux-tiny"], "--steps", "2", "--height", "64", "--width", "64"]
    out = tmp_path / "cat.png"
    r = _run([*args, "--image", dirs["png"], "--strength", "0.6", "--lora", f"{dirs['lora']}:0.7", "--output", str(out)])
    assert r.returncode == 0, r.stdout
    assert "FluxImg2ImgPipeline" in r.stdout  # the layout line names the pipeline
    params = read_png_params(out)
    assert params["pipeline"] == "FluxImg2ImgPipeline"
    assert params["inputs"]["image"]["sha256"] == image_sha256(Image.open(dirs["png"]).convert("RGB"))
    assert params["loras"][0]["scale"] == 0.7 and params["loras"][0]["path"] == dirs["lora"]
    assert params["strength"] == 0.6 and params["image"] == dirs["png"]
    json.dumps(params)
