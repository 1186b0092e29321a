"""Qwen-Image (QwenImagePipeline and its img2img / inpaint / Edit / Edit-Plus / Edit-inpaint forms,
QwenImageTransformer2DModel): plans, call, config reader, presets. The editing forms, their size rules and
the edit models' presets: engine/models/qwen_image/edit.py.

A 60-block double-stream MMDiT: every block runs its image and text streams through their own
modulation, norms and MLPs and one joint attention over [text, image] (engine/models/qwen_image/attention.py).

Sequence split. The model builds per-token inputs inside forward from whole-sequence lengths, so the
plan splits each where it appears (diffusers' own `_cp_plan` marks the same places):
- image tokens: the `hidden_states` input (everything before the blocks is per token);
- rotary tables: `pos_embed` returns (image table, text table) for the whole sequence — the text
  table's positions start after the image's largest side, so it must be computed from the whole text
  length and then split, never from a piece;
- text tokens: where block 0 receives them (after `txt_in` and after `pos_embed` has read the whole
  text length; `txt_norm` / `txt_in` run on the whole text, a few hundred tokens);
- `modulate_index` (Edit-2511's per-image-token choice of modulation, zero_cond_t): at every
  block, which the model passes it to whole;
- the Edit pipelines' reference tokens are part of the image stream (`hidden_states` and the rotary
  table hold them after the output's tokens): split with it, as Kontext's (edit.py);
- the text padding mask stays whole: the processor reads the pieces it needs (attention.py).
The output is gathered where the model returns it (proj_out is per token).

CFG: QwenImagePipeline's true CFG (negative prompt, true_cfg_scale > 1) calls the transformer twice
per step — prompt, then negative prompt — and combines (and renormalises) the predictions after the
second call: the `cfg_pairs` path, as Flux (parallel/plan/cfg_pairs.py). The two calls may have different
text lengths; each cfg rank's sp group splits its own.

TP (all-reduce form): Q/K/V and the text projections column-split, to_out / to_add_out row-split, both
MLPs col → row, and the per-block AdaLN modulation linears (img_mod / txt_mod: 6.8 of the 20.4 B
weights, which diffusers' `_tp_plan` leaves replicated), txt_in and norm_out column-split and
gathered; the timestep MLP col → row. img_in (64 → 3072) and the final proj_out stay replicated.
The sequence forms of TP are not declared: the image stream is modulated (and, for the edit models,
modulated per token) between norm and Q/K/V inside the block, where no module boundary carries the
gathered tokens.
"""

from __future__ import annotations

import torch

from engine.presets.components import QWEN25_VL_7B, QWEN_IMAGE_VAE, TINY_QWEN25_VL, TINY_QWEN_IMAGE_VAE
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import ModelPlan, Processors, SeqDim, SequenceSplit, TensorPlan

from ..family import Family, ModelInfo
from ..flux import flux_uses_cfg
from ..mmdit import COL, GATHER, ROW, check_tp_widths
from .attention import QwenImageParallelAttnProcessor
from .edit import QWEN_IMAGE_PIPELINES, edit_presets, qwen_image_preset

QWEN_IMAGE_TP_PLAN = {
    "time_text_embed.timestep_embedder.linear_1": COL,
    "time_text_embed.timestep_embedder.linear_2": ROW,
    "txt_in": GATHER,
    "transformer_blocks.*.img_mod.1": GATHER,
    "transformer_blocks.*.txt_mod.1": GATHER,
    "transformer_blocks.*.attn.to_[qkv]": COL,
    "transformer_blocks.*.attn.add_[qkv]_proj": COL,
    "transformer_blocks.*.attn.to_out.0": ROW,
    "transformer_blocks.*.attn.to_add_out": ROW,
    "transformer_blocks.*.img_mlp.net.0.proj": COL,
    "transformer_blocks.*.img_mlp.net.2": ROW,
    "transformer_blocks.*.txt_mlp.net.0.proj": COL,
    "transformer_blocks.*.txt_mlp.net.2": ROW,
    "norm_out.linear": GATHER,
}

QWEN_IMAGE_PLAN = ModelPlan(
    attention=Processors({"transformer_blocks.*.attn": QwenImageParallelAttnProcessor}),
    sequence=SequenceSplit(
        inputs={"hidden_states": SeqDim("image", 1)},
        modules={"pos_embed": (SeqDim("image", 0), SeqDim("text", 0))},
        module_inputs={
            "transformer_blocks.0": {"encoder_hidden_states": SeqDim("text", 1)},
            "transformer_blocks.*": {"modulate_index": SeqDim("image", 1)},
        },
        output=SeqDim("image", 1),
    ),
    tensor=TensorPlan(QWEN_IMAGE_TP_PLAN),
)

# QwenImagePipeline.default_sample_size (latent cells) when a request gives no size.
DEFAULT_SAMPLE_SIZE = 128


