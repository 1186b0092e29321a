"""Vision-language processors for images and text without torchvision (engine/loading/processors.py).

Here torchvision cannot be installed, so transformers' own Qwen2VLProcessor / PixtralProcessor cannot be
built; each processor is compared with a reference computed from the same image processor's outputs
and the same tokenizer, by hand: the image placeholders expanded (Qwen: one <|image_pad|> per merged
patch, grid.prod() / merge²; Pixtral: rows of [IMG] closed by [IMG_BREAK], the last by [IMG_END]) and
tokenized. Then the text embeddings the pipelines compute through the processor (Qwen-Image-Edit(-Plus)'s
Qwen2.5-VL seeing the images, FLUX.2's Mistral-3 from its chat template) equal the text encoder's on the
reference inputs, bitwise. Where torchvision is installed, the real processor joins the comparison.
A saved edit model's directory names the real class and loads with the image-and-text processor, said
in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.loading import processors

PROMPT = "make the circle red"


def _image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _qwen_reference(tokenizer, image_processor, texts: list[str], images: list) -> dict:
    """Qwen2VLProcessor's outputs, by hand: each <|image_pad|> becomes grid.prod() / merge² of them."""
    pixels = image_processor(images=images, return_tensors="pt")
    counts = iter((pixels["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist())
    expanded = []
    for text in texts:
        parts = text.split("<|image_pad|>")
        expanded.append(parts[0] + "".join("<|image_pad|>" * next(counts) + p for p in parts[1:]))
    tokens = tokenizer(expanded, padding=True, return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}


@pytest.fixture(scope="module")
def edit_plus():
    from engine.models import get_preset

    return get_preset("qwen-image-edit-plus-tiny").build_pipeline(dtype=torch.float32, device="cpu")


def test_qwen_processor_equals_the_reference_and_its_embeddings_too(edit_plus):
    proc = edit_plus.processor
    assert type(proc).__name__ == ("Qwen2VLImageTextProcessor" if not processors.has_torchvision() else "Qwen2VLProcessor")
    images = [_image(1, 80, 48), _image(2, 48, 64)]
    texts = ["Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|>"
             "<|vision_end|>" + PROMPT, "<|vision_start|><|image_pad|><|vision_end|> a"]
    both = [images, images[:1]]
    ref = _qwen_reference(proc.tokenizer, proc.image_processor, texts, [im for group in both for im in group])
    got = proc(text=texts, images=[im for group in both for im in group], padding=True, return_tensors="pt")
    for key, value in ref.items():
        assert torch.equal(got[key], value), key
    assert (ref["input_ids"] == proc.image_token_id).sum() == sum(ref["image_grid_thw"].prod(-1) // 4)
    # Qwen3-VL's processor (16-pixel patches) expands its images alike.
    qwen3 = processors.build("Qwen3VLProcessor", processors.image_processor("Qwen3VLProcessor", patch_size=16),
                             proc.tokenizer)
    ref3 = _qwen_reference(proc.tokenizer, qwen3.image_processor, texts, [im for group in both for im in group])
    got3 = qwen3(text=texts, images=[im for group in both for im in group], padding=True, return_tensors="pt")
    for key, value in ref3.items():
        assert torch.equal(got3[key], value), key
    if processors.has_torchvision():  # the real class, built the standard way, on the same inputs
        real = processors.build("Qwen2VLProcessor", proc.image_processor, proc.tokenizer)
        real_out = real(text=texts, images=[im for group in both for im in group], padding=True, return_tensors="pt")
        for key, value in ref.items():
            assert torch.equal(real_out[key], value), key

    # The pipeline's text embeddings (Qwen2.5-VL seeing both references) equal the encoder's on the reference.
    template = edit_plus.prompt_template_encode.format(texts[0])  # the pipeline's "Picture i: …" prefix
    conditioned = [edit_plus.image_processor.resize(im, 384, 384) for im in images]
    embeds, mask = edit_plus._get_qwen_prompt_embeds(PROMPT, conditioned, device="cpu")
    one = _qwen_reference(proc.tokenizer, proc.image_processor, [template], conditioned)
    with torch.no_grad():
        hidden = edit_plus.text_encoder(**one, output_hidden_states=True).hidden_states[-1]
    expected = hidden[0, edit_plus.prompt_template_encode_start_idx:]
    assert embeds.shape[1] == expected.shape[0] and mask.all()
    assert torch.equal(embeds[0], expected)


def test_pixtral_processor_equals_the_reference_and_flux2s_embeddings_too():
    from engine.presets.tokenizer import make_tokenizer

    tokenizer = make_tokenizer("mistral3")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]})
    image_processor = processors.image_processor("PixtralProcessor", size={"longest_edge": 112})
    proc = processors.build("PixtralProcessor", image_processor, tokenizer, chat_template=tokenizer.chat_template,
                            patch_size=14, spatial_merge_size=2)
    image = _image(3, 80, 48)
    got = proc(text=["see [IMG] here"], images=[image], return_tensors="pt")
    pixels = image_processor(images=[image], patch_size=28, return_tensors="pt")
    height, width = pixels["image_sizes"][0].tolist()
    rows = (["[IMG]"] * (width // 28) + ["[IMG_BREAK]"]) * (height // 28)
    rows[-1] = "[IMG_END]"
    ref = tokenizer(["see " + "".join(rows) + " here"], return_tensors="pt")
    assert (height, width) == (56, 84) and torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["pixel_values"], pixels["pixel_values"])

    # FLUX.2-dev encodes text alone through its processor's chat template: the same ids and embeddings as
    # through the tokenizer (the preset's own).
    from diffusers import Flux2Pipeline

    from engine.models import get_preset

    encoder = get_preset("flux2-dev-tiny").build_component("text_encoder", dtype=torch.float32, device="cpu")
    args = dict(text_encoder=encoder, prompt=[PROMPT], device="cpu", max_sequence_length=48)
    with torch.no_grad():
        through_processor = Flux2Pipeline._get_mistral_3_small_prompt_embeds(tokenizer=proc, **args)
        through_tokenizer = Flux2Pipeline._get_mistral_3_small_prompt_embeds(tokenizer=tokenizer, **args)
    assert torch.equal(through_processor, through_tokenizer)
    # Saved and read back as a directory's component is.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        proc.save_pretrained(folder)
        if processors.needs_stand_in("PixtralProcessor"):
            again = processors.load("PixtralProcessor", folder)
            assert torch.equal(again(text=["see [IMG] here"], images=[image], return_tensors="pt")["input_ids"],
                               ref["input_ids"])


def test_an_edit_directory_loads_its_processor_and_says_so(tmp_path):
    from engine.config import EngineConfig
    from engine.loading import load_pipeline, resolve_model
    from engine.models import get_preset
    from engine.preflight import preflight

    folder = get_preset("qwen-image-edit-tiny").save(tmp_path / "edit")
    import json

    assert json.loads((folder / "model_index.json").read_text())["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert json.loads((folder / "processor" / "processor_config.json").read_text())["processor_class"] == \
        "Qwen2VLProcessor"
    note = preflight(EngineConfig(model=str(folder))).processor_note
    if not processors.has_torchvision():
        assert note == ("torchvision is not installed: the vision-language processor is built for images and text "
                        "alone (processor: Qwen2VLProcessor with Qwen2VLImageProcessorPil)")
        pipe = load_pipeline(resolve_model(str(folder)), dtype=torch.float32, device="cpu")
        assert type(pipe.processor).__name__ == "Qwen2VLImageTextProcessor"
        with pytest.raises(ValueError, match="processes no video"):
            pipe.processor(text=["<|video_pad|>"], videos=[np.zeros((2, 28, 28, 3), dtype=np.uint8)])
    else:
        assert note == ""
    assert preflight(EngineConfig(model="qwen-image-tiny")).processor_note == ""
