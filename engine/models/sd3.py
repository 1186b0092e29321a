"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline, SD3Transformer2DModel, MMDiT): plans, call,
config reader, presets.

The model patchifies the latent image itself (`pos_embed`, which also adds the positional embedding
of each patch), so the image tokens are split where `pos_embed` returns them and gathered where
`proj_out` returns them, just before the model's own unpatchify. The text tokens are split where
`context_embedder` returns them: every rank keeps a piece of both, as for Flux, and each joint block's
attention runs over the concatenation [image piece, text piece] of every rank (token order across
ranks does not matter to unmasked attention). Everything else in a block is per token or per sample.

CFG: the pipeline batches [negative, prompt]; each cfg rank takes one half of every batched input.

Pipelines: StableDiffusion3Pipeline and its img2img / inpaint forms (same transformer, the pipeline
starts from the input image's noised latents and, inpainting, blends the kept region back each step),
and the PAG forms (StableDiffusion3PAGPipeline, StableDiffusion3PAGImg2ImgPipeline): their batch is
[uncond, cond, perturbed] (or [cond, perturbed]), the cfg ranks take whole branches
(parallel/plan/perturbed.py) and the PAG layers' perturbed rows run `SD3PerturbedAttnProcessor` below.

Legend: B batch, S tokens (this rank's joint piece), N image tokens of this rank, T all text tokens, H
heads, D head dim.
"""

from __future__ import annotations

import torch

from engine.presets.components import (
    CLIP_G, CLIP_L, SD3_VAE, T5_XXL, TINY_CLIP_G, TINY_CLIP_L, TINY_KL, TINY_T5, clip_text, kl_vae, t5_encoder,
)
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import (BatchSplit, ModelPlan, PerturbedPlan, Processors, Residuals, SeqContext, SeqDim,
                                    SequenceSplit, TensorPlan)
from shardiff_parallel.sharding import gather_pieces

from .dit import dit_info
from .family import ControlNetSpec, Family, PipelineSpec, pipeline_specs, prompt_kwargs, vae_scale
from .mmdit import COL, MMDIT_TP_PLAN, ROW, check_tp_widths
from .qkv import project_qkv


class SD3ParallelAttnProcessor:
    """diffusers' JointAttnProcessor2_0 with the attention call replaced by the mesh's parallel attention.

    `qk_norm=False` leaves out the Q/K RMS norms, as diffusers' PAG joint processors do in the PAG layers
    (PAGCFGJointAttnProcessor2_0 never applies `norm_q` / `norm_k`: on SD3.5, whose blocks have them, a PAG
    layer runs without them in diffusers, and so here, so that the image is diffusers' image)."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention, *, qk_norm: bool = True):
        self.ctx = ctx
        self.attention = attention
        self.qk_norm = qk_norm

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("shardiff's SD3 attention does not take an attention mask")
        q_BSHD, k_BSHD, v_BSHD, head_dim = _image_qkv(attn, hidden_states, self.qk_norm)
        groups = ("image",)
        if encoder_hidden_states is not None:
            eq_BSHD, ek_BSHD, ev_BSHD = _text_qkv(attn, encoder_hidden_states, head_dim, self.qk_norm)
            # SD3 puts the image first: [image, text], unlike Flux.
            q_BSHD = torch.cat([q_BSHD, eq_BSHD], dim=1)
            k_BSHD = torch.cat([k_BSHD, ek_BSHD], dim=1)
            v_BSHD = torch.cat([v_BSHD, ev_BSHD], dim=1)
            groups = ("image", "text")

        out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, self.ctx.joint_sizes(*groups))
        out = out_BSHD.flatten(2, 3).to(q_BSHD.dtype)

        img = out[:, : hidden_states.shape[1]]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        if encoder_hidden_states is None:
            return img
        txt = out[:, hidden_states.shape[1] :].contiguous()
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


def _image_qkv(attn, hidden_states, qk_norm: bool):
    # Processors derive head_dim from the layer's full out_features, so they take a column-split
    # Q/K/V (TP) unchanged: each rank computes H/T heads.
    head_dim = attn.to_k.out_features // attn.heads
    norms = (attn.norm_q, attn.norm_k) if qk_norm else (None, None)
    return (*project_qkv(hidden_states, attn.to_q, attn.to_k, attn.to_v, *norms, head_dim), head_dim)


def _text_qkv(attn, encoder_hidden_states, head_dim: int, qk_norm: bool):
    norms = (attn.norm_added_q, attn.norm_added_k) if qk_norm else (None, None)
    return project_qkv(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, *norms, head_dim)


class SD3PerturbedAttnProcessor:
    """The perturbed branch of a PAG layer, as diffusers' PAG joint processors compute it — under the mesh.

    diffusers masks the joint attention of the perturbed rows so that image tokens see themselves and
    every text token (identity among the image tokens), while text tokens see everything; Q/K norms
    are not applied (see SD3ParallelAttnProcessor). Here, on this rank's joint piece:
    - text queries: the unmasked parallel attention over every rank's tokens (its image-query half is
      discarded — diffusers computes the whole masked attention too);
    - image queries: softmax over [own key, all T text keys]; the text keys and values of the other
      sequence-parallel ranks are gathered (T is a few hundred tokens), and the image keys never
      leave their rank, so identity stays identity on any split. fp32, in query blocks.
    """

    QUERY_BLOCK = 4096

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("shardiff's SD3 attention does not take an attention mask")
        q_BNHD, k_BNHD, v_BNHD, head_dim = _image_qkv(attn, hidden_states, qk_norm=False)
        if encoder_hidden_states is None:  # image-only self-attention (SD3.5-medium's attn2): pure identity
            return attn.to_out[1](attn.to_out[0](v_BNHD.flatten(2, 3)))
        eq_BTHD, ek_BTHD, ev_BTHD = _text_qkv(attn, encoder_hidden_states, head_dim, qk_norm=False)
        N = hidden_states.shape[1]
        out_BSHD = self.attention(torch.cat([q_BNHD, eq_BTHD], 1), torch.cat([k_BNHD, ek_BTHD], 1),
                                  torch.cat([v_BNHD, ev_BTHD], 1), self.ctx.joint_sizes("image", "text"))
        txt = out_BSHD[:, N:].flatten(2, 3).to(q_BNHD.dtype)
        if self.ctx.sizes:  # sequence split: every rank's text keys and values
            both = torch.stack([ek_BTHD, ev_BTHD])
            both = gather_pieces(both, 2, self.ctx.sizes["text"], self.ctx.mesh.group("sp"))
            ek_BTHD, ev_BTHD = both.unbind(0)
        img = torch.cat([
            _self_and_text(q_BNHD[:, i : i + self.QUERY_BLOCK], k_BNHD[:, i : i + self.QUERY_BLOCK],
                           v_BNHD[:, i : i + self.QUERY_BLOCK], ek_BTHD, ev_BTHD)
            for i in range(0, N, self.QUERY_BLOCK)
        ], dim=1).flatten(2, 3).to(q_BNHD.dtype)
        img = attn.to_out[1](attn.to_out[0](img))
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


def _self_and_text(q_BNHD, k_BNHD, v_BNHD, k_BTHD, v_BTHD) -> torch.Tensor:
    """Each image query attends to its own key and to every text key (fp32): [B, N, H, D]."""
    scale = q_BNHD.shape[-1] ** -0.5
    q, k, v, kt, vt = (t.float() for t in (q_BNHD, k_BNHD, v_BNHD, k_BTHD, v_BTHD))
    own_BNH1 = (q * k).sum(-1, keepdim=True) * scale
    text_BNHT = torch.einsum("bnhd,bthd->bnht", q, kt) * scale
    p = torch.cat([own_BNH1, text_BNHT], dim=-1).softmax(dim=-1)
    return p[..., :1] * v + torch.einsum("bnht,bthd->bnhd", p[..., 1:], vt)


SD3_TP_PLAN = {
    # Same joint blocks as Flux's double-stream ones (SD3.5's 9-way norm1 and the last block's
    # continuous norm1_context included), plus SD3.5-medium's extra image-only self-attention.
    **MMDIT_TP_PLAN,
    "transformer_blocks.*.attn2.to_[qkv]": COL,
    "transformer_blocks.*.attn2.to_out.0": ROW,
}

SD3_PLAN = ModelPlan(
    attention=Processors({
        "transformer_blocks.*.attn": SD3ParallelAttnProcessor,
        # SD3.5-medium's extra image-only self-attention in its first blocks.
        "transformer_blocks.*.attn2": SD3ParallelAttnProcessor,
    }),
    sequence=SequenceSplit(
        modules={"pos_embed": SeqDim("image", 1), "context_embedder": SeqDim("text", 1)},
        gather_modules={"proj_out": SeqDim("image", 1)},
    ),
    batch=BatchSplit({"hidden_states": 0, "encoder_hidden_states": 0, "pooled_projections": 0, "timestep": 0}),
    tensor=TensorPlan(SD3_TP_PLAN),
    perturbed=PerturbedPlan(
        perturbed=SD3PerturbedAttnProcessor,
        normal=lambda ctx, attention: SD3ParallelAttnProcessor(ctx, attention, qk_norm=False),
    ),
    # A ControlNet's block samples, added to the image tokens: split like them (SD3_CONTROLNET_PLAN).
    residuals=Residuals({"block_controlnet_hidden_states": SeqDim("image", 1)}),
)

# SD3ControlNetModel: joint blocks over the same streams; it patchifies the latents (`pos_embed`) and
# the control latents (`pos_embed_input`) itself, both split where they return their tokens, as the text
# where `context_embedder` returns it. The pipeline batches [negative, prompt] for it too (a cfg split);
# its block samples leave as this rank's pieces for the transformer.
SD3_CONTROLNET_PLAN = ModelPlan(
    attention=Processors({"transformer_blocks.*.attn": SD3ParallelAttnProcessor}),
    sequence=SequenceSplit(
        modules={"pos_embed": SeqDim("image", 1), "pos_embed_input": SeqDim("image", 1),
                 "context_embedder": SeqDim("text", 1)},
        residual_output=SeqDim("image", 1),
    ),
    batch=BatchSplit({"hidden_states": 0, "encoder_hidden_states": 0, "pooled_projections": 0, "timestep": 0,
                      "controlnet_cond": 0}, output_dim=None),
    tensor=TensorPlan(SD3_TP_PLAN),
)
SD3_CONTROLNET = ControlNetSpec(
    classes=("SD3ControlNetModel",), plan=SD3_CONTROLNET_PLAN, denoiser_class="SD3Transformer2DModel",
    match=("num_attention_heads", "attention_head_dim", "in_channels", "patch_size", "joint_attention_dim",
           "caption_projection_dim", "pooled_projection_dim", "qk_norm"),
    refusals=lambda c: [] if c.get("use_pos_embed", True) else [
        "use_pos_embed false (SD3.5-style ControlNets that take the transformer's patch embedding are not supported yet)"],
    multi="SD3MultiControlNetModel",
    derive=lambda layers: dict(num_layers=layers, dual_attention_layers=()),
)

SD3_PIPELINES = pipeline_specs(
    PipelineSpec(cls="StableDiffusion3Pipeline",
                 variants={"image": "StableDiffusion3Img2ImgPipeline", "pag": "StableDiffusion3PAGPipeline",
                           "controlnet": "StableDiffusion3ControlNetPipeline"}),
    PipelineSpec(cls="StableDiffusion3ControlNetPipeline", inputs=("control_image",), required=("control_image",),
                 controlnet=True),
    PipelineSpec(cls="StableDiffusion3Img2ImgPipeline", inputs=("image",), required=("image",), strength=True,
                 variants={"mask_image": "StableDiffusion3InpaintPipeline", "pag": "StableDiffusion3PAGImg2ImgPipeline"}),
    PipelineSpec(cls="StableDiffusion3InpaintPipeline", inputs=("image", "mask_image"), required=("image", "mask_image"),
                 strength=True),
    PipelineSpec(cls="StableDiffusion3PAGPipeline", pag=True, variants={"image": "StableDiffusion3PAGImg2ImgPipeline"}),
    PipelineSpec(cls="StableDiffusion3PAGImg2ImgPipeline", inputs=("image",), required=("image",), strength=True,
                 pag=True),
)


def sd3_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random embeddings of the real shapes: 77 CLIP tokens + `text_tokens` T5 tokens, both branches."""
    gen = torch.Generator("cpu").manual_seed(1234)
    tokens = 77 + text_tokens

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return dict(
        prompt_embeds=rand(1, tokens, info.joint_attention_dim),
        negative_prompt_embeds=rand(1, tokens, info.joint_attention_dim),
        pooled_prompt_embeds=rand(1, info.pooled_projection_dim),
        negative_pooled_prompt_embeds=rand(1, info.pooled_projection_dim),
        guidance_scale=4.5,
    )


def read_sd3_info(configs, *, source: str, pipeline_class: str, default_size: int | None):
    t = configs["transformer"]
    return dit_info(t, family="sd3", source=source, pipeline_class=pipeline_class, default_size=default_size,
                    vae_scale_factor=vae_scale(configs["vae"]), text_width=t.get("joint_attention_dim", 4096),
                    pooled_width=t.get("pooled_projection_dim", 0))


# ---------------------------------------------------------------- presets

# stabilityai/stable-diffusion-3.5-large transformer/config.json.
SD35_LARGE = dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
                  num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                  pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128, dual_attention_layers=())
SD3_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0))


def sd3_preset(name, description, default_size, transformer, vae, clip_l, clip_g, t5) -> PresetSpec:
    return PresetSpec(
        name=name, family="sd3", pipeline_class="StableDiffusion3Pipeline", description=description,
        default_size=default_size, scheduler=SD3_SCHEDULER,
        components={
            "transformer": Component("diffusers", "SD3Transformer2DModel", transformer),
            "vae": kl_vae(vae),
            "text_encoder": clip_text(clip_l, projection=True),
            "text_encoder_2": clip_text(clip_g, projection=True),
            "text_encoder_3": t5_encoder(t5),
        },
        tokenizers={"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "t5"},
        extra=dict(image_encoder=None, feature_extractor=None),
    )


PRESETS = (
    sd3_preset("sd3.5-large", "SD3.5-large shapes (8B MMDiT, 38 heads; CLIP-L, CLIP-G, T5-XXL), random weights",
               1024, SD35_LARGE, SD3_VAE, CLIP_L, CLIP_G, T5_XXL),
    # 6 heads: Ulysses 2 divides them, Ulysses 4 does not (as SD3.5-large's 38). 16 latent channels, as the
    # real VAE: StableDiffusion3InpaintPipeline accepts no other transformer width.
    sd3_preset("sd3-tiny", "tiny SD3 for CPU tests: 2 joint blocks, 6 heads x 16, 4-level VAE (scale 8)", 64,
               {**SD35_LARGE, "attention_head_dim": 16, "num_attention_heads": 6, "num_layers": 2,
                "caption_projection_dim": 96, "joint_attention_dim": 96, "pooled_projection_dim": 80,
                "in_channels": 16, "out_channels": 16, "pos_embed_max_size": 16, "sample_size": 8},
               {**SD3_VAE, **TINY_KL, "sample_size": 64}, TINY_CLIP_L, TINY_CLIP_G, TINY_T5),
)

FAMILY = Family(
    name="sd3", pipelines=SD3_PIPELINES, plan=SD3_PLAN, read_info=read_sd3_info,
    call_kwargs=prompt_kwargs, bench_kwargs=sd3_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "cfg", "tp"}), check_tp=check_tp_widths, controlnet=SD3_CONTROLNET,
    # --quantize fp8: every linear of the blocks; the embedders and the final layer stay in the model's dtype
    # (as for Flux, engine/models/flux).
    fp8=Fp8Rule(include=("transformer_blocks.*",)),
    # SD3.5's last block returns no text stream (context_pre_only), which the first-block cache's residuals
    # carry: it is computed every step.
    cache_stacks=("transformer_blocks[:-1]",),
)
