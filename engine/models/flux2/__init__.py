"""FLUX.2 (Flux2Pipeline for FLUX.2-dev, Flux2KleinPipeline and Flux2KleinInpaintPipeline for FLUX.2-klein,
Flux2KleinKVPipeline for FLUX.2-klein-KV; Flux2Transformer2DModel): plans, calls, config reader, presets. Three
families of one transformer: the pipelines take different arguments (dev: embedded guidance; klein: CFG with
the empty prompt as its negative; klein-KV: neither) and klein-KV's plan keeps its references' K/V
(engine/models/flux2/kv.py). Reference images, inpainting and their size rules: engine/models/flux2/edit.py.

Sequence split: as FLUX.1, the joint [text, image] stream with both groups split on their own and
position ids split with their tokens (the model computes the rotary tables from `img_ids` /
`txt_ids`, and counts the text it strips before the output from its local piece). Double-stream
blocks run Flux's processor; single-stream blocks their own (engine/models/flux2/attention.py).

CFG: Flux2Pipeline makes one transformer call per step (FLUX.2-dev is guidance-distilled: the scale
is an input of the transformer), so --cfg is refused for it. Flux2KleinPipeline's base models run
CFG as two sequential calls per step — prompt, then the empty prompt — and combine after the second:
the `cfg_pairs` path (parallel/plan/cfg_pairs.py). Its step-distilled models (`is_distilled`, the released
FLUX.2-klein-4B / -9B) never run the second call, and --cfg is refused for them from model_index.json.

TP (all-reduce form): the double-stream blocks as MMDiT (Q/K/V and text projections column-split,
outputs row-split), their SwiGLU MLPs with the fused [gate, up] input split per half; the
single-stream blocks' fused [Q, K, V, gate, up] projection and [attention, MLP] output split per block
(the block sizes diffusers records on those Linears); the three shared modulation linears (0.6 B of
dev's weights), context_embedder and norm_out column-split and gathered; the timestep / guidance MLPs
col → row. x_embedder and proj_out stay replicated. The sequence forms are not declared: FLUX.2's
blocks modulate the norm outputs inside the block, between the norm and Q/K/V, where no module
boundary carries the gathered tokens.
"""

from __future__ import annotations

import functools

import torch

from engine.presets.components import (
    FLUX2_VAE, MISTRAL_SMALL_3_24B, QWEN3_4B, QWEN3_8B, TINY_FLUX2_VAE, TINY_MISTRAL3, TINY_QWEN3, flux2_vae, mistral3,
    qwen3_lm,
)
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import ModelPlan, Processors, SequenceSplit, TensorPlan
from shardiff_parallel.tensor import PACKED, Colwise, Rowwise

from ..family import Family, ModelInfo, vae_scale
from ..flux import FLUX_DEV_SCHEDULER, FLUX_PLAN
from ..flux.attention import FluxParallelAttnProcessor
from ..mmdit import COL, GATHER, ROW, check_tp_widths
from .attention import Flux2SingleStreamParallelAttnProcessor
from .edit import DEV_PIPELINES, KLEIN_PIPELINES, KV_PIPELINES
from .kv import kv_plan

FLUX2_TP_PLAN = {
    "time_guidance_embed.*.linear_1": COL,
    "time_guidance_embed.*.linear_2": ROW,
    "double_stream_modulation_img.linear": GATHER,
    "double_stream_modulation_txt.linear": GATHER,
    "single_stream_modulation.linear": GATHER,
    "context_embedder": GATHER,
    "transformer_blocks.*.attn.to_[qkv]": COL,
    "transformer_blocks.*.attn.add_[qkv]_proj": COL,
    "transformer_blocks.*.attn.to_out.0": ROW,
    "transformer_blocks.*.attn.to_add_out": ROW,
    # SwiGLU: the fused input projection is [gate, up], halves the model splits after the matmul.
    "transformer_blocks.*.ff.linear_in": Colwise(blocks=(1, 1)),
    "transformer_blocks.*.ff.linear_out": ROW,
    "transformer_blocks.*.ff_context.linear_in": Colwise(blocks=(1, 1)),
    "transformer_blocks.*.ff_context.linear_out": ROW,
    "single_transformer_blocks.*.attn.to_qkv_mlp_proj": Colwise(blocks=PACKED),
    "single_transformer_blocks.*.attn.to_out": Rowwise(blocks=PACKED),
    "norm_out.linear": GATHER,
}

