"""Qwen-Image 2.1 (QwenImage21Pipeline, QwenImage21Transformer2DModel): its plan — block-causal attention
under every sequence split, the prefix's K/V cached per rank — call, config reader and presets.

The pipeline draws from a prompt alone or from a prompt and up to ten condition images, which Qwen3-VL
reads beside the prompt (each at its vision slots in the text) and the VAE encodes at ~1024² pixels (its
aspect kept) whatever the output size: their latent tokens take those slots in the transformer's joint
sequence. The output's size, when the request gives none, is ~1024² pixels at the last image's aspect.

One stream of single-stream blocks: the model builds the joint sequence inside forward — the text
with each condition image's latents at its vision slots, then the target image — with its rotary
table, per-token modulation choice (`target_token_mask`: text and condition images modulate from
t = 0) and key-padding mask, all whole. So the plan splits the stream where block 0 receives it, and
the per-token inputs at every block (and `norm_out`'s modulation choice); the output is gathered where
`proj_out` leaves it (the pipeline keeps its last target tokens).

Attention is block-causal (parallel/block_causal.py): text causal, each image bidirectional inside, the
target seeing everything; the model gives the prefix's runs as `segments` in whole-sequence positions,
which the processor hands to the mesh's attention: after Ulysses' exchange every rank holds the whole
sequence of its heads and applies the rule there; Ring attends each key block by the rule, skipping
what no query may see. Padded prompt keys (`key_valid`) are a -1000 score bias (one more feature per
head, as Chroma's mask), so the cached keys carry it too.

KV cache (`kv_cache_mode`, diffusers' prefill "extract" then "cached"; the pipeline's `use_kv_cache`, on
by default, with `causal_condition`): the prefix's activations do not depend on the step, so its keys and
values are computed once. Each rank keeps its share — after Ulysses' exchange its heads, of its ring
chunk (a TP rank: of its heads) — in the processor, keyed by diffusers' per-layer cache object, which
identifies the guidance branch and the layer and lives as long as the pipeline's call (a weak key: each
request's call makes new ones, so a request starts from an empty cache and never reads another's);
cached steps attend the target's queries over it and the target's keys.

CFG: true CFG (a negative prompt and true_cfg_scale > 1; the model is meant to run without) is two
sequential calls per step, as Qwen-Image's: the `cfg_pairs` path, one call per cfg rank, each rank its own
branch's cache. The model returns its whole joint sequence, whose length differs between the prompt's
call and the negative prompt's, and the pipeline reads the target, its last tokens: the pair exchanges
those alone (`CfgPairs.tail`).

TP (all-reduce form): Q/K/V and the SwiGLU's two input projections column-split, to_out and the
SwiGLU's output row-split (diffusers' own `_tp_plan`), plus the shared `modulation` column-split and
gathered, the text projection and the timestep MLP col → row, norm_out's scale column-split and gathered.
"""

from __future__ import annotations

import math
import weakref

import torch

from engine.presets.components import (
    QWEN3_VL_8B, QWEN_IMAGE21_VAE, TINY_QWEN3_VL, TINY_QWEN_IMAGE21_VAE, qwen3_vl, qwen_image21_vae,
)
from engine.presets.spec import Component, PresetSpec, Processor
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.block_causal import BlockCausal, PrefixKV
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import CfgPairs, ModelPlan, Processors, SeqContext, SeqDim, SequenceSplit, TensorPlan
from shardiff_parallel.sharding import take_piece

from .chroma import score_bias
from .family import Family, ModelInfo, PipelineSpec, pipeline_specs
from .flux import flux_uses_cfg
from .hunyuan_image import MASKED
from .mmdit import COL, GATHER, ROW, check_tp_widths
from .qwen_image import QWEN_IMAGE_SCHEDULER, qwen_image_call_kwargs


