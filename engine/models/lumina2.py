"""Lumina-Image 2.0 (Lumina2Pipeline, Lumina2Transformer2DModel, a Next-DiT): plans, call, config
reader, presets.

The transformer (diffusers' transformer_lumina2.py) embeds the Gemma caption and the latent patches,
refines the caption alone (`context_refiner`, masked: the caption is padded to max_sequence_length)
and the image alone (`noise_refiner`, no mask), then joins them per sample as [real caption tokens,
image tokens] — padding dropped, each sample padded at the end to the batch's longest, with a mask
only if the lengths differ — and runs `layers` over that joint stream. Each stack is split over the
sp ranks on its own (engine/models/nextdit.py): Ulysses, Ring and their hybrid apply to all three.

Grouped-query attention: 24 query heads read 8 key/value heads. Ulysses splits the key/value heads
(Ulysses-2/4/8: 4/2/1 K/V heads and 12/6/3 query heads per rank; only K/V heads travel) and repeats
them first where the degree exceeds them or would unbalance the query heads (parallel/heads.py).
Padding: the caption mask and the joint-stream mask become key lengths; padded keys are never
attended on any layout, a ring block of padding only is skipped (no NaN), and padded queries are
computed as diffusers computes them and dropped by the model where it joins the streams.

CFG: Lumina2Pipeline calls the transformer once per branch (prompt, then negative prompt: their
captions differ in length, so it never batches them) and combines the two after the second call —
the cfg_pairs path: each cfg rank computes one of the two calls (parallel/plan/cfg_pairs.py).
`cfg_trunc_ratio` < 1 would drop the second call in late steps; the engine never passes it.

TP (all-reduce form): Q/K/V column-split by heads (query and key/value heads alike: TP must divide
both, 24 and 8 → 2, 4, 8), the output and MLP row-split, modulation linears gathered.

NewBie-image (NewBie-AI/NewBie-image-Exp0.1, 3.5 B) is this architecture (its `NextDiT_3B_GQA_patch2_
Adaln_Refiner_WHIT_CLIP`: width 2304, 36 layers, 24 / 8 heads, rotary axes 32/32/32 over 1024/512/512
positions, Gemma-3-4B captions of width 2560) plus a pooled Jina-CLIP text embedding folded into the
timestep conditioning (`clip_text_pooled_proj`, `time_text_embed`), which Lumina2Transformer2DModel
has no input for. Its backbone maps onto Lumina2Transformer2DModel's config (`NEWBIE_BACKBONE`,
tested: tests/test_lumina_zimage.py); to run NewBie itself it would need (1) its weights converted to
diffusers' names (its checkpoint is the original NextDiT's: `attention.qkv` fused, `adaLN_modulation`,
`final_layer`), (2) a transformer class with the CLIP-pooled conditioning — a diffusers subclass of
Lumina2Transformer2DModel whose timestep embedding also takes the pooled vector; the plans here
would apply unchanged, since the extra layers act on the per-sample conditioning vector, not on
tokens — and (3) a diffusers pipeline: its published NewbiePipeline is custom hub code (refused by
the loader's no-custom-code gate), batches [prompt, negative] in one call (the plain cfg split), and
uses Jina CLIP v2, which needs trust_remote_code. Its own inference scripts run one GPU only.

Legend: B batch, S tokens (this rank's piece), H heads, D head dim.
"""

from __future__ import annotations

import math

import torch

from engine.presets.components import FLUX_VAE, GEMMA2_2B, TINY_GEMMA2, TINY_KL, gemma2, kl_vae
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import ModelPlan, SeqDim, SequenceSplit, TensorPlan

from .family import Family, PipelineSpec, ModelInfo, prompt_kwargs
from .mmdit import COL, GATHER, ROW, check_tp_widths
from .nextdit import StackAttention, complex_rotary, stack_runs


