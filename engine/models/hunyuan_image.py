"""HunyuanImage-2.1 (HunyuanImagePipeline, HunyuanImageTransformer2DModel): plans, call, config reader,
presets.

A native-2K model: a 32× VAE (64 channels) and 1×1 patches, so 2048² is 4096 image tokens, beside the
text's 1128 (Qwen2.5-VL's 1000 padded tokens and ByT5's 128 for the quoted text to render). 20
double-stream blocks (image and text streams, one joint attention), then 40 single-stream blocks over
[image, text].

What the denoiser receives: `encoder_hidden_states` (Qwen2.5-VL's hidden states, padded to 1000) with
its mask, `encoder_hidden_states_2` (ByT5's 128 glyph tokens, all masked when the prompt quotes no
text) with its mask. Inside forward the model refines the Qwen text (`context_embedder`, a small
masked transformer), projects ByT5's, and reorders each sample's text to [real ByT5, real Qwen,
padded ByT5, padded Qwen] — all on the whole text. So the plan splits the text where block 0 receives
it (after the reorder), the image tokens where `x_embedder` makes them and the rotary table where
`rope` returns it, and gathers the image where `proj_out` leaves it (the model unpatchifies after it).
Each rank's joint piece is [its image piece, its text piece], in both kinds of block.

The text mask reaches every block whole: (B, 1, 1, S_image + S_text), True for real keys (every
image token is). The processor takes this rank's keys' part of it and leaves padded keys out as a score bias of -1000 (one
more feature per head: Chroma's `score_bias`), which no softmax survives in float32: exactly the
masked attention, on every kernel and layout, with no host sync.

CFG: the pipeline's guider (AdaptiveProjectedMixGuidance, a component with its own guidance scale)
runs the prompt and the negative prompt as two sequential transformer calls per step and combines
them after the second: the cfg pairs path, as Flux's true CFG. The guidance-distilled release
(`guidance_embeds`, no guider) runs one call per step, so --cfg 2 has nothing to split there. A guider
with start / stop leaving some steps unguided would break the pairs; the released ones guide every step.

TP (all-reduce form): Q/K/V and the text projections column-split, to_out / to_add_out row-split, the
MLPs col → row, the AdaLN modulation linears column-split and gathered, the timestep / guidance MLPs
col → row. The token refiner (2 small blocks over the text), the patch embedding and proj_out stay
replicated.

The refiner pipeline (HunyuanImageRefinerPipeline, a 3D-VAE model) is not run.
"""

from __future__ import annotations

import torch

from engine.presets.components import QWEN25_VL_7B, T5_XXL, TINY_QWEN25_VL, qwen25_vl, t5_encoder
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.plan import ModelPlan, Processors, SeqContext, SeqDim, SequenceSplit, TensorPlan
from shardiff_parallel.sharding import take_piece

from .chroma import score_bias
from .family import Family, ModelInfo, PipelineSpec
from .mmdit import COL, GATHER, JOINT_BLOCK_TP_PLAN, ROW, SINGLE_BLOCK_TP_PLAN, check_tp_widths

MASKED = -1000.0
"""Score bias of a padded key: exp(-1000) is 0 in float32, whatever the other scores."""