FLUX2_PLAN = ModelPlan(
    attention=Processors({
        "transformer_blocks.*.attn": FluxParallelAttnProcessor,
        "single_transformer_blocks.*.attn": Flux2SingleStreamParallelAttnProcessor,
    }),
    # Flux's token streams: text and image pieces with their ids.
    sequence=SequenceSplit(inputs=FLUX_PLAN.sequence.inputs, output=FLUX_PLAN.sequence.output),
    tensor=TensorPlan(FLUX2_TP_PLAN),
)

# Flux2Pipeline / Flux2KleinPipeline.default_sample_size (latent cells) when a request gives no size.
DEFAULT_SAMPLE_SIZE = 128


def _prompt(request) -> dict:
    kwargs = dict(prompt=request.prompt, guidance_scale=request.guidance,
                  num_images_per_prompt=request.num_images_per_prompt)
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    return kwargs


def flux2_call_kwargs(request) -> dict:
    """Flux2Pipeline: the prompt and the embedded guidance scale; it has no negative branch."""
    if request.negative_prompt is not None or request.true_cfg_scale > 1:
        raise ValueError("Flux2Pipeline has no negative prompt or true CFG: FLUX.2-dev is guidance-distilled "
                         "(--guidance is an input of its transformer); drop --negative-prompt / --true-cfg-scale")
    return _prompt(request)


def klein_call_kwargs(request) -> dict:
    """Flux2KleinPipeline: --guidance is its CFG scale, against the empty prompt (no negative prompt)."""
    if request.negative_prompt is not None or request.true_cfg_scale > 1:
        raise ValueError("Flux2KleinPipeline's negative branch is always the empty prompt and its CFG scale is "
                         "--guidance; drop --negative-prompt / --true-cfg-scale")
    return _prompt(request)


def kv_call_kwargs(request) -> dict:
    """Flux2KleinKVPipeline: the prompt alone (its step-distilled model takes no guidance scale)."""
    if request.negative_prompt is not None or request.true_cfg_scale > 1:
        raise ValueError("Flux2KleinKVPipeline has no negative branch (a step-distilled model); drop "
                         "--negative-prompt / --true-cfg-scale")
    kwargs = _prompt(request)
    del kwargs["guidance_scale"]
    return kwargs


def klein_uses_cfg(kwargs: dict) -> bool:
    # Flux2KleinPipeline.do_classifier_free_guidance (less `is_distilled`, which ModelInfo carries).
    return kwargs.get("guidance_scale", 4.0) > 1


def _embeds(info, text_tokens: int, device, dtype, gen) -> torch.Tensor:
    return torch.randn(1, text_tokens, info.joint_attention_dim, generator=gen).to(device, dtype)


def flux2_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random prompt embeddings of the real shape (3 stacked Mistral layers), FLUX.2-dev's default guidance."""
    gen = torch.Generator("cpu").manual_seed(1234)
    return dict(prompt_embeds=_embeds(info, text_tokens, device, dtype, gen), guidance_scale=4.0)


def klein_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Step-distilled (the released klein): one call per step, guidance 1 as diffusers runs them; base
    models: CFG at the pipeline's default 4, with a random negative embedding in place of the empty prompt's."""
    gen = torch.Generator("cpu").manual_seed(1234)
    kwargs = dict(prompt_embeds=_embeds(info, text_tokens, device, dtype, gen), guidance_scale=1.0)
    if not info.guidance_distilled:
        kwargs.update(negative_prompt_embeds=_embeds(info, text_tokens, device, dtype, gen), guidance_scale=4.0)
    return kwargs


def kv_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random prompt embeddings of the real shape; one call per step."""
    gen = torch.Generator("cpu").manual_seed(1234)
    return dict(prompt_embeds=_embeds(info, text_tokens, device, dtype, gen))


