"""Chroma (ChromaPipeline and its img2img / inpainting forms, ChromaTransformer2DModel): plans, call, config
reader, presets.

Chroma is Flux's architecture with two changes that matter here:
- Modulation comes from one "approximator" (`distilled_guidance_layer`, an MLP of 5 residual layers,
  5120 wide) that maps the timestep to every block's shift / scale / gate at once; the blocks' AdaLN
  have no linears of their own. It is per sample, so every sp rank runs it whole; TP splits its
  layers col → row like any MLP (half a billion weights in Chroma1-HD).
- A text attention mask. The pipelines give the transformer `attention_mask` (B, S_text + S_image):
  1 for the prompt's tokens and its first padding token, 0 for the rest of T5's padding, 1 for every
  image token; each block passes on the outer product m_q·m_k. The mask is in the text encoder's
  float dtype, so diffusers' attention *adds* it to the scores (a boolean mask would drop keys): a
  query with m_q = 1 scores every key with m_k = 1 one higher, a query with m_q = 0 attends plainly.
  The processor reproduces exactly that, on every layout, as one more feature per head (`score_bias`):
  q gets m_q, k gets m_k / scale, so q'·k'·scale = q·k·scale + m_q·m_k, and the attention needs no
  mask at all (every kernel, Ulysses and Ring alike). The mask is split with the tokens (each rank's
  piece is [its text piece, its image piece], as its joint sequence), and the processor reads its own
  tokens' m from the diagonal of the block's outer product (m·m = m for a 0/1 mask).

CFG: the pipelines run guidance (guidance_scale > 1, the default 5) as two sequential transformer
calls per step, prompt then negative prompt, combined after the second: the cfg pairs path, as Flux's
true CFG (parallel/plan/cfg_pairs.py).
"""

from __future__ import annotations

import torch

from engine.presets.components import FLUX_VAE, T5_XXL, kl_vae, t5_encoder
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import JointSeqDim, ModelPlan, Processors, SeqDim, SequenceSplit, TensorPlan

from .family import Family, ModelInfo, PipelineSpec, pipeline_specs, prompt_kwargs, vae_scale
from .flux import FLUX_DEV_SCHEDULER, FLUX_TINY_T5, FLUX_TINY_VAE
from .flux.attention import FluxParallelAttnProcessor
from .mmdit import COL, GATHER, JOINT_BLOCK_TP_PLAN, ROW, SINGLE_BLOCK_TP_PLAN, check_tp_widths

BIAS_FEATURES = 8
"""Features added per head for the score bias: one carries it, the rest pad the head dim to a multiple
of 8, which the fused attention kernels need."""


def score_bias(q_BSHD, k_BSHD, v_BSHD, m_q_BS, m_k_BS):
    """(q', k', v', scale) whose attention is softmax(q·k·scale + m_q·m_k) v with the heads' own scale:
    one more feature carries the bias (q: m_q, k: m_k / scale), zeros pad q, k and v to whole blocks of
    8 features; the caller drops v's extra features from the output."""
    D = q_BSHD.shape[-1]
    scale = D ** -0.5
    pad = q_BSHD.new_zeros(*q_BSHD.shape[:-1], BIAS_FEATURES)
    q_extra, k_extra = pad.clone(), pad.clone()
    q_extra[..., 0] = m_q_BS[:, :, None].to(q_BSHD.dtype)
    k_extra[..., 0] = (m_k_BS[:, :, None] / scale).to(k_BSHD.dtype)
    return (torch.cat([q_BSHD, q_extra], -1), torch.cat([k_BSHD, k_extra], -1), torch.cat([v_BSHD, pad], -1),
            scale)


class ChromaParallelAttnProcessor(FluxParallelAttnProcessor):
    """Flux's processor (joint [text, image] split, rotary per token) with Chroma's additive mask."""

    def attend(self, q_BSHD, k_BSHD, v_BSHD, attention_mask) -> torch.Tensor:
        sizes = self.ctx.joint_sizes("text", "image")
        if attention_mask is None:
            return self.attention(q_BSHD, k_BSHD, v_BSHD, sizes)
        assert attention_mask.ndim == 4 and attention_mask.shape[-1] == q_BSHD.shape[1], tuple(attention_mask.shape)
        m_BS = attention_mask.diagonal(dim1=-2, dim2=-1)[:, 0]  # this rank's tokens' m (0/1: m·m = m)
        D = q_BSHD.shape[-1]
        q_BSHD, k_BSHD, v_BSHD, scale = score_bias(q_BSHD, k_BSHD, v_BSHD, m_BS, m_BS)
        return self.attention(q_BSHD, k_BSHD, v_BSHD, sizes, scale=scale)[..., :D]


CHROMA_TP_PLAN = {
    # The approximator: its residual stream stays whole, each layer's MLP is a col → row pair.
    "distilled_guidance_layer.layers.*.linear_1": COL,
    "distilled_guidance_layer.layers.*.linear_2": ROW,
    "context_embedder": GATHER,
    # Double- and single-stream blocks (no AdaLN linears: their modulation is the approximator's).
    **JOINT_BLOCK_TP_PLAN,
    **SINGLE_BLOCK_TP_PLAN,
}

