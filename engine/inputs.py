"""Image inputs of a request (img2img, inpainting, Fill, Kontext, Control): read, checked, recorded.

A request names its images by path or passes PIL images (`GenerateRequest.image`, `mask_image`,
`control_image`); their types and combinations are checked when it is built (engine/validation.py).
Every rank reads them once, in its request check (engine/request_check.py), before the first
collective (missing, unreadable, not an image: one ValueError line), converts them as the pipelines
expect (images RGB; masks one channel, white = repaint) and records each in the output's metadata by
the hash of its pixels (engine/image_io.py `image_sha256`). `image` may hold several reference images
(a list, in order): each is read, converted and recorded alike, and the records are a list. Another
image input (a ControlNet's conditioning image) is one more entry in `IMAGE_FIELDS` and in the `inputs`
of the pipelines that take it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .image_io import image_sha256
from .validation import FLAGS, IMAGE_FIELDS, LIST_FIELDS

__all__ = ["FLAGS", "IMAGE_FIELDS", "LIST_FIELDS", "count", "default_size", "describe", "each", "fit", "load_image",
           "load_inputs", "record"]


def load_image(value, name: str) -> Image.Image:
    """The image `value` (a path or a PIL image) in the mode its field wants; ValueError naming the flag."""
    mode = IMAGE_FIELDS[name]
    if isinstance(value, Image.Image):
        image = value
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"{FLAGS[name]} {str(value)!r}: no such file")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{FLAGS[name]} {str(value)!r} cannot be read as an image ({e})") from None
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{FLAGS[name]} is an empty image")
    return image if image.mode == mode else image.convert(mode)


def load_inputs(request) -> dict[str, Image.Image | list[Image.Image]]:
    """Field → loaded image (several reference images: the list of them, in order), for the image inputs
    the request has."""
    out = {}
    for name in IMAGE_FIELDS:
        value = getattr(request, name)
        if isinstance(value, list):
            out[name] = [load_image(v, name) for v in value]
        elif value is not None:
            out[name] = load_image(value, name)
    return out


def record(value, image) -> dict | list[dict]:
    """What the PNG metadata says of one input image (of several: a list of records, in order)."""
    if isinstance(image, list):
        return [record(v, im) for v, im in zip(value, image, strict=True)]
    out = {"sha256": image_sha256(image), "size": [image.width, image.height]}
    if not isinstance(value, Image.Image):
        out["path"] = str(value)
    return out


def describe(value) -> str | list | None:
    """An image field in a request's dict form (JSON, compared across ranks): the path, or for a PIL
    image its size and pixel hash (several images: a list of those)."""
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if value is None or not isinstance(value, Image.Image):
        return None if value is None else str(value)
    return f"<PIL {value.mode} {value.width}x{value.height} sha256:{image_sha256(value)[:16]}>"


def count(value) -> int:
    """Images in an image field: 0 (none), 1, or the length of a list of reference images."""
    return 0 if value is None else len(value) if isinstance(value, (list, tuple)) else 1


def each(value, fn):
    """`fn` applied to the image of a field, or to each of its images."""
    return [fn(v) for v in value] if isinstance(value, list) else fn(value)


def default_size(images: dict, multiple: int) -> tuple[int, int] | None:
    """(height, width) of the output when the request gives none: the first input image's size (of
    several reference images, the first's), rounded down to the model's multiple; None without input images."""
    first = next((images[n] for n in IMAGE_FIELDS if n in images), None)
    if isinstance(first, list):
        first = first[0]
    if first is None:
        return None
    height, width = first.height // multiple * multiple, first.width // multiple * multiple
    if not height or not width:
        raise ValueError(f"the input image is {first.width}x{first.height}, smaller than the model's "
                         f"{multiple}-pixel multiple; give --height and --width")
    return height, width


def fit(image: Image.Image, height: int, width: int) -> Image.Image:
    """`image` at the output size (for pipelines that take no height / width: their output has the input's
    size). Lanczos, as diffusers' image processors resize."""
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
