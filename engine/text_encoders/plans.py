"""Tensor-parallel plans of the text encoders, as data, and how many ranks each one splits over.

A plan maps module paths (dot-separated, `*` / `[qkv]` wildcards per path element, as
`parallelize_module` matches them) to transformers' style names:

- `colwise`: a Linear's output features split (weight rows and bias); the output stays split, feeding
  head-split attention or a `rowwise` Linear.
- `rowwise`: a Linear's input features split; the partial products are all-reduced, the bias
  (replicated) joins once.
- `embedding_rowwise`: an embedding table split by vocabulary rows; each token's row comes from the
  one rank holding it (the others add zeros), all-reduced.
- `colwise_gather_output`: `colwise` with the output all-gathered (an LM head whose logits leave the model).
- `embedding_colwise`: an embedding table split by columns, output kept split — T5's relative-attention
  bias, one column per head, split with the heads.
- `replicated_with_grad_allreduce`: replicated (its gradient rule does not matter for inference).

Models that transformers gives a plan (`model.tp_plan`: Gemma-2, Qwen2.5-VL, Qwen3, Mistral, ...) use
it; T5 and CLIP, which have none, are declared here. Applied with DTensor `parallelize_module`
(engine/text_encoders/sharded.py): a text encoder runs once per request, so DTensor's per-op dispatch
costs little there, unlike in the denoiser (parallel/tensor.py).
"""

from __future__ import annotations

import fnmatch

import torch

T5_ENCODER_PLAN = {
    # `shared` is the same Parameter (tied); only encoder.embed_tokens runs in the encoder's forward.
    "encoder.embed_tokens": "embedding_rowwise",
    "encoder.block.*.layer.0.SelfAttention.[qkv]": "colwise",
    "encoder.block.*.layer.0.SelfAttention.relative_attention_bias": "embedding_colwise",
    "encoder.block.*.layer.0.SelfAttention.o": "rowwise",
    # wi (T5 v1.0) or wi_0 / wi_1 (gated, v1.1 and T5-XXL).
    "encoder.block.*.layer.1.DenseReluDense.wi*": "colwise",
    "encoder.block.*.layer.1.DenseReluDense.wo": "rowwise",
}
CLIP_TEXT_PLAN = {
    "embeddings.token_embedding": "embedding_rowwise",
    "encoder.layers.*.self_attn.[qkv]_proj": "colwise",
    "encoder.layers.*.self_attn.out_proj": "rowwise",
    "encoder.layers.*.mlp.fc1": "colwise",
    "encoder.layers.*.mlp.fc2": "rowwise",
}
PLANS: dict[str, dict[str, str]] = {
    "T5EncoderModel": T5_ENCODER_PLAN,
    "UMT5EncoderModel": T5_ENCODER_PLAN,
    "CLIPTextModel": CLIP_TEXT_PLAN,
    "CLIPTextModelWithProjection": CLIP_TEXT_PLAN,
}
"""Our plans, by transformers class, for the text encoders transformers gives none."""
PREFIXES = ("", "text_model.")
"""Where our plans' paths start: transformers 5 keeps CLIPTextModelWithProjection's tower under
`text_model` and has CLIPTextModel's at the top; the first prefix under which the plan finds modules wins."""

STYLES = ("colwise", "rowwise", "embedding_rowwise", "colwise_gather_output", "embedding_colwise",
          "replicated_with_grad_allreduce")
HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads", "num_heads")
"""Config fields whose counts a split must divide (the heads the colwise projections cut)."""


def plan_of(model: torch.nn.Module) -> dict[str, str] | None:
    """The model's plan: ours, else transformers' own (`tp_plan`), else None (no sharded form)."""
    ours = PLANS.get(type(model).__name__)
    plan = dict(getattr(model, "tp_plan", None) or {})
    if ours is not None:
        names = [n for n, _ in model.named_modules()]
        found = [{f"{pre}{k}": v for k, v in ours.items()} for pre in PREFIXES]
        plan = next((f for f in found if any(style_of(n, f) for n in names)), {})
    unknown = sorted({s for s in plan.values() if s not in STYLES})
    if unknown:
        raise ValueError(f"{type(model).__name__}'s tensor-parallel plan uses styles shardiff does not apply "
                         f"({', '.join(unknown)}); use --text-encoders first or replicated")
    return plan or None


def matches(name: str, pattern: str) -> bool:
    """`parallelize_module`'s rule: the same number of path elements, each matching its wildcard."""
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pats))


def style_of(name: str, plan: dict[str, str]) -> str | None:
    for pattern, style in plan.items():
        if matches(name, pattern):
            return style
    return None


def split_dims(module: torch.nn.Module, style: str) -> dict[str, int]:
    """Parameter (relative to `module`) → the dimension a style splits; unlisted: replicated."""
    if style == "replicated_with_grad_allreduce":
        return {}
    if isinstance(module, torch.nn.Embedding):
        dims = {"embedding_rowwise": 0, "embedding_colwise": 1}
        if style not in dims:
            raise ValueError(f"style {style!r} does not apply to an embedding ({type(module).__name__})")
        return {"weight": dims[style]}
    if not isinstance(module, torch.nn.Linear) or style.startswith("embedding"):
        raise ValueError(f"style {style!r} applies to a Linear, not {type(module).__name__}")
    if style == "rowwise":
        return {"weight": 1}  # the bias stays whole: added once after the reduction
    return {"weight": 0, **({"bias": 0} if module.bias is not None else {})}


def planned(model: torch.nn.Module, plan: dict[str, str]) -> dict[str, int]:
    """Full parameter name → the dimension the plan splits (also on a meta-device model)."""
    out = {}
    for name, module in model.named_modules():
        style = style_of(name, plan)
        if style is not None:
            out |= {f"{name}.{p}": d for p, d in split_dims(module, style).items()}
    return out


def _head_counts(config) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {k: int(getattr(text, k)) for k in HEAD_COUNTS if isinstance(getattr(text, k, None), int)}


def shard_degree(model: torch.nn.Module, plan: dict[str, str], ranks: int) -> int:
    """The most ranks (a divisor of `ranks`) that split every planned dimension and head count evenly;
    1 when none does (the encoder then stays whole on each rank)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    sizes = [params[n].shape[d] for n, d in planned(model, plan).items()]
    sizes += list(_head_counts(model.config).values()) if hasattr(model, "config") else []
    return max(d for d in range(1, ranks + 1) if ranks % d == 0 and all(s % d == 0 for s in sizes))


def local_numel(model: torch.nn.Module, plan: dict[str, str] | None, degree: int) -> int:
    """Parameters one rank holds with the model split `degree` ways (tied parameters counted once)."""
    split = planned(model, plan) if plan and degree > 1 else {}
    # A tied parameter (T5's shared / encoder.embed_tokens) is split if any of its names is.
    is_split: dict[int, bool] = {}
    sizes: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        is_split[id(p)] = is_split.get(id(p), False) or name in split
        sizes[id(p)] = p.numel()
    return sum(n // degree if is_split[k] else n for k, n in sizes.items())


def numel(model: torch.nn.Module) -> int:
    return local_numel(model, None, 1)


def describe_split(ranks: int, degree: int) -> str:
    return "whole" if degree == 1 else f"{degree} ways" + (f" ({ranks // degree} copies)" if degree < ranks else "")

