"""Sana (SanaPipeline, SanaTransformer2DModel): sequence split by image rows, CFG, TP; plans, config
reader, presets.

Sequence split. The image tokens are a row-major grid (latent rows × columns / patch): they are split
in whole rows over the sequence-parallel ranks (uneven allowed: the first ranks one row more), where
`patch_embed` returns them (positions already added), and gathered where `proj_out` returns them,
before the model's own unpatchify. Each block then needs, per rank:
- self-attention (`attn1`): linear attention with a ReLU kernel. Its output for a query needs only
  two sums over all keys — each head's KᵀV state and key sum — so the ranks all-reduce that (D+1)×D
  state per head in fp32 (parallel/linear_attention.py) and apply it to their own queries: exact, no
  all-to-all, no ring. So Ulysses and Ring are the same thing for Sana: `--ulysses U --ring R` gives
  U × R row pieces in the sp order (ring-major), any U and R (no head count to divide), and with
  neither given every sequence-parallel rank counts as Ulysses.
- cross-attention (`attn2`) to the Gemma text: this rank's image tokens against the whole text,
  which every rank holds — diffusers' SanaAttnProcessor2_0, text mask included (under TP its
  computation with the head count taken from the projection width).
- Mix-FFN (GLUMBConv): 1×1 conv, depthwise 3×3 conv, 1×1 conv over the token grid. The block reshapes
  its tokens with the `height` it is given, so that argument becomes this rank's row count, and the
  3×3 convolution becomes a halo convolution (parallel/halo.py) that reads one boundary row from the
  rank above and the rank below.
Norms, modulation, gates and residuals are per token.

PAG: SanaPAGPipeline batches [negative, prompt, perturbed] (or [prompt, perturbed]): `--cfg 3` runs one
branch per rank, `--cfg 2` [uncond, cond | perturbed] or [cond | perturbed]; the perturbed rows of its PAG
layers run identity attention (engine/models/pag.py), the others Sana's own linear attention (without
its Q/K norms there, as diffusers' PAG processors).

CFG: the pipeline batches [negative, prompt]; each cfg rank takes one half (`--cfg 2 --ulysses 2`).

TP: Q/K/V of both attentions column-split (whole heads per rank), their outputs row-split; the Q/K
norms of SANA 1.5 (RMSNorm across all heads) keep their weight slice and all-reduce the sum of
squares; the Mix-FFN's 1×1 `conv_inverted` column-split in two blocks ([value, gate]: each rank
keeps its piece of both, so the block's chunk pairs them), the depthwise conv split with its channels
(no communication), `conv_point` row-split (one all-reduce); the timestep and caption embedders
col → row, the AdaLN linear gathered. The degree must divide the 70 self-attention heads, the 20
cross-attention heads and the 5600 Mix-FFN channels: TP 2, 5 or 10 (7 divides the 70 heads but not
the 20 cross-attention ones).

Legend: B batch, S this rank's tokens, H heads (this rank's under TP), D head dim, L text tokens.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from engine.presets.components import DC_AE_F32C32, GEMMA2_2B, TINY_DC_AE_F32, TINY_GEMMA2, dc_ae, gemma2
from engine.presets.spec import Component, PresetSpec
from shardiff_parallel.linear_attention import linear_attention
from shardiff_parallel.fp8 import Fp8Rule
from shardiff_parallel.tensor import local_out_features
from shardiff_parallel.plan import (BatchSplit, ModelPlan, PerturbedPlan, Processors, Residuals, RowGrids, RowsArg,
                                    SeqContext, SeqDim, SequenceSplit, TensorPlan, grid_conv)
from shardiff_parallel.tensor import Colwise, Rowwise, SplitNorm

from .dit import dit_info
from .family import ControlNetSpec, Family, PipelineSpec, pipeline_specs, vae_scale
from .pag import ValueIdentityAttention
from .mmdit import COL, GATHER, ROW
from .pixart import pixart_bench_kwargs, pixart_call_kwargs


def _heads_BHDS(x_BSF: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H·D] → [B, H, D, S], as diffusers' linear processor lays Q/K/V out."""
    return x_BSF.transpose(1, 2).unflatten(1, (-1, head_dim))


