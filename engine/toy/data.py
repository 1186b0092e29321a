"""A procedural text-to-image dataset: one flat shape on a plain background, with its caption.

    "a small red circle top left on a white background"
    "a blue square bottom right on a yellow background"      (no size word: any size)
    "a large green triangle in the center on a black background"
    "a red circle top left"                                    (no background: white)

Grammar: ``a [small|large] <colour> <shape> <position> [on a <background> background]``, with
colour in COLOURS, shape in SHAPES, position in POSITIONS, background in BACKGROUNDS (never the
shape's own colour). Everything is a pure function of a seed (numpy Generator), and images are
rendered with 4×4 supersampling (anti-aliased edges), so no files and no downloads are involved.

`analyse` holds the pixel statistics that the tests (and the training script's final report) use to
decide whether an image shows what its prompt asked for.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 64

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
BACKGROUNDS = ("white", "black", "gray", "yellow", "blue", "green")
DEFAULT_BACKGROUND = "white"
SHAPES = ("circle", "square", "triangle")
# Caption phrase -> centre (row, column) as a fraction of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.25, 0.75),
    "bottom left": (0.75, 0.25),
    "bottom right": (0.75, 0.75),
    "in the center": (0.5, 0.5),
}
# Size word -> radius range as a fraction of the image side (None: no size word, any size).
SIZES: dict[str | None, tuple[float, float]] = {
    "small": (4.5 / 64, 6.5 / 64),
    "large": (10 / 64, 12 / 64),
    None: (4.5 / 64, 12 / 64),
}
JITTER = 2 / 64  # the centre moves up to this much (fraction of the side) in x and y
# Shape extent relative to the radius, so that the three shapes have similar areas.
SQUARE_HALF_SIDE = 0.9
TRIANGLE_HALF_SIZE = 1.15
P_NO_SIZE = 1 / 3
P_NO_BACKGROUND = 0.15
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str
    size: str | None  # "small", "large" or None (not said: any size)
    says_background: bool  # False: the caption leaves the (white) background out
    radius: float  # pixels
    cy: float  # pixels
    cx: float

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.position, self.background if self.says_background else None,
                       self.size)


def caption(colour: str, shape: str, position: str, background: str | None = None, size: str | None = None) -> str:
    words = ["a"] + ([size] if size else []) + [colour, shape, position]
    if background is not None:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def all_captions() -> list[str]:
    """Every caption `sample_scenes` can produce, in a fixed order."""
    out = []
    for size, colour, shape, position, background in itertools.product(
        [None, "small", "large"], COLOURS, SHAPES, POSITIONS, (None,) + BACKGROUNDS
    ):
        if colour == (background or DEFAULT_BACKGROUND):
            continue
        out.append(caption(colour, shape, position, background, size))
    return out


def sample_scenes(rng: np.random.Generator, n: int, image_size: int = IMAGE_SIZE) -> list[Scene]:
    scenes = []
    for _ in range(n):
        colour = COLOURS[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        says_background = colour == DEFAULT_BACKGROUND or rng.random() >= P_NO_BACKGROUND
        if says_background:
            choices = [b for b in BACKGROUNDS if b != colour]
            background = choices[rng.integers(len(choices))]
        else:
            background = DEFAULT_BACKGROUND
        size = None if rng.random() < P_NO_SIZE else ("small", "large")[rng.integers(2)]
        lo, hi = SIZES[size]
        fy, fx = POSITIONS[position]
        jy, jx = rng.uniform(-JITTER, JITTER, size=2)
        scenes.append(Scene(
            colour=colour, shape=shape, position=position, background=background, size=size,
            says_background=says_background, radius=float(rng.uniform(lo, hi) * image_size),
            cy=float((fy + jy) * image_size), cx=float((fx + jx) * image_size),
        ))
    return scenes


def render(scenes: list[Scene], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 images (N, 3, H, W) of `scenes`, anti-aliased."""
    n = len(scenes)
    if n == 0:
        return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    s = SUPERSAMPLE
    coords = (torch.arange(image_size * s, dtype=torch.float32) + 0.5) / s
    cy = torch.tensor([sc.cy for sc in scenes])[:, None, None]
    cx = torch.tensor([sc.cx for sc in scenes])[:, None, None]
    r = torch.tensor([sc.radius for sc in scenes])[:, None, None]
    dy = coords[None, :, None] - cy
    dx = coords[None, None, :] - cx
    circle = dy**2 + dx**2 <= r**2
    half = SQUARE_HALF_SIDE * r
    square = (dy.abs() <= half) & (dx.abs() <= half)
    t = TRIANGLE_HALF_SIZE * r  # apex at the top, base at the bottom of a 2t x 2t box
    triangle = (dy >= -t) & (dy <= t) & (dx.abs() <= (dy + t) / 2)
    kind = torch.tensor([SHAPES.index(sc.shape) for sc in scenes])[:, None, None]
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).float()
    alpha = torch.nn.functional.avg_pool2d(mask[:, None], s)  # (N, 1, H, W) coverage
    fg = torch.tensor([PALETTE[sc.colour] for sc in scenes], dtype=torch.float32)[:, :, None, None]
    bg = torch.tensor([PALETTE[sc.background] for sc in scenes], dtype=torch.float32)[:, :, None, None]
    return (bg * (1 - alpha) + fg * alpha).round().clamp(0, 255).to(torch.uint8)