class HunyuanImageParallelAttnProcessor:
    """diffusers' HunyuanImageAttnProcessor with the attention call replaced by the mesh's."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx = ctx
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        D = attn.inner_dim // attn.heads
        single = attn.add_q_proj is None
        if single:  # single-stream block: one projection over [image, text]
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        # -1 heads: a TP rank holds its share of them.
        q_BSHD, k_BSHD, v_BSHD = (p(hidden_states).unflatten(-1, (-1, D)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q_BSHD, k_BSHD = attn.norm_q(q_BSHD), attn.norm_k(k_BSHD)
        S_txt = encoder_hidden_states.shape[1]
        S_img = q_BSHD.shape[1] - (S_txt if single else 0)
        if image_rotary_emb is not None:  # image tokens only
            q_BSHD = torch.cat([apply_rotary_emb(q_BSHD[:, :S_img], image_rotary_emb, sequence_dim=1),
                                q_BSHD[:, S_img:]], dim=1)
            k_BSHD = torch.cat([apply_rotary_emb(k_BSHD[:, :S_img], image_rotary_emb, sequence_dim=1),
                                k_BSHD[:, S_img:]], dim=1)
        if not single:
            eq, ek, ev = (p(encoder_hidden_states).unflatten(-1, (-1, D))
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q_BSHD = torch.cat([q_BSHD, attn.norm_added_q(eq)], dim=1)
            k_BSHD = torch.cat([k_BSHD, attn.norm_added_k(ek)], dim=1)
            v_BSHD = torch.cat([v_BSHD, ev], dim=1)

        sizes = self.ctx.joint_sizes("image", "text")
        if attention_mask is None:
            out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, sizes)
        else:
            real_BS = self._my_keys(attention_mask, S_img, S_txt)
            bias_BS = (~real_BS).to(torch.float32) * MASKED
            ones_BS = torch.ones_like(bias_BS)
            q_BSHD, k_BSHD, v_BSHD, scale = score_bias(q_BSHD, k_BSHD, v_BSHD, ones_BS, bias_BS)
            out_BSHD = self.attention(q_BSHD, k_BSHD, v_BSHD, sizes, scale=scale)[..., :D]
        out = out_BSHD.flatten(2, 3).to(q_BSHD.dtype)

        img, txt = out[:, :S_img], out[:, S_img:]
        if not single:
            img = attn.to_out[1](attn.to_out[0](img.contiguous()))
            txt = attn.to_add_out(txt.contiguous())
        return img, txt

    def _my_keys(self, attention_mask: torch.Tensor, S_img: int, S_txt: int) -> torch.Tensor:
        """(B, S) whether each key of this rank's [image piece, text piece] is real. The model's mask is
        (B, 1, 1, image + whole text): its image part is all True (and as long as the image tokens
        `x_embedder` returned, which is this rank's piece), its text part is the whole reordered text's."""
        real_BS = attention_mask.reshape(attention_mask.shape[0], -1).bool()
        txt_sizes = self.ctx.sizes.get("text")
        txt_BS = real_BS[:, real_BS.shape[1] - (sum(txt_sizes) if txt_sizes else S_txt):]
        if txt_sizes:
            txt_BS = take_piece(txt_BS, 1, txt_sizes, self.ctx.mesh.coord("sp"))
        assert txt_BS.shape[1] == S_txt, (tuple(attention_mask.shape), S_txt)
        return torch.cat([txt_BS.new_ones(txt_BS.shape[0], S_img), txt_BS], dim=1)


HUNYUAN_IMAGE_TP_PLAN = {
    "time_guidance_embed.*.linear_1": COL,
    "time_guidance_embed.*.linear_2": ROW,
    "transformer_blocks.*.norm1.linear": GATHER,
    "transformer_blocks.*.norm1_context.linear": GATHER,
    **JOINT_BLOCK_TP_PLAN,
    "single_transformer_blocks.*.norm.linear": GATHER,
    **SINGLE_BLOCK_TP_PLAN,
    "norm_out.linear": GATHER,
}

_IMAGE_ROTARY = SeqDim("image", 0)
HUNYUAN_IMAGE_PLAN = ModelPlan(
    attention=Processors({
        "transformer_blocks.*.attn": HunyuanImageParallelAttnProcessor,
        "single_transformer_blocks.*.attn": HunyuanImageParallelAttnProcessor,
    }),
    sequence=SequenceSplit(
        modules={"x_embedder": SeqDim("image", 1), "rope": (_IMAGE_ROTARY, _IMAGE_ROTARY)},
        # The text after the model's reorder (block 0 takes it positionally).
        module_inputs={"transformer_blocks.0": {"encoder_hidden_states": SeqDim("text", 1)}},
        gather_modules={"proj_out": SeqDim("image", 1)},
    ),
    tensor=TensorPlan(HUNYUAN_IMAGE_TP_PLAN),
)


def hunyuan_image_call_kwargs(request) -> dict:
    """HunyuanImagePipeline arguments beyond size, steps, seed and output type. Its CFG scale is its
    guider's (a component), so --guidance goes to the guidance-distilled model's embedded guidance only."""
    return dict(prompt=request.prompt, negative_prompt=request.negative_prompt,
                num_images_per_prompt=request.num_images_per_prompt, distilled_guidance_scale=request.guidance)


def hunyuan_image_bench_kwargs(info, *, text_tokens: int, device, dtype) -> dict:
    """Random embeddings of the real shapes for both guidance branches: Qwen2.5-VL's 1000 tokens (a
    quarter of them real) and ByT5's 128 (none real: a prompt with no quoted text)."""
    gen = torch.Generator("cpu").manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    mask = (torch.arange(text_tokens) < text_tokens // 4).long().to(device)[None]
    glyph_mask = torch.zeros(1, GLYPH_TOKENS, dtype=torch.long, device=device)
    branch = lambda: dict(embeds=rand(1, text_tokens, info.joint_attention_dim), mask=mask.clone(),  # noqa: E731
                          embeds_2=rand(1, GLYPH_TOKENS, info.pooled_projection_dim), mask_2=glyph_mask.clone())
    pos, neg = branch(), branch()
    return dict(prompt_embeds=pos["embeds"], prompt_embeds_mask=pos["mask"], prompt_embeds_2=pos["embeds_2"],
                prompt_embeds_mask_2=pos["mask_2"], negative_prompt_embeds=neg["embeds"],
                negative_prompt_embeds_mask=neg["mask"], negative_prompt_embeds_2=neg["embeds_2"],
                negative_prompt_embeds_mask_2=neg["mask_2"])


GLYPH_TOKENS = 128
"""HunyuanImagePipeline.tokenizer_2_max_length: ByT5 tokens per prompt."""


def read_hunyuan_image_info(configs, *, source: str, pipeline_class: str, default_size: int | None) -> ModelInfo:
    t, vae = configs["transformer"], configs["vae"]
    scale = int(vae.get("spatial_compression_ratio", 32))
    patch = int(t.get("patch_size", [1, 1])[0])
    return ModelInfo(
        source=source, family="hunyuan-image", pipeline_class=pipeline_class,
        num_heads=int(t.get("num_attention_heads", 28)), head_dim=int(t.get("attention_head_dim", 128)),
        num_layers=int(t.get("num_layers", 20)), num_single_layers=int(t.get("num_single_layers", 40)),
        in_channels=int(t.get("in_channels", 64)), joint_attention_dim=int(t.get("text_embed_dim", 3584)),
        # ByT5's width: the second text input (what bench_kwargs makes).
        pooled_projection_dim=int(t.get("text_embed_2_dim") or 0),
        vae_scale_factor=scale, spatial_multiple=scale * patch, patch_size=patch,
        default_size=int(default_size or 2048), uses_guidance_embeds=bool(t.get("guidance_embeds", False)),
        # The distilled release embeds its guidance and has no guider: one transformer call per step.
        guidance_distilled=bool(t.get("guidance_embeds", False)),
        mlp_width=int(t.get("num_attention_heads", 28) * t.get("attention_head_dim", 128) * t.get("mlp_ratio", 4.0)),
    )


# ---------------------------------------------------------------- presets

# hunyuanvideo-community/HunyuanImage-2.1-Diffusers transformer/config.json.
HUNYUAN_IMAGE_TRANSFORMER = dict(
    in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=[1, 1], qk_norm="rms_norm",
    guidance_embeds=False, text_embed_dim=3584, text_embed_2_dim=1472, rope_theta=256.0, rope_axes_dim=[64, 64],
    use_meanflow=False,
)
# Its vae/config.json: 32× spatial compression to 64 channels.
HUNYUAN_IMAGE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=64, block_out_channels=[128, 256, 512, 512, 1024, 1024],
    layers_per_block=2, spatial_compression_ratio=32, sample_size=384, scaling_factor=0.75289,
    downsample_match_channel=True, upsample_match_channel=True,
)
# Glyph-SDXL-v2's ByT5-small encoder (text_encoder_2/config.json).
BYT5_SMALL = {**T5_XXL, "vocab_size": 1510, "d_model": 1472, "d_ff": 3584, "d_kv": 64, "num_layers": 12,
              "num_heads": 6, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
HUNYUAN_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=5.0, use_dynamic_shifting=False)