def qwen_image_call_kwargs(request) -> dict:
    """QwenImagePipeline arguments beyond size, steps, seed and output type. Its guidance is true CFG
    only (the released transformer has no guidance embedding), so --guidance is not passed."""
    kwargs = dict(prompt=request.prompt, negative_prompt=request.negative_prompt,
                  true_cfg_scale=request.true_cfg_scale, num_images_per_prompt=request.num_images_per_prompt)
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    return kwargs


def qwen_image_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random embeddings of the real shapes for both branches of Qwen-Image's recommended true CFG
    (true_cfg_scale 4): two transformer calls per step. Masks of all ones: no padding (the pipeline
    then drops them, as for one prompt)."""
    gen = torch.Generator("cpu").manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    ones = torch.ones(1, text_tokens, dtype=torch.long, device=device)
    return dict(prompt_embeds=rand(1, text_tokens, info.joint_attention_dim), prompt_embeds_mask=ones,
                negative_prompt_embeds=rand(1, text_tokens, info.joint_attention_dim),
                negative_prompt_embeds_mask=ones, true_cfg_scale=4.0, max_sequence_length=text_tokens)


def read_qwen_image_info(configs, *, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    t, vae = configs["transformer"], configs["vae"]
    # QwenImagePipeline: 2 ** len(temperal_downsample) pixels per latent cell, 2×2 cells per token.
    scale = 2 ** len(vae.get("temperal_downsample", [False, True, True]))
    return ModelInfo(
        source=source, family="qwen-image", pipeline_class=pipeline_class,
        num_heads=int(t.get("num_attention_heads", 24)), head_dim=int(t.get("attention_head_dim", 128)),
        num_layers=int(t.get("num_layers", 60)), num_single_layers=0, in_channels=int(t.get("in_channels", 64)),
        joint_attention_dim=int(t.get("joint_attention_dim", 3584)), pooled_projection_dim=0,
        vae_scale_factor=scale, spatial_multiple=scale * int(t.get("patch_size", 2)),
        default_size=int(default_size or DEFAULT_SAMPLE_SIZE * scale), uses_guidance_embeds=False,
    )


# ---------------------------------------------------------------- presets

# Qwen/Qwen-Image transformer/config.json (the QwenImageTransformer2DModel defaults): 60 blocks,
# 24 heads × 128, Qwen2.5-VL's 3584-wide text, 2×2 patches of 16 latent channels.
QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56],
)
# Qwen/Qwen-Image scheduler/scheduler_config.json (exponential time shift, 8192-token range).
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False,
)
# 4 heads: Ulysses-2 × TP-2 splits them; the text width is the tiny Qwen2.5-VL's.
QWEN_IMAGE_TINY_TRANSFORMER = {
    **QWEN_IMAGE_TRANSFORMER, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 4, "joint_attention_dim": TINY_QWEN25_VL["text_config"]["hidden_size"],
    "axes_dims_rope": [4, 6, 6],
}


PRESETS = (
    qwen_image_preset("qwen-image", "Qwen-Image shapes (20.4B MMDiT, 24 heads; Qwen2.5-VL-7B, its 3D VAE), random "
                      "weights", "QwenImagePipeline", 1024, QWEN_IMAGE_TRANSFORMER, QWEN_IMAGE_VAE, QWEN25_VL_7B,
                      QWEN_IMAGE_SCHEDULER, processor=None),
    qwen_image_preset("qwen-image-tiny", "tiny Qwen-Image for CPU tests: 2 blocks, 4 heads x 16, tiny Qwen2.5-VL, "
                      "4-level VAE (scale 8)", "QwenImagePipeline", 128, QWEN_IMAGE_TINY_TRANSFORMER, TINY_QWEN_IMAGE_VAE,
                      TINY_QWEN25_VL, QWEN_IMAGE_SCHEDULER, processor=None),
    *edit_presets(QWEN_IMAGE_TRANSFORMER, QWEN_IMAGE_TINY_TRANSFORMER, TINY_QWEN_IMAGE_VAE, QWEN_IMAGE_SCHEDULER),
)

FAMILY = Family(
    name="qwen-image", pipelines=QWEN_IMAGE_PIPELINES, plan=QWEN_IMAGE_PLAN, read_info=read_qwen_image_info,
    call_kwargs=qwen_image_call_kwargs, bench_kwargs=qwen_image_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "tp", "cfg"}), check_tp=check_tp_widths,
    uses_cfg=flux_uses_cfg, cfg_pairs=True,
    # --quantize fp8: every linear of the blocks (modulation included); the embedders and the final layer stay
    # in the model's dtype (as for Flux, engine/models/flux).
    fp8=Fp8Rule(include=("transformer_blocks.*",)),
    cache_stacks=("transformer_blocks",),
)
