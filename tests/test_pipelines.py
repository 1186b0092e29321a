"""The pipelines people run — img2img, inpainting, Flux Fill / Kontext / Control, PAG — and LoRAs, on
tiny random diffusers directories, under every parallel axis the family has.

One process equals diffusers' own pipeline (the class the request selects, loaded from the same
directory, with the same inputs and seed, arguments written out here); Ulysses-2, Ring-2, TP-2, CFG-2
(on 2 processes), Ulysses-2 × Ring-2 and CFG-2 × Ulysses-2 (on 4) and CFG-3 (PAG with CFG: one branch
per rank, on 3) equal one process within 1e-4 relative L2. A random LoRA file (transformer and CLIP
keys, two of them with scales) equals diffusers' `load_lora_weights` + `set_adapters`, at 1 process,
Ulysses-2 (switched in with `Engine.set_loras`) and TP-2 (`EngineConfig.loras`, on a sharded load).
Sizes make uneven splits (Flux 48×80: 15 image tokens, Kontext + its 64² reference: 31; SD3 80×48: 15).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.harness import run_distributed

PROMPT, NEGATIVE = "a small red circle top left", "blue stripes"
MODELS = ("flux-tiny", "flux-fill-tiny", "flux-kontext-tiny", "flux-control-tiny", "sd3-tiny", "sana-tiny",
          "pixart-tiny", "sd1.5-tiny", "sdxl-tiny")
FLUX = dict(height=48, width=80, max_sequence_length=24, guidance=3.5)
DIT = dict(height=80, width=48, max_sequence_length=24, guidance=4.5)
# name → (model, request fields, the diffusers class it must select). "IMG" / "MASK" / "CTRL" / "IMG_PATH"
# are replaced by the test images (PIL, or a path for IMG_PATH).
CASES = {
    "flux-i2i": ("flux-tiny", dict(FLUX, image="IMG_PATH", strength=0.7), "FluxImg2ImgPipeline"),
    "flux-inpaint": ("flux-tiny", dict(FLUX, image="IMG", mask_image="MASK", strength=0.9), "FluxInpaintPipeline"),
    "flux-i2i-cfg": ("flux-tiny", dict(FLUX, image="IMG", negative_prompt=NEGATIVE, true_cfg_scale=3.0),
                     "FluxImg2ImgPipeline"),
    "flux-lora": ("flux-tiny", dict(FLUX), "FluxPipeline"),
    "fill": ("flux-fill-tiny", dict(FLUX, image="IMG", mask_image="MASK"), "FluxFillPipeline"),
    "kontext": ("flux-kontext-tiny", dict(FLUX, image="IMG", keep_image_size=True), "FluxKontextPipeline"),
    "kontext-cfg": ("flux-kontext-tiny", dict(FLUX, image="IMG", keep_image_size=True, negative_prompt=NEGATIVE,
                                              true_cfg_scale=3.0), "FluxKontextPipeline"),
    "control": ("flux-control-tiny", dict(FLUX, control_image="CTRL"), "FluxControlPipeline"),
    "control-i2i": ("flux-control-tiny", dict(FLUX, image="IMG", control_image="CTRL", strength=0.8),
                    "FluxControlImg2ImgPipeline"),
    "sd3-i2i": ("sd3-tiny", dict(DIT, image="IMG", strength=0.8, negative_prompt=NEGATIVE), "StableDiffusion3Img2ImgPipeline"),
    "sd3-inpaint": ("sd3-tiny", dict(DIT, image="IMG", mask_image="MASK"), "StableDiffusion3InpaintPipeline"),
    "sd3-pag": ("sd3-tiny", dict(DIT, pag_scale=2.0, negative_prompt=NEGATIVE), "StableDiffusion3PAGPipeline"),
    "sd3-pag-nocfg": ("sd3-tiny", dict(DIT, pag_scale=2.0, guidance=1.0), "StableDiffusion3PAGPipeline"),
    "sana-pag": ("sana-tiny", dict(DIT, height=64, width=32, pag_scale=2.0), "SanaPAGPipeline"),
    "sana-pag-nocfg": ("sana-tiny", dict(DIT, height=64, width=32, pag_scale=2.0, guidance=1.0), "SanaPAGPipeline"),
    "pixart-pag": ("pixart-tiny", dict(DIT, pag_scale=2.0), "PixArtSigmaPAGPipeline"),
    "sd-i2i": ("sd1.5-tiny", dict(height=64, width=64, guidance=7.0, image="IMG", strength=0.75),
               "StableDiffusionImg2ImgPipeline"),
    "sd-pag-inpaint": ("sd1.5-tiny", dict(height=64, width=64, guidance=7.0, image="IMG", mask_image="MASK",
                                          pag_scale=1.5), "StableDiffusionPAGInpaintPipeline"),
    "sdxl-pag-i2i": ("sdxl-tiny", dict(height=64, width=64, guidance=5.0, image="IMG", pag_scale=1.5, strength=0.7),
                     "StableDiffusionXLPAGImg2ImgPipeline"),
}
LORA_CASES = {"flux-lora"}
# world → [(model, degrees, cases)]; "lora-set" switches the LoRAs in with Engine.set_loras, "lora-config"
# loads them with EngineConfig.loras.
LAYOUTS = {
    2: [("flux-tiny", dict(ulysses=2), ["flux-i2i", "flux-inpaint", "lora-set", "flux-lora"]),
        ("flux-tiny", dict(tp=2), ["lora-config", "flux-lora", "lora-off", "flux-i2i"]),
        # One rank encodes the text for the img2img pipeline made from the loaded one, too.
        ("flux-tiny", dict(cfg=2, text_encoders="first"), ["flux-i2i-cfg"]),
        ("flux-kontext-tiny", dict(ring=2), ["kontext"]),
        ("flux-kontext-tiny", dict(cfg=2), ["kontext-cfg"]),
        ("flux-fill-tiny", dict(tp=2), ["fill"]),
        ("flux-control-tiny", dict(ulysses=2), ["control", "control-i2i"]),
        ("sd3-tiny", dict(ulysses=2), ["sd3-i2i", "sd3-pag"]),
        ("sd3-tiny", dict(ring=2), ["sd3-pag"]),
        ("sd3-tiny", dict(tp=2), ["sd3-inpaint", "sd3-pag"]),
        # 3 branches over 2 ranks: [uncond, cond | perturbed]; without CFG [cond | perturbed].
        ("sd3-tiny", dict(cfg=2), ["sd3-pag", "sd3-pag-nocfg"]),
        ("sana-tiny", dict(cfg=2), ["sana-pag", "sana-pag-nocfg"]),
        ("sana-tiny", dict(ulysses=2), ["sana-pag"]),
        ("sana-tiny", dict(tp=2), ["sana-pag-nocfg"]),
        ("pixart-tiny", dict(ulysses=2), ["pixart-pag"]),
        ("sd1.5-tiny", dict(cfg=2), ["sd-i2i", "sd-pag-inpaint"]),
        ("sdxl-tiny", dict(cfg=2), ["sdxl-pag-i2i"])],
    3: [("sd3-tiny", dict(cfg=3), ["sd3-pag"]), ("sana-tiny", dict(cfg=3), ["sana-pag"])],
    4: [("flux-fill-tiny", dict(ulysses=2, ring=2), ["fill"]),
        ("flux-kontext-tiny", dict(ulysses=2, ring=2), ["kontext"]),
        ("sd3-tiny", dict(ulysses=2, ring=2), ["sd3-pag"]),
        ("sd3-tiny", dict(cfg=2, ulysses=2), ["sd3-pag"])],
}


def _images(seed: int = 0) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    # 64² inputs: the Flux / SD3 pipelines resize them to the output size (Kontext keeps its own size).
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ctrl = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(((rng.random((64, 64)) > 0.5) * 255).astype(np.uint8), mode="L")
    return {"IMG": img, "MASK": mask, "CTRL": ctrl}


def _fields(case: str, files: dict) -> dict:
    _, fields, _ = CASES[case]
    images = _images()
    out = {}
    for k, v in fields.items():
        if v == "IMG_PATH":
            v = files["image_path"]
        elif isinstance(v, str) and v in images:
            v = images[v]
        out[k] = v
    return out


def _request(case: str, files: dict):
    from engine import GenerateRequest

    return GenerateRequest(prompt=PROMPT, steps=2, seed=11, **_fields(case, files))


def _lora_specs(files: dict) -> list:
    return [f"{files['lora_a']}:0.8", files["lora_b"]]


def _run(world: int, files: dict, layouts) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    for model, degrees, cases in layouts:
        loras = _lora_specs(files) if "lora-config" in cases else ()
        engine = Engine(EngineConfig(model=files[model], loras=loras, **degrees))
        for case in cases:
            if case.startswith("lora-"):
                if case != "lora-config":
                    engine.set_loras(_lora_specs(files) if case == "lora-set" else [])
                continue
            # "name@tag": the case `name` again, kept under another key.
            latents = engine.generate(_request(case.partition("@")[0], files), output_type="latent").latents
            out[(model, str(degrees), case)] = latents.clone()
        engine.close()
    return out


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _random_lora(pipe, seed: int, *, rank: int, text: bool) -> dict:
    """A LoRA in diffusers' keys on every linear of the transformer's blocks (TP column-, row-split,
    gathered and replicated ones alike), optionally on CLIP's attention."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    parts = [("transformer", pipe.transformer)] + ([("text_encoder", pipe.text_encoder)] if text else [])
    for prefix, model in parts:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and (prefix == "transformer" or "self_attn" in name):
                out[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
                out[f"{prefix}.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.torch import save_file

    from engine.models import get_preset

    root = tmp_path_factory.mktemp("pipelines")
    out = {m: str(get_preset(m).save(root / m)) for m in MODELS}
    out["image_path"] = str(root / "input.png")
    _images()["IMG"].save(out["image_path"])
    pipe = get_preset("flux-tiny").build_pipeline(dtype=torch.float32, device="cpu")
    out["lora_a"], out["lora_b"] = str(root / "a.safetensors"), str(root / "b.safetensors")
    save_file(_random_lora(pipe, 1, rank=4, text=True), out["lora_a"])
    save_file(_random_lora(pipe, 2, rank=2, text=False), out["lora_b"])
    return out


@pytest.fixture(scope="module")
def single(files):
    layouts = [(m, {}, [c for c in CASES if CASES[c][0] == m and c not in LORA_CASES]) for m in MODELS]
    # LoRAs switched in, then off again: the base image, bitwise.
    layouts.append(("flux-tiny", {}, ["lora-set", "flux-lora", "lora-off", "flux-lora@off"]))
    return {case: lat for (_, _, case), lat in _run(1, files, layouts).items()}


def _reference_kwargs(case: str, files: dict) -> dict:
    """diffusers' call for the case, written out (not taken from the engine)."""
    from PIL import Image

    model, _, cls = CASES[case]
    f = _fields(case, files)
    kw = dict(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(11),
              output_type="latent", guidance_scale=f.pop("guidance"))
    if isinstance(f.get("image"), str):
        f["image"] = Image.open(f["image"]).convert("RGB")
    if "max_sequence_length" in f:
        kw["max_sequence_length"] = f.pop("max_sequence_length")
    if f.pop("keep_image_size", False):
        kw.update(_auto_resize=False, max_area=f["height"] * f["width"])
    if model in ("sana-tiny", "pixart-tiny"):
        kw.update(use_resolution_binning=False, clean_caption=False, negative_prompt="")
    if cls.endswith("Img2ImgPipeline") and model in ("sd1.5-tiny", "sdxl-tiny"):
        h, w = f.pop("height"), f.pop("width")  # no size arguments: the output has the image's size
        f["image"] = f["image"].resize((w, h), Image.LANCZOS)
    return {**kw, **f}


def test_single_process_equals_diffusers(files, single):
    import diffusers

    from engine.loading import load_pipeline
    from engine.pipelines import choose
    from engine.models import family
    from engine.loading import inspect_model

    bases = {}
    for case, (model, _, cls) in CASES.items():
        info = inspect_model(files[model])
        assert choose(family(info.family), info.pipeline_class, _request(case, files)).cls == cls, case
        if model not in bases or case in LORA_CASES:
            bases[model] = load_pipeline(files[model], dtype=torch.float32, device="cpu")
        pipe = getattr(diffusers, cls).from_pipe(bases[model], dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if case in LORA_CASES:
            ref_base = pipe(**_reference_kwargs(case, files)).images
            assert torch.equal(single["flux-lora@off"], ref_base), "LoRAs switched off must leave the base weights"
            pipe.load_lora_weights(files["lora_a"], adapter_name="a")
            pipe.load_lora_weights(files["lora_b"], adapter_name="b")
            pipe.set_adapters(["a", "b"], [0.8, 1.0])
        ref = pipe(**_reference_kwargs(case, files)).images
        got = single[case]
        assert torch.isfinite(ref).all() and got.shape == ref.shape, case
        err = _rel(got, ref)
        assert err <= 1e-5, f"{case} ({cls}): differs from diffusers by {err:.2e}"
        if case in LORA_CASES:
            assert _rel(single["flux-lora@off"], ref) > 1e-2, "the LoRA changed nothing"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_layouts_equal_single_process(files, single, world):
    results = run_distributed(_run, world, world, files, LAYOUTS[world], timeout=600)
    for rank, res in enumerate(results):
        assert len(res) == sum(len([c for c in cs if not c.startswith("lora-")]) for _, _, cs in LAYOUTS[world])
        for (model, degrees, case), lat in res.items():
            err = _rel(lat, single[case])
            assert err <= 1e-4, f"rank {rank} {model} {degrees} {case}: rel L2 {err:.2e}"