def render_chunked(scenes: list[Scene], image_size: int = IMAGE_SIZE, chunk: int = 256) -> torch.Tensor:
    return torch.cat([render(scenes[i:i + chunk], image_size) for i in range(0, len(scenes), chunk)] or
                     [render([], image_size)])


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1], as the VAE sees images."""
    return images_uint8.float() / 127.5 - 1.0


# ---------------------------------------------------------------- what a prompt asks, what an image shows

_PROMPT = re.compile(
    r"^a (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+) (?P<position>top left|top right|bottom left|"
    r"bottom right|in the center)(?: on a (?P<background>\w+) background)?$"
)


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The attributes a caption of this grammar asks for (ValueError for any other prompt)."""
    m = _PROMPT.match(prompt.strip().lower())
    if not m or m["colour"] not in COLOURS or m["shape"] not in SHAPES or (
        m["background"] is not None and m["background"] not in BACKGROUNDS
    ):
        raise ValueError(f"not a prompt of the shapes grammar: {prompt!r}")
    out = m.groupdict()
    out["background"] = out["background"] or DEFAULT_BACKGROUND
    return out


def classify_pixels(image: np.ndarray, max_distance: float = 70.0) -> np.ndarray:
    """(H, W) palette index of each RGB pixel's nearest palette colour, -1 where none is within max_distance."""
    names = list(PALETTE)
    pal = np.array([PALETTE[c] for c in names], dtype=np.float32)
    d = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - pal[None, None], axis=-1)
    idx = d.argmin(-1)
    idx[d.min(-1) > max_distance] = -1
    return idx


def analyse(image: np.ndarray, background: str) -> dict:
    """Pixel statistics of an (H, W, 3) uint8 image whose background should be `background`.

    background_fraction: share of pixels that are the background colour.
    dominant: the most frequent palette colour among the other (classified) pixels, or None.
    dominant_share: its share of all non-background pixels (unclassified ones included).
    dominant_pixels: how many pixels it covers; centre: their centre of mass (row, column) as
    fractions of the image side; fill: their share of their bounding box (circle ≈ 0.79, square ≈ 1,
    triangle ≈ 0.5).
    """
    names = list(PALETTE)
    h, w = image.shape[:2]
    idx = classify_pixels(image)
    bg = idx == names.index(background)
    other = ~bg
    counts = np.bincount(idx[other & (idx >= 0)], minlength=len(names))
    out = dict(background_fraction=float(bg.mean()), dominant=None, dominant_share=0.0, dominant_pixels=0,
               centre=(float("nan"), float("nan")), fill=float("nan"))
    if counts.sum() == 0:
        return out
    k = int(counts.argmax())
    ys, xs = np.nonzero(idx == k)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    out.update(dominant=names[k], dominant_share=float(counts[k] / other.sum()), dominant_pixels=int(counts[k]),
               centre=(float((ys.mean() + 0.5) / h), float((xs.mean() + 0.5) / w)), fill=float(counts[k] / box))
    return out


def check_image(image: np.ndarray, prompt: str) -> list[str]:
    """What is wrong with `image` for `prompt` (empty list: it shows what was asked).

    Thresholds: the asked background covers ≥ 50 % of the image; the asked colour is the dominant
    non-background colour, covers ≥ 50 % of the non-background pixels and ≥ 0.5 % of the image; its
    centre of mass lies in the asked quadrant (≥ 6 % of the side away from the middle lines) or, for
    "in the center", within 12 % of the side of the middle.
    """
    want = parse_prompt(prompt)
    stats = analyse(image, want["background"])
    problems = []
    if stats["background_fraction"] < 0.5:
        problems.append(f"background {want['background']} covers {stats['background_fraction']:.0%} < 50%")
    if stats["dominant"] != want["colour"]:
        problems.append(f"dominant non-background colour is {stats['dominant']}, not {want['colour']}")
    elif stats["dominant_share"] < 0.5:
        problems.append(f"{want['colour']} is only {stats['dominant_share']:.0%} of the non-background pixels")
    if stats["dominant_pixels"] < 0.005 * image.shape[0] * image.shape[1]:
        problems.append(f"only {stats['dominant_pixels']} {stats['dominant']} pixels")
    cy, cx = stats["centre"]
    if want["position"] == "in the center":
        if not (abs(cy - 0.5) <= 0.12 and abs(cx - 0.5) <= 0.12):
            problems.append(f"centre of mass ({cy:.2f}, {cx:.2f}) is not in the center")
    else:
        vertical, horizontal = want["position"].split()
        ok_y = cy <= 0.44 if vertical == "top" else cy >= 0.56
        ok_x = cx <= 0.44 if horizontal == "left" else cx >= 0.56
        if not (ok_y and ok_x):
            problems.append(f"centre of mass ({cy:.2f}, {cx:.2f}) is not {want['position']}")
    return problems
