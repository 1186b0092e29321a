"""FLUX.2-klein-KV (Flux2KleinKVPipeline): its reference images' keys and values computed once, split over the mesh.

The pipeline's first step runs the transformer with the reference tokens at the head of the image stream
(`hidden_states` [B, S_ref + S_out, 128], `kv_cache_mode="extract"`, `num_ref_tokens` S_ref): they are
modulated as at timestep 0, their queries attend the reference keys only while every other query attends
everything, and their post-rotary K/V are kept; the model drops them before its output. Later steps carry
the target alone (`"cached"`) and attend the kept K/V beside their own — the references' activations do
not depend on the step, so the image is the uncached one.

The split. The reference tokens are their own token group ("reference", counted by `num_ref_tokens`:
parallel/plan/counted.py), split over the sp ranks ahead of the image group's split of the target: each
rank's piece of the stream is [its references, its target tokens], and `num_ref_tokens` becomes its share,
which is what the model reads to blend its per-token modulation, to tell the processors where the
references are and to drop them. The processors below give the mesh's attention every rank's reference run
(`references`: parallel/references.py) and keep this rank's share of their K/V: under Ulysses its heads of
every reference token, under Ring the K/V of its own references (all its heads; TP: its heads). The kept K/V
live as long as diffusers' per-layer cache object that identifies them (a weak key): the model makes new
ones in each request's first step and the pipeline drops them at the end of its call, so a request never
sees another's and starts from none. A cached step before any extraction is an error, not a recomputation.
"""

from __future__ import annotations

import weakref

from shardiff_parallel.attention import ParallelAttention
from shardiff_parallel.block_causal import PrefixKV
from shardiff_parallel.plan import CountedTokens, JointSeqDim, ModelPlan, Processors, SeqContext, SeqDim, SequenceSplit

from ..flux.attention import FluxParallelAttnProcessor
from .attention import Flux2SingleStreamParallelAttnProcessor

JOINT = ("text", "reference", "image")
"""Each rank's joint piece: its text, its reference tokens (first step only), its target tokens."""


class ReferenceKV:
    """One attention module's attention under the KV pipeline's three kinds of call, and its kept K/V."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        self.ctx, self.attention = ctx, attention
        self.kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        """diffusers' layer cache of the request → this rank's share of the references' K/V."""

    def __call__(self, q_BSHD, k_BSHD, v_BSHD, kv_cache, kv_cache_mode, n_text: int, n_references: int):
        sizes = self.ctx.joint_sizes(*JOINT)
        if kv_cache_mode == "cached" and kv_cache is not None:
            if kv_cache not in self.kept:
                raise ValueError("a cached FLUX.2-klein-KV step before its first step kept the references' K/V")
            return self.attention(q_BSHD, k_BSHD, v_BSHD, sizes, prefix=self.kept[kv_cache])
        if kv_cache_mode != "extract" or not n_references:
            return self.attention(q_BSHD, k_BSHD, v_BSHD, sizes)
        # Every rank's reference run: after its text piece (each rank's count from the counted split).
        if self.ctx.sizes:
            spans = tuple(zip(self.ctx.sizes["text"], self.ctx.sizes["reference"]))
        else:
            spans = ((n_text, n_references),)
        keep = None
        if kv_cache is not None:
            keep = self.kept[kv_cache] = PrefixKV()
        return self.attention(q_BSHD, k_BSHD, v_BSHD, sizes, references=spans, keep=keep)


class Flux2KVParallelAttnProcessor(FluxParallelAttnProcessor):
    """The double-stream blocks: diffusers' Flux2KVAttnProcessor under the mesh."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        super().__init__(ctx, attention)
        self.kv = ReferenceKV(ctx, attention)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 kv_cache=None, kv_cache_mode=None, num_ref_tokens=0):
        if attention_mask is not None:
            raise ValueError("shardiff's FLUX.2 attention does not take an attention mask")
        q_BSHD, k_BSHD, v_BSHD = self.project(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        out_BSHD = self.kv(q_BSHD, k_BSHD, v_BSHD, kv_cache, kv_cache_mode, n_text, num_ref_tokens)
        return self.output(attn, out_BSHD.to(q_BSHD.dtype), hidden_states, encoder_hidden_states)


class Flux2KVSingleStreamProcessor(Flux2SingleStreamParallelAttnProcessor):
    """The single-stream blocks: diffusers' Flux2KVParallelSelfAttnProcessor under the mesh."""

    def __init__(self, ctx: SeqContext, attention: ParallelAttention):
        super().__init__(ctx, attention)
        self.kv = ReferenceKV(ctx, attention)

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
                 kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0):
        if attention_mask is not None:
            raise ValueError("shardiff's FLUX.2 attention does not take an attention mask")
        q_BSHD, k_BSHD, v_BSHD, mlp = self.project(attn, hidden_states, image_rotary_emb)
        out_BSHD = self.kv(q_BSHD, k_BSHD, v_BSHD, kv_cache, kv_cache_mode, num_txt_tokens, num_ref_tokens)
        return self.output(attn, out_BSHD.to(q_BSHD.dtype), mlp)


_STREAM = JointSeqDim(("reference", "image"), 1)


def kv_plan(tensor) -> ModelPlan:
    """FLUX.2's plan with the reference group and the KV processors (`tensor`: FLUX.2's TP part)."""
    return ModelPlan(
        attention=Processors({
            "transformer_blocks.*.attn": Flux2KVParallelAttnProcessor,
            "single_transformer_blocks.*.attn": Flux2KVSingleStreamProcessor,
        }),
        counted=CountedTokens(tokens="reference", count="num_ref_tokens", when={"kv_cache_mode": "extract"},
                              each_rank=True),
        sequence=SequenceSplit(
            inputs={"hidden_states": _STREAM, "img_ids": JointSeqDim(("reference", "image"), -2),
                    "encoder_hidden_states": SeqDim("text", 1), "txt_ids": SeqDim("text", -2)},
            # The model drops the references (this rank's share) before its output: the target is left.
            output=SeqDim("image", 1),
        ),
        tensor=tensor,
    )