class QwenImage21ParallelAttnProcessor:
    """diffusers' QwenImage21AttnProcessor with the mesh's block-causal attention and a per-rank cache."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention
        self.kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        """diffusers' layer cache (one per guidance branch and layer) → this rank's PrefixKV."""

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        from diffusers.models.transformers.transformer_qwenimage21 import _qwenimage21_prepare_qkv

        # Projections, norms and rotary only: the cache is this processor's.
        q_BSHD, k_BSHD, v_BSHD, _ = _qwenimage21_prepare_qkv(attn, hidden_states, rotary_emb, None, None, None)
        D = q_BSHD.shape[-1]
        cached = segments is None
        if cached and kv_cache_mode != "cached":
            raise ValueError("Qwen-Image 2.1's blocks got no segments outside a cached step")
        # Prefill: key_valid over the whole sequence; cached: the mask over [prefix, target].
        valid_BS = key_valid if not cached else (None if attention_mask is None else attention_mask[:, 0, 0])
        scale = None
        if valid_BS is not None:
            mine_BS = self._my_keys(valid_BS, q_BSHD.shape[1])
            bias_BS = (~mine_BS).to(torch.float32) * MASKED
            q_BSHD, k_BSHD, v_BSHD, scale = score_bias(q_BSHD, k_BSHD, v_BSHD, torch.ones_like(bias_BS), bias_BS)

        sizes = self.ctx.sizes.get("joint")
        if cached:
            if layer_cache not in self.kept:
                raise ValueError("a cached Qwen-Image 2.1 step before its prefill (kv_cache_mode 'extract')")
            out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, sizes, scale=scale, prefix=self.kept[layer_cache])
        else:
            keep = None
            if kv_cache_mode == "extract" and layer_cache is not None:
                keep = self.kept[layer_cache] = PrefixKV()
            out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, sizes, scale=scale, causal=BlockCausal(tuple(segments)),
                                      keep=keep)
        out = out_BSHD[..., :D].flatten(2, 3).type_as(q_BSHD)
        return attn.to_out[1](attn.to_out[0](out))

    def _my_keys(self, valid_BS: torch.Tensor, local: int) -> torch.Tensor:
        """This rank's keys' part of the whole mask: its piece of the joint stream (in a cached step, of
        the target, which is the mask's end)."""
        sizes = self.ctx.sizes.get("joint")
        total = sum(sizes) if sizes else local
        valid_BS = valid_BS[:, valid_BS.shape[1] - total:].bool()
        if sizes:
            valid_BS = take_piece(valid_BS, 1, sizes, self.ctx.mesh.coord("sp"))
        return valid_BS


QWEN_IMAGE21_TP_PLAN = {
    "time_text_embed.timestep_embedder.linear_1": COL,
    "time_text_embed.timestep_embedder.linear_2": ROW,
    "txt_in.in_layer": COL,
    "txt_in.out_layer": ROW,
    "modulation.1": GATHER,
    "transformer_blocks.*.attn.to_[qkv]": COL,
    "transformer_blocks.*.attn.to_out.0": ROW,
    "transformer_blocks.*.img_mlp.proj": COL,
    "transformer_blocks.*.img_mlp.gate_layer": COL,
    "transformer_blocks.*.img_mlp.out": ROW,
    "norm_out.linear": GATHER,
}

_JOINT = SeqDim("joint", 1)
_PER_TOKEN = SeqDim("joint", 0)
QWEN_IMAGE21_PLAN = ModelPlan(
    attention=Processors({"transformer_blocks.*.attn": QwenImage21ParallelAttnProcessor}),
    sequence=SequenceSplit(
        module_inputs={
            "transformer_blocks.0": {"hidden_states": _JOINT},
            "transformer_blocks.*": {"rotary_emb": _PER_TOKEN, "target_token_mask": _PER_TOKEN},
            "norm_out": {"target_token_mask": _PER_TOKEN},  # passed by position
        },
        gather_modules={"proj_out": _JOINT},
    ),
    tensor=TensorPlan(QWEN_IMAGE21_TP_PLAN),
    # Under true CFG the pipeline reads the target alone: the last tokens of the joint output.
    cfg_pairs=CfgPairs(tail=lambda arguments: math.prod(arguments["img_shapes"][0][-1])),
)

# Qwen/Qwen-Image-2.1 transformer/config.json (the QwenImage21Transformer2DModel defaults): 32 single-stream
# blocks, 32 heads × 128, Qwen3-VL's 4096-wide text, 64 latent channels per token.
QWEN_IMAGE21_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128, num_attention_heads=32,
    context_in_dim=4096, mlp_ratio=3, axes_dims_rope=[16, 56, 56], causal_condition=True,
)
# 4 heads: Ulysses-2 × TP-2 splits them.
QWEN_IMAGE21_TINY_TRANSFORMER = {
    **QWEN_IMAGE21_TRANSFORMER, "in_channels": 8, "out_channels": 8, "num_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 4, "context_in_dim": 32, "axes_dims_rope": [4, 6, 6],
}


# ---------------------------------------------------------------- the pipeline

OUTPUT_RESOLUTION = 1024
"""QwenImage21Pipeline's `output_resolution`: the side of the square whose area its condition images are encoded
at, and its default output's area."""
MULTIPLE = 32
"""Pixels per size step: the VAE's 16 × 2 (the pipeline floors height and width to it)."""
MAX_CONDITION_IMAGES = 10
"""Condition images per request: the one-to-ten range Qwen-Image 2.1's reference conditioning is described
with (diffusers' pipeline itself takes any number)."""


def condition_size(images: list) -> tuple[int, int]:
    """(height, width) QwenImage21Pipeline draws at by default with condition images: OUTPUT_RESOLUTION² pixels at
    the last image's aspect, sides multiples of 32."""
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions

    width, height, _ = calculate_dimensions(OUTPUT_RESOLUTION**2, images[-1].width / images[-1].height)
    return height // MULTIPLE * MULTIPLE, width // MULTIPLE * MULTIPLE


