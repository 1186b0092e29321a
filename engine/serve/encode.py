"""Image files of the server's answers, made on the first rank (off the controller's event loop).

The rank that holds the images encodes them — PNG, JPEG or WebP, with the parameters embedded — and
sends the base64 text, which the controller drops into the JSON answer as it is: a 3 MB image crosses
the worker channel once, as bytes, and the controller neither pickles a PIL image nor compresses it.

Metadata: a PNG carries the CLI's two text chunks (engine/image_io.py); JPEG and WebP carry the same
JSON record in EXIF (ImageDescription). Prompts are bounded there: a prompt longer than
`PROMPT_EXCERPT` characters is kept as its first characters and "…", with the SHA-256 of the whole
prompt beside it (`prompt_sha256`; `negative_prompt_sha256`), so a long prompt never makes a long file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass

FORMATS = ("png", "jpeg", "webp")
PROMPT_EXCERPT = 1000
"""Characters of a prompt kept in an image's metadata and in the answer's parameters."""
EXIF_IMAGE_DESCRIPTION = 0x010E


@dataclass(frozen=True)
class Encoding:
    """How the first rank encodes the images of an HTTP answer."""

    format: str = "png"
    """png, jpeg or webp."""
    quality: int | None = None
    """jpeg / webp: the encoder's quality, 0–100 (OpenAI's output_compression); None: 100 (webp: lossless)."""


def bounded_params(params: dict, excerpt: int = PROMPT_EXCERPT) -> dict:
    """`params` with each prompt cut to `excerpt` characters (and "…"), and the full prompts' SHA-256."""
    out = dict(params)
    for key in ("prompt", "negative_prompt"):
        text = out.get(key)
        if isinstance(text, list):
            text = "\n".join(text)
        if isinstance(text, str):
            out[f"{key}_sha256"] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            if len(text) > excerpt:
                out[key] = text[:excerpt] + "…"
    return out


def image_bytes(image, params: dict, encoding: Encoding) -> bytes:
    """`image` (PIL) as a file of `encoding.format`, with `params` (bounded) embedded."""
    from engine.image_io import png_bytes

    params = bounded_params(params)
    if encoding.format == "png":
        return png_bytes(image, params)
    buffer = io.BytesIO()
    exif = image.getexif()
    exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(params, sort_keys=True, ensure_ascii=True)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if encoding.format == "jpeg":
        rgb.save(buffer, format="JPEG", quality=100 if encoding.quality is None else encoding.quality, exif=exif)
    else:
        options = {"lossless": True} if encoding.quality is None else {"quality": encoding.quality}
        rgb.save(buffer, format="WEBP", exif=exif, **options)
    return buffer.getvalue()


def b64_image(image, params: dict, encoding: Encoding) -> str:
    return base64.b64encode(image_bytes(image, params, encoding)).decode("ascii")


def read_params(data: bytes) -> dict:
    """The parameters embedded in an answer's image file (PNG, JPEG or WebP); ValueError if none."""
    from PIL import Image

    from engine.image_io import read_png_params

    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        description = im.getexif().get(EXIF_IMAGE_DESCRIPTION)
    if fmt == "PNG":
        return read_png_params(io.BytesIO(data))
    if not description:
        raise ValueError(f"this {fmt} image holds no shardiff parameters")
    return json.loads(description)