CHROMA_PLAN = ModelPlan(
    attention=Processors({
        "transformer_blocks.*.attn": ChromaParallelAttnProcessor,
        "single_transformer_blocks.*.attn": ChromaParallelAttnProcessor,
    }),
    sequence=SequenceSplit(
        inputs={
            "hidden_states": SeqDim("image", 1),
            "img_ids": SeqDim("image", -2),
            "encoder_hidden_states": SeqDim("text", 1),
            "txt_ids": SeqDim("text", -2),
            # After both groups: split by their splits, [text piece, image piece] as the joint sequence.
            "attention_mask": JointSeqDim(("text", "image"), 1),
        },
        output=SeqDim("image", 1),
    ),
    tensor=TensorPlan(CHROMA_TP_PLAN),
)

_IMAGE, _MASK = "image", "mask_image"
CHROMA_PIPELINES = pipeline_specs(
    PipelineSpec(cls="ChromaPipeline", variants={"image": "ChromaImg2ImgPipeline"}),
    PipelineSpec(cls="ChromaImg2ImgPipeline", inputs=(_IMAGE,), required=(_IMAGE,), strength=True,
                 variants={"mask_image": "ChromaInpaintPipeline"}),
    PipelineSpec(cls="ChromaInpaintPipeline", inputs=(_IMAGE, _MASK), required=(_IMAGE, _MASK), strength=True),
)


def chroma_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random prompt embeddings of the real shapes for both guidance branches (two transformer calls per
    step, as Chroma runs by default), with T5 masks that keep a quarter of the tokens."""
    gen = torch.Generator("cpu").manual_seed(1234)
    mask = (torch.arange(text_tokens) <= text_tokens // 4).to(device, dtype)[None]
    return dict(
        prompt_embeds=torch.randn(1, text_tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, text_tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        prompt_attention_mask=mask, negative_prompt_attention_mask=mask.clone(),
        max_sequence_length=text_tokens, guidance_scale=5.0,
    )


def read_chroma_info(configs, *, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    t, vae = configs["transformer"], configs["vae"]
    scale = vae_scale(vae)
    return ModelInfo(
        source=source, family="chroma", pipeline_class=pipeline_class,
        num_heads=int(t.get("num_attention_heads", 24)), head_dim=int(t.get("attention_head_dim", 128)),
        num_layers=int(t.get("num_layers", 19)), num_single_layers=int(t.get("num_single_layers", 38)),
        in_channels=int(t.get("in_channels", 64)), joint_attention_dim=int(t.get("joint_attention_dim", 4096)),
        pooled_projection_dim=0, vae_scale_factor=scale, spatial_multiple=scale * 2,  # 2×2 packed cells
        default_size=int(default_size or 1024), uses_guidance_embeds=False,
        tp_widths=(("approximator width", int(t.get("approximator_hidden_dim", 5120))),),
    )


# ---------------------------------------------------------------- presets

# lodestones/Chroma1-HD transformer/config.json (the ChromaTransformer2DModel defaults).
CHROMA_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, axes_dims_rope=[16, 56, 56], approximator_num_channels=64,
    approximator_hidden_dim=5120, approximator_layers=5,
)
CHROMA_TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=8,
    joint_attention_dim=FLUX_TINY_T5["d_model"], axes_dims_rope=[4, 6, 6], approximator_num_channels=16,
    approximator_hidden_dim=32, approximator_layers=2,
)


def chroma_preset(name: str, description: str, default_size: int, transformer: dict, vae: dict, t5: dict) -> PresetSpec:
    return PresetSpec(
        name=name, family="chroma", pipeline_class="ChromaPipeline", description=description,
        default_size=default_size,
        components={
            "transformer": Component("diffusers", "ChromaTransformer2DModel", transformer),
            "vae": kl_vae(vae),
            "text_encoder": t5_encoder(t5),
        },
        tokenizers={"tokenizer": "t5"},
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(FLUX_DEV_SCHEDULER)),
        extra=dict(image_encoder=None, feature_extractor=None),
    )


PRESETS = (
    chroma_preset("chroma", "Chroma1-HD shapes (8.9B Flux-derived transformer, T5-XXL, Flux VAE), random weights",
                  1024, CHROMA_TRANSFORMER, FLUX_VAE, T5_XXL),
    chroma_preset("chroma-tiny", "tiny Chroma for CPU tests: 2+2 blocks, 8 heads x 16, 2-layer approximator",
                  128, CHROMA_TINY_TRANSFORMER, FLUX_TINY_VAE, FLUX_TINY_T5),
)

FAMILY = Family(
    name="chroma", pipelines=CHROMA_PIPELINES, plan=CHROMA_PLAN, read_info=read_chroma_info,
    call_kwargs=prompt_kwargs, bench_kwargs=chroma_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "tp", "cfg"}), check_tp=check_tp_widths, cfg_pairs=True,
    cfg_hint="--guidance > 1",
    # --quantize fp8: every linear of the blocks; the modulation approximator, the embedders and the final
    # layer, outside the blocks, stay in the model's dtype (as for Flux, engine/models/flux).
    fp8=Fp8Rule(include=("transformer_blocks.*", "single_transformer_blocks.*")),
    refusals={"cache": "ChromaPipeline runs its two guidance branches as two calls per step without naming them "
                       "(diffusers' cache contexts), so a step cache would mix the branches' states"},
)