class SanaLinearAttnProcessor:
    """diffusers' SanaLinearAttnProcessor2_0 with the key-value state summed over the sp ranks (each
    holds whole rows of the image); the head count follows the projection width (TP shards).

    `qk_norm=False` leaves out the Q/K norms, as diffusers' PAG processors for Sana do in the PAG layers
    (PAGCFGSanaLinearAttnProcessor2_0 never applies `norm_q` / `norm_k`: on SANA 1.5, whose blocks have
    them, a PAG layer runs without them in diffusers, and so here, so that the image is diffusers')."""

    def __init__(self, ctx: SeqContext, attention=None, *, qk_norm: bool = True):
        self.group = ctx.mesh.group("sp")
        self.qk_norm = qk_norm

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("shardiff's Sana self-attention takes neither a mask nor a context")
        original_dtype = hidden_states.dtype
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None and self.qk_norm:
            query = attn.norm_q(query)
        if attn.norm_k is not None and self.qk_norm:
            key = attn.norm_k(key)
        head_dim = attn.inner_dim // attn.heads
        q_BHDS, k_BHDS, v_BHDS = (_heads_BHDS(t, head_dim) for t in (query, key, value))
        # The kernel (ReLU), then fp32 from here on, as diffusers' processor.
        out_BHDS = linear_attention(F.relu(q_BHDS), F.relu(k_BHDS), v_BHDS, eps=1e-15, group=self.group)
        out = out_BHDS.flatten(1, 2).transpose(1, 2).to(original_dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if original_dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class SanaCrossAttnProcessor:
    """Cross-attention of this rank's image tokens to the whole text (every rank holds it). With all
    heads on this rank it is diffusers' own SanaAttnProcessor2_0; with a TP shard of them, that
    processor's computation with the head count taken from the projection width (`shard_heads`)."""

    def __init__(self, ctx: SeqContext, attention=None):
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

        self.whole = SanaAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if local_out_features(attn.to_q) == attn.inner_dim:
            return self.whole(attn, hidden_states, encoder_hidden_states, attention_mask)
        return self.shard_heads(attn, hidden_states, encoder_hidden_states, attention_mask)

    @staticmethod
    def shard_heads(attn, hidden_states, encoder_hidden_states, attention_mask):
        assert encoder_hidden_states is not None, "Sana's attn2 attends to the text"
        B, L, _ = encoder_hidden_states.shape
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = attn.inner_dim // attn.heads
        q_BHSD, k_BHLD, v_BHLD = (t.view(B, -1, t.shape[-1] // head_dim, head_dim).transpose(1, 2)
                                  for t in (query, key, value))
        mask = None
        if attention_mask is not None:
            # [B, 1, L] bias (the model makes it from the 0/1 text mask), the same for every head:
            # broadcast where diffusers repeats it per head.
            assert attention_mask.shape[-1] == L, (tuple(attention_mask.shape), L)
            mask = attention_mask.view(B, 1, -1, L)
        out = F.scaled_dot_product_attention(q_BHSD, k_BHLD, v_BHLD, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def sana_token_grid(model: torch.nn.Module, inputs) -> tuple[int, int]:
    """(rows, columns) of the image tokens: the latent's, in patches."""
    h, w = inputs["hidden_states"].shape[-2:]
    p = model.config.patch_size
    return h // p, w // p


GLU_COL = Colwise(blocks=(1, 1))
"""The Mix-FFN's doubled width, [value, gate] chunked after the depthwise conv: split per half."""

SANA_TP_PLAN = {
    "time_embed.emb.timestep_embedder.linear_1": COL,
    "time_embed.emb.timestep_embedder.linear_2": ROW,
    "time_embed.linear": GATHER,
    "caption_projection.linear_1": COL,
    "caption_projection.linear_2": ROW,
    "transformer_blocks.*.attn[12].to_[qkv]": COL,
    "transformer_blocks.*.attn[12].norm_[qk]": SplitNorm(),
    "transformer_blocks.*.attn[12].to_out.0": ROW,
    "transformer_blocks.*.ff.conv_inverted": GLU_COL,
    "transformer_blocks.*.ff.conv_depth": GLU_COL,
    "transformer_blocks.*.ff.conv_point": Rowwise(),
    # patch_embed, caption_norm, norm_out and proj_out stay replicated (small, per token).
}

SANA_PLAN = ModelPlan(
    attention=Processors({"transformer_blocks.*.attn1": SanaLinearAttnProcessor,
                          "transformer_blocks.*.attn2": SanaCrossAttnProcessor}),
    sequence=SequenceSplit(modules={"patch_embed": SeqDim("image", 1)},
                           gather_modules={"proj_out": SeqDim("image", 1)}),
    grids=RowGrids(
        shapes={"image": sana_token_grid},
        row_args={"transformer_blocks.*": RowsArg("height", "image")},
        stand_ins={"transformer_blocks.*.ff.conv_depth": grid_conv("image")},
    ),
    batch=BatchSplit({"hidden_states": 0, "encoder_hidden_states": 0, "encoder_attention_mask": 0, "timestep": 0}),
    tensor=TensorPlan(SANA_TP_PLAN),
    # SanaPAGPipeline perturbs the self-attention (attn1) of its PAG layers: the perturbed rows run
    # identity attention, the others SanaLinearAttnProcessor (its all-reduced state under a sequence
    # split) without the Q/K norms, as diffusers' PAG processors.
    perturbed=PerturbedPlan(perturbed=ValueIdentityAttention,
                            normal=lambda ctx, attention: SanaLinearAttnProcessor(ctx, attention, qk_norm=False)),
    # A ControlNet's block samples, added to the image tokens: split in the same rows (SANA_CONTROLNET_PLAN).
    residuals=Residuals({"controlnet_block_samples": SeqDim("image", 1)}),
)
# SanaControlNetModel: the same blocks over the same row-split grid (its `patch_embed` embeds the latents
# and the control latents, both split where it returns them); its block samples stay split.
SANA_CONTROLNET_PLAN = replace(
    SANA_PLAN,
    sequence=replace(SANA_PLAN.sequence, gather_modules={}, residual_output=SeqDim("image", 1)),
    batch=BatchSplit({**SANA_PLAN.batch.inputs, "controlnet_cond": 0}, output_dim=None),
    residuals=None, perturbed=None,
)
SANA_CONTROLNET = ControlNetSpec(
    classes=("SanaControlNetModel",), plan=SANA_CONTROLNET_PLAN, denoiser_class="SanaTransformer2DModel",
    match=("in_channels", "num_attention_heads", "attention_head_dim", "num_cross_attention_heads",
           "cross_attention_head_dim", "cross_attention_dim", "caption_channels", "mlp_ratio", "patch_size",
           "sample_size"),
    derive=lambda layers: dict(num_layers=layers),
)
SANA_PIPELINES = pipeline_specs(
    PipelineSpec(cls="SanaPipeline", variants={"pag": "SanaPAGPipeline", "controlnet": "SanaControlNetPipeline"}),
    PipelineSpec(cls="SanaPAGPipeline", pag=True),
    PipelineSpec(cls="SanaControlNetPipeline", inputs=("control_image",), required=("control_image",), controlnet=True),
)


def read_sana_info(configs, *, source: str, pipeline_class: str, default_size: int | None):
    t = configs["transformer"]
    # The DC-AE's scale: 2^(levels-1) over its encoder levels, as SanaPipeline computes it.
    scale = vae_scale(configs["vae"], "encoder_block_out_channels")
    patch = int(t.get("patch_size", 1))
    heads, head_dim = int(t.get("num_attention_heads", 70)), int(t.get("attention_head_dim", 32))
    # What TP splits: self- and cross-attention heads, the Mix-FFN's hidden channels (GLUMBConv's int()).
    widths = (("attention heads", heads), ("cross-attention heads", int(t.get("num_cross_attention_heads", 20))),
              ("Mix-FFN channels", int(float(t.get("mlp_ratio", 2.5)) * heads * head_dim)))
    return dit_info(t, family="sana", source=source, pipeline_class=pipeline_class, default_size=default_size,
                    vae_scale_factor=scale, text_width=t.get("caption_channels", 2304), patch=patch,
                    # SanaPipeline itself refuses sizes that are not multiples of 32, whatever the VAE.
                    spatial_multiple=math.lcm(scale * patch, 32), tp_widths=widths)


def check_sana_tp(info, tp: int) -> None:
    """ValueError unless --tp divides every width TP splits (from the configs, before any weight)."""
    if tp == 1:
        return
    for what, n in info.tp_widths:
        if n % tp:
            ok = [d for d in range(2, 17) if all(m % d == 0 for _, m in info.tp_widths)]
            raise ValueError(
                f"--tp {tp} does not divide the model's {n} {what}; TP degrees that work for this model: "
                + (", ".join(map(str, ok)) if ok else "none (use --ulysses / --ring)")
            )


def check_sana_size(info, parallel, height: int, width: int) -> None:
    """Every sequence-parallel rank needs at least one row of image tokens."""
    sp = parallel.sp
    cell = info.vae_scale_factor * info.patch_size
    if sp > 1 and height // cell < sp:
        least = math.ceil(sp * cell / info.spatial_multiple) * info.spatial_multiple
        raise ValueError(
            f"--height {height} gives {height // cell} rows of image tokens, fewer than the {sp} sequence-parallel "
            f"ranks (--ulysses × --ring) that split them by rows; use --height {least} or more, or fewer ranks"
        )


# ---------------------------------------------------------------- presets

# Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json, DC-AE f32c32, flow DPM-Solver.
SANA_1600M = dict(attention_bias=False, attention_head_dim=32, caption_channels=2304, cross_attention_dim=2240,
                  cross_attention_head_dim=112, dropout=0.0, in_channels=32, interpolation_scale=None, mlp_ratio=2.5,
                  norm_elementwise_affine=False, norm_eps=1e-6, num_attention_heads=70, num_cross_attention_heads=20,
                  num_layers=20, out_channels=32, patch_size=1, sample_size=32)
# Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers: the 1600M block widths, 60 blocks, Q/K RMSNorm across
# all heads — diffusers' scripts/convert_sana_to_diffusers.py, model type SanaMS1.5_4800M_P1_D60 (its
# model_kwargs and the qk_norm it sets for the SANA 1.5 types; interpolation_scale None at 1024 px).
SANA_4800M = {**SANA_1600M, "num_layers": 60, "qk_norm": "rms_norm_across_heads"}
# Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers: 1600M with 128 latent cells a side and sincos
# positions (interpolation scale 2.0 at 4096 px), the same DC-AE; the same conversion script.
SANA_1600M_4K = {**SANA_1600M, "sample_size": 128, "interpolation_scale": 2.0}
SANA_SCHEDULER_CONFIG = dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, algorithm_type="dpmsolver++",
    solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", flow_shift=3.0,
    prediction_type="flow_prediction", use_flow_sigmas=True, timestep_spacing="linspace", steps_offset=0)
SANA_SCHEDULER = ("DPMSolverMultistepScheduler", SANA_SCHEDULER_CONFIG)
# The conversion script shifts the flow by 6.0 for the 4096 px model (3.0 below).
SANA_4K_SCHEDULER = ("DPMSolverMultistepScheduler", {**SANA_SCHEDULER_CONFIG, "flow_shift": 6.0})


def sana_preset(name, description, default_size, transformer, vae, gemma, scheduler=SANA_SCHEDULER) -> PresetSpec:
    return PresetSpec(
        name=name, family="sana", pipeline_class="SanaPipeline", description=description,
        default_size=default_size, scheduler=scheduler,
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
    sana_preset("sana-4.8b",
                "SANA 1.5 4.8B 1024px shapes (60 blocks, Q/K norms, Gemma-2-2B, DC-AE f32), random weights", 1024,
                SANA_4800M, DC_AE_F32C32, GEMMA2_2B),
    sana_preset("sana-1600m-4k",
                "Sana 1600M 4K shapes (128² latent cells, sincos positions, flow shift 6), random weights", 4096,
                SANA_1600M_4K, DC_AE_F32C32, GEMMA2_2B, SANA_4K_SCHEDULER),
    # The 4.8B's features at toy widths (Q/K norms across heads) plus the 4K model's positions, and a DC-AE
    # of scale 32 as the real one, so latent rows are any count (7 rows split 2, 3 and 4 ways unevenly).
    sana_preset("sana-tiny", "tiny Sana for CPU tests: 2 blocks, 2 heads x 8, Q/K norms, positions, DC-AE scale 32",
                256, {**SANA_4800M, "attention_head_dim": 8, "num_attention_heads": 2, "num_layers": 2,
                      "num_cross_attention_heads": 2, "cross_attention_head_dim": 8, "cross_attention_dim": 16,
                      "caption_channels": 32, "in_channels": 8, "out_channels": 8, "sample_size": 8,
                      "interpolation_scale": 1.0},
                TINY_DC_AE_F32, TINY_GEMMA2),
)

def register_cache_blocks() -> None:
    """diffusers' first-block cache hooks need each block class's outputs described (its registry knows
    the other families' blocks): a Sana block returns its image stream alone."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    TransformerBlockRegistry.register(SanaTransformerBlock, TransformerBlockMetadata(return_hidden_states_index=None))


# SanaPipeline takes the same arguments as PixArtSigmaPipeline (prompt, mask-carrying embeddings,
# resolution binning, caption cleaning), so the request → kwargs mappings are PixArt's.
FAMILY = Family(
    name="sana", pipelines=SANA_PIPELINES, plan=SANA_PLAN, read_info=read_sana_info,
    call_kwargs=pixart_call_kwargs, bench_kwargs=pixart_bench_kwargs, presets=PRESETS,
    axes=frozenset({"ulysses", "ring", "cfg", "tp"}), check_tp=check_sana_tp, heads_split=False,
    check_size=check_sana_size, controlnet=SANA_CONTROLNET,
    refusals={"quantize_qkv": "Sana's self-attention is linear: its ranks all-reduce a key-value state and exchange "
                              "no Q, K or V"},
    # --quantize fp8: the blocks' attention linears (the Mix-FFN is convolutions, left as they are); the
    # timestep and caption embedders and the final layer stay in the model's dtype.
    fp8=Fp8Rule(include=("transformer_blocks.*",)), cache_stacks=("transformer_blocks",),
    cache_setup=register_cache_blocks,
)
