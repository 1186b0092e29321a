"""Named model presets: real diffusers architectures filled with random weights.

No checkpoint can be downloaded here, yet tests, demos and benchmarks need the
exact module shapes of real models. A preset is the configuration of every
component; `build_pipeline` turns it into a pipeline whose weights are a pure
function of (seed, parameter name), so every rank of a job builds the same model
on its own, with no broadcast, and a tensor-parallel loader can recreate any one
parameter alone (see `init_parameter`).

Weights are never built in fp32 on the CPU first: modules are created with
parameters on the meta device, then each parameter is materialised directly on
the target device. The generator runs on that device, so values are identical
for one device type and seed; CPU and CUDA builds differ (different RNGs).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from engine import tokenizer as tok

FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# FLUX.1-schnell is timestep-distilled: fixed sigmas, no resolution-dependent shift.
FLUX_SCHNELL_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)

# black-forest-labs/FLUX.1-dev vae/config.json
FLUX_VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu",
    latent_channels=16, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)

# black-forest-labs/FLUX.1-dev transformer/config.json (axes_dims_rope is the default).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)

# Token ids come from our own tokenizer (engine/tokenizer.py), not the real ones:
# CLIP pools its output at the first eos id, so they must agree.
_TOKEN_IDS = dict(pad_token_id=tok.PAD_ID, bos_token_id=tok.BOS_ID, eos_token_id=tok.EOS_ID)

# openai/clip-vit-large-patch14 text tower, as used by FLUX.1.
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    **_TOKEN_IDS,
)

# google/t5-v1_1-xxl encoder, as used by FLUX.1.
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False,
    use_cache=False, pad_token_id=tok.PAD_ID, eos_token_id=tok.EOS_ID, decoder_start_token_id=tok.PAD_ID,
)

TINY_VOCAB = 1024  # > tok.VOCAB_SIZE, so every tokenizer id has an embedding row
assert tok.VOCAB_SIZE < TINY_VOCAB


@dataclass(kw_only=True, frozen=True)
class PresetSpec:
    """Everything needed to build (or describe) one model without any file."""

    name: str
    family: str  # "flux"
    pipeline_class: str  # a diffusers pipeline class name
    description: str
    default_size: int  # image side the preset is meant for, in pixels
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]  # CLIPTextConfig kwargs
    text_encoder_2: dict[str, Any]  # T5Config kwargs
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLUX_DEV_SCHEDULER))


PRESETS: dict[str, PresetSpec] = {
    "flux-tiny": PresetSpec(
        name="flux-tiny",
        family="flux",
        pipeline_class="FluxPipeline",
        description="tiny Flux for CPU tests: 2+2 blocks, 8 heads x 16, 4-level VAE (scale 8)",
        default_size=128,
        transformer=dict(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=8, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=[4, 6, 6],
        ),
        # 4 latent channels x 2x2 packing = the transformer's 16 input channels.
        vae={**FLUX_VAE, "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "latent_channels": 4, "sample_size": 128},
        text_encoder={**CLIP_L, "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64,
                      "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
        text_encoder_2={**T5_XXL, "vocab_size": TINY_VOCAB, "d_model": 64, "d_ff": 128, "d_kv": 32,
                        "num_layers": 2, "num_heads": 2},
    ),
    "flux-dev": PresetSpec(
        name="flux-dev",
        family="flux",
        pipeline_class="FluxPipeline",
        description="FLUX.1-dev shapes (12B transformer, CLIP-L, T5-XXL), random weights",
        default_size=1024,
        transformer=FLUX_DEV_TRANSFORMER,
        vae=FLUX_VAE,
        text_encoder=CLIP_L,
        text_encoder_2=T5_XXL,
    ),
    "flux-schnell": PresetSpec(
        name="flux-schnell",
        family="flux",
        pipeline_class="FluxPipeline",
        description="FLUX.1-schnell shapes (no guidance embedding, unshifted scheduler), random weights",
        default_size=1024,
        transformer={**FLUX_DEV_TRANSFORMER, "guidance_embeds": False},
        vae=FLUX_VAE,
        text_encoder=CLIP_L,
        text_encoder_2=T5_XXL,
        scheduler=dict(FLUX_SCHNELL_SCHEDULER),
    ),
}

# UNet families (SD1.5, SDXL) have other components; their specs build and save themselves.
from engine.unet_presets import UNET_PRESETS  # noqa: E402

PRESETS.update(UNET_PRESETS)
# SD3/SD3.5, PixArt-Σ and Sana: specs that build and save themselves too.
from engine.dit_presets import DIT_PRESETS  # noqa: E402

PRESETS.update(DIT_PRESETS)

MODEL_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def get_preset(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# ---------------------------------------------------------------- initialisation

NORM_BIAS_SCALE = 0.0
BIAS_SCALE = 0.02  # small but nonzero, so bias handling (e.g. sharding) is exercised


def parameter_seed(seed: int, name: str) -> int:
    """64-bit generator seed from (seed, fully qualified parameter name)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_parameter(
    name: str, shape: tuple[int, ...] | torch.Size, *, is_norm: bool, seed: int,
    device: torch.device | str, dtype: torch.dtype,
) -> torch.Tensor:
    """The value of one parameter, reproducible alone.

    `name` is "<component>.<parameter path>", e.g. "transformer.x_embedder.weight";
    `is_norm` says the owning module is a normalisation layer. Values are drawn in
    fp32 on `device` and then cast, so a bf16 build equals the fp32 build cast.
    Matrices/convs: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) keeps each layer roughly
    variance-preserving, so 57 Flux blocks stay finite in bf16; norm scales are 1.
    """
    shape = tuple(shape)
    device = torch.device(device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    is_bias = name.endswith("bias")
    if len(shape) >= 2:
        bound = 1.0 / math.sqrt(out.numel() // shape[0])
    elif is_norm:
        return out.fill_(NORM_BIAS_SCALE if is_bias else 1.0).to(dtype)
    else:
        bound = BIAS_SCALE
    gen = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
    return out.uniform_(-bound, bound, generator=gen).to(dtype)


def _is_norm(module: torch.nn.Module) -> bool:
    # LayerNorm, GroupNorm, diffusers' RMSNorm, T5LayerNorm, ...
    return "Norm" in type(module).__name__


def materialize_(model: torch.nn.Module, *, prefix: str, seed: int, device: torch.device | str,
                 dtype: torch.dtype) -> torch.nn.Module:
    """Replace every meta parameter of `model` in place by its deterministic value.

    Tied parameters (T5's shared/embed_tokens) stay tied: each distinct meta
    tensor is materialised once, under its first name, and put back everywhere.
    """
    done: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, param in list(module.named_parameters(recurse=False)):
            if id(param) not in done:
                full = f"{prefix}.{module_name}.{pname}" if module_name else f"{prefix}.{pname}"
                value = init_parameter(full, param.shape, is_norm=_is_norm(module), seed=seed, device=device,
                                       dtype=dtype)
                done[id(param)] = torch.nn.Parameter(value, requires_grad=False)
            setattr(module, pname, done[id(param)])
    # Buffers were built for real on the CPU (position ids, ...); keep int buffers' dtype.
    model.to(device)
    for module in model.modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf.is_floating_point():
                setattr(module, bname, buf.to(dtype))
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left on the meta device"
    return model.eval()


# ---------------------------------------------------------------- components

def _empty_model(spec: PresetSpec, name: str) -> torch.nn.Module:
    """One model component with parameters on the meta device (no memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    # include_buffers=False: buffers such as CLIP's position_ids hold real values.
    with init_empty_weights(include_buffers=False):
        if name == "transformer":
            return FluxTransformer2DModel(**spec.transformer)
        if name == "vae":
            return AutoencoderKL(**spec.vae)
        if name == "text_encoder":
            return CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        if name == "text_encoder_2":
            model = T5EncoderModel(T5Config(**spec.text_encoder_2))
    assert name == "text_encoder_2", f"not a model component: {name}"
    # init_empty_weights re-creates every registered parameter, which undoes
    # transformers' tying of shared/encoder.embed_tokens (tied in real T5 and in a
    # from_pretrained load). Tie again, outside the context, so both get one value.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model


def _other_components(spec: PresetSpec, *, with_text_encoders: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts: dict[str, Any] = {"scheduler": FlowMatchEulerDiscreteScheduler(**spec.scheduler)}
    if with_text_encoders:
        parts["tokenizer"] = tok.make_tokenizer("clip")
        parts["tokenizer_2"] = tok.make_tokenizer("t5")
    return parts


def _pipeline_class(spec: PresetSpec):
    import diffusers

    return getattr(diffusers, spec.pipeline_class)


def build_component(preset: str, name: str, *, dtype: torch.dtype, device: torch.device | str,
                    seed: int = 0) -> torch.nn.Module:
    """One model component of a preset with its deterministic random weights."""
    if hasattr(get_preset(preset), "build_component"):  # a spec that builds itself (engine/unet_presets.py)
        return get_preset(preset).build_component(name, dtype=dtype, device=device, seed=seed)
    if name not in MODEL_COMPONENTS:
        raise ValueError(f"unknown component {name!r}; model components: {', '.join(MODEL_COMPONENTS)}")
    spec = get_preset(preset)
    return materialize_(_empty_model(spec, name), prefix=name, seed=seed, device=device, dtype=dtype)


def build_pipeline(preset: str, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                   with_text_encoders: bool = True, components: dict[str, Any] | None = None):
    """The preset's diffusers pipeline with random weights, built on `device` in `dtype`.

    `with_text_encoders=False` leaves both text encoders and tokenizers None (callers
    then pass prompt embeddings), which skips most of flux-dev's memory. `components`: prebuilt
    model components used as given (a tensor-parallel shard of the denoiser).
    """
    spec = get_preset(preset)
    components = components or {}
    if hasattr(spec, "build_pipeline"):  # a spec that builds itself (engine/unet_presets.py)
        extra = {"components": components} if components else {}  # only DiT specs take prebuilt components
        return spec.build_pipeline(dtype=dtype, device=device, seed=seed, with_text_encoders=with_text_encoders,
                                   **extra)
    names = [n for n in MODEL_COMPONENTS if (with_text_encoders or n not in TEXT_COMPONENTS) and n not in components]
    parts = {n: build_component(preset, n, dtype=dtype, device=device, seed=seed) for n in names} | components
    parts |= _other_components(spec, with_text_encoders=with_text_encoders)
    for n in TEXT_COMPONENTS:
        parts.setdefault(n, None)
    return _pipeline_class(spec)(**parts)


def save_preset(preset: str, path: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write the preset as a normal diffusers directory (model_index.json + safetensors).

    Components are built and written one at a time, so peak memory is the largest
    component, not the whole pipeline.
    """
    spec = get_preset(preset)
    if hasattr(spec, "save"):  # a spec that saves itself (engine/unet_presets.py)
        return spec.save(path, dtype=dtype, seed=seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    others = _other_components(spec, with_text_encoders=True)
    # A pipeline of meta modules costs nothing and lets diffusers write model_index.json.
    empty = _pipeline_class(spec)(**others, **{n: _empty_model(spec, n) for n in MODEL_COMPONENTS})
    empty.save_config(path)
    del empty
    for name, part in others.items():
        part.save_pretrained(path / name)
    for name in MODEL_COMPONENTS:
        model = build_component(preset, name, dtype=dtype, device="cpu", seed=seed)
        model.save_pretrained(path / name, safe_serialization=True)
        del model
    return path


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.presets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list presets")
    save = sub.add_parser("save", help="write a preset as a diffusers directory")
    save.add_argument("preset")
    save.add_argument("dir")
    save.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    save.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for spec in PRESETS.values():
            print(f"{spec.name:14s} {spec.description}")
        return 0
    try:
        out = save_preset(args.preset, args.dir, dtype=getattr(torch, args.dtype), seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