def read_flux2_info(configs, *, family: str, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    t, vae = configs["transformer"], configs["vae"]
    scale = vae_scale(vae)
    heads, head_dim = int(t.get("num_attention_heads", 48)), int(t.get("attention_head_dim", 128))
    return ModelInfo(
        source=source, family=family, pipeline_class=pipeline_class, num_heads=heads, head_dim=head_dim,
        num_layers=int(t.get("num_layers", 8)), num_single_layers=int(t.get("num_single_layers", 48)),
        in_channels=int(t.get("in_channels", 128)), joint_attention_dim=int(t.get("joint_attention_dim", 15360)),
        pooled_projection_dim=0, vae_scale_factor=scale,
        # 2×2 latent cells per token (the pipelines' patchify).
        spatial_multiple=scale * 2, default_size=int(default_size or DEFAULT_SAMPLE_SIZE * scale),
        uses_guidance_embeds=bool(t.get("guidance_embeds", True)),
        mlp_width=int(heads * head_dim * float(t.get("mlp_ratio", 3.0))),
        guidance_distilled=bool(configs.get("pipeline", {}).get("is_distilled", False)),
    )


# ---------------------------------------------------------------- presets

# Transformer configs of diffusers' scripts/convert_flux2_to_diffusers.py (black-forest-labs/FLUX.2-dev,
# FLUX.2-klein-4B, FLUX.2-klein-9B). dev: 8 double + 48 single blocks, 48 heads × 128 (32.2 B).
FLUX2_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
    joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32],
    rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
# klein-4B: 5 + 20 blocks, 24 heads; text width 3 × Qwen3-4B's 2560. klein-9B: 8 + 24 blocks, 32 heads, 3 × 4096.
FLUX2_KLEIN_4B_TRANSFORMER = {**FLUX2_DEV_TRANSFORMER, "num_layers": 5, "num_single_layers": 20,
                              "num_attention_heads": 24, "joint_attention_dim": 7680, "guidance_embeds": False}
FLUX2_KLEIN_9B_TRANSFORMER = {**FLUX2_DEV_TRANSFORMER, "num_layers": 8, "num_single_layers": 24,
                              "num_attention_heads": 32, "joint_attention_dim": 12288, "guidance_embeds": False}
# 4 heads × 16 (Ulysses-2 × TP-2), 4 latent channels × 2×2 packing; text width 3 × the tiny LMs' 32.
FLUX2_TINY_TRANSFORMER = {**FLUX2_DEV_TRANSFORMER, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
                          "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 96,
                          "axes_dims_rope": [4, 4, 4, 4]}


def flux2_preset(name: str, description: str, default_size: int, transformer: dict, vae: dict,
                 text_encoder: Component, *, klein: bool = False, distilled: bool = False,
                 kv: bool = False) -> PresetSpec:
    klein = klein or kv
    return PresetSpec(
        name=name, family="flux2-klein-kv" if kv else "flux2-klein" if klein else "flux2",
        pipeline_class="Flux2KleinKVPipeline" if kv else "Flux2KleinPipeline" if klein else "Flux2Pipeline",
        description=description,
        default_size=default_size,
        components={
            "transformer": Component("diffusers", "Flux2Transformer2DModel", transformer),
            "vae": flux2_vae(vae),
            "text_encoder": text_encoder,
        },
        tokenizers={"tokenizer": "qwen3" if klein else "mistral3"},
        # FLUX.1-dev's scheduler config, which the conversion script gives FLUX.2 (dynamic shifting: the
        # pipelines pass their own empirical mu).
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(FLUX_DEV_SCHEDULER)),
        # klein-KV's pipeline is for its step-distilled model alone (no guidance argument, nothing to record).
        extra=dict(is_distilled=distilled) if klein and not kv else {},
    )


