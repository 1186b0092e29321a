"""Z-Image (ZImagePipeline, ZImageTransformer2DModel, a single-stream DiT): plans, call, config reader,
presets.

The transformer (diffusers' transformer_z_image.py) takes lists of per-sample latents and captions
(the pipeline already dropped the caption's padding), pads each to a multiple of 32 tokens with
learned pad tokens (real tokens of the computation, attended like any other), refines the image
(`noise_refiner`) and the caption (`context_refiner`) apart, joins them per sample as [image,
caption] — the batch padded to its longest, masked only if lengths differ — and runs `layers` over
that joint stream. Each stack is split over the sp ranks on its own (engine/models/nextdit.py).

Heads: 30, which Ulysses-4 and -8 do not divide: they run with uneven heads (8, 8, 7, 7 and 4 × 6,
3 × 2; parallel/heads.py), as the explicit `--ulysses 4` asks; the automatic layout keeps the
largest Ulysses degree that divides 30 (Ulysses-2 × Ring-2 on 4 GPUs). TP (all-reduce form) must
divide the 30 heads and the 10240-wide MLP: 2, 5 or 10; --tp 2 --ulysses 2 then shares each TP
rank's 15 heads 8 / 7.

CFG: ZImagePipeline batches [prompt, negative] as one call of 2B samples (lists of 2B tensors);
each cfg rank takes one branch's samples, and the per-sample outputs are gathered back as a list.
Guidance is on for guidance_scale > 0 (the pipeline's rule; Z-Image-Turbo runs with 0: no CFG).
Without CFG split the two branches' captions differ in length, so the joint stream carries a
padding mask, honoured on every split.

Legend: B batch, S tokens (this rank's piece), H heads, D head dim.
"""

from __future__ import annotations

import torch

from engine.presets.components import FLUX_VAE, QWEN3_4B, TINY_KL, TINY_QWEN3_2L, kl_vae, qwen3
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import BatchSplit, ModelPlan, SeqDim, SequenceSplit, TensorPlan

from .family import Family, PipelineSpec, ModelInfo, prompt_kwargs, vae_scale
from .mmdit import COL, GATHER, ROW, check_tp_widths
from .nextdit import StackAttention, complex_rotary, stack_runs


