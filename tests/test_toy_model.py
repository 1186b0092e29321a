"""The shipped default model (`shapes`, engine/assets/shapes) draws what the prompt asks for, on CPU.

For a handful of prompts (colours × shapes × positions × backgrounds) the engine's image must show the
asked-for background, the asked-for colour as the dominant other colour, with its centre of mass in the
asked-for quadrant (engine.toy.data.check_image: plain pixel statistics). The same checks must FAIL on
the flux-tiny preset's random weights, and on the shapes model's image for a prompt it was not given, so
they cannot pass by accident. 2-process jobs (Ulysses-2, Ring-2, TP-2) reproduce the 1-process image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.toy import data, train
from tests.harness import rel_l2, run_distributed

# The training script's closing-check prompts (colours × shapes × positions × backgrounds).
PROMPTS = train.REPORT_PROMPTS
# A prompt that differs in colour and position (and background) from each of PROMPTS.
OTHER = {p: PROMPTS[(i + 3) % len(PROMPTS)] for i, p in enumerate(PROMPTS)}
STEPS = 20


def _u8(image: np.ndarray) -> np.ndarray:
    return (np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)


def _draw(model: str, prompts: list[str], steps: int = STEPS) -> dict[str, np.ndarray]:
    from engine import Engine, EngineConfig, GenerateRequest

    engine = Engine(EngineConfig(model=model))
    try:
        return {
            p: _u8(engine.generate(GenerateRequest(prompt=p, steps=steps, seed=0, height=64, width=64),
                                   output_type="np").image)
            for p in prompts
        }
    finally:
        engine.close()


@pytest.fixture(scope="module")
def shapes_images():
    return _draw("shapes", PROMPTS)


def test_default_model_is_the_shipped_shapes_model():
    from engine.config import DEFAULT_MODEL
    from engine.loading import inspect_model
    from engine.loading.safety import BUILTIN_MODELS

    assert DEFAULT_MODEL == "shapes"
    info = inspect_model(DEFAULT_MODEL)
    assert info.default_size == 64 and info.vae_scale_factor == 8
    assert info.num_heads % 4 == 0  # Ulysses-2, Ring-2, U2×R2 and Ulysses-4
    folder = BUILTIN_MODELS["shapes"]
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert {f.suffix for f in files} <= {".json", ".safetensors"}, "only configs and safetensors ship"
    assert sum(f.stat().st_size for f in files) < 8 * 2**20
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_shapes_model_draws_the_prompt(shapes_images, prompt):
    image = shapes_images[prompt]
    assert data.check_image(image, prompt) == [], f"{prompt!r}: {data.analyse(image, data.parse_prompt(prompt)['background'])}"
    # ... and the same statistics reject it for a prompt that asks for something else.
    assert data.check_image(image, OTHER[prompt]) != []


def test_random_weights_fail_the_checks():
    images = _draw("flux-tiny", PROMPTS, steps=4)
    passed = [p for p, image in images.items() if not data.check_image(image, p)]
    assert passed == [], f"random weights pass the checks for {passed}"


def test_training_forward_equals_the_pipelines():
    """The training script's compressed text (engine.toy.model) is exactly FluxPipeline's 512-token call."""
    from engine.loading import load_pipeline
    from engine.toy import model as toy

    pipe = load_pipeline("shapes", dtype=torch.float32, device="cpu")
    for length in (512, 77):
        assert toy.check_compression(pipe, PROMPTS[:3], max_sequence_length=length) <= 1e-5


def test_text_encoders_tell_prompts_apart():
    from engine.loading import load_pipeline

    pipe = load_pipeline("shapes", dtype=torch.float32, device="cpu")
    prompts = ["a red circle top left on a white background", "a white circle top left on a red background",
               "a red circle top right on a white background"]
    with torch.no_grad():
        pooled = pipe._get_clip_prompt_embeds(prompt=prompts, device="cpu")
        t5 = pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=64, device="cpu")
    for i in range(len(prompts)):
        for j in range(i):
            assert (pooled[i] - pooled[j]).norm() > 1e-3 * pooled[j].norm()
            assert (t5[i] - t5[j]).norm() > 1e-2 * t5[j].norm()


# Ulysses-2, Ring-2 and tensor parallel 2 on two processes.
LAYOUTS = [dict(ulysses=2, ring=1), dict(ulysses=1, ring=2), dict(ulysses=1, ring=1, tp=2)]
PARALLEL_PROMPT = "a blue square bottom right on a yellow background"


def _generate_layouts(layouts):
    from engine import Engine, EngineConfig, GenerateRequest

    out = {}
    for degrees in layouts:
        engine = Engine(EngineConfig(model="shapes", **degrees))
        req = GenerateRequest(prompt=PARALLEL_PROMPT, steps=8, seed=3)
        out[tuple(sorted(degrees.items()))] = (engine.generate(req, output_type="latent").latents.clone(),
                                torch.from_numpy(engine.generate(req, output_type="np").image).clone())
        engine.close()
    return out


def test_two_processes_reproduce_the_single_process_image():
    (ref_lat, ref_img), = _generate_layouts([dict(ulysses=1, ring=1)]).values()
    assert data.check_image(_u8(ref_img.numpy()), PARALLEL_PROMPT) == []
    for rank, res in enumerate(run_distributed(_generate_layouts, 2, LAYOUTS, timeout=240)):
        for layout, (lat, img) in res.items():
            assert rel_l2(lat, ref_lat) <= 1e-4, f"rank {rank} {dict(layout)}: latents rel L2 {rel_l2(lat, ref_lat):.2e}"
            assert rel_l2(img, ref_img) <= 1e-4, f"rank {rank} {dict(layout)}: image rel L2 {rel_l2(img, ref_img):.2e}"


def test_cli_default_model_writes_the_asked_image(tmp_path: Path):
    from PIL import Image

    from engine.generate import main

    out = tmp_path / "x.png"
    main(["--prompt", "a blue square bottom right on a yellow background", "--output", str(out), "--steps", "20"])
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (64, 64, 3)
    assert data.check_image(image, "a blue square bottom right on a yellow background") == []