PRESETS = (
    flux2_preset("flux2-dev", "FLUX.2-dev shapes (32B transformer, 48 heads; Mistral-Small-3 24B, its VAE), random "
                 "weights", 1024, FLUX2_DEV_TRANSFORMER, FLUX2_VAE, mistral3(MISTRAL_SMALL_3_24B)),
    flux2_preset("flux2-dev-tiny", "tiny FLUX.2-dev for CPU tests: 2+2 blocks, 4 heads x 16, tiny Mistral-3", 128,
                 FLUX2_TINY_TRANSFORMER, TINY_FLUX2_VAE, mistral3(TINY_MISTRAL3)),
)
KLEIN_PRESETS = (
    flux2_preset("flux2-klein-4b", "FLUX.2-klein-4B shapes (step-distilled; Qwen3-4B), random weights", 1024,
                 FLUX2_KLEIN_4B_TRANSFORMER, FLUX2_VAE, qwen3_lm(QWEN3_4B), klein=True, distilled=True),
    flux2_preset("flux2-klein-9b", "FLUX.2-klein-9B shapes (step-distilled; Qwen3-8B), random weights", 1024,
                 FLUX2_KLEIN_9B_TRANSFORMER, FLUX2_VAE, qwen3_lm(QWEN3_8B), klein=True, distilled=True),
    # A base (not distilled) klein: its CFG is what --cfg 2 splits.
    flux2_preset("flux2-klein-tiny", "tiny FLUX.2-klein base model for CPU tests (CFG): 2+2 blocks, 4 heads x 16, "
                 "tiny Qwen3", 128, {**FLUX2_TINY_TRANSFORMER, "guidance_embeds": False}, TINY_FLUX2_VAE,
                 qwen3_lm(TINY_QWEN3), klein=True),
)
# black-forest-labs/FLUX.2-klein-9b-kv: klein-9B's transformer (its KV path is diffusers' code, not weights).
KV_PRESETS = (
    flux2_preset("flux2-klein-9b-kv", "FLUX.2-klein-9B-KV shapes (step-distilled, reference K/V cached; Qwen3-8B), "
                 "random weights", 1024, FLUX2_KLEIN_9B_TRANSFORMER, FLUX2_VAE, qwen3_lm(QWEN3_8B), kv=True),
    flux2_preset("flux2-klein-kv-tiny", "tiny FLUX.2-klein-KV for CPU tests: flux2-klein-tiny's parts", 128,
                 {**FLUX2_TINY_TRANSFORMER, "guidance_embeds": False}, TINY_FLUX2_VAE, qwen3_lm(TINY_QWEN3), kv=True),
)

# --quantize fp8: the blocks' token-wise linears (FLUX.2 modulates from shared linears outside the blocks,
# which stay in the model's dtype with the embedders and the final layer). --cache: over the single-stream
# stack (most of the work), whose blocks all return the joint stream; the double-stream blocks, which return
# two streams, are computed every step.
_COMMON = dict(plan=FLUX2_PLAN, check_tp=check_tp_widths,
               fp8=Fp8Rule(include=("transformer_blocks.*", "single_transformer_blocks.*")),
               cache_stacks=("single_transformer_blocks",))
FAMILY = Family(
    name="flux2", pipelines=DEV_PIPELINES, read_info=functools.partial(read_flux2_info, family="flux2"),
    call_kwargs=flux2_call_kwargs, bench_kwargs=flux2_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "tp"}),
    refusals={"cfg": "Flux2Pipeline runs one transformer call per step (FLUX.2-dev's guidance is an input of the "
                     "transformer, not two branches); give those ranks to --ulysses/--ring"},
    **_COMMON,
)
KLEIN = Family(
    name="flux2-klein", pipelines=KLEIN_PIPELINES,
    read_info=functools.partial(read_flux2_info, family="flux2-klein"), call_kwargs=klein_call_kwargs,
    bench_kwargs=klein_bench_kwargs, presets=KLEIN_PRESETS, axes=frozenset({"ulysses", "ring", "tp", "cfg"}),
    uses_cfg=klein_uses_cfg, cfg_pairs=True, cfg_hint="--guidance > 1 (its negative branch is the empty prompt)",
    **_COMMON,
)
KV = Family(
    name="flux2-klein-kv", pipelines=KV_PIPELINES,
    read_info=functools.partial(read_flux2_info, family="flux2-klein-kv"), call_kwargs=kv_call_kwargs,
    bench_kwargs=kv_bench_kwargs, presets=KV_PRESETS, axes=frozenset({"ulysses", "ring", "tp"}),
    refusals={"cfg": "Flux2KleinKVPipeline runs one transformer call per step (a step-distilled model: no guidance "
                     "branches); give those ranks to --ulysses/--ring",
              "cache": "Flux2KleinKVPipeline already reuses work across steps (its references' K/V), and its first "
                       "step returns that cache beside its output"},
    **{**_COMMON, "plan": kv_plan(FLUX2_PLAN.tensor), "cache_stacks": ()},
)
FAMILIES = (FAMILY, KLEIN, KV)
