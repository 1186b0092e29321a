"""ControlNets under model parallelism, on tiny random models made on the fly (random weights in the
zero-initialised output projections too, so that the residuals change the image).

One process equals diffusers' own ControlNet pipeline (the same directories, inputs and seed, the
call written out here); Ulysses-2, Ring-2, TP-2 and CFG-2 (Flux true CFG: the ControlNet runs once
for both calls) equal one process within 1e-4 relative L2. Flux 48×80 has 15 image tokens: uneven
pieces, and the residuals are split like them (checked: they are never gathered). Bad input is
refused before any collective.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.harness import rel_l2, run_distributed

PROMPT, NEGATIVE = "a small red circle top left", "blue stripes"
FLUX = dict(height=48, width=80, max_sequence_length=24, guidance=3.5, controlnet_scale=0.8)
UNET = dict(height=64, width=64, guidance=7.0, negative_prompt=NEGATIVE, controlnet_scale=0.9)
SD3 = dict(height=80, width=48, max_sequence_length=24, guidance=4.5, negative_prompt=NEGATIVE, controlnet_scale=0.7)
# case → (base model, ControlNets, request fields, the diffusers class it must select)
CASES = {
    "cn": ("flux", ("cn",), dict(FLUX, control_image="CTRL"), "FluxControlNetPipeline"),
    "cn-i2i": ("flux", ("cn",), dict(FLUX, control_image="CTRL", image="IMG", strength=0.7),
               "FluxControlNetImg2ImgPipeline"),
    "cn-cfg": ("flux", ("cn",), dict(FLUX, control_image="CTRL", negative_prompt=NEGATIVE, true_cfg_scale=3.0),
               "FluxControlNetPipeline"),
    "union": ("flux", ("union",), dict(FLUX, control_image="CTRL", control_mode=2), "FluxControlNetPipeline"),
    "multi": ("flux", ("cn", "cn2"), dict(FLUX, control_image="CTRL", controlnet_scale=(0.8, 0.5)),
              "FluxControlNetPipeline"),
    "sd3": ("sd3", ("sd3cn",), dict(SD3, control_image="CTRL"), "StableDiffusion3ControlNetPipeline"),
    "sana": ("sana", ("sanacn",), dict(SD3, height=64, width=32, control_image="CTRL"), "SanaControlNetPipeline"),
    "sd": ("sd", ("sdcn",), dict(UNET, control_image="CTRL"), "StableDiffusionControlNetPipeline"),
    "sd-i2i": ("sd", ("sdcn",), dict(UNET, control_image="CTRL", image="IMG", strength=0.7),
               "StableDiffusionControlNetImg2ImgPipeline"),
}
LAYOUTS = [  # (degrees, cases), on 2 processes
    (dict(ulysses=2), ["cn", "cn-i2i", "union", "sd3", "sana"]),
    (dict(ring=2), ["cn", "multi", "sd3"]),
    (dict(tp=2), ["cn", "union", "sd3", "sana"]),
    (dict(cfg=2), ["cn-cfg", "sd3", "sd", "sd-i2i", "sana"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from engine.controlnet import save_random_controlnet
    from engine.models import family, get_preset

    root = tmp_path_factory.mktemp("controlnet")
    base = str(get_preset("flux-tiny").save(root / "flux"))
    sd3 = str(get_preset("sd3-tiny").save(root / "sd3"))
    flux = family("flux")
    return {
        "base": base, "flux": base, "sd3": sd3,
        "cn": str(save_random_controlnet(base, flux, root / "cn", 2, single_layers=1, seed=1)),
        "cn2": str(save_random_controlnet(base, flux, root / "cn2", 1, single_layers=2, seed=2)),
        "union": str(save_random_controlnet(base, flux, root / "union", 1, single_layers=1, num_mode=4, seed=3)),
        "sd3cn": str(save_random_controlnet(sd3, family("sd3"), root / "sd3cn", 1, seed=4)),
        "sana": (sana := str(get_preset("sana-tiny").save(root / "sana"))),
        "sanacn": str(save_random_controlnet(sana, family("sana"), root / "sanacn", 1, seed=6)),
        "sd": (sd := str(get_preset("sd1.5-tiny").save(root / "sd"))),
        "sdcn": str(save_random_controlnet(sd, family("sd"), root / "sdcn", 0, seed=5)),
    }


def _images() -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    return {"IMG": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
            "CTRL": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))}


def _request(case: str):
    from engine import GenerateRequest

    images = _images()
    fields = {k: images.get(v, v) if isinstance(v, str) else v for k, v in CASES[case][2].items()}
    return GenerateRequest(prompt=PROMPT, steps=2, seed=11, **fields)


def _run(world: int, files: dict, layouts) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    for degrees, cases in layouts:
        for base, nets in dict.fromkeys(CASES[c][:2] for c in cases):
            engine = Engine(EngineConfig(model=files[base], controlnets=tuple(files[n] for n in nets), **degrees))
            for case in (c for c in cases if CASES[c][:2] == (base, nets)):
                result = engine.generate(_request(case), output_type="latent")
                assert result.params["pipeline"] == CASES[case][3], result.params["pipeline"]
                out[(str(degrees), case)] = result.latents.clone()
            if degrees.get("ulysses") == 2 and nets == ("cn",):
                out["residual_pieces"] = _residual_lengths(engine)
            engine.close()
    return out


def _residual_lengths(engine) -> list[int]:
    """Token lengths of the ControlNet's block samples in one call: this rank's piece, not all 15."""
    seen = []
    hook = engine.controlnet.register_forward_hook(
        lambda m, a, out: seen.extend(t.shape[1] for group in out for t in group))
    engine.generate(_request("cn"), output_type="latent")
    hook.remove()
    return sorted(set(seen))


@pytest.fixture(scope="module")
def single(files):
    return {case: lat for (_, case), lat in _run(1, files, [({}, list(CASES))]).items()}


def _diffusers(files: dict, case: str) -> torch.Tensor:
    import diffusers

    base, nets, fields, cls = CASES[case]
    fields, images = dict(fields), _images()
    kind = {"flux": diffusers.FluxControlNetModel, "sd3": diffusers.SD3ControlNetModel,
            "sd": diffusers.ControlNetModel, "sana": diffusers.SanaControlNetModel}[base]
    models = [kind.from_pretrained(files[n]) for n in nets]
    controlnet = models[0] if len(models) == 1 else diffusers.FluxMultiControlNetModel(models)
    pipe = getattr(diffusers, cls).from_pretrained(files[base], controlnet=controlnet)
    kw = dict(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(11),
              output_type="latent", guidance_scale=fields.pop("guidance"), height=fields.pop("height"),
              width=fields.pop("width"))
    if "max_sequence_length" in fields:
        kw["max_sequence_length"] = fields.pop("max_sequence_length")
    scale = fields.pop("controlnet_scale")
    kw["controlnet_conditioning_scale"] = list(scale) if isinstance(scale, tuple) else scale
    control = images[fields.pop("control_image")]
    control = control if len(nets) == 1 else [control] * len(nets)
    if "image" in fields:
        kw["image"] = images[fields.pop("image")]
    kw["image" if cls == "StableDiffusionControlNetPipeline" else "control_image"] = control
    kw.update(fields)
    if base == "sana":  # as the engine calls PixArt / Sana: the exact size, no caption cleaning
        kw.update(use_resolution_binning=False, clean_caption=False)
    # The SD3 ControlNet pipeline samples its control latents from the global generator; the engine
    # seeds it with the request's seed.
    torch.manual_seed(11)
    return pipe(**kw).images


@pytest.mark.parametrize("case", ["cn", "union", "multi", "cn-cfg", "sd3", "sana", "sd", "sd-i2i"])
def test_single_process_equals_diffusers(files, single, case):
    assert rel_l2(single[case], _diffusers(files, case)) <= 1e-5


def test_the_controlnet_changes_the_image(files, single):
    from engine import Engine, EngineConfig, GenerateRequest

    engine = Engine(EngineConfig(model=files["base"]))
    fields = {k: v for k, v in CASES["cn"][2].items() if k not in ("control_image", "controlnet_scale")}
    plain = engine.generate(GenerateRequest(prompt=PROMPT, steps=2, seed=11, **fields), output_type="latent").latents
    engine.close()
    assert rel_l2(single["cn"], plain) > 0.05


def test_layouts_equal_one_process(files, single):
    results = run_distributed(_run, 2, 2, files, LAYOUTS, timeout=240)
    for degrees, cases in LAYOUTS:
        for case in cases:
            for rank in results:
                err = rel_l2(rank[(str(degrees), case)], single[case])
                assert err <= 1e-4, (degrees, case, err)
    # Ulysses-2 over 15 image tokens: pieces of 8 and 7, never the gathered 15.
    assert [r["residual_pieces"] for r in results] == [[8], [7]]


def _error(files, nets, **fields):
    from engine import Engine, EngineConfig

    with pytest.raises(ValueError) as e:
        Engine(EngineConfig(model=files["base"], controlnets=nets, **fields))
    return str(e.value)


def test_bad_controlnets_are_refused_before_any_collective(files, tmp_path):
    import json

    from engine import Engine, EngineConfig, GenerateRequest
    from engine.controlnet import save_random_controlnet
    from engine.models import family, get_preset

    assert "no such directory" in _error(files, (str(tmp_path / "none"),))
    # Another model's ControlNet: the sizes that differ are named.
    wide = tmp_path / "wide"
    save_random_controlnet(files["base"], family("flux"), wide, 1)
    config = json.loads((wide / "config.json").read_text())
    config["num_attention_heads"] *= 2
    (wide / "config.json").write_text(json.dumps(config))
    message = _error(files, (str(wide),))
    assert "does not fit" in message and "num_attention_heads" in message, message
    # Not a ControlNet of this family.
    config["_class_name"] = "SD3ControlNetModel"
    (wide / "config.json").write_text(json.dumps(config))
    assert "not a ControlNet of flux" in _error(files, (str(wide),))
    # Pickles only.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "FluxControlNetModel"}))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"x")
    assert "no .safetensors" in _error(files, (str(pickled),))
    # A family without ControlNets.
    pixart = str(get_preset("pixart-tiny").save(tmp_path / "pixart"))
    assert "no ControlNet with pixart" in _error({"base": pixart}, (files["cn"],))
    # The sequence form of TP (checked with the layout, as the engine's preflight does).
    from engine.controlnet import check_controlnets
    from shardiff_parallel.config import ParallelConfig

    with pytest.raises(ValueError, match="--tp-comm allreduce"):
        check_controlnets((files["cn"],), files["base"], family("flux"), ParallelConfig(tp=2, tp_comm="sequence"))
    with pytest.raises(ValueError, match="--cuda-graphs"):
        check_controlnets((files["cn"],), files["base"], family("flux"), ParallelConfig(), cuda_graphs=True)
    # Requests: a ControlNet needs a control image; scales and modes need a ControlNet.
    engine = Engine(EngineConfig(model=files["base"], controlnets=(files["cn"],)))
    with pytest.raises(ValueError, match="needs --control-image"):
        engine.check_request(GenerateRequest(prompt=PROMPT), engine.parallel)
    with pytest.raises(ValueError, match="2 values for 1 ControlNets"):
        engine.check_request(GenerateRequest(prompt=PROMPT, control_image=_images()["CTRL"],
                                             controlnet_scale=(0.5, 0.5)), engine.parallel)
    with pytest.raises(ValueError, match="no such file"):
        engine.check_request(GenerateRequest(prompt=PROMPT, control_image=str(tmp_path / "none.png")), engine.parallel)
    engine.close()
    plain = Engine(EngineConfig(model=files["base"]))
    with pytest.raises(ValueError, match="runs no ControlNet"):
        plain.check_request(GenerateRequest(prompt=PROMPT, controlnet_scale=0.5), plain.parallel)
    with pytest.raises(ValueError, match="--controlnet DIR"):
        plain.check_request(GenerateRequest(prompt=PROMPT, control_image=_images()["CTRL"]), plain.parallel)
    plain.close()
