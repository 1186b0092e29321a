"""Bounds on the work one request may ask for: denoising steps, prompt length, text tokens.

Two kinds of bound, both checked before any rank sees a request (pure: no weights, no collective):
- `Limits`: the operator's, a flag each (the server's --max-steps and --max-prompt-chars; the CLI can
  take the same flags). A request past one is a user error naming the flag, never work that runs for
  hours or grows a worker's memory without end.
- `ModelLimits`: what the served model itself takes, read from its configs by `model_limits(model)`:
  the longest text its tokenizers encode. A `max_sequence_length` beyond it would reach the pipeline
  and be refused there on every rank (or silently truncated).

`check_limits(request, limits, model_limits)` raises ValueError with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_STEPS = 200
DEFAULT_MAX_PROMPT_CHARS = 10_000
TOKENIZER_SANITY = 1_000_000
"""A tokenizer's model_max_length above this is transformers' "no limit" placeholder (1e30), not a length."""


@dataclass(frozen=True)
class Limits:
    """The operator's bounds on one request; None: unbounded."""

    max_steps: int | None = DEFAULT_MAX_STEPS
    """Denoising steps of one image (--max-steps)."""
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS
    """Characters of a prompt or negative prompt (--max-prompt-chars)."""

    def __post_init__(self):
        for name in ("max_steps", "max_prompt_chars"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class ModelLimits:
    """What the model takes (from its configs); None: not known."""

    max_sequence_length: int | None = None
    """The longest text its tokenizers encode, in tokens."""


def model_limits(model) -> ModelLimits:
    """The limits of `model` (a preset, a built-in model or a diffusers directory, or its description),
    from configs only."""
    from engine.loading import resolve_model

    model = resolve_model(model)
    if model.preset is not None:
        from engine.presets import tokenizer as tok

        lengths = [tok.CLIP_MAX_LENGTH if kind == "clip" else tok.T5_MAX_LENGTH if kind == "t5" else tok.CHAT_MAX_LENGTH
                   for kind in model.preset.tokenizers.values()]
    else:
        lengths = _directory_tokenizer_lengths(model.path)
    lengths = [n for n in lengths if isinstance(n, int) and not isinstance(n, bool) and 0 < n < TOKENIZER_SANITY]
    return ModelLimits(max_sequence_length=max(lengths) if lengths else None)


def _directory_tokenizer_lengths(model) -> list:
    import json

    out = []
    for config in sorted(Path(model).glob("tokenizer*/tokenizer_config.json")):
        try:
            out.append(json.loads(config.read_text()).get("model_max_length"))
        except (OSError, ValueError):
            continue  # an unreadable tokenizer config bounds nothing; the pipeline still checks its own
    return out


def check_limits(request, limits: Limits, model: ModelLimits, *, model_name: str = "the model") -> None:
    """ValueError (one line, naming the flag) when `request` asks for more than `limits` or `model` allow."""
    if limits.max_steps is not None and request.steps > limits.max_steps:
        raise ValueError(f"--steps {request.steps} is more than --max-steps {limits.max_steps} allows")
    if limits.max_prompt_chars is not None:
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        for name, text in [*(("prompt", p) for p in prompts), ("negative prompt", request.negative_prompt)]:
            if text is not None and len(text) > limits.max_prompt_chars:
                raise ValueError(f"the {name} has {len(text)} characters, more than --max-prompt-chars "
                                 f"{limits.max_prompt_chars} allows")
    longest = model.max_sequence_length
    if longest is not None and request.max_sequence_length is not None and request.max_sequence_length > longest:
        raise ValueError(f"--max-sequence-length {request.max_sequence_length} is more than {model_name}'s "
                         f"tokenizers take ({longest} tokens); use at most {longest}")