# 4 heads × 16: Ulysses-2 × TP-2 splits them; 32 channels per VAE level (its GroupNorms' 32 groups).
TINY_BYT5 = {**BYT5_SMALL, "vocab_size": 384, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4}
HUNYUAN_IMAGE_TINY_TRANSFORMER = {
    **HUNYUAN_IMAGE_TRANSFORMER, "in_channels": 8, "out_channels": 8, "num_attention_heads": 4,
    "attention_head_dim": 16, "num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 1,
    "text_embed_dim": TINY_QWEN25_VL["text_config"]["hidden_size"], "text_embed_2_dim": TINY_BYT5["d_model"],
    "rope_axes_dim": [8, 8],
}
HUNYUAN_IMAGE_TINY_VAE = {**HUNYUAN_IMAGE_VAE, "latent_channels": 8, "block_out_channels": [32] * 6,
                          "layers_per_block": 1, "sample_size": 128}


def hunyuan_image_preset(name: str, description: str, default_size: int, transformer: dict, vae: dict,
                         qwen: dict, byt5: dict) -> PresetSpec:
    return PresetSpec(
        name=name, family="hunyuan-image", pipeline_class="HunyuanImagePipeline", description=description,
        default_size=default_size,
        components={
            "transformer": Component("diffusers", "HunyuanImageTransformer2DModel", transformer),
            "vae": Component("diffusers", "AutoencoderKLHunyuanImage", vae),
            "text_encoder": qwen25_vl(qwen),
            "text_encoder_2": t5_encoder(byt5),
        },
        tokenizers={"tokenizer": "qwen2.5-vl", "tokenizer_2": "byt5"},
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(HUNYUAN_IMAGE_SCHEDULER)),
        # The released guiders: adaptive projected guidance mixed with CFG (scale 3.5), every step.
        guiders={"guider": ("AdaptiveProjectedMixGuidance", {}), "ocr_guider": ("AdaptiveProjectedMixGuidance", {})},
    )


