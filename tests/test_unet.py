"""UNet families (SD1.5, SDXL) on tiny random diffusers directories: data parallel and CFG split.

1, 2, 3 and 4 gloo processes produce the same image set for 5 prompts × 2 images (uneven splits:
10 = 5+5 = 4+3+3), one guided image is CFG-split on 2 processes (and CFG × DP on 4), and the
single-process images are diffusers' own pipeline images for the same seeds.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.harness import run_distributed

MODELS = ("sd1.5-tiny", "sdxl-tiny")
PROMPTS = ["a red cat", "a blue dog on grass", "a green tree", "two yellow stars", "a white boat at sea"]
IMAGES_PER_PROMPT = 2
SIZE, STEPS, GUIDANCE = 32, 2, 7.0


def _requests(n_prompts: int = len(PROMPTS)):
    from engine import GenerateRequest

    every = [p for p in PROMPTS[:n_prompts] for _ in range(IMAGES_PER_PROMPT)]
    return [GenerateRequest(prompt=p, height=SIZE, width=SIZE, steps=STEPS, guidance=GUIDANCE, seed=100 + i)
            for i, p in enumerate(every)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: one intra-op thread is fastest, and it does not fight the worker processes for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from engine.models import get_preset

    return {m: str(get_preset(m).save(tmp_path_factory.mktemp(m) / "model")) for m in MODELS}


CASES = {"batch": _requests, "single": lambda: _requests()[:1], "pairs": lambda: _requests(1)}
"""batch: 5 prompts × 2 images; single: one guided image; pairs: 2 guided images (CFG × DP on 4)."""


def _generate(world: int, dirs: dict, cases=("batch", "single")):
    """Per model and case: the layout chosen and (first rank) the images, through one Engine."""
    from engine import Engine, EngineConfig

    out = {}
    for name, path in dirs.items():
        engine = Engine(EngineConfig(model=path))
        for case in cases:
            results = engine.generate_batch(CASES[case](), output_type="np")
            out[(name, case)] = (engine.parallel.describe(),
                                 None if results is None else [torch.from_numpy(r.image).clone() for r in results])
        engine.close()
    return out


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def single(model_dirs):
    return _generate(1, model_dirs)


def test_single_process_equals_diffusers_pipeline(model_dirs, single):
    from diffusers import DiffusionPipeline

    for name, path in model_dirs.items():
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        layout, images = single[(name, "batch")]
        assert layout == "single" and len(images) == len(PROMPTS) * IMAGES_PER_PROMPT
        for req, img in zip(_requests(), images):
            ref = pipe(req.prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np").images[0]
            assert _rel(img, torch.from_numpy(ref)) <= 1e-5, f"{name} seed {req.seed}"
        # Different seeds give different images (each image has its own noise).
        assert _rel(images[0], images[1]) > 1e-2


# world → expected layout per case
EXPECTED = {2: dict(batch="dp2", single="cfg2"), 3: dict(batch="dp3", single="dp3"),
            4: dict(single="dp2×cfg2", pairs="dp2×cfg2")}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_process_count_gives_the_same_images(model_dirs, single, world):
    # 4 processes on a small CI machine: CFG × DP on one model only (the batch split is tested by 2 and 3).
    dirs = model_dirs if world < 4 else {"sd1.5-tiny": model_dirs["sd1.5-tiny"]}
    results = run_distributed(_generate, world, world, dirs, tuple(EXPECTED[world]), timeout=300)
    for rank, res in enumerate(results):
        for (name, case), (layout, images) in res.items():
            assert layout == EXPECTED[world][case], f"{name} {case} on {world}: {layout}"
            if rank:
                assert images is None, "only the first rank gets the results"
                continue
            ref = single[(name, "batch")][1][: len(images)]
            assert len(images) == {"batch": 10, "single": 1, "pairs": 2}[case]
            for i, (img, r) in enumerate(zip(images, ref)):
                err = _rel(img, r)
                assert err <= 1e-4, f"{name} {case} image {i} on {world} processes ({layout}): rel L2 {err:.2e}"


def test_automatic_layout_rule():
    from engine.config import EngineConfig
    from engine.models.unet import unet_layout

    auto = EngineConfig(model="sd1.5")
    cases = [
        (1, [True], "single"), (2, [True], "cfg2"), (2, [False], "dp2"), (2, [True] * 2, "dp2"),
        (3, [True], "dp3"), (4, [True], "dp2×cfg2"), (4, [True] * 2, "dp2×cfg2"), (4, [True] * 3, "dp4"),
        (8, [True] * 8, "dp8"), (4, [True, False], "dp4"), (2, None, "cfg2"),
    ]
    for world, guided, want in cases:
        layout, why = unet_layout(world, auto, guided)
        assert layout.describe() == want and why, (world, guided, layout, why)
    assert unet_layout(4, EngineConfig(model="sd1.5", cfg=2), [True] * 8)[0].describe() == "dp2×cfg2"
    assert unet_layout(4, EngineConfig(model="sd1.5", parallel="dp"), [True])[0].describe() == "dp4"
    assert unet_layout(4, EngineConfig(model="sd1.5", parallel="cfg"), [True] * 8)[0].describe() == "dp2×cfg2"
    with pytest.raises(ValueError, match="--dp 3"):
        unet_layout(3, EngineConfig(model="sd1.5", parallel="cfg"), [True])


@pytest.mark.parametrize("axis", ["ulysses", "ring", "tp"])
def test_sharding_a_unet_is_refused_with_the_reason(axis):
    from engine import Engine, EngineConfig

    with pytest.raises(ValueError, match=rf"cannot use --{axis}: a UNet is too small.*--parallel auto"):
        Engine(EngineConfig(model="sd1.5-tiny", **{axis: 2}))


def test_cfg_split_needs_guidance_on():
    from engine.config import EngineConfig
    from engine.models import family

    with pytest.raises(ValueError, match="guidance off"):
        family("sd").check_cfg({"cfg": 2}, {"guidance_scale": 1.0})
    # auto never picks it for unguided images
    from engine.models.unet import unet_layout

    assert unet_layout(2, EngineConfig(model="sd1.5"), [False])[0].cfg == 1


def test_presets_have_the_real_sizes():
    from engine.loading import inspect_model
    from engine.models import PRESETS

    unet = lambda m: sum(p.numel() for p in PRESETS[m].empty_model("unet").parameters())  # noqa: E731
    assert round(unet("sd1.5") / 1e9, 2) == 0.86 and round(unet("sdxl") / 1e9, 2) == 2.57
    sd, xl = inspect_model("sd1.5"), inspect_model("sdxl")
    assert (sd.family, sd.default_size, sd.joint_attention_dim) == ("sd", 512, 768)
    assert (xl.family, xl.default_size, xl.joint_attention_dim, xl.pooled_projection_dim) == ("sdxl", 1024, 2048, 1280)


def test_real_sd_directory_layout_loads_without_safety_checker(model_dirs, tmp_path):
    """A StableDiffusionPipeline directory as published (safety checker + feature extractor listed,
    the checker from the non-library `stable_diffusion` module, pickle weights): loads, checker off."""
    from engine.loading import load_pipeline
    from engine.loading import inspect_model

    path = tmp_path / "sd"
    shutil.copytree(model_dirs["sd1.5-tiny"], path)
    index = json.loads((path / "model_index.json").read_text())
    index |= dict(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                  feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (path / "model_index.json").write_text(json.dumps(index))
    (path / "safety_checker").mkdir()
    (path / "safety_checker" / "pytorch_model.bin").write_bytes(b"not loaded")
    assert inspect_model(str(path)).family == "sd"
    pipe = load_pipeline(str(path), dtype=torch.float32, device="cpu")
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_cli_saves_numbered_images_in_order(model_dirs, single, tmp_path):
    from engine.generate import main
    from engine.image_io import read_png_params
    from PIL import Image

    out = tmp_path / "img.png"
    args = ["--model", model_dirs["sd1.5-tiny"], "--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS),
            "--guidance", str(GUIDANCE), "--seed", "100", "--num-images", str(IMAGES_PER_PROMPT), "--output", str(out)]
    for p in PROMPTS[:2]:
        args += ["--prompt", p]
    main(args)
    ref = single[("sd1.5-tiny", "batch")][1]
    for i in range(2 * IMAGES_PER_PROMPT):
        f = tmp_path / f"img-{i:03d}.png"
        params = read_png_params(f)
        assert (params["seed"], params["prompt"], params["index"]) == (100 + i, PROMPTS[i // IMAGES_PER_PROMPT], i)
        png = torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255)
        assert (png - ref[i]).abs().max() <= 1 / 255 + 1e-6  # PNG rounding only
    assert not (tmp_path / "img.png").exists()


def test_auto_dtype_is_fp16_for_unets_on_gpu_bf16_for_transformers():
    """--dtype auto follows the family on GPUs (UNets are published in fp16; bf16 drifts 1.1-1.5% over
    30 guided steps, fp16 0.13-0.20%), and is fp32 on CPU; an explicit --dtype always wins."""
    import torch

    from engine.config import EngineConfig
    from engine.models import family

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert family("sdxl").gpu_dtype == family("sd").gpu_dtype == torch.float16
    assert family("flux").gpu_dtype == family("sd3").gpu_dtype == torch.bfloat16
    auto = EngineConfig()
    assert auto.torch_dtype(cuda, family("sdxl").gpu_dtype) == torch.float16
    assert auto.torch_dtype(cuda, family("flux").gpu_dtype) == torch.bfloat16
    assert auto.torch_dtype(cpu, family("sdxl").gpu_dtype) == torch.float32
    assert EngineConfig(dtype="bf16").torch_dtype(cuda, family("sdxl").gpu_dtype) == torch.bfloat16