QWEN_IMAGE21_PIPELINES = pipeline_specs(
    PipelineSpec(cls="QwenImage21Pipeline", inputs=("image",), max_images=MAX_CONDITION_IMAGES,
                 size_rule=condition_size),
)


def qwen_image21_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random prompt embeddings of the real width, no padding; one call per step (the model runs without
    guidance)."""
    gen = torch.Generator("cpu").manual_seed(1234)
    return dict(prompt_embeds=torch.randn(1, text_tokens, info.joint_attention_dim, generator=gen).to(device, dtype))


def read_qwen_image21_info(configs, *, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    t = configs["transformer"]
    heads, head_dim = int(t.get("num_attention_heads", 32)), int(t.get("attention_head_dim", 128))
    return ModelInfo(
        source=source, family="qwen-image-2.1", pipeline_class=pipeline_class, num_heads=heads, head_dim=head_dim,
        num_layers=int(t.get("num_layers", 32)), num_single_layers=0, in_channels=int(t.get("in_channels", 64)),
        joint_attention_dim=int(t.get("context_in_dim", 4096)), pooled_projection_dim=0,
        # The pipeline's own constants: 16 pixels per latent cell (one token each), sizes floored to 32.
        vae_scale_factor=16, spatial_multiple=MULTIPLE, default_size=int(default_size or OUTPUT_RESOLUTION),
        uses_guidance_embeds=False, mlp_width=heads * head_dim * int(t.get("mlp_ratio", 3)),
    )


# ---------------------------------------------------------------- presets

# Qwen/Qwen3-VL-8B-Instruct preprocessor_config.json: 16-pixel patches merged 2 × 2, from 256² to 4096² pixels
# (so the ~1024² condition images keep their size: one vision slot per 2 × 2 latent tokens, as the transformer
# needs), mean and std 0.5.
QWEN3_VL_IMAGE_PROCESSOR = dict(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                                temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                                image_std=[0.5, 0.5, 0.5])
QWEN3_VL_PROCESSOR = Processor("Qwen3VLProcessor", "qwen2.5-vl", QWEN3_VL_IMAGE_PROCESSOR, chat_template=True)


def qwen_image21_preset(name: str, description: str, default_size: int, transformer: dict, vae: dict,
                        text_encoder: dict) -> PresetSpec:
    return PresetSpec(
        name=name, family="qwen-image-2.1", pipeline_class="QwenImage21Pipeline", description=description,
        default_size=default_size,
        components={
            "transformer": Component("diffusers", "QwenImage21Transformer2DModel", transformer),
            "vae": qwen_image21_vae(vae),
            "text_encoder": qwen3_vl(text_encoder),
        },
        tokenizers={},
        processors={"processor": QWEN3_VL_PROCESSOR},
        # Qwen-Image's scheduler config (exponential time shift; the pipeline passes its own mu).
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(QWEN_IMAGE_SCHEDULER)),
    )


PRESETS = (
    qwen_image21_preset("qwen-image-2.1", "Qwen-Image 2.1 shapes (32 block-causal single-stream blocks, 32 heads; "
                        "Qwen3-VL-8B, its RGBA VAE), random weights", 1024, QWEN_IMAGE21_TRANSFORMER, QWEN_IMAGE21_VAE,
                        QWEN3_VL_8B),
    qwen_image21_preset("qwen-image-2.1-tiny", "tiny Qwen-Image 2.1 for CPU tests: 2 blocks, 4 heads x 16, tiny "
                        "Qwen3-VL, narrow 5-level VAE", 128, QWEN_IMAGE21_TINY_TRANSFORMER, TINY_QWEN_IMAGE21_VAE,
                        TINY_QWEN3_VL),
)

FAMILY = Family(
    name="qwen-image-2.1", pipelines=QWEN_IMAGE21_PIPELINES, plan=QWEN_IMAGE21_PLAN, read_info=read_qwen_image21_info,
    call_kwargs=qwen_image_call_kwargs, bench_kwargs=qwen_image21_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "tp", "cfg"}), check_tp=check_tp_widths, uses_cfg=flux_uses_cfg,
    cfg_pairs=True, cfg_hint="true CFG: --negative-prompt and --true-cfg-scale > 1",
    refusals={"cache": "QwenImage21Pipeline already caches the prompt's and condition images' K/V across steps "
                       "(its prefix), and its cached steps run a shorter sequence than its first"},
    # --quantize fp8: every linear of the blocks; the shared modulation, the embedders and the final layer,
    # outside the blocks, stay in the model's dtype (as for Flux, engine/models/flux).
    fp8=Fp8Rule(include=("transformer_blocks.*",)),
)