class Lumina2ParallelAttnProcessor(StackAttention):
    """diffusers' Lumina2AttnProcessor2_0 (grouped-query self-attention with Q/K norms and complex
    rotary embeddings) with the attention call replaced by the mesh's parallel attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        # From the whole layer's width (a TP shard keeps it), so -1 counts this rank's heads.
        head_dim = attn.to_q.out_features // attn.heads
        q_BSHD = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        k_BSHD = attn.to_k(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        v_BSHD = attn.to_v(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        dtype = q_BSHD.dtype
        if attn.norm_q is not None:
            q_BSHD = attn.norm_q(q_BSHD)
        if attn.norm_k is not None:
            k_BSHD = attn.norm_k(k_BSHD)
        if image_rotary_emb is not None:
            q_BSHD, k_BSHD = complex_rotary(q_BSHD, image_rotary_emb), complex_rotary(k_BSHD, image_rotary_emb)
        q_BSHD, k_BSHD = q_BSHD.to(dtype), k_BSHD.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:
            # Proportional attention: by the whole sequence's length, not this rank's piece.
            scale = math.sqrt(math.log(self.total_tokens(hidden_states.shape[1]), base_sequence_length)) * attn.scale
        out_BSHD = self.attend(q_BSHD, k_BSHD, v_BSHD, masked=attention_mask is not None, scale=scale)
        out = out_BSHD.flatten(2, 3).type_as(q_BSHD)
        return attn.to_out[1](attn.to_out[0](out))


LUMINA2_TP_PLAN = {
    "time_caption_embed.timestep_embedder.linear_1": COL,
    "time_caption_embed.timestep_embedder.linear_2": ROW,
    # The caption projection (Gemma width → model width, once per call) stays replicated.
    "*.attn.to_[qkv]": COL,
    "*.attn.to_out.0": ROW,
    "*.feed_forward.linear_[13]": COL,
    "*.feed_forward.linear_2": ROW,
    # AdaLN of the modulated blocks (noise refiner and main layers) and of the output norm.
    "*.norm1.linear": GATHER,
    "norm_out.linear_1": GATHER,
}

LUMINA2_PLAN = ModelPlan(
    runs=stack_runs(Lumina2ParallelAttnProcessor, stream="hidden_states", rotary="image_rotary_emb",
                    mask="attention_mask"),
    sequence=SequenceSplit(gather_modules={"norm_out": SeqDim("joint", 1)}),
    tensor=TensorPlan(LUMINA2_TP_PLAN),
)

# Lumina2Pipeline's own defaults.
MAX_TEXT_TOKENS = 256
VAE_SCALE = 8
"""Lumina2Pipeline fixes vae_scale_factor = 8 whatever the VAE (the FLUX VAE it ships with is 8)."""


def lumina2_mlp_width(t: dict) -> int:
    """LuminaFeedForward's hidden width: 4 × width (× ffn_dim_multiplier), rounded up to multiple_of."""
    width = 4 * int(t.get("hidden_size", 2304))
    if t.get("ffn_dim_multiplier") is not None:
        width = int(t["ffn_dim_multiplier"] * width)
    multiple = int(t.get("multiple_of", 256))
    return multiple * ((width + multiple - 1) // multiple)


def read_lumina2_info(configs, *, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    t = configs["transformer"]
    heads = int(t.get("num_attention_heads", 24))
    patch = int(t.get("patch_size", 2))
    return ModelInfo(
        source=source, family="lumina2", pipeline_class=pipeline_class, num_heads=heads,
        head_dim=int(t.get("hidden_size", 2304)) // heads, num_kv_heads=int(t.get("num_kv_heads") or heads),
        mlp_width=lumina2_mlp_width(t), num_layers=int(t.get("num_layers", 26)), num_single_layers=0,
        in_channels=int(t.get("in_channels", 16)), joint_attention_dim=int(t.get("cap_feat_dim", 1024)),
        pooled_projection_dim=0, vae_scale_factor=VAE_SCALE, spatial_multiple=VAE_SCALE * patch,
        default_size=int(default_size or int(t.get("sample_size", 128)) * VAE_SCALE), uses_guidance_embeds=False,
    )


def lumina2_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random Gemma embeddings of the pipeline's shape: 256 caption tokens of which `text_tokens` (at most
    256) are real, the negative prompt's caption one real token (Gemma's <bos> of ""), guidance on."""
    gen = torch.Generator("cpu").manual_seed(1234)
    real = max(1, min(text_tokens, MAX_TEXT_TOKENS))

    def embeds():
        return torch.randn(1, MAX_TEXT_TOKENS, info.joint_attention_dim, generator=gen).to(device, dtype)

    def mask(n):
        m = torch.zeros(1, MAX_TEXT_TOKENS, dtype=torch.long, device=device)
        m[:, :n] = 1
        return m

    return dict(prompt_embeds=embeds(), prompt_attention_mask=mask(real), negative_prompt_embeds=embeds(),
                negative_prompt_attention_mask=mask(1), guidance_scale=4.0)


# ---------------------------------------------------------------- presets

# Alpha-VLLM/Lumina-Image-2.0 transformer/config.json.
LUMINA2_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=None, hidden_size=2304, num_layers=26,
    num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None,
    norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=[32, 32, 32], axes_lens=[300, 512, 512], cap_feat_dim=2304,
)
# NewBie-image-Exp0.1's Next-DiT without its Jina-CLIP conditioning (see the module docstring).
NEWBIE_BACKBONE = {**LUMINA2_TRANSFORMER, "num_layers": 36, "axes_lens": [1024, 512, 512], "cap_feat_dim": 2560}
# Its scheduler: flow matching with a fixed shift of 6 (the original's time-shifting factor).
LUMINA2_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=6.0,
                                                             use_dynamic_shifting=False))
# 6 query / 2 key/value heads of 16: Ulysses-2 splits the K/V heads, Ulysses-4 repeats them (6 heads
# on 4 ranks: 2, 2, 1, 1), TP-2 holds 3 / 1.
LUMINA2_TINY = {**LUMINA2_TRANSFORMER, "sample_size": 8, "in_channels": 4, "hidden_size": 96, "num_layers": 2,
                "num_attention_heads": 6, "num_kv_heads": 2, "multiple_of": 16, "axes_dim_rope": [4, 6, 6],
                "cap_feat_dim": TINY_GEMMA2["hidden_size"]}


def lumina2_preset(name, description, default_size, transformer, vae, gemma) -> PresetSpec:
    return PresetSpec(
        name=name, family="lumina2", pipeline_class="Lumina2Pipeline", description=description,
        default_size=default_size, scheduler=LUMINA2_SCHEDULER,
        components={
            "transformer": Component("diffusers", "Lumina2Transformer2DModel", transformer),
            "vae": kl_vae(vae),
            "text_encoder": gemma2(gemma),
        },
        tokenizers={"tokenizer": "t5"},
    )


PRESETS = (
    lumina2_preset("lumina2", "Lumina-Image 2.0 shapes (2.6B Next-DiT, 24 / 8 grouped-query heads; Gemma-2-2B, FLUX VAE), "
                   "random weights", 1024, LUMINA2_TRANSFORMER, FLUX_VAE, GEMMA2_2B),
    lumina2_preset("lumina2-tiny", "tiny Lumina2 for CPU tests: 2+2+2 blocks, 6 / 2 grouped-query heads x 16", 64,
                   LUMINA2_TINY, {**FLUX_VAE, **TINY_KL, "latent_channels": 4, "sample_size": 64}, TINY_GEMMA2),
)

FAMILY = Family(
    name="lumina2", pipelines=(PipelineSpec(cls="Lumina2Pipeline"),), plan=LUMINA2_PLAN, read_info=read_lumina2_info,
    call_kwargs=prompt_kwargs, bench_kwargs=lumina2_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "cfg", "tp"}), check_tp=check_tp_widths, cfg_pairs=True,
    cfg_hint="--guidance > 1",
    # --quantize fp8: every linear of the refiners and the main stack; the embedders and the final layer stay in
    # the model's dtype (as for Flux, engine/models/flux).
    fp8=Fp8Rule(include=("noise_refiner.*", "context_refiner.*", "layers.*")),
    refusals={"cache": "Lumina2Pipeline runs its two guidance branches as two calls per step without naming them "
                       "(diffusers' cache contexts), so a step cache would mix the branches' states"},
)
