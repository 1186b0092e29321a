"""Command-line pieces for several images per launch: prompts, --num-images, output names.

Images are numbered prompt by prompt (all images of the first prompt, then the second's, ...); image
i gets the seed `--seed + i` and the file `<output stem>-<i:03d>.png`, whatever the number of
processes. One image keeps the plain --output name.
"""

from __future__ import annotations

from pathlib import Path

from .cli_flags import PROMPTS, Flag, complete, positive_int, values
from .config import REQUEST_FLAGS, GenerateRequest
from .limits import DEFAULT_MAX_PROMPT_CHARS, Limits, check_limits, model_limits

DEFAULT_PROMPT = "a red fox in snow"

PROMPT_FLAGS = (
    Flag("prompt", PROMPTS, action="append", default=None, shown=repr(DEFAULT_PROMPT),
         help="prompt; give it several times for several images"),
    Flag("prompts_file", PROMPTS, default=None,
         help="text file with one prompt per line (blank lines skipped), after any --prompt"),
    Flag("num_images", PROMPTS, type=positive_int, default=1,
         help="images per prompt; image i (over all prompts) uses seed --seed + i"),
    Flag("max_prompt_chars", PROMPTS, type=positive_int, default=DEFAULT_MAX_PROMPT_CHARS,
         help="longest prompt (and negative prompt) accepted, in characters (the server's limit too)"),
)
"""Flags of engine.generate alone: what makes its list of requests."""
OUTPUT_FLAGS = (
    Flag("output", PROMPTS, default="out/image.png",
         help="PNG path, missing folders created; several images: <stem>-000.png, <stem>-001.png, …"),
    Flag("overwrite", PROMPTS, action="store_true", default=False, help="replace an existing --output file"),
)


def request_flags() -> tuple[Flag, ...]:
    """GenerateRequest's flags, completed from its fields (defaults, docstrings)."""
    return complete(GenerateRequest, REQUEST_FLAGS)


def flags() -> tuple[Flag, ...]:
    """Every flag of engine.generate that says what to draw, in --help order."""
    return (*PROMPT_FLAGS, *request_flags(), *OUTPUT_FLAGS)


def prompts_from_args(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts-file {args.prompts_file!r} cannot be read: {e}") from None
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file!r} holds no prompt")
    return prompts or [DEFAULT_PROMPT]


def requests_from_args(args, model=None) -> list[GenerateRequest]:
    """One request per image, in image order, each with its own seed; within --max-prompt-chars and, given
    the model (name or description), what its tokenizers take (engine/limits.py: the server's rules)."""
    prompts = prompts_from_args(args)
    every = [p for p in prompts for _ in range(args.num_images)]
    fields = values(args, request_flags())
    requests = [GenerateRequest(prompt=prompt, **{**fields, "seed": args.seed + i}) for i, prompt in enumerate(every)]
    if model is not None:
        limits, takes = Limits(max_steps=None, max_prompt_chars=args.max_prompt_chars), model_limits(model)
        for r in requests:
            check_limits(r, limits, takes, model_name=str(model))
    return requests


def output_names(output: str, n: int) -> list[str]:
    """`out/cat.png` → [`out/cat.png`] for one image, [`out/cat-000.png`, ...] for several."""
    if n == 1:
        return [output]
    p = Path(output)
    return [str(p.with_name(f"{p.stem}-{i:03d}{p.suffix}")) for i in range(n)]
