"""Qwen-Image 2.1 (QwenImage21Transformer2DModel): its plan — block-causal attention under every
sequence split, the prefix's K/V cached per rank — and its configs.

Not a family yet: diffusers 0.42.1 runs this model only through its modular pipeline
(QwenImage21ModularPipeline), which has none of the DiffusionPipeline interface the engine drives
(model_index.json, `from_pipe`, `__call__`); `QwenImage21Pipeline` comes with a later diffusers. The
plan is applied to the transformer directly (`apply_plan`; tests/test_qwen_image21.py), and becomes a
`Family` with presets once the pipeline class exists.

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

KV cache (`kv_cache_mode`, diffusers' prefill "extract" then "cached"): the prefix's activations do not
depend on the step, so its keys and values are computed once. Each rank keeps its share — after
Ulysses' exchange its heads, of its ring chunk (a TP rank: of its heads) — in the processor, keyed by
diffusers' per-layer cache object, which identifies the guidance branch and the layer and lives as
long as the pipeline's loop; cached steps attend the target's queries over it and the target's keys.

TP (all-reduce form): Q/K/V and the SwiGLU's two input projections column-split, to_out and the
SwiGLU's output row-split (diffusers' own `_tp_plan`), plus the shared `modulation` column-split and
gathered, the text projection and the timestep MLP col → row, norm_out's scale column-split and gathered.
"""

from __future__ import annotations

import weakref

import torch

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.block_causal import BlockCausal, PrefixKV
from shardiff_parallel.plan import ModelPlan, Processors, SeqContext, SeqDim, SequenceSplit, TensorPlan
from shardiff_parallel.sharding import take_piece

from .chroma import score_bias
from .hunyuan_image import MASKED
from .mmdit import COL, GATHER, ROW


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