class ZImageParallelAttnProcessor(StackAttention):
    """diffusers' ZSingleStreamAttnProcessor (self-attention with Q/K norms and complex rotary
    embeddings) with the attention call replaced by the mesh's parallel attention."""

    MODULE = "attention"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        head_dim = attn.to_q.out_features // attn.heads
        q_BSHD, k_BSHD, v_BSHD = (lin(hidden_states).unflatten(-1, (-1, head_dim)) for lin in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q_BSHD = attn.norm_q(q_BSHD)
        if attn.norm_k is not None:
            k_BSHD = attn.norm_k(k_BSHD)
        if freqs_cis is not None:
            q_BSHD, k_BSHD = complex_rotary(q_BSHD, freqs_cis), complex_rotary(k_BSHD, freqs_cis)
        dtype = q_BSHD.dtype
        out_BSHD = self.attend(q_BSHD, k_BSHD.to(dtype), v_BSHD, masked=attention_mask is not None)
        out = attn.to_out[0](out_BSHD.flatten(2, 3).to(dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


ZIMAGE_TP_PLAN = {
    "t_embedder.mlp.0": COL,
    "t_embedder.mlp.2": ROW,
    # The caption projection (once per call) and the patch embedders stay replicated.
    "*.attention.to_[qkv]": COL,
    "*.attention.to_out.0": ROW,
    "*.feed_forward.w[13]": COL,
    "*.feed_forward.w2": ROW,
    # AdaLN of the modulated blocks (the context refiner has none) and of the final layer.
    "noise_refiner.*.adaLN_modulation.0": GATHER,
    "layers.*.adaLN_modulation.0": GATHER,
    "all_final_layer.*.adaLN_modulation.1": GATHER,
}

ZIMAGE_PLAN = ModelPlan(
    runs=stack_runs(ZImageParallelAttnProcessor, stream="x", rotary="freqs_cis", mask="attn_mask",
                    per_token=("noise_mask",)),
    # The final layer of the config's patch size ("2-1"): the joint stream's last per-token layer.
    sequence=SequenceSplit(gather_modules={"all_final_layer.*": SeqDim("joint", 1)}),
    batch=BatchSplit({"x": 0, "t": 0, "cap_feats": 0}),
    tensor=TensorPlan(ZIMAGE_TP_PLAN),
)

MAX_TEXT_TOKENS = 512
"""ZImagePipeline's default max_sequence_length."""


def zimage_call_kwargs(request) -> dict:
    """The shared prompt arguments, with two things ZImagePipeline needs: one negative prompt per prompt
    of a batch, and a list of prompts of its own — it writes the chat-templated prompts into the list
    it is given, which would template a reused request's prompts twice."""
    kwargs = prompt_kwargs(request)
    if isinstance(request.prompt, list):
        kwargs["prompt"] = list(request.prompt)
        if isinstance(request.negative_prompt, str):
            kwargs["negative_prompt"] = [request.negative_prompt] * len(request.prompt)
    return kwargs


def zimage_uses_cfg(kwargs: dict) -> bool:
    """ZImagePipeline runs both branches when guidance_scale > 0 (not > 1)."""
    return kwargs.get("guidance_scale", 5.0) > 0


def read_zimage_info(configs, *, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    t = configs["transformer"]
    heads, dim = int(t.get("n_heads", 30)), int(t.get("dim", 3840))
    scale = vae_scale(configs["vae"])
    patch = int(list(t.get("all_patch_size", [2]))[0])
    return ModelInfo(
        source=source, family="zimage", pipeline_class=pipeline_class, num_heads=heads, head_dim=dim // heads,
        # The blocks' attention is multi-head whatever n_kv_heads says (diffusers passes no kv_heads).
        num_kv_heads=heads, mlp_width=int(dim / 3 * 8), num_layers=int(t.get("n_layers", 30)), num_single_layers=0,
        in_channels=int(t.get("in_channels", 16)), joint_attention_dim=int(t.get("cap_feat_dim", 2560)),
        pooled_projection_dim=0, vae_scale_factor=scale, spatial_multiple=scale * patch,
        # ZImagePipeline's default is 1024² whatever the config.
        default_size=int(default_size or 1024), uses_guidance_embeds=False,
    )


def zimage_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Z-Image-Turbo's use: a random Qwen3 caption of `text_tokens` real tokens (at most 512), no CFG."""
    gen = torch.Generator("cpu").manual_seed(1234)
    tokens = max(1, min(text_tokens, MAX_TEXT_TOKENS))
    embeds = torch.randn(tokens, info.joint_attention_dim, generator=gen).to(device, dtype)
    return dict(prompt_embeds=[embeds], guidance_scale=0.0)


# ---------------------------------------------------------------- presets

# Tongyi-MAI/Z-Image-Turbo transformer/config.json.
ZIMAGE_TRANSFORMER = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
    n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)
# Its scheduler_config.json: flow matching, fixed shift 3.
ZIMAGE_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0,
                                                            use_dynamic_shifting=False))
# 6 heads of 16: Ulysses-4 holds 2, 2, 1, 1; TP-2 3 each, then Ulysses-2 2 / 1.
ZIMAGE_TINY = {**ZIMAGE_TRANSFORMER, "in_channels": 4, "dim": 96, "n_layers": 2, "n_heads": 6, "n_kv_heads": 6,
               "cap_feat_dim": TINY_QWEN3_2L["hidden_size"], "axes_dims": [4, 6, 6]}


def zimage_preset(name, description, default_size, transformer, vae, text_encoder) -> PresetSpec:
    return PresetSpec(
        name=name, family="zimage", pipeline_class="ZImagePipeline", description=description,
        default_size=default_size, scheduler=ZIMAGE_SCHEDULER,
        components={
            "transformer": Component("diffusers", "ZImageTransformer2DModel", transformer),
            "vae": kl_vae(vae),
            "text_encoder": qwen3(text_encoder),
        },
        # ZImagePipeline renders the prompt with the tokenizer's chat template.
        tokenizers={"tokenizer": "qwen3"},
    )


PRESETS = (
    zimage_preset("z-image", "Z-Image-Turbo shapes (6B single-stream DiT, 30 heads; Qwen3-4B, FLUX VAE), random weights",
                  1024, ZIMAGE_TRANSFORMER, FLUX_VAE, QWEN3_4B),
    zimage_preset("z-image-tiny", "tiny Z-Image for CPU tests: 2+2+2 blocks, 6 heads x 16", 64, ZIMAGE_TINY,
                  {**FLUX_VAE, **TINY_KL, "latent_channels": 4, "sample_size": 64}, TINY_QWEN3_2L),
)

FAMILY = Family(
    name="zimage", pipelines=(PipelineSpec(cls="ZImagePipeline"),), plan=ZIMAGE_PLAN, read_info=read_zimage_info,
    call_kwargs=zimage_call_kwargs, bench_kwargs=zimage_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "cfg", "tp"}), check_tp=check_tp_widths, uses_cfg=zimage_uses_cfg,
    cfg_hint="--guidance > 0",
    # --quantize fp8: every linear of the refiners and the main stack; the embedders and the final layer stay in
    # the model's dtype (as for Flux, engine/models/flux).
    fp8=Fp8Rule(include=("noise_refiner.*", "context_refiner.*", "layers.*")),
    cache_stacks=("layers",), cache_methods=("taylorseer",),  # its blocks take their stream as `x`
)
