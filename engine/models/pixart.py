"""PixArt-Σ (PixArtSigmaPipeline, PixArtTransformer2DModel): plans, call, config reader, presets.

Image tokens are made inside the model (`pos_embed` patchifies and adds positions), so they are split
where `pos_embed` returns them and gathered where `proj_out` returns them, before the model's own
unpatchify. Each block has self-attention over the image tokens (`attn1`: parallel attention over the
sp group) and cross-attention to the T5 text (`attn2`): its queries are this rank's image tokens and
its keys/values come from the whole text, which every rank has, so `attn2` keeps diffusers' own
processor (text mask included) and needs no communication. Norms, modulation and MLPs are per token.

CFG: the pipeline batches [negative, prompt]; each cfg rank takes one half.

Legend: B batch, S tokens (this rank's piece), H heads, D head dim.
"""

from __future__ import annotations

import torch

from engine.presets.components import SDXL_VAE, T5_XXL, TINY_KL, TINY_T5, kl_vae, t5_encoder
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import BatchSplit, ModelPlan, Processors, SeqContext, SeqDim, SequenceSplit, TensorPlan

from .dit import dit_info
from .family import Family, PipelineSpec, pipeline_specs, vae_scale
from .mmdit import COL, GATHER, ROW, check_tp_widths
from .pag import VALUE_IDENTITY
from .qkv import project_qkv


class PixArtParallelSelfAttnProcessor:
    """diffusers' AttnProcessor2_0 for unmasked self-attention, with the parallel attention call."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError("shardiff's PixArt self-attention takes neither a mask nor a context")
        assert attn.spatial_norm is None and attn.group_norm is None and not attn.residual_connection
        q_BSHD, k_BSHD, v_BSHD = project_qkv(
            hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, attn.to_k.out_features // attn.heads
        )
        out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, self.ctx.joint_sizes("image"))
        out = attn.to_out[1](attn.to_out[0](out_BSHD.flatten(2, 3).to(q_BSHD.dtype)))
        return out / attn.rescale_output_factor


PIXART_TP_PLAN = {
    "adaln_single.emb.timestep_embedder.linear_1": COL,
    "adaln_single.emb.timestep_embedder.linear_2": ROW,
    "adaln_single.linear": GATHER,
    "caption_projection.linear_1": COL,
    "caption_projection.linear_2": ROW,
    "transformer_blocks.*.attn1.to_[qkv]": COL,
    "transformer_blocks.*.attn1.to_out.0": ROW,
    "transformer_blocks.*.ff.net.0.proj": COL,
    "transformer_blocks.*.ff.net.2": ROW,
    # attn2 (cross-attention to the text) stays replicated: it runs diffusers' own processor, which
    # infers head_dim from the width it is given and would misread a column-split one.
}

PIXART_PLAN = ModelPlan(
    attention=Processors({"transformer_blocks.*.attn1": PixArtParallelSelfAttnProcessor}),
    sequence=SequenceSplit(modules={"pos_embed": SeqDim("image", 1)}, gather_modules={"proj_out": SeqDim("image", 1)}),
    batch=BatchSplit({
        "hidden_states": 0, "encoder_hidden_states": 0, "encoder_attention_mask": 0, "timestep": 0,
        "added_cond_kwargs": 0,
    }),
    tensor=TensorPlan(PIXART_TP_PLAN),
    # PixArtSigmaPAGPipeline perturbs the self-attention (attn1) of its PAG layers.
    perturbed=VALUE_IDENTITY,
)

PIXART_PIPELINES = pipeline_specs(
    PipelineSpec(cls="PixArtSigmaPipeline", variants={"pag": "PixArtSigmaPAGPipeline"}),
    PipelineSpec(cls="PixArtSigmaPAGPipeline", pag=True),
)


def pixart_call_kwargs(request) -> dict:
    kwargs = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or "",
        guidance_scale=request.guidance,
        num_images_per_prompt=request.num_images_per_prompt,
        # The requested size, exactly (diffusers would snap it to its aspect-ratio bins and resize).
        use_resolution_binning=False,
        clean_caption=False,
    )
    if request.max_sequence_length is not None:
        kwargs["max_sequence_length"] = request.max_sequence_length
    return kwargs


def pixart_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random T5 embeddings of the real shape (300 tokens by default) for both branches."""
    gen = torch.Generator("cpu").manual_seed(1234)
    tokens = min(text_tokens, 300)
    mask = torch.ones(1, tokens, dtype=torch.long, device=device)
    return dict(
        prompt_embeds=torch.randn(1, tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, tokens, info.joint_attention_dim, generator=gen).to(device, dtype),
        prompt_attention_mask=mask, negative_prompt_attention_mask=mask, negative_prompt=None,
        guidance_scale=4.5, use_resolution_binning=False, max_sequence_length=tokens,
    )


def read_pixart_info(configs, *, source: str, pipeline_class: str, default_size: int | None):
    t = configs["transformer"]
    return dit_info(t, family="pixart", source=source, pipeline_class=pipeline_class, default_size=default_size,
                    vae_scale_factor=vae_scale(configs["vae"]), text_width=t.get("caption_channels", 4096))


# ---------------------------------------------------------------- presets

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (SDXL VAE, DPM-Solver++).
PIXART_SIGMA = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, caption_channels=4096,
                    cross_attention_dim=1152, dropout=0.0, in_channels=4, interpolation_scale=2,
                    norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32, norm_type="ada_norm_single",
                    num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, out_channels=8, patch_size=2,
                    sample_size=128, upcast_attention=False, use_additional_conditions=False)
PIXART_SCHEDULER = ("DPMSolverMultistepScheduler", dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, prediction_type="epsilon",
    solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    timestep_spacing="linspace", steps_offset=0))


def pixart_preset(name, description, default_size, transformer, vae, t5) -> PresetSpec:
    return PresetSpec(
        name=name, family="pixart", pipeline_class="PixArtSigmaPipeline", description=description,
        default_size=default_size, scheduler=PIXART_SCHEDULER,
        components={
            "transformer": Component("diffusers", "PixArtTransformer2DModel", transformer),
            "vae": kl_vae(vae),
            "text_encoder": t5_encoder(t5),
        },
        tokenizers={"tokenizer": "t5"},
    )


PRESETS = (
    pixart_preset("pixart-sigma", "PixArt-Σ XL-2 1024 shapes (0.6B DiT, T5-XXL, SDXL VAE), random weights",
                  1024, PIXART_SIGMA, SDXL_VAE, T5_XXL),
    pixart_preset("pixart-tiny", "tiny PixArt-Σ for CPU tests: 2 blocks, 4 heads x 8", 64,
                  {**PIXART_SIGMA, "attention_head_dim": 8, "num_attention_heads": 4, "num_layers": 2,
                   "cross_attention_dim": 32, "caption_channels": 96, "sample_size": 8, "interpolation_scale": 1},
                  {**SDXL_VAE, **TINY_KL, "sample_size": 64}, TINY_T5),
)

FAMILY = Family(
    name="pixart", pipelines=PIXART_PIPELINES, plan=PIXART_PLAN, read_info=read_pixart_info,
    call_kwargs=pixart_call_kwargs, bench_kwargs=pixart_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "cfg", "tp"}), check_tp=check_tp_widths,
    # --quantize fp8: the blocks' linears (self- and cross-attention, MLP); the adaLN-single modulation, the
    # caption projection and the final layer, outside the blocks, stay in the model's dtype.
    fp8=Fp8Rule(include=("transformer_blocks.*",)), cache_stacks=("transformer_blocks",),
)
