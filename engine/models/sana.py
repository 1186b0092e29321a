"""Sana (SanaPipeline, SanaTransformer2DModel): CFG parallelism; plans, config reader, presets.

The pipeline batches [negative, prompt]; each cfg rank runs one branch of every step, exactly.

Sequence parallelism is refused for now. Sana's self-attention is linear (ReLU kernel), whose split
form is exact and cheap — all-reduce each head's KᵀV and K-sum over the sp group — but every block's
Mix-FFN (GLUMBConv) runs a 3×3 depthwise convolution over the 2-D token grid, which needs the
neighbouring rows of the next and previous rank (a halo exchange inside a diffusers module we do not
fork). Until that exists, `Family.axes` of Sana is {cfg} and the user is told so.

Tensor parallelism is refused with its reason too: Sana-1600M is 3.2 GB in bf16 (it fits any GPU, so
TP would buy no memory, and on NVLinked GPUs TP is slower than the other axes at every size measured
for Flux), its 70 self-attention heads split only over 2, 5 or 7 ranks, and its MLP is convolutions
(1×1, 3×3 depthwise, 1×1 in GLUMBConv), not the linears the TP plans split.
"""

from __future__ import annotations

import math

from engine.presets.components import DC_AE_F32C32, GEMMA2_2B, TINY_DC_AE, TINY_GEMMA2, dc_ae, gemma2
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.plan import ModelPlan

from .dit import dit_info
from .family import Family, vae_scale
from .pixart import pixart_bench_kwargs, pixart_call_kwargs

SANA_PLAN = ModelPlan(
    batch_inputs={"hidden_states": 0, "encoder_hidden_states": 0, "encoder_attention_mask": 0, "timestep": 0},
)

SANA_SP_REFUSAL = (
    "Sana's Mix-FFN convolves over the 2-D token grid (3x3 depthwise), which a sequence split would need "
    "halo exchanges for; use --cfg 2 (and --dp for more images)"
)
SANA_TP_REFUSAL = (
    "Sana-1600M's 3.2 GB of bf16 weights fit any GPU (TP would buy no memory), its 70 attention heads split "
    "only over 2, 5 or 7 ranks, and its Mix-FFN is convolutions, not splittable linears; use --cfg 2 for one "
    "image and --dp for more"
)


def read_sana_info(configs, *, source: str, pipeline_class: str, default_size: int | None):
    t = configs["transformer"]
    # The DC-AE's scale: 2^(levels-1) over its encoder levels, as SanaPipeline computes it.
    scale = vae_scale(configs["vae"], "encoder_block_out_channels")
    patch = int(t.get("patch_size", 1))
    return dit_info(t, family="sana", source=source, pipeline_class=pipeline_class, default_size=default_size,
                    vae_scale_factor=scale, text_width=t.get("caption_channels", 2304), patch=patch,
                    # SanaPipeline itself refuses sizes that are not multiples of 32, whatever the VAE.
                    spatial_multiple=math.lcm(scale * patch, 32))


# ---------------------------------------------------------------- presets

# Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json, DC-AE f32c32, flow DPM-Solver.
SANA_1600M = dict(attention_bias=False, attention_head_dim=32, caption_channels=2304, cross_attention_dim=2240,
                  cross_attention_head_dim=112, dropout=0.0, in_channels=32, interpolation_scale=None, mlp_ratio=2.5,
                  norm_elementwise_affine=False, norm_eps=1e-6, num_attention_heads=70, num_cross_attention_heads=20,
                  num_layers=20, out_channels=32, patch_size=1, sample_size=32)
SANA_SCHEDULER = ("DPMSolverMultistepScheduler", dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, algorithm_type="dpmsolver++",
    solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", flow_shift=3.0,
    prediction_type="flow_prediction", use_flow_sigmas=True, timestep_spacing="linspace", steps_offset=0))


def sana_preset(name, description, default_size, transformer, vae, gemma) -> PresetSpec:
    return PresetSpec(
        name=name, family="sana", pipeline_class="SanaPipeline", description=description,
        default_size=default_size, scheduler=SANA_SCHEDULER,
        components={
            "transformer": Component("diffusers", "SanaTransformer2DModel", transformer),
            "vae": dc_ae(vae),
            "text_encoder": gemma2(gemma),
        },
        tokenizers={"tokenizer": "t5"},
    )


PRESETS = (
    sana_preset("sana-1600m", "Sana 1600M 1024px shapes (linear-attention DiT, Gemma-2-2B, DC-AE f32), random weights",
                1024, SANA_1600M, DC_AE_F32C32, GEMMA2_2B),
    sana_preset("sana-tiny", "tiny Sana for CPU tests: 2 blocks, 2 heads x 8, 3-level DC-AE (scale 4)", 32,
                {**SANA_1600M, "attention_head_dim": 8, "num_attention_heads": 2, "num_layers": 2,
                 "num_cross_attention_heads": 2, "cross_attention_head_dim": 8, "cross_attention_dim": 16,
                 "caption_channels": 32, "in_channels": 8, "out_channels": 8, "sample_size": 8},
                TINY_DC_AE, TINY_GEMMA2),
)

# SanaPipeline takes the same arguments as PixArtSigmaPipeline (prompt, mask-carrying embeddings,
# resolution binning, caption cleaning), so the request → kwargs mappings are PixArt's.
FAMILY = Family(
    name="sana", pipelines=("SanaPipeline",), plan=SANA_PLAN, read_info=read_sana_info,
    call_kwargs=pixart_call_kwargs, bench_kwargs=pixart_bench_kwargs, presets=PRESETS,
    axes=frozenset({"cfg"}), refusals={"ulysses": SANA_SP_REFUSAL, "ring": SANA_SP_REFUSAL, "tp": SANA_TP_REFUSAL},
)
