"""Command-line pieces for several images per launch: prompts, --num-images, output names.

Images are numbered prompt by prompt (all images of the first prompt, then the second's, ...); image
i gets the seed `--seed + i` and the file `<output stem>-<i:03d>.png`, whatever the number of
processes. One image keeps the plain --output name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import GenerateRequest

DEFAULT_PROMPT = "a red fox in snow"


def auto_or_positive_int(text: str) -> int | None:
    """argparse type of a degree that may be chosen automatically: "auto" → None."""
    return None if text == "auto" else positive_int(text)


def positive_int(text: str) -> int:
    """argparse type of counts and degrees: a clear message instead of a crash deeper down."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts-file", default=None,
                   help="text file with one prompt per line (blank lines skipped), after any --prompt")
    p.add_argument("--num-images", type=positive_int, default=1,
                   help="images per prompt; image i (over all prompts) uses seed --seed + i")
    g = p.add_argument_group("input images and guidance (docs/PIPELINES.md)")
    g.add_argument("--image", default=None,
                   help="input image: img2img on a text-to-image model; the image to inpaint, fill or edit (Kontext)")
    g.add_argument("--mask-image", default=None, help="inpainting mask (white = repaint), with --image")
    g.add_argument("--control-image", default=None,
                   help="control image: of a ControlNet (--controlnet), or of a Flux Control (Canny / Depth) model")
    g.add_argument("--controlnet-scale", type=_scales, default=None,
                   help="ControlNet residual scale, or one per --controlnet comma-separated (default: the pipeline's, 1.0)")
    g.add_argument("--control-mode", type=int, default=None,
                   help="Flux Union ControlNets: the control type, in the ControlNet's own numbering")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting: share of the denoising redone, in (0, 1] (default: the pipeline's)")
    g.add_argument("--pag-scale", type=float, default=None,
                   help="perturbed-attention guidance scale: runs the family's PAG pipeline (SD3, Sana, PixArt-Σ, SD, SDXL)")
    g.add_argument("--keep-image-size", action="store_true",
                   help="Kontext: keep the input image's size instead of the nearest resolution Kontext was trained at")


def _scales(text: str):
    """"0.7" → 0.7; "0.7,0.5" → (0.7, 0.5)."""
    values = tuple(float(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


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


def requests_from_args(args) -> list[GenerateRequest]:
    """One request per image, in image order, each with its own seed."""
    prompts = prompts_from_args(args)
    every = [p for p in prompts for _ in range(args.num_images)]
    return [
        GenerateRequest(
            prompt=prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
            steps=args.steps, guidance=args.guidance, true_cfg_scale=args.true_cfg_scale, seed=args.seed + i,
            max_sequence_length=args.max_sequence_length, image=args.image, mask_image=args.mask_image,
            control_image=args.control_image, strength=args.strength, pag_scale=args.pag_scale,
            keep_image_size=args.keep_image_size, controlnet_scale=args.controlnet_scale,
            control_mode=args.control_mode,
        )
        for i, prompt in enumerate(every)
    ]


def output_names(output: str, n: int) -> list[str]:
    """`out/cat.png` → [`out/cat.png`] for one image, [`out/cat-000.png`, ...] for several."""
    if n == 1:
        return [output]
    p = Path(output)
    return [str(p.with_name(f"{p.stem}-{i:03d}{p.suffix}")) for i in range(n)]
