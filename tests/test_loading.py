"""Presets, loading and model inspection on CPU with the flux-tiny preset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.loading import load_pipeline
from engine.loading import inspect_model
from engine.models import PRESETS, get_preset
from engine.presets.weights import init_parameter
from engine.presets.tokenizer import EOS_ID, make_tokenizer

MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return get_preset("flux-tiny").save(tmp_path_factory.mktemp("flux_tiny") / "model")


@pytest.fixture(scope="module")
def tiny():
    return get_preset("flux-tiny").build_pipeline(dtype=torch.float32, device="cpu")


def assert_same_weights(a, b):
    for name in MODELS:
        pa = dict(getattr(a, name).named_parameters(remove_duplicate=False))
        pb = dict(getattr(b, name).named_parameters(remove_duplicate=False))
        assert pa.keys() == pb.keys(), name
        for key in pa:
            assert torch.equal(pa[key], pb[key]), f"{name}.{key} differs"


def generate(pipe):
    return pipe(
        "a red circle above a blue square", height=128, width=128, num_inference_steps=2,
        output_type="np", generator=torch.Generator("cpu").manual_seed(0),
    ).images


def test_build_is_deterministic(tiny):
    assert_same_weights(tiny, get_preset("flux-tiny").build_pipeline(dtype=torch.float32, device="cpu"))


def test_seed_changes_weights(tiny):
    other = get_preset("flux-tiny").build_component("transformer", dtype=torch.float32, device="cpu", seed=1)
    assert not torch.equal(other.x_embedder.weight, tiny.transformer.x_embedder.weight)


def test_parameter_alone_matches_built(tiny):
    # Value depends only on (seed, name): no dependence on construction order.
    for name, param, is_norm in [
        ("transformer.single_transformer_blocks.1.proj_out.weight",
         tiny.transformer.single_transformer_blocks[1].proj_out.weight, False),
        ("transformer.transformer_blocks.0.attn.to_q.bias", tiny.transformer.transformer_blocks[0].attn.to_q.bias, False),
        ("transformer.transformer_blocks.0.attn.norm_q.weight",
         tiny.transformer.transformer_blocks[0].attn.norm_q.weight, True),
    ]:
        alone = init_parameter(name, param.shape, is_norm=is_norm, seed=0, device="cpu", dtype=torch.float32)
        assert torch.equal(alone, param), name
    assert torch.all(tiny.transformer.transformer_blocks[0].attn.norm_q.weight == 1)


def test_bf16_is_fp32_cast(tiny):
    vae = get_preset("flux-tiny").build_component("vae", dtype=torch.bfloat16, device="cpu")
    for (name, p16), p32 in zip(vae.named_parameters(), tiny.vae.parameters()):
        assert p16.dtype == torch.bfloat16 and torch.equal(p16, p32.to(torch.bfloat16)), name


def test_t5_embeddings_tied(tiny):
    t5 = tiny.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight


def test_tokenizer_ids_match_text_encoders(tiny):
    ids = make_tokenizer("clip")("a red circle", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [tiny.text_encoder.config.bos_token_id, *ids[1:4], EOS_ID]
    assert tiny.text_encoder.config.eos_token_id == EOS_ID == tiny.text_encoder_2.config.eos_token_id
    assert make_tokenizer("t5").model_max_length == 512
    vocab = len(make_tokenizer("t5"))
    assert vocab < tiny.text_encoder.config.vocab_size and vocab < tiny.text_encoder_2.config.vocab_size


def test_without_text_encoders():
    pipe = get_preset("flux-tiny").build_pipeline(dtype=torch.float32, device="cpu", with_text_encoders=False)
    assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.text_encoder_2 is None
    assert pipe.tokenizer_2 is None and pipe.transformer is not None


def test_saved_dir_loads_same_weights(tiny, tiny_dir):
    assert (tiny_dir / "model_index.json").is_file()
    assert list((tiny_dir / "transformer").glob("*.safetensors"))
    assert_same_weights(tiny, load_pipeline(str(tiny_dir), dtype=torch.float32, device="cpu"))


def test_generation_matches_diffusers_own_loader(tiny_dir, tiny):
    from diffusers import FluxPipeline

    ours = generate(load_pipeline(str(tiny_dir), dtype=torch.float32, device="cpu"))
    theirs = generate(FluxPipeline.from_pretrained(tiny_dir, local_files_only=True))
    assert ours.shape == (1, 128, 128, 3)
    assert np.isfinite(ours).all() and ours.std() > 0
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, generate(tiny))


def test_inspect_model(tiny_dir):
    for model in ("flux-tiny", str(tiny_dir)):
        info = inspect_model(model)
        assert (info.family, info.num_heads, info.head_dim, info.spatial_multiple) == ("flux", 8, 16, 16)
        assert info.uses_guidance_embeds and info.default_size == 128
    dev = inspect_model("flux-dev")
    assert (dev.num_heads, dev.head_dim, dev.num_layers, dev.num_single_layers) == (24, 128, 19, 38)
    assert not inspect_model("flux-schnell").uses_guidance_embeds


# ---------------------------------------------------------------- user errors

def copy_dir(src, tmp_path):
    return shutil.copytree(src, tmp_path / "copy")


def edit_index(path, **changes):
    index = json.loads((path / "model_index.json").read_text())
    index.update(changes)
    (path / "model_index.json").write_text(json.dumps(index))


def load(path):
    return load_pipeline(str(path), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("call", [load, inspect_model])
def test_missing_dir(tmp_path, call):
    with pytest.raises(ValueError, match="neither a known preset .*flux-tiny.* nor an existing directory"):
        call(str(tmp_path / "nope"))


@pytest.mark.parametrize("call", [load, inspect_model])
def test_dir_without_model_index(tmp_path, call):
    with pytest.raises(ValueError, match="model_index.json is missing"):
        call(str(tmp_path))


def test_malformed_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path)
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        inspect_model(str(tmp_path))


def test_refuses_foreign_library(tiny_dir, tmp_path):
    path = copy_dir(tiny_dir, tmp_path)
    edit_index(path, transformer=["my_package", "MyTransformer"])
    with pytest.raises(ValueError, match="'transformer' comes from library 'my_package'.*no custom code"):
        load(path)


def test_refuses_custom_pipeline(tiny_dir, tmp_path):
    path = copy_dir(tiny_dir, tmp_path)
    edit_index(path, custom_pipeline="evil/pipeline")
    with pytest.raises(ValueError, match="custom pipeline"):
        load(path)
    edit_index(path, custom_pipeline=None, _class_name="EvilPipeline")
    with pytest.raises(ValueError, match="'EvilPipeline' is not a diffusers pipeline class"):
        inspect_model(str(path))


def test_refuses_pickle_only_component(tiny_dir, tmp_path):
    path = copy_dir(tiny_dir, tmp_path)
    weights = path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="component 'vae' has only pickle weights"):
        load(path)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown preset .flux-huge.*flux-dev, .*flux-schnell, flux-tiny"):
        get_preset("flux-huge").build_pipeline(dtype=torch.float32, device="cpu")
    assert {"flux-tiny", "flux-dev", "flux-schnell"} <= PRESETS.keys()