PRESETS = (
    hunyuan_image_preset("hunyuanimage-2.1", "HunyuanImage-2.1 shapes (17B transformer, 28 heads; Qwen2.5-VL-7B, "
                         "ByT5-small, 32x VAE), random weights", 2048, HUNYUAN_IMAGE_TRANSFORMER, HUNYUAN_IMAGE_VAE,
                         QWEN25_VL_7B, BYT5_SMALL),
    hunyuan_image_preset("hunyuanimage-2.1-tiny", "tiny HunyuanImage-2.1 for CPU tests: 2+2 blocks, 4 heads x 16, "
                         "tiny Qwen2.5-VL and ByT5, 6-level VAE (scale 32)", 128, HUNYUAN_IMAGE_TINY_TRANSFORMER,
                         HUNYUAN_IMAGE_TINY_VAE, TINY_QWEN25_VL, TINY_BYT5),
)

FAMILY = Family(
    name="hunyuan-image", pipelines=(PipelineSpec(cls="HunyuanImagePipeline"),), plan=HUNYUAN_IMAGE_PLAN,
    read_info=read_hunyuan_image_info, call_kwargs=hunyuan_image_call_kwargs, bench_kwargs=hunyuan_image_bench_kwargs,
    presets=PRESETS, axes=frozenset({"ulysses", "ring", "tp", "cfg"}), check_tp=check_tp_widths,
    # The guider decides, not the request: every call of a model with one runs both branches.
    uses_cfg=lambda kwargs: True, cfg_pairs=True,
    # --quantize fp8: every linear of the blocks; the embedders, the text refiner and the final layer stay in
    # the model's dtype (as for Flux, engine/models/flux).
    fp8=Fp8Rule(include=("transformer_blocks.*", "single_transformer_blocks.*")),
    cache_stacks=("transformer_blocks", "single_transformer_blocks"),
)
